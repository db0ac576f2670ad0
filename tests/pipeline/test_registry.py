"""The registry, partition keys and artefact paths: bad input fails early, with a message that says what to
fix."""

import dagster as dg
import pytest

from sae_pipeline.partitions import (
    PartitionKeyError,
    check_model_key,
    model_key_for,
    parse_model_stride,
    strides_from_env,
)
from sae_pipeline.registry import DEFAULT_REGISTRY, RegistryError, load_registry
from sae_pipeline.resources import ArtefactStore
from tests.support.pipeline import write_registry


def registry_with(tmp_path, **entry):
    return write_registry(tmp_path / "models.yaml", {"model": "some/model", **entry})


def test_default_registry_lists_the_embedded_model_with_demo_settings():
    registry = load_registry(DEFAULT_REGISTRY)
    entry = registry.get("smollm2-135m")
    assert entry.model == "smollm2-135m" and entry.dataset == "embedded"
    assert entry.train["max_tokens"] <= 50_000 and entry.eval.max_tokens <= 8192
    assert "--layer_stride" not in entry.train_args()


def test_registry_path_comes_from_the_environment(tmp_path, monkeypatch):
    path = registry_with(tmp_path, name="from-env")
    monkeypatch.setenv("SAE_PIPELINE_REGISTRY", str(path))
    assert list(load_registry().entries) == ["from-env"]


BAD_KEYS = ["a|b", "a,b", "a[0]", "b]", "../escape", "a/b", "..", ".hidden", "", "a b", "/abs", "x" * 101]


@pytest.mark.parametrize("name", BAD_KEYS)
def test_model_keys_that_would_break_partition_keys_or_paths_are_rejected(tmp_path, name):
    with pytest.raises(RegistryError, match="invalid model key"):
        load_registry(registry_with(tmp_path, name=name))


def test_model_keys_are_derived_from_hub_ids_and_paths():
    assert model_key_for("EleutherAI/pythia-70m") == "EleutherAI--pythia-70m"
    assert model_key_for("/data/models/tiny-llama/") == "tiny-llama"
    assert model_key_for("smollm2-135m") == "smollm2-135m"
    with pytest.raises(PartitionKeyError):
        model_key_for("org/a|b")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"ctx_length": 64}, "unknown key 'ctx_length' (did you mean 'ctx_len'?)"),
        ({"train": {"save_dir": "/elsewhere"}}, "train.save_dir is set by the artefact store"),
        ({"train": {"hf_token": "hf_x"}}, "HF_TOKEN"),
        ({"train": {"layer_stride": 2}}, "stride partition"),
        ({"train": {"sweep": ["k=16,32"]}}, "train.sweep is set by the entry's `sweep`"),
        ({"train": {"activations": "/cache"}}, "train.activations is set by the pipeline"),
        ({"train": {"k": 0}}, "k must be a positive integer"),
        ({"train": {"expansion_factr": 4}}, "did you mean 'expansion_factor'?"),
        ({"thresholds": {"max_fvu": -1}}, "thresholds.max_fvu must be a non-negative number"),
        ({"thresholds": {"max_fvux": 1}}, "thresholds: unknown key 'max_fvux' (did you mean 'max_fvu'?)"),
        ({"eval": 3}, "`eval` must be a dict, got 3"),
        ({"strides": "2"}, "`strides` must be a list, got '2'"),
        ({"eval": {"max_tokens": 0}}, "eval.max_tokens must be a positive integer"),
        ({"ctx_len": 1}, "`ctx_len` must be an integer >= 2"),
        ({"strides": [0]}, "`strides` must be an integer >= 1"),
        ({"model": ""}, "`model` is required"),
    ],
)
def test_malformed_entries_name_the_file_the_entry_and_the_field(tmp_path, entry, message):
    path = registry_with(tmp_path, **entry)
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    assert message in str(error.value)
    assert str(path) in str(error.value) and "models[0]" in str(error.value)


def test_duplicate_names_missing_files_and_bad_yaml_are_reported(tmp_path):
    same = {"name": "x", "model": "a"}
    duplicates = write_registry(tmp_path / "dup.yaml", same, {**same, "model": "c"})
    with pytest.raises(RegistryError, match="duplicate name 'x'"):
        load_registry(duplicates)
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("models: [unclosed")
    with pytest.raises(RegistryError, match="cannot read it"):
        load_registry(tmp_path / "bad.yaml")
    (tmp_path / "shape.yaml").write_text("- model: a\n")
    with pytest.raises(RegistryError, match="list under `models:`"):
        load_registry(tmp_path / "shape.yaml")


def test_unknown_model_lookup_names_the_registry(tmp_path):
    registry = load_registry(registry_with(tmp_path, name="known"))
    with pytest.raises(RegistryError, match=r"'unknown' is not in the registry .* \(it lists: known\)"):
        registry.get("unknown")


def test_train_options_become_sae_core_flags(tmp_path):
    train = {"k": 16, "normalize_decoder": False, "exclude_tokens": [0, 2], "lr": None}
    entry = load_registry(registry_with(tmp_path, train=train)).get("some--model")
    assert entry.train_args() == [
        "--k",
        "16",
        "--normalize_decoder",
        "false",
        "--exclude_tokens",
        "0",
        "2",
        "--lr",
        "none",
    ]
    from sae_core.run import parse_run_config

    cfg = parse_run_config(["m", *entry.train_args()])
    assert cfg.sae.k == 16 and cfg.sae.normalize_decoder is False and cfg.exclude_tokens == [0, 2]


def test_partition_keys_parse_in_both_forms():
    assert parse_model_stride("tiny|2") == ("tiny", 2)
    assert parse_model_stride(dg.MultiPartitionKey({"model": "tiny", "stride": "4"})) == ("tiny", 4)
    for bad in ("tiny", "tiny|x", "a,b|2", "tiny|0"):
        with pytest.raises(PartitionKeyError):
            parse_model_stride(bad)


def test_strides_are_configurable_from_the_environment(monkeypatch):
    assert strides_from_env() == ["1", "2", "4"]
    monkeypatch.setenv("SAE_PIPELINE_STRIDES", "8, 2,2")
    assert strides_from_env() == ["2", "8"]
    monkeypatch.setenv("SAE_PIPELINE_STRIDES", "2,-1")
    with pytest.raises(PartitionKeyError):
        strides_from_env()


def test_artefact_paths_are_per_partition_and_stay_under_the_root(tmp_path):
    store = ArtefactStore(root=str(tmp_path))
    paths = [
        store.run_dir("m", 1),
        store.run_dir("m", 2),
        store.run_dir("n", 1),
        store.eval_dir("m", 1),
        store.publish_dir("m", 1),
        store.tokenized_dir("m"),
    ]
    assert len(set(paths)) == len(paths)
    assert all(tmp_path.resolve() in p.parents for p in paths)
    for bad in ("..", "../x", "/etc", "a/b"):
        with pytest.raises(PartitionKeyError):
            store.run_dir(bad, 1)
    assert check_model_key("ok-1.2_b") == "ok-1.2_b"


def test_a_run_folder_is_held_by_one_run_at_a_time(tmp_path):
    store = ArtefactStore(root=str(tmp_path))
    folder = store.run_dir("m", 1)
    with store.exclusive(folder):
        with pytest.raises(dg.Failure, match="in use by another run"):
            with store.exclusive(folder):
                pass
        with store.exclusive(store.run_dir("m", 2)):  # another partition is not held up
            pass
    with store.exclusive(folder):  # released at the end of the block
        pass
