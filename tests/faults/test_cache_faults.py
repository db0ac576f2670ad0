"""Faults around the activation cache: broken or foreign caches are refused in one line; a killed writer
resumes to the same bytes; a second writer is turned away."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sae_core.cache import ActivationCache, open_for_run, write_cache
from sae_core.config import RunConfig
from sae_core.errors import ConfigError, DatasetLoadError
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
        "40",
        "--max_tokens",
        "2400",
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
