"""Stopping a training step, politely or not, leaves no torchrun or rank process behind.

A child Python process materializes sae_checkpoints (2 ranks) on a dataset large enough to train for minutes;
once training has started, the test interrupts it (SIGINT: what a run termination delivers to the step) or
kills it outright (SIGKILL: a lost step worker), then checks the process table. Every process of the training
carries the test's own artefact root on its command line, which is how they are found.
"""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.pipeline import MODEL, tiny_entry, write_registry
from tests.support.processes import training_processes, wait_until_gone

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def start_long_training(trained, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    root = tmp_path / "artefacts"
    shutil.copytree(trained.root / "tokenized", root / "tokenized")  # reuse the fixture's tokenized dataset
    entry = tiny_entry(
        Path(trained.entry["model"]),
        Path(trained.entry["dataset"]),
        train={"max_tokens": None, "batch_size": 1, "save_every": 10_000},
    )
    registry = write_registry(tmp_path / "models.yaml", entry)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.run_training", str(root), str(registry), f"{MODEL}|1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = root / "runs" / MODEL / "stride-1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not start:\n" + (process.stdout.read() if process.stdout else ""))
        time.sleep(0.5)
    return process, root, metrics


def test_interrupting_the_step_stops_torchrun_and_every_rank(trained, tmp_path):
    process, root, _ = start_long_training(trained, tmp_path)
    running = training_processes(str(root))
    assert len(running) >= 3, [p.cmdline() for p in running]  # torchrun + 2 ranks
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=90)
    assert "interrupted: stopping torchrun" in output
    left = wait_until_gone(str(root), timeout_s=10)
    assert not left, [p.cmdline() for p in left]


def test_killing_the_step_process_leaves_no_rank_behind(trained, tmp_path):
    process, root, _ = start_long_training(trained, tmp_path)
    assert len(training_processes(str(root))) >= 3
    process.kill()  # no cleanup code runs: the parent-death signals must do it
    process.communicate(timeout=30)
    # torchrun gets SIGTERM from the kernel, and gives its ranks up to 30 s before SIGKILL.
    left = wait_until_gone(str(root), timeout_s=45)
    assert not left, [p.cmdline() for p in left]
