"""The activation cache: written once from the LM, read back shuffled, trained from like live activations."""

import json
import sys

import pytest
import torch

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from sae_core.cache import ActivationCache, CachedActivations, write_cache
from sae_core.distributed import DistContext
from sae_core.errors import ConfigError
from sae_core.loggers import Profiler
from tests.support.tiny import tiny_model
from tests.support.training import (
    COMMON,
    Tok,
    check,
    make_trainer,
    params,
    run,
    sae_params,
    token_data,
    torchrun,
)


def cache_of(path, dtype="float32", shard_tokens=37, batch_size=3, data=None, **kw):
    """A cache of token_data() on the tiny model; shards (37 rows) and LM batches (3 sequences of 15 kept
    tokens) end at different rows, so shards straddle batches."""
    write_cache(
        tiny_model(),
        Tok(),
        token_data() if data is None else data,
        path,
        dtype=dtype,
        shard_tokens=shard_tokens,
        batch_size=batch_size,
        progress=False,
        **kw,
    )
    return ActivationCache(path)


def cached_trainer(tmp_path, cache, run_name="cached", resume=False, **kw):
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=4),
        **{"batch_size": 4, "lr_warmup_steps": 2, "save_dir": str(tmp_path), "run_name": run_name, **kw},
    )
    return SaeTrainer(cfg, cache, None, resume=resume, progress=False)


def reader(cache, rank=0, world=1, shuffle_shards=2, seed=0, whole_batch=False):
    return CachedActivations(
        cache,
        hookpoints=cache.hookpoints,
        owners={h: rank for h in cache.hookpoints},
        ctx=DistContext(rank=rank, world_size=world),
        batch_size=2,
        whole_batch=whole_batch,
        seed=seed,
        shuffle_shards=shuffle_shards,
        profiler=Profiler(torch.device("cpu"), enabled=False),
    )


def test_manifest_records_source_tokens_exclusion_and_a_hash_per_shard(tmp_path):
    cache = cache_of(tmp_path / "c", max_tokens=300, source={"model": "tiny", "dataset": "ids"})
    m = cache.manifest
    # 300 tokens of 16-token sequences: the first 19 sequences, BOS (token 0) left out of each.
    assert (m["sequences"], m["ctx_len"], m["tokens"], m["excluded_tokens"]) == (19, 16, 19 * 15, 19)
    assert m["excluded_token_ids"] == [0, 2] and m["complete"] and m["format_version"] == 1
    assert m["model"] == "tiny" and m["d_in"] == 32 and m["dtype"] == "float32"
    assert m["hookpoints"] == ["layers.0", "layers.1", "layers.2"]
    shards = m["shards"]["layers.1"]
    assert [s["rows"] for s in shards] == [37] * 7 + [285 - 7 * 37]
    assert all(len(s["sha256"]) == 64 for s in shards)


def test_training_from_a_float32_cache_in_order_equals_live_training(tmp_path):
    cache = cache_of(tmp_path / "c")
    live = make_trainer(tmp_path, run_name="live")
    live.fit()
    cached = cached_trainer(tmp_path, cache, cache_shuffle_shards=0)
    cached.fit()
    assert cached.total_steps == live.total_steps == 8
    assert cached.tokens_seen == live.tokens_seen
    a, b = params(live), params(cached)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_bfloat16_cache_feeds_the_live_activations_rounded_to_bfloat16(tmp_path):
    cache = cache_of(tmp_path / "c", dtype="bfloat16")
    live = make_trainer(tmp_path, run_name="live").activations
    cached = cached_trainer(tmp_path, cache, cache_shuffle_shards=0).activations
    for index in (0, 5):
        for hookpoint in cache.hookpoints:
            want = live.batch(index).inputs[hookpoint]
            got = cached.batch(index).inputs[hookpoint]
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.equal(got, want.bfloat16().float())


def test_shuffled_reading_is_a_permutation_split_between_ranks_and_a_function_of_the_index(tmp_path):
    cache = cache_of(tmp_path / "c")
    stored = torch.cat([cache.load_shard("layers.2", i) for i in range(len(cache.shards("layers.2")))])
    n_batches = cache.tokens // (2 * 2 * cache.rows_per_sequence)
    ranks = [reader(cache, rank=r, world=2) for r in range(2)]
    seen = torch.cat([ranks[r].batch(i).inputs["layers.2"] for i in range(n_batches) for r in range(2)])
    # Each rank its own share: over the epoch (here every row fits in whole batches) each cached row is read
    # exactly once (as a multiset: two tokens with the same prefix have the same activations).
    assert seen.shape[0] == stored.shape[0] == n_batches * 2 * 2 * 15
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, stored.tolist()))
    # Shuffled across shards: a batch of 30 rows mixes more than one shard of 37 (written in order, two
    # neighbouring shards would give runs of consecutive rows).
    first = ranks[0].batch(0).inputs["layers.2"]
    positions = sorted(int((stored == row).all(-1).nonzero()[0]) for row in first)
    assert positions != list(range(positions[0], positions[0] + len(positions)))
    # The same index gives the same rows, in any order of calls (what an exact resume needs).
    again = reader(cache, rank=0, world=2)
    assert torch.equal(again.batch(5).inputs["layers.2"], ranks[0].batch(5).inputs["layers.2"])
    assert torch.equal(again.batch(0).inputs["layers.2"], first)
    # Another seed, another order.
    assert not torch.equal(reader(cache, rank=0, world=2, seed=1).batch(0).inputs["layers.2"], first)
    # --distribute_layers: the owner reads the whole global batch, i.e. both ranks' shares.
    whole = reader(cache, rank=0, world=2, whole_batch=True).batch(3).inputs["layers.2"]
    assert torch.equal(whole, torch.cat([ranks[r].batch(3).inputs["layers.2"] for r in range(2)]))


def test_nonfinite_rows_are_kept_in_the_cache_and_dropped_when_read(tmp_path):
    model = tiny_model()
    # A token whose embedding is NaN: every activation at its position is NaN.
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    data = token_data()
    data[0, 5] = 7
    write_cache(model, Tok(), data, tmp_path / "c", dtype="float16", shard_tokens=64, progress=False)
    cache = ActivationCache(tmp_path / "c")
    assert cache.manifest["nonfinite_rows"]["layers.0"] >= 1
    batch = reader(cache, shuffle_shards=0).batch(0)
    assert batch.nonfinite["layers.0"] >= 1
    assert batch.inputs["layers.0"].isfinite().all()


def test_resume_from_a_cache_continues_in_the_same_order(tmp_path):
    cache = cache_of(tmp_path / "c")
    full = cached_trainer(tmp_path, cache, run_name="full")
    full.fit()
    part = cached_trainer(tmp_path, cache, run_name="part")
    part.fit(max_steps=3)
    resumed = cached_trainer(tmp_path, ActivationCache(tmp_path / "c"), run_name="part", resume=True)
    assert resumed.step == 3
    resumed.fit()
    a, b = params(full), params(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_profile_of_a_cached_run_times_the_reading(tmp_path):
    cached_trainer(tmp_path, cache_of(tmp_path / "c"), profile=True).fit(max_steps=2)
    timings = json.loads((tmp_path / "cached" / "run.json").read_text())["timings"]
    assert timings["cache_read_s"] > 0 and timings["lm_forward_s"] == 0 and timings["sae_s"] > 0


def test_same_source_and_settings_give_byte_identical_shards(tmp_path):
    cache_of(tmp_path / "a", dtype="float16")
    cache_of(tmp_path / "b", dtype="float16")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 3 * 13
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (
        json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"]
        == json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"]
    )


def test_selection_from_a_cache_and_its_one_line_errors(tmp_path):
    cache = cache_of(tmp_path / "c", layers=[0, 2])
    assert cache.select_hookpoints() == ["layers.0", "layers.2"]
    assert cache.select_hookpoints(layer_stride=2) == ["layers.0", "layers.2"]
    assert cache.select_hookpoints(hookpoints=["layers.2"]) == ["layers.2"]
    with pytest.raises(ConfigError, match=r"layer 1 is not in the cache .*\(layers.0, layers.2\)"):
        cache.select_hookpoints(layers=[1])
    with pytest.raises(
        ConfigError, match="exclude_tokens=\\[5\\] but the cache .* left out the tokens \\[0, 2\\]"
    ):
        cached_trainer(tmp_path, cache, exclude_tokens=[5])
    with pytest.raises(ConfigError, match="other settings \\(dtype differ\\)"):
        cache_of(tmp_path / "c", layers=[0, 2], dtype="float16")


@pytest.mark.slow
def test_cli_cache_then_train_from_it_with_torchrun_data_parallel_and_distributed_layers(
    tmp_path, tiny_model_dir, tiny_text_file
):
    cache_dir = tmp_path / "cache"
    source = [str(tiny_model_dir), str(tiny_text_file), "--ctx_len", "32", "--shuffle_seed", "none"]
    check(
        run(
            [sys.executable, "-m", "sae_core.cache", *source, "--layers", "0", "2", "--max_tokens", "2400"]
            + ["--shard_tokens", "200", "--dtype", "float32", "--out", str(cache_dir), "--device", "cpu"]
        )
    )
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["sequences"] == 75 and manifest["hookpoints"] == ["layers.0", "layers.2"]
    train = [*COMMON, "--activations", str(cache_dir), "--batch_size", "2", "--run_name", "r"]
    single = [
        sys.executable,
        "-m",
        "sae_core",
        *train,
        "--batch_size",
        "4",
        "--save_dir",
        str(tmp_path / "1"),
    ]
    p = run(single)
    check(p)
    assert "training 2 SAEs (layers.0, layers.2)" in p.stdout
    check(run(torchrun(2, *train, "--save_dir", str(tmp_path / "dp"))))
    check(run(torchrun(2, *train, "--distribute_layers", "--save_dir", str(tmp_path / "dl"))))
    reference = sae_params(tmp_path / "1" / "r")
    for mode in ("dp", "dl"):
        got = sae_params(tmp_path / mode / "r")
        assert sorted(got) == sorted(reference)
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-5, msg=f"{mode} {name}")
    # Evaluation's held-out tail starts after every cached sequence (heldout.py reads these fields).
    info = json.loads((tmp_path / "1" / "r" / "run.json").read_text())
    assert info["train_sequences"] == 75 and info["seq_len"] == 32
    assert info["model"] == str(tiny_model_dir) and info["dataset"] == str(tiny_text_file)
    assert info["config"]["activations"] == str(cache_dir) and info["config"]["shuffle_seed"] is None
    from transformers import AutoTokenizer

    from sae_core.heldout import held_out_sequences

    _, settings = held_out_sequences(
        info,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        None,
        split=None,
        offset=None,
        ctx_len=None,
        text_column=None,
        max_tokens=64,
        model_max=None,
        token=None,
    )
    assert settings["offset"] == 75 and settings["dataset"] == str(tiny_text_file)
    p = run([sys.executable, "-m", "sae_core.cache", *source, "--dtype", "float8", "--out", str(cache_dir)])
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].endswith(
        "error: dtype must be one of float16, bfloat16, float32, got 'float8'"
    )


@pytest.mark.slow
def test_torchrun_ranks_write_their_own_shards_of_the_same_rows(tmp_path, tiny_model_dir, tiny_text_file):
    source = [str(tiny_model_dir), str(tiny_text_file), "--ctx_len", "32", "--shuffle_seed", "none"]
    flags = ["--layers", "1", "--max_tokens", "2400", "--batch_size", "2", "--shard_tokens", "100"]
    flags += ["--dtype", "float32", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    check(run([sys.executable, "-m", "sae_core.cache", *source, *flags, "--out", str(one)]))
    cmd = torchrun(2, *source, *flags, "--out", str(two))
    cmd[cmd.index("sae_core")] = "sae_core.cache"
    p = run(cmd)
    check(p)
    assert p.stdout.count("cached 2,325 tokens x 1 hookpoints") == 1  # rank 0 says it
    a, b = ActivationCache(one), ActivationCache(two)
    for key in ("tokens", "excluded_tokens", "sequences", "nonfinite_rows", "hookpoints", "d_in"):
        assert a.manifest[key] == b.manifest[key], key
    assert b.manifest["world_size"] == 2 and len(list(two.glob("progress-rank*.json"))) == 2
    names = [s["file"] for s in b.shards("layers.1")]
    assert names[0] == "rank000-shard-00000.safetensors" and "rank001-shard-00000.safetensors" in names

    def rows(cache):
        return torch.cat([cache.load_shard("layers.1", i) for i in range(len(cache.shards("layers.1")))])

    # The same LM batches, run by two ranks: the same rows, in another order.
    assert sorted(map(tuple, rows(a).tolist())) == sorted(map(tuple, rows(b).tolist()))
