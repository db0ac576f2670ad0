"""--shard_latents: a sharded SAE equals the unsharded one (real torchrun gloo ranks), and bad layouts are
refused with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_core import SaeConfig
from sae_core.distributed import DistContext
from sae_core.errors import ConfigError
from sae_core.latent_shards import ShardedSae, ShardLayout, make_layout
from tests.support.processes import free_port
from tests.support.training import env

WORKER = Path(__file__).parents[1] / "support" / "latent_shard_worker.py"


def run_worker(nproc: int, tmp_path: Path, *scenarios: str) -> dict:
    out = tmp_path / "checks.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        str(WORKER),
        *scenarios,
        str(out),
    ]
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
