"""kill -9 of a whole 2-rank torchrun job training from the activation cache: `--resume` ends with the SAEs
of an uninterrupted 2-rank run, bit for bit (each rank's share of the shuffled cache, and the position in
it, come back exactly)."""

import json
import subprocess
import time

import psutil
import pytest

from sae_core.cache import write_cache
from sae_core.checkpoint import latest_complete_step
from tests.support.tiny import tiny_model
from tests.support.training import Tok, check, env, run, sae_params, token_data, torchrun


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks at once, as a lost machine would (torch starts ranks in sessions of
    their own, so a process-group kill would miss them)."""
    job = psutil.Process(proc.pid)
    for p in [*job.children(recursive=True), job]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


@pytest.mark.slow
def test_kill_9_of_two_ranks_training_from_the_cache_then_resume_equals_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    write_cache(tiny_model(), Tok(), token_data(n_seq=160), cache, shard_tokens=500, progress=False)
    train = ["--activations", str(cache), "--device", "cpu", "--run_name", "r"]
    train += ["--expansion_factor", "4", "--k", "4", "--batch_size", "2", "--save_every", "1"]
    check(run(torchrun(2, *train, "--save_dir", str(tmp_path / "full"))))

    run_dir = tmp_path / "killed" / "r"
    proc = subprocess.Popen(
        torchrun(2, *train, "--save_dir", str(tmp_path / "killed")),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (latest_complete_step(run_dir, 1) or 0) < 5 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_job(proc)
    killed_at = latest_complete_step(run_dir, 1)
    total = json.loads((tmp_path / "full" / "r" / "run.json").read_text())["total_steps"]
    assert killed_at is not None and 5 <= killed_at < total, (killed_at, total)  # cut in the middle
    check(run(torchrun(2, *train, "--save_dir", str(tmp_path / "killed"), "--resume")))
    full, resumed = sae_params(tmp_path / "full" / "r"), sae_params(run_dir)
    assert sorted(full) == sorted(resumed)
    for name in full:
        assert (full[name] == resumed[name]).all(), name
