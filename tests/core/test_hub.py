"""Publishing and loading SAEs through the real `huggingface_hub` client, against a Hub-compatible server on
127.0.0.1 (tests/support/hub_server.py). Nothing here reaches the internet.

The client runs with Xet disabled (the server speaks the LFS protocol only) and with its cache and token file
redirected into tmp folders, so a developer's own login or cache never leaks into a test.
"""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

from sae_core.card import public_config, render_model_card
from sae_core.errors import HubError
from sae_core.hub import PublishResult, download_saes, main, publish
from sae_core.utils import atomic_folder, atomic_write_bytes
from tests.support.hub_server import HubServer
from tests.support.tiny import child_env

TOKEN = (
    "hf_AliceWriteToken0123456789abcdef"  # alice's; shaped like a real token so the redaction is exercised
)
WRONG_TOKEN = "hf_NotAKnownToken0123456789abcdef"
REPO_ROOT = Path(__file__).resolve().parents[2]
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub-storage"), tokens={TOKEN: "alice"}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def isolated_client(monkeypatch, tmp_path):
    """Point the client's cache and token file into tmp_path; no HF_TOKEN unless a test sets it.

    conftest.py sets HF_HUB_OFFLINE=1 for the whole suite (nothing may reach the internet); these tests talk
    to the server on 127.0.0.1, so they turn the client's offline switch off (the offline test runs in a
    subprocess).
    """
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def repo_id(request) -> str:
    return "alice/" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:80]


def make_run(
    folder: Path,
    hookpoints=("layers.1", "layers.3"),
    seed: int = 0,
    with_eval: bool = True,
    config: dict | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny run folder as the trainer and evaluator write it (d=8, M=32); returns the tensors written."""
    generator = torch.Generator().manual_seed(seed)
    written = {}
    for hookpoint in hookpoints:
        (folder / hookpoint).mkdir(parents=True, exist_ok=True)
        cfg = {
            "expansion_factor": 4,
            "normalize_decoder": True,
            "num_latents": 32,
            "k": 4,
            "d_in": 8,
            "hookpoint": hookpoint,
            "stream": "residual",
        }
        (folder / hookpoint / "cfg.json").write_text(json.dumps(cfg))
        tensors = {
            "encoder.weight": torch.randn(32, 8, generator=generator),
            "encoder.bias": torch.randn(32, generator=generator),
            "W_dec": torch.randn(32, 8, generator=generator),
            "b_dec": torch.randn(8, generator=generator),
        }
        save_file(tensors, folder / hookpoint / "sae.safetensors")
        written[hookpoint] = tensors
    run = {
        "config": config or {"lr": 5e-4, "k": 4, "tokens": 4096, "batch_size": 8},
        "model": "HuggingFaceTB/SmolLM2-135M",
        "dataset": "EleutherAI/fineweb-edu-dedup-10b",
        "tokens": 4096,
        "steps": 16,
        "wall_time_s": 12.5,
        "sae_core_version": "0.1.0",
    }
    (folder / "run.json").write_text(json.dumps(run))
    if with_eval:
        (folder / "eval").mkdir(exist_ok=True)
        metrics = {
            h: {
                "fvu": 0.1234 + i,
                "mse": 0.5,
                "cosine": 0.9,
                "l0": 4.0,
                "dead_pct_eval": 1.5,
                "dead_pct_train": 2.0,
                "ce_clean": 3.1,
                "ce_sae": 3.3,
                "ce_zero": 9.0,
                "ce_mean": 7.0,
                "delta_ce": 0.2,
                "loss_recovered_zero": 0.966,
                "loss_recovered_mean": 0.95,
                "kl": 0.21,
            }
            for i, h in enumerate(hookpoints)
        }
        report = {
            "settings": {"model": run["model"], "dataset": run["dataset"], "split": "train", "tokens": 2048},
            "hookpoints": metrics,
        }
        (folder / "eval" / "report.json").write_text(json.dumps(report))
        (folder / "eval" / "report.md").write_text("| hookpoint | fvu |\n|---|---|\n| layers.1 | 0.1234 |\n")
        (folder / "eval" / "fvu.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    return written


def commits_on_main(hub: HubServer, repo_id: str) -> list[dict]:
    """The server's history of main, newest first."""
    repo = hub.repo(repo_id)
    history, oid = [], repo.refs["main"]
    while oid:
        history.append({"oid": oid, **repo.commit(oid)})
        oid = history[-1]["parent"]
    return history


def all_text_under(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for folder in folders for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------
# Publishing


def test_publish_makes_one_commit_holding_every_file(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    before = len(hub.requests)

    result = publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    assert result.created_commit and result.repo_id == repo_id
    history = commits_on_main(hub, repo_id)
    assert len(history) == 2 and history[0]["oid"] == result.revision  # the repo's initial commit + ours
    assert history[0]["title"] == "Upload SAEs"
    assert set(history[0]["files"]) == {
        ".gitattributes",
        "README.md",
        "eval/report.json",
        "eval/report.md",
        "eval/fvu.png",
        "layers.1/cfg.json",
        "layers.1/sae.safetensors",
        "layers.3/cfg.json",
        "layers.3/sae.safetensors",
    }
    files = history[0]["files"]
    assert files["layers.1/sae.safetensors"]["lfs"] and files["eval/fvu.png"]["lfs"]  # binary -> LFS
    assert not files["layers.1/cfg.json"]["lfs"] and not files["README.md"]["lfs"]
    calls = [(method, path) for method, path, _ in hub.requests[before:]]
    assert [c for c in calls if c[1].endswith("/commit/main")] == [
        ("POST", f"/api/models/{repo_id}/commit/main")
    ]
    assert sum(method == "PUT" for method, _ in calls) == 3  # two SAEs and the plot went through LFS uploads
    assert result.url == f"{hub.url}/{repo_id}/commit/{result.revision}"
    # The client sees the same thing as the server's storage.
    assert sorted(HfApi(endpoint=hub.url, token=TOKEN).list_repo_files(repo_id)) == sorted(
        history[0]["files"]
    )


def test_round_trip_gives_bit_identical_tensors(hub, repo_id, tmp_path):
    written = make_run(tmp_path / "run")
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    folder = download_saes(repo_id, endpoint=hub.url)

    for hookpoint, tensors in written.items():
        loaded = load_file(folder / hookpoint / "sae.safetensors")
        assert set(loaded) == set(TENSORS)
        for name in TENSORS:
            assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensors[name])
        assert json.loads((folder / hookpoint / "cfg.json").read_text())["d_in"] == 8


def test_sae_load_many_from_hub_round_trip(hub, repo_id, tmp_path):
    from sae_core import Sae

    written = make_run(tmp_path / "run")
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    saes = Sae.load_many_from_hub(repo_id, endpoint=hub.url)
    one = Sae.load_from_hub(repo_id, layer=3, endpoint=hub.url)

    assert list(saes) == ["layers.1", "layers.3"]
    for hookpoint, sae in [*saes.items(), ("layers.3", one)]:
        state = sae.state_dict()
        for name in TENSORS:
            assert torch.equal(state[name], written[hookpoint][name])


def test_republishing_identical_content_makes_no_commit(hub, repo_id, tmp_path, caplog):
    make_run(tmp_path / "run")
    first = publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)
    uploads_before = sum(method == "PUT" for method, _, _ in hub.requests)

    with caplog.at_level(logging.INFO, logger="sae_core.hub"):
        again = publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    assert not again.created_commit and again.revision == first.revision
    assert len(commits_on_main(hub, repo_id)) == 2
    assert sum(method == "PUT" for method, _, _ in hub.requests) == uploads_before  # nothing re-uploaded
    assert "nothing changed" in again.describe() and "nothing changed" in caplog.text


def test_republishing_a_changed_run_replaces_what_it_no_longer_has(hub, repo_id, tmp_path):
    make_run(tmp_path / "run1", hookpoints=("layers.1", "layers.3"))
    publish(tmp_path / "run1", repo_id, token=TOKEN, endpoint=hub.url)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.upload_file(path_or_fileobj=b"notes by hand\n", path_in_repo="NOTES.md", repo_id=repo_id)
    make_run(tmp_path / "run2", hookpoints=("layers.1",), seed=1, with_eval=False)

    result = publish(tmp_path / "run2", repo_id, token=TOKEN, endpoint=hub.url, commit_message="Retrain")

    assert result.created_commit
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "NOTES.md",
        "README.md",
        "layers.1/cfg.json",
        "layers.1/sae.safetensors",
    ]


def test_revision_pins_an_earlier_publish(hub, repo_id, tmp_path):
    old = make_run(tmp_path / "run1", seed=1)
    first = publish(tmp_path / "run1", repo_id, token=TOKEN, endpoint=hub.url)
    new = make_run(tmp_path / "run2", seed=2)
    second = publish(tmp_path / "run2", repo_id, token=TOKEN, endpoint=hub.url)
    assert second.created_commit and second.revision != first.revision

    pinned = download_saes(repo_id, ["layers.1"], revision=first.revision, endpoint=hub.url)
    latest = download_saes(repo_id, ["layers.1"], endpoint=hub.url)

    assert torch.equal(load_file(pinned / "layers.1" / "sae.safetensors")["W_dec"], old["layers.1"]["W_dec"])
    assert torch.equal(load_file(latest / "layers.1" / "sae.safetensors")["W_dec"], new["layers.1"]["W_dec"])
    assert pinned.name == first.revision and latest.name == second.revision  # cache snapshots per commit


def test_loading_one_hookpoint_downloads_only_its_folder(hub, repo_id, tmp_path):
    make_run(tmp_path / "run", hookpoints=("layers.1", "layers.3", "layers.10"))
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)
    before = len(hub.requests)

    folder = download_saes(repo_id, ["layers.1"], endpoint=hub.url)

    cached = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert cached == ["layers.1/cfg.json", "layers.1/sae.safetensors"]  # not layers.10, the card or the plots
    fetched = {
        path.split("/resolve/")[1].split("/", 1)[1]
        for _, path, _ in hub.requests[before:]
        if "/resolve/" in path
    }
    assert fetched == {"layers.1/cfg.json", "layers.1/sae.safetensors"}
    # EleutherAI's older spelling finds the same folder, and a glob fetches the rest.
    assert download_saes(repo_id, ["layer_3"], endpoint=hub.url) == folder
    download_saes(repo_id, ["layers.*"], endpoint=hub.url)
    assert sorted(p.name for p in folder.iterdir()) == ["layers.1", "layers.10", "layers.3"]


def test_a_hookpoint_the_repo_lacks_is_a_one_line_error_listing_what_it_has(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    with pytest.raises(FileNotFoundError) as error:
        download_saes(repo_id, ["layers.7"], endpoint=hub.url)

    message = str(error.value)
    assert "layers.7" in message and "it has: layers.1, layers.3" in message and "\n" not in message


def test_unknown_repo_or_revision_is_a_one_line_error(hub, repo_id, tmp_path):
    with pytest.raises(ValueError, match=rf"'{repo_id}' not found") as error:
        download_saes(repo_id, endpoint=hub.url)
    assert "\n" not in str(error.value)

    make_run(tmp_path / "run")
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)
    with pytest.raises(HubError, match="revision 'v9' not found"):
        download_saes(repo_id, revision="v9", endpoint=hub.url)
    with pytest.raises(HubError, match="not a valid Hub repo id"):
        download_saes("not a repo!", endpoint=hub.url)
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        download_saes(str(tmp_path / "missing" / "folder"))


def test_wrong_token_is_refused_with_a_one_line_error_without_the_token(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    before = len(hub.requests)

    with pytest.raises(HubError) as error:  # a ValueError too, as before errors.py
        publish(tmp_path / "run", repo_id, token=WRONG_TOKEN, endpoint=hub.url)

    message = str(error.value)
    assert "refused the token" in message and "401" in message and "\n" not in message
    assert WRONG_TOKEN not in message
    # Nothing chained: the client's error holds its request, Authorization header included.
    assert error.value.__cause__ is None and error.value.__context__ is None
    assert hub.repo(repo_id) is None  # nothing was created
    assert {status for _, _, status in hub.requests[before:]} == {401}


def test_publishing_needs_a_token(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="no Hugging Face token"):
        publish(tmp_path / "run", repo_id, endpoint=hub.url)


def test_private_repo_is_invisible_without_the_token(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url, private=True)

    with pytest.raises(ValueError, match="not found"):
        download_saes(repo_id, ["layers.1"], endpoint=hub.url)
    assert (download_saes(repo_id, ["layers.1"], endpoint=hub.url, token=TOKEN) / "layers.1").is_dir()


def test_token_is_never_written_anywhere(hub, repo_id, tmp_path, monkeypatch, caplog, capsys):
    # The worst case: the training config recorded the token, and publishing takes it from HF_TOKEN.
    make_run(
        tmp_path / "run",
        config={
            "hf_token": TOKEN,
            "token": TOKEN,
            "lr": 1e-3,
            "tokens": 4096,
            "data": {"auth_token": TOKEN, "note": f"token={TOKEN}"},
        },
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):
        publish(tmp_path / "run", repo_id, endpoint=hub.url)
        publish(tmp_path / "run", local_dir=tmp_path / "published")
        download_saes(repo_id, endpoint=hub.url)

    captured = capsys.readouterr()
    everything = all_text_under(hub.root, tmp_path / "published", tmp_path / "hf-cache")
    assert TOKEN.encode() not in everything  # server storage and access log, local folder, client cache
    assert TOKEN not in caplog.text and TOKEN not in captured.out + captured.err
    readme = (tmp_path / "published" / "README.md").read_text()
    assert "| `lr` | 0.001 |" in readme and "| `tokens` | 4,096 |" in readme
    assert "hf_token" not in readme and "auth_token" not in readme and "| `data.note` | *** |" in readme


def test_a_file_holding_the_token_is_refused_before_any_upload(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    cfg = tmp_path / "run" / "layers.1" / "cfg.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hf_token": TOKEN}))
    before = len(hub.requests)

    with pytest.raises(HubError, match="contains the Hugging Face token") as error:
        publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    assert TOKEN not in str(error.value) and len(hub.requests) == before  # refused before any request


def test_a_connection_lost_mid_upload_is_retried_by_the_client(hub, repo_id, tmp_path):
    make_run(tmp_path / "run", with_eval=False)
    hub.fail_next("PUT", r"^/_lfs/", status=None)  # the server hangs up without answering

    result = publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)

    assert result.created_commit
    uploads = [status for method, path, status in hub.requests if method == "PUT" and repo_id in path]
    assert uploads.count(-1) == 1 and uploads.count(200) == 2  # one dropped, then both SAEs went through


def test_client_failures_become_one_line_errors_without_a_chain():
    import httpx2

    from sae_core.download import HubTarget, hub_call

    def lost_upload():
        try:
            raise httpx2.ReadError("connection reset")
        except httpx2.ReadError as cause:
            raise RuntimeError(
                f"Error while uploading 'layers.1/sae.safetensors' to the Hub.\n{TOKEN}"
            ) from cause

    with pytest.raises(ConnectionError) as error:
        hub_call(lost_upload, HubTarget("alice/x", "http://hub", [TOKEN]))

    message = str(error.value)
    assert "layers.1/sae.safetensors" in message and "cannot reach the Hub" in message and "\n" not in message
    assert TOKEN not in message and error.value.__context__ is None and error.value.__cause__ is None


def test_a_failed_commit_leaves_the_previous_revision_intact(hub, repo_id, tmp_path):
    old = make_run(tmp_path / "run1", seed=1)
    first = publish(tmp_path / "run1", repo_id, token=TOKEN, endpoint=hub.url)
    make_run(tmp_path / "run2", seed=2)
    hub.fail_next("POST", r"/commit/main$", status=500)

    with pytest.raises(ConnectionError, match="HTTP 500") as error:
        publish(tmp_path / "run2", repo_id, token=TOKEN, endpoint=hub.url)

    assert "\n" not in str(error.value) and TOKEN not in str(error.value)
    assert hub.head(repo_id) == first.revision
    folder = download_saes(repo_id, ["layers.1"], endpoint=hub.url)
    assert torch.equal(load_file(folder / "layers.1" / "sae.safetensors")["W_dec"], old["layers.1"]["W_dec"])


# ----------------------------------------------------------------------------------------------------------
# HF_ENDPOINT and HF_HUB_OFFLINE, which the client reads at import: a fresh process is the honest test.


def start_python(code: str, env: dict[str, str]) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**base, "PYTHONPATH": child_env()["PYTHONPATH"], "HF_HUB_DISABLE_XET": "1", **env},
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_hf_endpoint_and_offline_cache_in_fresh_processes(hub, repo_id, tmp_path):
    # Two fresh processes run side by side (each pays torch's import): one online, one offline on another
    # repo.
    online_repo, offline_repo = repo_id + "-online", repo_id + "-offline"
    written = make_run(tmp_path / "run")
    publish(tmp_path / "run", offline_repo, token=TOKEN, endpoint=hub.url)
    cached = download_saes(
        offline_repo, ["layers.1"], endpoint=hub.url, cache_dir=tmp_path / "hf-home" / "hub"
    )
    requests_before = len(hub.requests)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": TOKEN}

    # Online: the CLI publishes and download_saes loads, with endpoint and token from the environment only.
    online = start_python(
        f"""
        from sae_core.hub import download_saes, main
        main([{str(tmp_path / "run")!r}, {online_repo!r}])
        print(download_saes({online_repo!r}, ["layers.1"]))
    """,
        env,
    )
    # Offline: the cached layer loads without a request; an uncached one is a clear one-line error.
    offline = start_python(
        f"""
        from sae_core.hub import download_saes
        print(download_saes({offline_repo!r}, ["layers.1"]))
        try:
            download_saes({offline_repo!r}, ["layers.3"])
        except FileNotFoundError as error:
            print("FileNotFoundError:", error)
    """,
        {**env, "HF_HUB_OFFLINE": "1"},
    )
    online_out, online_err = online.communicate(timeout=120)
    offline_out, offline_err = offline.communicate(timeout=120)

    assert online.returncode == 0, online_err
    assert f"published to {online_repo}" in online_out and TOKEN not in online_out + online_err
    folder = Path(online_out.strip().splitlines()[-1])
    assert folder.is_relative_to(tmp_path / "hf-home" / "hub")
    assert torch.equal(
        load_file(folder / "layers.1" / "sae.safetensors")["W_dec"], written["layers.1"]["W_dec"]
    )

    assert offline.returncode == 0, offline_err
    loaded, uncached = offline_out.strip().splitlines()
    assert Path(loaded) == cached
    assert uncached.startswith("FileNotFoundError:") and "HF_HUB_OFFLINE=1" in uncached
    assert not [path for _, path, _ in hub.requests[requests_before:] if offline_repo in path]


# ----------------------------------------------------------------------------------------------------------
# Local folder publishing


def test_local_dir_publishing_writes_a_loadable_folder_atomically(tmp_path):
    written = make_run(tmp_path / "run")
    target = tmp_path / "out" / "saes"

    result = publish(tmp_path / "run", local_dir=target)

    assert result == PublishResult(None, target.resolve(), result.revision, target.resolve().as_uri(), True)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "README.md",
        "eval/fvu.png",
        "eval/report.json",
        "eval/report.md",
        "layers.1/cfg.json",
        "layers.1/sae.safetensors",
        "layers.3/cfg.json",
        "layers.3/sae.safetensors",
    ]
    assert download_saes(str(target), ["layers.3"]) == target
    assert torch.equal(
        load_file(target / "layers.3" / "sae.safetensors")["b_dec"], written["layers.3"]["b_dec"]
    )

    again = publish(tmp_path / "run", local_dir=target)
    assert not again.created_commit and again.revision == result.revision

    make_run(tmp_path / "run2", hookpoints=("layers.1",), seed=3, with_eval=False)
    replaced = publish(tmp_path / "run2", local_dir=target)
    assert replaced.created_commit and sorted(p.name for p in target.iterdir()) == ["README.md", "layers.1"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["saes"]  # no temporary or old folder left

    with pytest.raises(HubError, match="must not be the run folder"):
        publish(tmp_path / "run", local_dir=tmp_path / "run")


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-") and not target.exists()
        (staging / "a.txt").write_text("one")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "one"

    # A failure while writing leaves the old folder as it was, and no leftover.
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(target) as staging:
        (staging / "b.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and sorted(p.name for p in target.iterdir()) == [
        "a.txt"
    ]

    # A failure of the final rename puts the old folder back in place.
    real_replace = os.replace

    def replace_fails_into_target(src, dst):
        if Path(dst) == target and ".tmp-" in Path(src).name:
            raise OSError("rename refused")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_into_target)
    with pytest.raises(OSError, match="rename refused"), atomic_folder(target) as staging:
        (staging / "c.txt").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and sorted(p.name for p in target.iterdir()) == [
        "a.txt"
    ]

    with atomic_folder(target) as staging:
        (staging / "d.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["d.txt"] and [p.name for p in tmp_path.iterdir()] == [
        "out"
    ]


# ----------------------------------------------------------------------------------------------------------
# The model card


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_card_has_hub_metadata_summary_snippet_and_eval_table(hub, repo_id, tmp_path):
    make_run(tmp_path / "run")
    publish(tmp_path / "run", repo_id, token=TOKEN, endpoint=hub.url)
    card = Path(huggingface_hub.hf_hub_download(repo_id, "README.md", endpoint=hub.url)).read_text()

    meta = front_matter(card)
    assert meta["library_name"] == "sae_core" and meta["license"] == "mit"
    assert {"sparse-autoencoder", "sae", "topk-sae"} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["datasets"] == ["EleutherAI/fineweb-edu-dedup-10b"]
    assert "| Tokens trained | 4,096 |" in card and "| Latents per SAE | 32 |" in card
    assert "| Hookpoints | `layers.1`, `layers.3` |" in card
    assert (
        "\n".join(
            [
                "from sae_core import Sae",
                f'saes = Sae.load_many_from_hub("{repo_id}")  # {{hookpoint: Sae}}',
                f'sae = Sae.load_from_hub("{repo_id}", hookpoint="layers.1")  # downloads only that folder',
            ]
        )
        in card
    )
    assert "## Evaluation" in card and "| hookpoint | FVU ↓ | L0 |" in card
    assert "| `layers.1` | 0.1234 | 4 | 1.5 |" in card and "| `layers.3` | 1.123 |" in card
    assert "![fvu](eval/fvu.png)" in card and "2,048 tokens" in card
    # The server parsed the front matter the way the Hub does.
    info = HfApi(endpoint=hub.url).model_info(repo_id)
    assert info.card_data.library_name == "sae_core" and "topk-sae" in info.tags


def test_card_without_report_or_hub_ids_says_less():
    card = render_model_card(
        repo_id=None,
        hookpoints={"layer_2": {"expansion_factor": 32, "d_in": 16, "num_latents": 0, "k": 8}},
        run={"model": "/opt/models/smollm2.gguf", "config": {"hf_token": "x", "max_tokens": 10}},
    )
    meta = front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta  # a local path is not a Hub id
    assert "## Evaluation" not in card and "| `layer_2` | 16 | 512 | 8 |" in card
    assert "max_tokens" in card and "hf_token" not in card
    assert public_config({"a": {"api_key": "k", "tokens_per_step": 3}, "v": "hf_" + "x" * 30}) == {
        "a.tokens_per_step": 3,
        "v": "***",
    }


def test_a_sweep_variants_card_links_the_other_variants_and_marks_its_own():
    sweep = [{"variant": "k4", "location": "org/sae-k4"}, {"variant": "k8", "location": "org/sae-k8"}]
    hookpoints = {"layers.1": {"d_in": 16, "num_latents": 64, "k": 4}}
    card = render_model_card(repo_id="org/sae-k4", hookpoints=hookpoints, sweep=sweep)
    assert "## The sweep" in card and "| k4 | org/sae-k4 (this one) |" in card
    assert "| k8 | [org/sae-k8](https://huggingface.co/org/sae-k8) |" in card
    assert "## The sweep" not in render_model_card(repo_id="org/sae-k4", hookpoints=hookpoints)


# ----------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["{tmp}/nope", "alice/x"], "run folder '{tmp}/nope' does not exist"),
        (["{tmp}/empty", "alice/x"], "no SAEs in '{tmp}/empty'"),
        (["{tmp}/run", "not a/valid/id"], "'not a/valid/id' is not a valid Hub repo id"),
        (["{tmp}/run"], "give a REPO_ID to publish to the Hub, or --local_dir DIR"),
        (["{tmp}/run", "alice/x", "--endpoint", "http://127.0.0.1:9"], "no Hugging Face token"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, argv, expected, capsys):
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "run", with_eval=False)
    with pytest.raises(SystemExit) as error:
        main([arg.format(tmp=tmp_path) for arg in argv])
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert expected.format(tmp=tmp_path) in err and "Traceback" not in err


def test_cli_rejects_abbreviated_flags(tmp_path, capsys):
    make_run(tmp_path / "run", with_eval=False)
    with pytest.raises(SystemExit) as error:
        main([str(tmp_path / "run"), "--local", str(tmp_path / "out")])  # not --local_dir
    assert error.value.code == 2 and "unrecognized arguments: --local" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_lets_a_bug_keep_its_traceback(tmp_path, monkeypatch):
    # Only SaeCoreError and OSError are user errors; anything else is a bug and must not be dressed as one.
    import sae_core.hub as hub_module

    def broken_publish(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(hub_module, "publish", broken_publish)
    with pytest.raises(KeyError, match="a bug"):
        main([str(tmp_path / "run"), "--local_dir", str(tmp_path / "out")])


def test_cli_writes_a_local_folder(tmp_path, capsys):
    make_run(tmp_path / "run", with_eval=False)
    main([str(tmp_path / "run"), "--local_dir", str(tmp_path / "out")])
    assert "published to" in capsys.readouterr().out and (tmp_path / "out" / "README.md").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_modes_plain_writes_would(tmp_path, umask):
    # Temporary files and folders are private (0600/0700); renamed into place they must not stay so, or a
    # team's web server and colleagues could not read SAEs, reports and dashboards.
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        with atomic_folder(tmp_path / "sae") as staging:
            atomic_write_bytes(staging / "cfg.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "sae").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "sae" / "cfg.json").stat().st_mode & 0o777 == 0o666 & ~umask
