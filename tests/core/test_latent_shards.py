"""--shard_latents: a sharded SAE equals the unsharded one (real torchrun gloo ranks), and bad layouts are
refused with one line."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from sae_core import Sae, SaeConfig, TrainConfig
from sae_core.distributed import DistContext
from sae_core.errors import CheckpointError, ConfigError
from sae_core.latent_shards import ShardedSae, ShardLayout, make_layout, refuse_incomplete_shard_states
from tests.support.training import COMMON, check, env, run, sae_params, torchrun

WORKER = Path(__file__).parents[1] / "support" / "latent_shard_worker.py"


def run_worker(nproc: int, tmp_path: Path, *scenarios: str) -> dict:
    out = tmp_path / "checks.json"
    cmd = torchrun(nproc, *scenarios, str(out), entry=(str(WORKER),))
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_shards_equal_one_process_forward_gradients_and_steps(tmp_path):
    result = run_worker(2, tmp_path, "steps", "ties", "wide_k")
    assert result["world_size"] == 2 and result["replicas"] == 1
    for rank_checks in result["checks"]:
        # 8 Adam steps with AuxK (dead latents on both shards, one shard, fewer than k_aux, none), ties
        # across shards, k above a shard's share and its positive pre-activations.
        assert rank_checks["params"] == 8 * 4
        assert rank_checks["grad"] == 8 * 3 + 2 * 4
        assert rank_checks["forward_output"] == 8 + 2
        assert rank_checks["latent_acts"] == 2


@pytest.mark.slow
def test_two_replicas_of_two_shards_equal_one_process(tmp_path):
    result = run_worker(4, tmp_path, "replicas")
    assert result["world_size"] == 4 and result["replicas"] == 2
    assert all(rank_checks["params"] == 8 * 4 for rank_checks in result["checks"])


def test_shard_count_must_divide_the_ranks():
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        make_layout(DistContext(rank=0, world_size=3), 2)


def test_shard_count_must_divide_the_latents():
    with pytest.raises(ConfigError, match="does not divide the SAE's 36 latents"):
        ShardedSae.create(12, SaeConfig(num_latents=36, k=4), ShardLayout(shards=8))


# ---------------------------------------------------------------------------------------- the trainer (CLI)
def assert_close_params(a: dict, b: dict, exact: bool = False) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def train_args(tiny_model_dir, tiny_text_file):
    return [str(tiny_model_dir), str(tiny_text_file), *COMMON, "--max_tokens", "2000", "--save_every", "3"]


@pytest.mark.slow
def test_cli_two_replicas_of_two_shards_train_like_one_process_and_resume_exactly(tmp_path, train_args):
    single = tmp_path / "single"
    check(
        run([sys.executable, "-m", "sae_core", *train_args, "--batch_size", "4", "--save_dir", str(single)])
    )
    sharded = [*train_args, "--batch_size", "2", "--shard_latents", "2", "--run_name", "r"]
    check(run(torchrun(4, *sharded, "--save_dir", str(tmp_path / "full"))))
    full = tmp_path / "full" / "r"
    # Whole SAEs in the usual layout (Sae.load reads them), equal to one process on the same global batches.
    assert_close_params(sae_params(full), sae_params(next(single.iterdir())))
    states = sorted(p.name.split("-")[0] for p in (full / "trainer_state").iterdir())
    assert states == ["rank0", "rank1"]  # one state per shard, written by the first replica

    part = tmp_path / "part" / "r"
    proc = subprocess.Popen(
        torchrun(4, *sharded, "--save_dir", str(tmp_path / "part")),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while len(list((part / "trainer_state").glob("rank*-step*.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
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
    check(run(torchrun(4, *sharded, "--save_dir", str(tmp_path / "part"), "--resume")))
    assert_close_params(sae_params(part), sae_params(full), exact=True)

    # Another shard count is refused in one line that says what would work.
    one_process = [*train_args, "--batch_size", "4", "--run_name", "r", "--save_dir", str(tmp_path / "part")]
    p = run([sys.executable, "-m", "sae_core", *one_process, "--resume"])
    assert p.returncode != 0
    assert "the run was saved with --shard_latents 2; resume it with --shard_latents 2" in p.stderr, p.stderr


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
