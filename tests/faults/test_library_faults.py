"""Faults injected into real training runs: crash anywhere, lose nothing, load nothing broken."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from sae_core.checkpoint import CheckpointError, latest_complete_step, load_state, state_path
from sae_core.data import DatasetLoadError, load_text_dataset
from tests.support.tiny import tiny_model
from tests.support.training import COMMON, Tok, check, env, run, sae_params, token_data, torchrun

ROOT = Path(__file__).resolve().parents[2]


def cli(data, save_dir, *extra):
    return [
        sys.executable,
        "-m",
        "sae_core",
        *data,
        *COMMON,
        "--batch_size",
        "4",
        "--max_tokens",
        "4000",
        "--save_every",
        "1",
        "--save_dir",
        str(save_dir),
        "--run_name",
        "r",
        *extra,
    ]


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_text_file):
    data = [str(tiny_model_dir), str(tiny_text_file)]
    check(run(cli(data, tmp_path / "full")))
    reference = sae_params(tmp_path / "full" / "r")

    rng = random.Random(1234)
    run_dir = tmp_path / "killed" / "r"
    kills = 0
    for _ in range(3):
        args = cli(data, tmp_path / "killed", *(["--resume"] if (run_dir / "trainer_state").exists() else []))
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until training is under way (a state exists or grows), then kill at a random moment:
        # with --save_every 1 most moments fall inside a checkpoint write.
        before = latest_complete_step(run_dir, 1) or 0
        deadline = time.time() + 120
        while (
            (latest_complete_step(run_dir, 1) or 0) <= before
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        step = latest_complete_step(run_dir, 1)
        assert step is not None
        load_state(state_path(run_dir, 0, step))  # the newest complete checkpoint always loads
        for hook in run_dir.glob("layers.*"):
            load_file(hook / "sae.safetensors")  # and so do the SAE files users read
    assert kills >= 1
    check(run(cli(data, tmp_path / "killed", "--resume")))
    got = sae_params(run_dir)
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_other_within_bounded_time(tmp_path, tiny_model_dir, tiny_text_file):
    import psutil

    data = [str(tiny_model_dir), str(tiny_text_file)]
    args = [
        *data,
        *COMMON,
        "--batch_size",
        "2",
        "--max_tokens",
        "4000",
        "--save_every",
        "2",
        "--save_dir",
        str(tmp_path),
        "--run_name",
        "r",
    ]
    proc = subprocess.Popen(
        torchrun(2, *args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    run_dir = tmp_path / "r"
    deadline = time.time() + 120
    while latest_complete_step(run_dir, 1) is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children() if "sae_core" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    rank1 = next(r for r in ranks if r.environ().get("RANK") == "1")
    t0 = time.time()
    rank1.kill()
    proc.wait(timeout=90)
    elapsed = time.time() - t0
    assert proc.returncode != 0 and elapsed < 90
    for r in ranks:
        assert not r.is_running() or r.status() == psutil.STATUS_ZOMBIE
    # What was saved before the failure resumes, to the end.
    check(run(torchrun(2, *args, "--resume")))
    assert latest_complete_step(run_dir, 1) > 2


def test_disk_full_during_checkpoint_is_a_clear_error_and_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = TrainConfig(
        SaeConfig(expansion_factor=2, k=4), batch_size=4, save_every=2, save_dir=str(tmp_path), run_name="r"
    )
    trainer = SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), progress=False)
    trainer.fit(max_steps=2)
    before = {
        p.name: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file() and p.suffix != ".jsonl"
    }

    import sae_core.utils as utils

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is intact"):
        trainer.fit(max_steps=4)
    monkeypatch.setattr(utils.os, "fsync", real_fsync)
    after = {
        p.name: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file() and p.suffix != ".jsonl"
    }
    assert after == before  # no temp files left, nothing half-written
    assert latest_complete_step(tmp_path / "r", 1) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_trainer_state_is_a_clear_error_naming_the_file(tmp_path, damage):
    cfg = TrainConfig(SaeConfig(expansion_factor=2, k=4), batch_size=4, save_dir=str(tmp_path), run_name="r")
    SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), progress=False).fit(max_steps=1)
    path = state_path(tmp_path / "r", 0, 1)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(os.urandom(2000))
    else:
        torch.save({"some": "other file"}, path)
    with pytest.raises(CheckpointError, match=str(path)) as e:
        SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_state_with_pickled_code_is_refused(tmp_path):
    cfg = TrainConfig(SaeConfig(expansion_factor=2, k=4), batch_size=4, save_dir=str(tmp_path), run_name="r")
    SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), progress=False).fit(max_steps=1)
    path = state_path(tmp_path / "r", 0, 1)
    torch.save(
        {"step": 1, "saes": {}, "evil": Path("/")}, path
    )  # an arbitrary class: weights_only refuses it
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_state(path)


def test_damaged_tokenized_dataset_folder_is_a_clear_error(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4}).save_to_disk(str(tmp_path / "tok"))
    for arrow in (tmp_path / "tok").glob("*.arrow"):
        arrow.write_bytes(b"\x00" * 64)
    with pytest.raises(DatasetLoadError, match=str(tmp_path / "tok")):
        load_text_dataset(str(tmp_path / "tok"))


def test_trust_remote_code_is_off_by_default():
    from sae_core.run import parse_run_config

    assert parse_run_config(["some/model"]).trust_remote_code is False
