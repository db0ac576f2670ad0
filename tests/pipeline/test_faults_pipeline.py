"""Faults injected into real pipeline runs: the tiny model on the CPU, real torchrun, a real Dagster instance.

- `dagster dev` is restarted while a run it launched is training. Its webserver is a child of `dagster dev`,
  which shuts all its services down (daemon, code servers) as soon as that child dies: killing the webserver
  and starting `dagster dev` again is what "restarting the webserver" means for the documented setup. The run
  worker belongs to the code server, which lingers until its runs end: the run goes on to success, the
  restarted UI shows it, and nothing is left running afterwards.
- Two stride partitions of one model train at the same time, in two processes: each keeps to its own run
  folder, and the tokenized dataset they both read is left byte for byte as it was.
- Along the way: a fake HF_TOKEN given to the run through the environment is written to no file (artefacts,
  DAGSTER_HOME with its SQLite storage and compute logs, the console log), and every socket Dagster's own
  processes listen on is bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import psutil
import pytest

from sae_pipeline.assets import tokenized_dataset
from tests.pipeline.browser import group_members, stop_process_group
from tests.pipeline.conftest import (
    MODEL,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)
from tests.pipeline.test_termination import training_processes, wait_until_gone
from tests.pipeline.test_ui import free_port, start_dagster_dev, wait_until_serving

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "hf_FaultSuiteFakeToken0123456789abcdef"
DAGSTER_YAML = "telemetry:\n  enabled: false\nauto_materialize:\n  enabled: false\n"

LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RUN_STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status tags { key value } } }
}"""
LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert "errors" not in answer, answer
    return answer["data"]


def run_status(url: str, run_id: str) -> str:
    run = graphql(url, RUN_STATUS, {"runId": run_id})["runOrError"]
    assert run["__typename"] == "Run", run
    return run["status"]


def tokenize(root: Path, registry: Path, instance: dg.DagsterInstance) -> None:
    instance.add_dynamic_partitions("models", [MODEL])
    result = materialize([tokenized_dataset], MODEL, instance, resources_for(root, registry))
    assert result.success, failure_text(result)


def metrics_steps(path: Path) -> list[int]:
    """The step of every line of a metrics.jsonl; each line must be one whole JSON record."""
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def files_holding(folder: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


def listening_addresses(processes: list[psutil.Process]) -> dict[str, list[str]]:
    """The TCP/UDP addresses each process listens on (unix sockets are not network reachable)."""
    found = {}
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            listening = [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            if listening:
                found[" ".join(p.cmdline()[1:4])] = listening
    return found


def kill_webserver(dev: subprocess.Popen, grace_s: float = 3) -> None:
    """SIGTERM the webserver child of `dagster dev`, SIGKILL it when it is still there after `grace_s`."""
    [webserver] = [p for p in psutil.Process(dev.pid).children() if "dagster_webserver" in p.cmdline()]
    webserver.terminate()
    try:
        webserver.wait(grace_s)
    except psutil.TimeoutExpired:  # under `dagster dev` it does not end on SIGTERM (Dagster 1.13.27)
        webserver.kill()
        webserver.wait(10)


def test_restarting_dagster_dev_mid_training_keeps_the_run_going_and_leaks_nothing(
    tmp_path, tiny_model_dir, corpus_file, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # the tokenize step below reads it, as the run's steps do
    home, root = tmp_path / "dagster_home", tmp_path / "artefacts"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    # ~320 optimizer steps of one sequence on 2 ranks (~30 s): training outlasts the webserver's end.
    entry = tiny_entry(tiny_model_dir, corpus_file,
                       train={"batch_size": 1, "max_tokens": 20_000, "save_every": 25, "log_every": 1})
    registry = write_registry(tmp_path / "models.yaml", entry)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tokenize(root, registry, instance)

    # The server's own registry is empty, so its sensor launches nothing; the run gets the registry by config.
    env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_PIPELINE_ROOT": str(root), "OMP_NUM_THREADS": "1",
           "SAE_PIPELINE_REGISTRY": str(write_registry(tmp_path / "empty.yaml")), "HF_TOKEN": FAKE_TOKEN}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = [tmp_path / "dagster_dev_1.log", tmp_path / "dagster_dev_2.log"]
    first = start_dagster_dev(port, env, tmp_path, logs[0])
    second = None
    run_dir = root / "runs" / MODEL / "stride-1"
    metrics = run_dir / "metrics.jsonl"
    left: list[str] = []
    try:
        wait_until_serving(first, url, logs[0])
        [location] = [e["name"] for e in graphql(url, LOCATIONS)["workspaceOrError"]["locationEntries"]]
        tags = {"dagster/partition": f"{MODEL}|1", "dagster/partition/model": MODEL,
                "dagster/partition/stride": "1"}
        params = {
            "selector": {"repositoryLocationName": location, "repositoryName": "__repository__",
                         "jobName": "train_evaluate_publish_job", "assetSelection": [{"path": ["sae_checkpoints"]}]},
            "runConfigData": {"resources": {
                "registry": {"config": {"path": str(registry)}},
                "launcher": {"config": {"nproc_per_node": 2, "omp_num_threads": 1}},
            }},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        launched = graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        deadline = time.monotonic() + 150
        while not (metrics.exists() and metrics.stat().st_size > 0):
            status = run_status(url, run_id)
            assert status not in FINISHED and time.monotonic() < deadline, f"training did not start ({status})"
            time.sleep(0.5)
        assert len(training_processes(str(root))) >= 3  # torchrun + 2 ranks

        # Dagster's own processes listen on 127.0.0.1 only (the code servers on unix sockets). torchrun's
        # rendezvous store, which torch binds to every interface, is left out: it is torch's, not Dagster's.
        dagster_processes = [p for p in group_members(first.pid) if p not in training_processes(str(root))]
        addresses = listening_addresses(dagster_processes)
        assert any(key.startswith("-m dagster_webserver") for key in addresses), addresses
        assert all(ip == "127.0.0.1" for ips in addresses.values() for ip in ips), addresses

        kill_webserver(first)
        steps_without_webserver = len(metrics.read_text().splitlines())
        first.wait(timeout=60)  # dagster dev sees its webserver gone and shuts the daemon and itself down

        second = start_dagster_dev(port, env, tmp_path, logs[1])
        wait_until_serving(second, url, logs[1])
        deadline = time.monotonic() + 180
        while (status := run_status(url, run_id)) not in FINISHED:  # the restarted UI follows the run
            assert time.monotonic() < deadline, f"the run is still {status}"
            time.sleep(1)
        assert status == "SUCCESS", logs[0].read_text()[-5000:]
        shown = graphql(url, RUN_STATUS, {"runId": run_id})["runOrError"]["tags"]
        assert {"key": "dagster/partition", "value": f"{MODEL}|1"} in shown

        # Nothing of the first server outlives the run: the lingering code server, its run worker, torchrun
        # and the ranks all end with it.
        assert not (rank_left := wait_until_gone(str(root), timeout_s=30)), [p.cmdline() for p in rank_left]
        deadline = time.monotonic() + 60
        while (lingering := [p for p in group_members(first.pid) if p.is_running()]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not lingering, [p.cmdline() for p in lingering if p.is_running()]
    finally:
        for server in (first, second):
            if server is not None:
                left += stop_process_group(server)
    assert not left, f"processes left running: {left}"

    # The run trained once, from step 1 to the end, kept going after the kill, and its result is complete.
    steps = metrics_steps(metrics)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > steps_without_webserver
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == info["total_steps"] == steps[-1]
    from sae_core.sae import Sae

    for hookpoint in ("layers.0", "layers.1", "layers.2"):
        assert Sae.load_from_disk(run_dir / hookpoint).hookpoint == hookpoint
    assert not list(run_dir.parent.glob("stride-1.previous"))

    # The token reached the run through the environment and was written nowhere: artefacts, DAGSTER_HOME
    # (SQLite runs and event logs, compute logs), what dagster dev printed. (test_cli.py checks the published
    # folder.)
    for folder in (root, home, *logs):
        assert folder.exists()
    assert not files_holding(tmp_path, FAKE_TOKEN)


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_two_strides_of_one_model_trained_at_once_keep_to_their_own_folders(tmp_path, tiny_model_dir, corpus_file):
    root = tmp_path / "artefacts"
    entry = tiny_entry(tiny_model_dir, corpus_file,
                       train={"batch_size": 4, "max_tokens": 1_200, "save_every": 3, "log_every": 1})
    registry = write_registry(tmp_path / "models.yaml", entry)
    tokenize(root, registry, dg.DagsterInstance.ephemeral())
    tokenized = root / "tokenized" / MODEL
    before = tree_digest(tokenized)

    layers = {1: ["layers.0", "layers.1", "layers.2"], 2: ["layers.0", "layers.2"]}
    children = {
        stride: subprocess.Popen(
            [sys.executable, "-m", "tests.pipeline.run_training", str(root), str(registry), f"{MODEL}|{stride}"],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        for stride in layers
    }
    # Watch the process table until both are done: the two torchruns must have run side by side.
    both_seen = False
    deadline = time.monotonic() + 150
    while any(child.poll() is None for child in children.values()) and time.monotonic() < deadline:
        torchruns = [" ".join(p.cmdline()) for p in training_processes(str(root))]
        torchruns = [c for c in torchruns if "torch.distributed.run" in c]
        both_seen |= all(any(f"--layer_stride {s} " in c for c in torchruns) for s in layers)
        time.sleep(0.2)
    outputs = {}
    for stride, child in children.items():
        if child.poll() is None:
            child.kill()
        outputs[stride] = child.communicate(timeout=30)[0]
    for output in outputs.values():
        assert "RESULT success" in output, output[-5000:]
    assert both_seen, "the two trainings did not overlap"
    assert not (left := wait_until_gone(str(root), timeout_s=10)), [p.cmdline() for p in left]

    for stride, hookpoints in layers.items():
        run_dir = root / "runs" / MODEL / f"stride-{stride}"
        info = json.loads((run_dir / "run.json").read_text())
        assert info["hookpoints"] == hookpoints and info["steps"] == info["total_steps"] > 2
        assert info["config"]["layer_stride"] == stride
        saved = sorted(p.parent.name for p in run_dir.glob("*/cfg.json"))
        assert saved == hookpoints
        for hookpoint in hookpoints:
            cfg = json.loads((run_dir / hookpoint / "cfg.json").read_text())
            assert cfg["hookpoint"] == hookpoint
        # One writer per file: whole JSON lines, steps 1..N once each, only this partition's layers.
        steps = metrics_steps(run_dir / "metrics.jsonl")
        assert steps == list(range(1, info["steps"] + 1))
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            assert sorted(k[4:] for k in json.loads(line) if k.startswith("fvu/")) == hookpoints
        states = sorted(p.name for p in (run_dir / "trainer_state").iterdir())
        assert states and all(name.endswith(f"{info['steps']:09d}.pt") for name in states), states
    assert sorted(p.name for p in (root / "runs" / MODEL).iterdir()) == [
        ".stride-1.lock", ".stride-2.lock", "stride-1", "stride-2"
    ]
    # The shared tokenized dataset was only read: same files, same bytes, same mtimes, no cache written.
    assert tree_digest(tokenized) == before
