"""The activation cache in the pipeline (registry `cache: true`): the cached_activations asset writes it in
launched torchrun ranks, sae_checkpoints trains from it, a second materialization reuses it untouched, a
changed setting writes it again (swapped in whole), and entries without `cache: true` never get one."""

import json
import shutil

import pytest

from sae_pipeline.assets import cached_activations, sae_checkpoints
from sae_pipeline.assets.activations import cache_key, differences
from sae_pipeline.registry import RegistryError, parse_entry
from tests.support.pipeline import MODEL, PARTITION, failure_text, materialize, resources_for, write_registry


def metadata_of(result, asset: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    assert len(events) == 1, [e.asset_key for e in result.get_asset_materialization_events()]
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def shard_stamps(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture
def cached_root(trained, tmp_path):
    """A fresh artefact root holding the trained fixture's tokenized dataset, and a registry whose entry asks
    for a cache (fp16, to tell a rewrite from a reuse by the dtype too)."""
    root = tmp_path / "artefacts"
    shutil.copytree(trained.root / "tokenized", root / "tokenized")
    entry = {**trained.entry, "cache": True, "cache_dtype": "float16"}
    registry = write_registry(tmp_path / "models.yaml", entry)
    return root, entry, resources_for(root, registry)


def test_the_cache_is_written_in_launched_ranks_trained_from_reused_and_rewritten_when_a_setting_changes(
    trained, cached_root, tmp_path
):
    root, entry, resources = cached_root
    cache = root / "activations" / MODEL / "stride-2"
    run_json = root / "runs" / MODEL / "stride-2" / "run.json"

    # The cache asset writes the cache in 2 torchrun ranks; training reads it (no LM forward).
    first = materialize([cached_activations], PARTITION, trained.instance, resources)
    assert first.success, failure_text(first)
    meta = metadata_of(first, "cached_activations")
    assert meta["path"] == str(cache) and meta["reused"] is False and meta["reason"] == "no cache yet"
    assert meta["hookpoints"] == ["layers.0", "layers.2"] and meta["dtype"] == "float16"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2  # written by 2 torchrun ranks
    assert meta["tokens"] == manifest["tokens"] > 0 and meta["disk_bytes"] > 0
    logs = [r.user_message for r in trained.instance.all_logs(first.run_id) if r.user_message]
    assert any("-m sae_pipeline.cache_entry" in m and "--nproc-per-node 2" in m for m in logs)
    train = materialize([sae_checkpoints], PARTITION, trained.instance, resources)
    assert train.success, failure_text(train)
    meta = metadata_of(train, "sae_checkpoints")
    assert meta["activations"] == str(cache) and meta["cache_reused"] is True and meta["world_size"] == 2
    run = json.loads(run_json.read_text())
    assert run["config"]["activations"] == str(cache) and run["steps"] > 0
    stamps = shard_stamps(cache)
    assert len(stamps) >= 2

    # Materializing the cache again reuses it: not a byte is written.
    again = materialize([cached_activations], PARTITION, trained.instance, resources)
    assert again.success, failure_text(again)
    meta = metadata_of(again, "cached_activations")
    assert meta["reused"] is True and meta["reason"] == "its settings match"
    assert shard_stamps(cache) == stamps
    assert (cache / "manifest.json").read_text() == json.dumps(manifest, indent=2) + "\n"

    # Another storage dtype, and training alone selected: it writes the cache again itself (into a staging
    # folder, swapped in whole), reports that as a materialization of cached_activations, trains from it.
    changed = write_registry(tmp_path / "bf16.yaml", {**entry, "cache_dtype": "bfloat16"})
    resources = {**resources, "registry": resources_for(root, changed)["registry"]}
    rewrite = materialize([sae_checkpoints], PARTITION, trained.instance, resources)
    assert rewrite.success, failure_text(rewrite)
    meta = metadata_of(rewrite, "cached_activations")
    assert meta["reused"] is False and meta["reason"] == "dtype changed" and meta["dtype"] == "bfloat16"
    assert json.loads((cache / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((cache / "pipeline.json").read_text())["dtype"] == "bfloat16"
    assert metadata_of(rewrite, "sae_checkpoints")["cache_reused"] is False
    assert json.loads(run_json.read_text())["config"]["activations"] == str(cache)
    assert sorted(p.name for p in cache.parent.iterdir() if p.name.startswith(".")) == [
        ".stride-2.lock"
    ]  # no staging or old folder left behind


def test_an_entry_without_cache_gets_no_cache_and_trains_as_before(trained, tmp_path):
    result = materialize([cached_activations], PARTITION, trained.instance, trained.resources)
    assert result.success, failure_text(result)
    assert result.get_asset_materialization_events() == []  # skipped: no materialization, no launch
    logs = [r.user_message for r in trained.instance.all_logs(result.run_id) if r.user_message]
    assert any(
        "no activation cache for tiny, stride 2: its registry entry's `cache: true` is not set" in m
        for m in logs
    )
    assert not (trained.root / "activations").exists()
    meta = {
        k: v.value
        for k, v in trained.train.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    assert "activations" not in meta
    run = json.loads((trained.root / "runs" / MODEL / "stride-2" / "run.json").read_text())
    assert run["config"]["activations"] is None


def test_the_reuse_rule_compares_the_source_and_accepts_a_larger_cache():
    entry = parse_entry({"model": "m", "cache": True, "train": {"max_tokens": 1000}})
    tokenized = {"dataset_fingerprint": "abc", "sequences": 10, "dagster_run_id": "run-1"}
    wanted = cache_key(entry, 2, tokenized, 1000)
    assert differences(wanted, wanted) == []
    # Retokenized into the same data by another run: still the same cache.
    assert differences(cache_key(entry, 2, {**tokenized, "dagster_run_id": "run-2"}, 1000), wanted) == []
    assert differences({**wanted, "max_tokens": 5000}, wanted) == []  # more tokens than asked for
    assert differences({**wanted, "max_tokens": None}, wanted) == []  # all of them
    assert differences({**wanted, "max_tokens": 500}, wanted) == ["max_tokens"]
    assert differences(wanted, cache_key(entry, 2, tokenized, None)) == ["max_tokens"]
    other = parse_entry({"model": "m", "cache": True, "train": {"dtype": "bfloat16"}})
    assert differences(wanted, cache_key(other, 4, {**tokenized, "sequences": 11}, 1000)) == [
        "source_options",
        "tokenized",
        "stride",
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cache", "yes", "`cache` must be true or false, got 'yes'"),
        ("cache_dtype", "fp8", "`cache_dtype` must be one of float16, bfloat16, float32, got 'fp8'"),
        ("cach", True, "unknown key 'cach' (did you mean 'cache'?)"),
    ],
)
def test_bad_cache_settings_fail_the_registry_in_one_line(field, value, message):
    with pytest.raises(RegistryError) as error:
        parse_entry({"model": "m", field: value}, "models[0]")
    assert str(error.value) == f"models[0] ('m'): {message}"
