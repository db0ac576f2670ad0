"""Faults around the activation cache: broken or foreign caches are refused in one line; a killed writer
resumes to the same bytes; a second writer is turned away."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sae_core.cache import ActivationCache, open_for_run, write_cache
from sae_core.config import RunConfig
from sae_core.errors import ConfigError, DatasetLoadError, SaeCoreError
from tests.support.tiny import tiny_model
from tests.support.training import Tok, env, token_data


@pytest.fixture
def cache_dir(tmp_path):
    out = tmp_path / "cache"
    write_cache(
        tiny_model(),
        Tok(),
        token_data(),
        out,
        dtype="float16",
        shard_tokens=100,
        source={"model": "tiny-llama", "dataset": "ids"},
        progress=False,
    )
    return out


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_a_missing_shard_is_named(cache_dir):
    (cache_dir / "layers.1" / "shard-00002.safetensors").unlink()
    with pytest.raises(DatasetLoadError, match=r"layers.1/shard-00002.safetensors: shard missing") as e:
        ActivationCache(cache_dir)
    one_line(e.value)


def test_a_truncated_shard_is_named(cache_dir):
    path = cache_dir / "layers.2" / "shard-00000.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(
        DatasetLoadError, match=r"shard-00000.safetensors: \d+ bytes, expected \d+ .*truncated"
    ):
        ActivationCache(cache_dir)
    os.truncate(path, 5)  # not even a header
    with pytest.raises(DatasetLoadError, match="not a readable safetensors shard"):
        ActivationCache(cache_dir)


def test_a_shard_whose_sha256_differs_is_refused_when_read(cache_dir, tmp_path):
    path = cache_dir / "layers.0" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # same size, one value changed
    path.write_bytes(bytes(data))
    cache = ActivationCache(cache_dir)  # sizes are checked at open, hashes as each shard is read
    with pytest.raises(DatasetLoadError, match="shard-00001.safetensors: sha256 does not match the manifest"):
        cache.load_shard("layers.0", 1)


def test_a_manifest_of_a_newer_format_asks_for_an_upgrade(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DatasetLoadError, match="cache format 99 is newer than this sae_core reads") as e:
        ActivationCache(cache_dir)
    one_line(e.value)


def test_a_shard_of_another_width_is_refused(cache_dir, tmp_path):
    other = tmp_path / "narrow"
    write_cache(
        tiny_model(d=16), Tok(), token_data(), other, dtype="float16", shard_tokens=100, progress=False
    )
    (other / "layers.1" / "shard-00000.safetensors").replace(
        cache_dir / "layers.1" / "shard-00000.safetensors"
    )
    with pytest.raises(DatasetLoadError, match="rows of width 16, but the manifest says d_in=32"):
        ActivationCache(cache_dir)


def test_a_cache_of_another_model_or_dataset_is_refused(cache_dir):
    with pytest.raises(
        ConfigError, match="MODEL is 'gpt2' but the cache .* holds activations of 'tiny-llama'"
    ):
        open_for_run(RunConfig(model="gpt2", activations=str(cache_dir)))
    with pytest.raises(ConfigError, match="DATASET is 'wikitext' but the cache .* was written from 'ids'"):
        open_for_run(RunConfig(dataset="wikitext", activations=str(cache_dir)))
    cache, cfg, info = open_for_run(RunConfig(activations=str(cache_dir)))
    assert (cfg.model, cfg.dataset, cfg.ctx_len, info["model"]) == ("tiny-llama", "ids", 16, "tiny-llama")
    # The embedded model and corpus under their other names are the same source.
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(
        json.dumps({**manifest, "model": "smollm2-135m", "dataset": "embedded"})
    )
    cache, cfg, info = open_for_run(
        RunConfig(model="embedded", dataset="python-docs", activations=str(cache_dir))
    )
    assert (cfg.model, cfg.dataset) == ("smollm2-135m", "embedded")


def test_an_incomplete_cache_is_refused_for_training(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DatasetLoadError, match="the cache is incomplete .* running the same"):
        ActivationCache(cache_dir)


def test_cli_error_for_a_folder_that_is_not_a_cache_is_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "sae_core", "--activations", str(tmp_path), "--device", "cpu"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    want = f"{tmp_path}: no manifest.json: not an activation cache (write one with python -m sae_core.cache)"
    assert p.stderr.strip().splitlines() == [f"error: {want}"]


def test_a_second_writer_on_one_folder_is_refused(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()",
            str(out / ".lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="is being written by another process") as e:
            write_cache(tiny_model(), Tok(), token_data(), out, progress=False)
        one_line(e.value)
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder (even on kill -9): the folder can be written now.
    write_cache(tiny_model(), Tok(), token_data(), out, shard_tokens=100, progress=False)
    assert ActivationCache(out).tokens == 32 * 15


def test_disk_full_while_writing_keeps_the_shards_before_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    def write(out):
        write_cache(tiny_model(), Tok(), token_data(), out, dtype="float16", shard_tokens=50, progress=False)

    write(tmp_path / "reference")
    import sae_core.utils as utils

    real_fsync, calls = os.fsync, []

    def fills_up(fd):
        calls.append(fd)
        # Two per atomic write (file, folder): the first manifest, then 2 shard sets (3 shards + manifest).
        if len(calls) > 18:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(utils.os, "fsync", fills_up)
    with pytest.raises(
        SaeCoreError, match="No space left on device; the first 2 shards of each hookpoint are intact"
    ):
        write(tmp_path / "full")
    monkeypatch.setattr(utils.os, "fsync", real_fsync)
    partial = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert not partial["complete"] and partial["tokens"] == 100
    assert not list((tmp_path / "full").rglob("*.tmp"))
    with pytest.raises(DatasetLoadError, match="incomplete"):
        ActivationCache(tmp_path / "full")
    write(tmp_path / "full")  # space freed: the same call resumes
    for f in (tmp_path / "reference").rglob("*.safetensors"):
        assert (tmp_path / "full" / f.relative_to(tmp_path / "reference")).read_bytes() == f.read_bytes()
    assert ActivationCache(tmp_path / "full").manifest == ActivationCache(tmp_path / "reference").manifest


def cache_cli(model_dir, text_file, out):
    return [
        sys.executable,
        "-m",
        "sae_core.cache",
        str(model_dir),
        str(text_file),
        "--ctx_len",
        "16",
        "--batch_size",
        "1",
        "--shard_tokens",
        "100",
        "--max_tokens",
        "1600",
        "--dtype",
        "float16",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_kill_9_while_writing_then_resume_gives_the_bytes_of_an_uninterrupted_cache(
    tmp_path, tiny_model_dir, tiny_text_file
):
    reference = tmp_path / "reference"
    p = subprocess.run(cache_cli(tiny_model_dir, tiny_text_file, reference), env=env(), capture_output=True)
    assert p.returncode == 0, p.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cache_cli(tiny_model_dir, tiny_text_file, killed),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a few shards are written
        try:
            manifest = json.loads((killed / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("tokens", 0) >= 200:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and partial["tokens"] >= 200

    p = subprocess.run(cache_cli(tiny_model_dir, tiny_text_file, killed), env=env(), capture_output=True)
    assert p.returncode == 0, p.stderr[-3000:]
    files = sorted(f.relative_to(reference) for f in reference.rglob("*.safetensors"))
    assert len(files) > 3 * 10
    assert sorted(f.relative_to(killed) for f in killed.rglob("*.safetensors")) == files
    for f in files:
        assert (killed / f).read_bytes() == (reference / f).read_bytes(), f
    full, resumed = (json.loads((d / "manifest.json").read_text()) for d in (reference, killed))
    assert resumed == full
    assert not list(killed.rglob("*.tmp"))  # nothing half-written left behind


@pytest.mark.slow
def test_kill_9_while_training_from_the_cache_then_resume_equals_uninterrupted(tmp_path):
    from sae_core.checkpoint import latest_complete_step
    from tests.support.training import sae_params

    cache = tmp_path / "cache"
    write_cache(tiny_model(), Tok(), token_data(n_seq=160), cache, shard_tokens=500, progress=False)
    train = [
        sys.executable,
        "-m",
        "sae_core",
        "--activations",
        str(cache),
        "--device",
        "cpu",
        "--run_name",
        "r",
    ]
    train += ["--expansion_factor", "4", "--k", "4", "--batch_size", "2", "--save_every", "1"]
    p = subprocess.run(
        [*train, "--save_dir", str(tmp_path / "full")], env=env(), capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]

    run_dir = tmp_path / "killed" / "r"
    proc = subprocess.Popen(
        [*train, "--save_dir", str(tmp_path / "killed")],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (latest_complete_step(run_dir, 1) or 0) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= latest_complete_step(run_dir, 1) < 80
    p = subprocess.run(
        [*train, "--save_dir", str(tmp_path / "killed"), "--resume"],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    full, resumed = sae_params(tmp_path / "full" / "r"), sae_params(run_dir)
    assert sorted(full) == sorted(resumed)
    for name in full:
        assert (full[name] == resumed[name]).all(), name
