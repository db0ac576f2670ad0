"""Stopping a training step, politely or not, leaves no torchrun or rank process behind.

A child Python process materializes sae_checkpoints (2 ranks) on a dataset large enough to train for minutes;
once training has started, the test interrupts it (SIGINT: what a run termination delivers to the step) or
kills it outright (SIGKILL: a lost step worker), then checks the process table. Every process of the training
carries the test's own artefact root on its command line, which is how they are found.

An interrupted step is up for retry (Dagster applies the step's retry policy to interrupts too): in this
in-process materialization the retry starts training again. The interrupt test therefore checks the processes
of the launch it interrupted, as soon as they should be gone, and does not wait for the retry to train.
"""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.pipeline import MODEL, tiny_entry, write_registry
from tests.support.processes import training_processes, wait_until_gone

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def start_long_training(trained, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start the child; return it once training has logged a step, with its artefact root and output file."""
    root = tmp_path / "artefacts"
    shutil.copytree(trained.root / "tokenized", root / "tokenized")  # reuse the fixture's tokenized dataset
    entry = tiny_entry(
        Path(trained.entry["model"]),
        Path(trained.entry["dataset"]),
        train={"max_tokens": None, "batch_size": 1, "save_every": 10_000},
    )
    registry = write_registry(tmp_path / "models.yaml", entry)
    output = tmp_path / "output.log"  # a file, so it can be read while the child runs
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.run_training", str(root), str(registry), f"{MODEL}|1"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    metrics = root / "runs" / MODEL / "stride-1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not start:\n" + output.read_text()[-5000:])
        time.sleep(0.5)
    return process, root, output


def test_interrupting_the_step_stops_torchrun_and_every_rank(trained, tmp_path):
    process, root, output = start_long_training(trained, tmp_path)
    # The launch: torchrun and its 2 ranks (the child itself has the root on its command line too).
    running = [p for p in training_processes(str(root)) if p.pid != process.pid]
    assert len(running) >= 3, [p.cmdline() for p in running]
    try:
        process.send_signal(signal.SIGINT)
        # The step stops torchrun's whole tree (SIGTERM; SIGKILL after 45 s) before it fails, so every process
        # of the interrupted launch ends in that time, and the step says so.
        _, alive = psutil.wait_procs(running, timeout=50)
        assert not alive, [p.cmdline() for p in alive]
        deadline = time.monotonic() + 10
        while "interrupted: stopping torchrun" not in output.read_text():
            assert time.monotonic() < deadline, output.read_text()[-5000:]
            time.sleep(0.2)
    finally:
        # The step's retry may be training by now: the child goes, and the parent-death signals stop the rest
        # (as in the next test).
        process.kill()
        process.wait(timeout=30)
        left = wait_until_gone(str(root), timeout_s=45)
    assert not left, [p.cmdline() for p in left]


def test_killing_the_step_process_leaves_no_rank_behind(trained, tmp_path):
    process, root, _ = start_long_training(trained, tmp_path)
    assert len([p for p in training_processes(str(root)) if p.pid != process.pid]) >= 3  # torchrun + 2 ranks
    process.kill()  # no cleanup code runs: the parent-death signals must do it
    process.wait(timeout=30)
    # torchrun gets SIGTERM from the kernel, and gives its ranks up to 30 s before SIGKILL.
    left = wait_until_gone(str(root), timeout_s=45)
    assert not left, [p.cmdline() for p in left]
