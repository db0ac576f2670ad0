"""--shard_latents: a sharded SAE equals the unsharded one (real torchrun gloo ranks), also trained from a
cache and in sweeps; it resumes exactly and with another shard count; bad layouts are refused in one line."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from sae_core import Sae, SaeConfig, SaeTrainer, TrainConfig
from sae_core import checkpoint as ckpt
from sae_core.cache import ActivationCache, write_cache
from sae_core.distributed import DistContext
from sae_core.errors import CheckpointError, ConfigError
from sae_core.latent_shards import (
    ShardedSae,
    ShardLayout,
    make_layout,
    newest_shard_step,
    prune_other_layouts,
    refuse_incomplete_shard_states,
    reshard_state,
)
from sae_core.sweep import SweepTrainer
from tests.support.latent_shard_worker import (
    STOP_AT,
    SWEEP,
    live_trainer,
    trainer_config,
    twin_config,
    twin_flags,
)
from tests.support.tiny import tiny_model
from tests.support.training import Tok, check, env, make_trainer, run, sae_params, token_data, torchrun

WORKER = Path(__file__).parents[1] / "support" / "latent_shard_worker.py"


def run_worker(nproc: int, folder: Path, *scenarios: str) -> dict:
    out = folder / "checks.json"
    cmd = torchrun(nproc, *scenarios, str(out), entry=(str(WORKER),))
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(out.read_text())


def assert_close_params(a: dict, b: dict, exact: bool = False) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A float32 cache of layers 0 and 2 of the tiny model on 128 sequences of 16 tokens (32 steps of 4)."""
    folder = tmp_path_factory.mktemp("shard-cache") / "cache"
    data = token_data(n_seq=128)
    write_cache(
        tiny_model(), Tok(), data, folder, layers=[0, 2], dtype="float32", shard_tokens=100, progress=False
    )
    return folder


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    """One launch of 2 ranks (1 replica x 2 shards) for every 2-rank scenario of the worker: the ShardedSae
    against one process, and the trainers' runs (the folder holds them)."""
    work = tmp_path_factory.mktemp("two-ranks")
    shutil.copytree(cache_dir, work / "cache")
    # An unsharded run stopped at a checkpoint, for the worker to resume with 2 shards.
    unsharded = SaeTrainer(
        trainer_config(work / "sharded", "up"), ActivationCache(cache_dir), None, progress=False
    )
    unsharded.fit(max_steps=STOP_AT)
    return work, run_worker(2, work, "steps", "ties", "wide_k", "trainers")


def unsharded_from_cache(cache_dir: Path, save_dir: Path, run_name: str = "run", **kw) -> SaeTrainer:
    trainer = SaeTrainer(
        trainer_config(save_dir, run_name, **kw), ActivationCache(cache_dir), None, progress=False
    )
    trainer.fit()
    return trainer


@pytest.mark.slow
def test_two_shards_equal_one_process_forward_gradients_and_steps(two_ranks):
    _, result = two_ranks
    assert result["world_size"] == 2 and result["replicas"] == 1
    for rank_checks in result["checks"]:
        # 8 Adam steps with AuxK (dead latents on both shards, one shard, fewer than k_aux, none), ties
        # across shards, k above a shard's share and its positive pre-activations.
        assert rank_checks["params"] == 8 * 4
        assert rank_checks["grad"] == 8 * 3 + 2 * 4
        assert rank_checks["forward_output"] == 8 + 2
        assert rank_checks["latent_acts"] == 2


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    """One launch of 4 ranks (2 replicas x 2 shards): the ShardedSae against one process, and the run the CLI
    test launches, trained without the CLI (`twin`)."""
    work = tmp_path_factory.mktemp("four-ranks")
    shutil.copytree(cache_dir, work / "cache")
    return work, run_worker(4, work, "replicas", "twin")


@pytest.mark.slow
def test_two_replicas_of_two_shards_equal_one_process(four_ranks):
    _, result = four_ranks
    assert result["world_size"] == 4 and result["replicas"] == 2
    assert all(rank_checks["params"] == 8 * 4 for rank_checks in result["checks"])


@pytest.mark.slow
def test_two_shards_train_from_a_cache_like_one_process_and_resume_exactly(two_ranks, cache_dir, tmp_path):
    work, _ = two_ranks
    reference = unsharded_from_cache(cache_dir, tmp_path)
    assert reference.dead_threshold == 51 and reference.total_steps == 8
    full = sae_params(work / "sharded" / "full")
    assert_close_params(full, sae_params(reference.run_dir))
    # Stopped at a checkpoint and resumed (each shard its own state): bit for bit the uninterrupted run.
    assert_close_params(sae_params(work / "sharded" / "part"), full, exact=True)
    states = sorted(p.name for p in (work / "sharded" / "part" / "trainer_state").iterdir())
    assert states == ["rank0-step000000008.pt", "rank1-step000000008.pt"]


@pytest.mark.slow
def test_a_resume_with_another_shard_count_reshards_the_trainer_state(two_ranks, cache_dir, tmp_path):
    work, _ = two_ranks
    # 1 -> 2: the unsharded run stopped at step 3 (schedule-free Adam), finished by 2 shards.
    reference = unsharded_from_cache(cache_dir, tmp_path)
    up = work / "sharded" / "up"
    assert sorted(p.name for p in (up / "trainer_state").iterdir()) == [
        "rank0-step000000008.pt",
        "rank1-step000000008.pt",
    ]
    assert_close_params(sae_params(up), sae_params(reference.run_dir))
    # 2 -> 1: a live run with Adam stopped at step 3 by 2 shards, finished here in one process.
    down = tmp_path / "down"
    shutil.copytree(work / "sharded" / "stopped", down / "stopped")
    resumed = live_trainer(trainer_config(down, "stopped", optimizer="adam"), resume=True)
    assert resumed.step == STOP_AT
    resumed.fit()
    alone = live_trainer(trainer_config(tmp_path / "alone", "stopped", optimizer="adam"))
    alone.fit()
    assert_close_params(sae_params(resumed.run_dir), sae_params(alone.run_dir))
    for hookpoint, sae in resumed.saes.items():
        state, want = (
            resumed.optimizers[hookpoint].parts["adam"].state,
            alone.optimizers[hookpoint].parts["adam"],
        )
        for p, q in zip(sae.parameters(), alone.saes[hookpoint].parameters()):
            torch.testing.assert_close(
                state[p]["exp_avg_sq"], want.state[q]["exp_avg_sq"], rtol=1e-3, atol=1e-9
            )
        assert torch.equal(resumed.tokens_since_fired[hookpoint], alone.tokens_since_fired[hookpoint])
    # Shard 1's old state went once the new layout had saved a newer step.
    assert sorted(p.name for p in (resumed.run_dir / "trainer_state").iterdir()) == ["rank0-step000000008.pt"]


@pytest.mark.slow
def test_a_sweep_shards_every_variant_like_its_unsharded_sweep(two_ranks, cache_dir, tmp_path):
    work, result = two_ranks
    # A sweep with a variant of 63 latents was refused in one line naming it (the worker checked the line).
    assert all(rank_checks.get("refused_variant") == 1 for rank_checks in result["checks"])
    reference = SweepTrainer(
        trainer_config(tmp_path, "sweep"), ActivationCache(cache_dir), None, sweep=SWEEP, progress=False
    )
    reference.fit()
    assert reference.variants == ["expansion_factor2", "expansion_factor4"]
    for variant in reference.variants:
        got = sae_params(work / "sharded" / "sweep" / variant)
        assert got["layers.0/W_dec"].shape[0] == 32 * int(variant[-1])
        assert_close_params(got, sae_params(tmp_path / "sweep" / variant))


def test_shard_count_must_divide_the_ranks():
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        make_layout(DistContext(rank=0, world_size=3), 2)


def test_shard_count_must_divide_the_latents():
    with pytest.raises(ConfigError, match="does not divide the SAE's 36 latents"):
        ShardedSae.create(12, SaeConfig(num_latents=36, k=4), ShardLayout(shards=8))


# ---------------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_two_replicas_of_two_shards_from_a_cache_train_like_one_process_and_resume_exactly(
    four_ranks, cache_dir, tmp_path
):
    work, _ = four_ranks
    single = twin_config(tmp_path / "single", batch_size=4, shard_latents=1)
    reference = SaeTrainer(single, ActivationCache(cache_dir), None, progress=False)
    reference.fit()
    # The 4 ranks' run trained without the CLI (TWIN): whole SAEs in the usual layout (Sae.load reads them),
    # equal to one process on the same global batches.
    uninterrupted = sae_params(work / "twin" / "r")
    assert_close_params(uninterrupted, sae_params(reference.run_dir))

    part = tmp_path / "part" / "r"
    sharded = ["--device", "cpu", "--activations", str(cache_dir), *twin_flags(), "--run_name", "r"]
    sharded += ["--save_dir", str(part.parent)]
    proc = subprocess.Popen(
        torchrun(4, *sharded),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while len(list((part / "trainer_state").glob("rank*-step*.pt"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    # One rank (shard 1 of replica 1) dies mid-run: the others must not wait for it forever.
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "3"]
    assert len(ranks) == 1
    killed_at = time.monotonic()
    ranks[0].kill()
    try:
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left, had the wait timed out
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60
    saved_steps = [int(p.stem.split("step")[1]) for p in (part / "trainer_state").glob("rank*-step*.pt")]
    assert max(saved_steps) < reference.total_steps  # killed mid-run, not after the last step
    check(run(torchrun(4, *sharded, "--resume")))
    assert_close_params(sae_params(part), uninterrupted, exact=True)
    states = sorted(p.name.split("-")[0] for p in (part / "trainer_state").iterdir())
    assert states == ["rank0", "rank1"]  # one state per shard, written by the first replica

    # One process cannot continue 2 data-parallel replicas: refused in one line that says what would work.
    with pytest.raises(
        ConfigError,
        match=r"saved on 4 ranks \(2 data-parallel replicas x --shard_latents 2\); resume it on 2 x N ranks",
    ):
        SaeTrainer(replace(single, save_dir=str(part.parent)), ActivationCache(cache_dir), None, resume=True)


def test_shard_latents_refuses_distribute_layers_and_muon():
    with pytest.raises(ConfigError, match="cannot be combined"):
        TrainConfig(shard_latents=2, distribute_layers=True)
    with pytest.raises(ConfigError, match="does not support --optimizer muon"):
        TrainConfig(shard_latents=2, optimizer="muon")
    with pytest.raises(ConfigError, match="not supported with --transcode, --skip_connection or --finetune"):
        TrainConfig(SaeConfig(transcode=True), shard_latents=2)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_create_builds_exactly_the_shards_of_the_seeded_sae_without_building_it(monkeypatch, dtype):
    monkeypatch.setattr("sae_core.latent_shards.INIT_BLOCK_ELEMENTS", 7 * 12)  # blocks cut across shards
    cfg = SaeConfig(num_latents=36, k=4)
    torch.manual_seed(5)
    whole = Sae(12, cfg, dtype=dtype)
    after_whole = torch.rand(3)
    for shard in range(3):
        torch.manual_seed(5)
        sharded = ShardedSae.create(12, cfg, ShardLayout(shards=3, shard_rank=shard), dtype=dtype)
        assert torch.equal(torch.rand(3), after_whole)  # the generator ends where Sae's does
        expected = ShardedSae.from_whole(whole, ShardLayout(shards=3, shard_rank=shard))
        for (name, p), (_, q) in zip(sharded.named_parameters(), expected.named_parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q), name


def test_a_missing_shard_state_is_named(tmp_path):
    states = tmp_path / "trainer_state"
    states.mkdir()
    for name in ("rank0-step000000003.pt", "rank0-step000000006.pt", "rank1-step000000006.pt"):
        (states / name).write_bytes(b"")
    (states / "rank1-step000000006.pt").unlink()  # shard 1's newest state lost; its step 3 was pruned
    with pytest.raises(CheckpointError, match=r"step 6, lacks rank1-step000000006.pt\); restore"):
        refuse_incomplete_shard_states(tmp_path, 2)


def test_resume_takes_the_newest_step_that_every_shard_of_its_layout_completed(tmp_path):
    def save(rank: int, step: int, shards: int) -> None:
        state = {"step": step, "saes": {}, "config": json.dumps({"shard_latents": shards})}
        ckpt.save_state(tmp_path, rank, step, state)

    save(0, 3, 2)
    save(1, 3, 2)
    save(0, 6, 2)  # shard 1 died before saving step 6
    assert newest_shard_step(tmp_path) == (3, 2)
    save(0, 9, 1)  # resumed with 1 shard: its step needs rank 0 alone
    assert newest_shard_step(tmp_path) == (9, 1)
    prune_other_layouts(tmp_path, 1, 9)
    assert sorted(p.name for p in (tmp_path / "trainer_state").iterdir()) == [
        "rank0-step000000003.pt",  # (pruned by rank 0 itself, ckpt.prune_states)
        "rank0-step000000006.pt",
        "rank0-step000000009.pt",
    ]
    for path in (tmp_path / "trainer_state").iterdir():
        path.unlink()
    save(0, 6, 2)
    with pytest.raises(CheckpointError, match=r"step 6, lacks rank1-step000000006.pt\); restore"):
        newest_shard_step(tmp_path)


def tensors(obj, path=()):
    """(path, tensor) of every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors(value, (*path, i))


def test_resharding_a_state_into_shards_and_back_gives_it_again_and_shards_must_agree(tmp_path):
    trainer = make_trainer(tmp_path, layers=[1])
    trainer.fit(max_steps=2)
    whole = ckpt.load_state(ckpt.state_path(trainer.run_dir, 0, 2))
    names = [name for name, _ in trainer.saes["layers.1"].named_parameters()]
    halves = [reshard_state([whole], ShardLayout(shards=2, shard_rank=r), names, "here") for r in range(2)]
    assert halves[1]["saes"]["layers.1"]["W_dec"].shape == (64, 32)
    assert json.loads(halves[0]["config"])["shard_latents"] == 2
    again = reshard_state(halves, ShardLayout(), names, "here")
    assert json.loads(again["config"]) == json.loads(whole["config"])
    want = dict(tensors(whole))
    got = dict(tensors(again))
    assert sorted(got) == sorted(want) and len(got) == 4 + 4 * 2 + 1  # SAE, z and v, counters
    for path, value in got.items():
        assert torch.equal(value, want[path]), path
    halves[1]["saes"]["layers.1"]["b_dec"] += 1e-3
    with pytest.raises(CheckpointError, match="here: shard 1's layers.1 b_dec differs from shard 0's"):
        reshard_state(halves, ShardLayout(), names, "here")
