"""Faults injected into real pipeline runs: the tiny model on the CPU, real torchrun, a real Dagster instance.

- `dagster dev` is restarted while a run it launched is training. Its webserver is a child of `dagster dev`,
  which shuts all its services down (daemon, code servers) as soon as that child dies: killing the webserver
  and starting `dagster dev` again is what "restarting the webserver" means for the documented setup. The run
  worker belongs to the code server, which lingers until its runs end: the run goes on to success, the
  restarted UI shows it, and nothing is left running afterwards.
- Two stride partitions of one model train at the same time, in two processes: each keeps to its own run
  folder, and the tokenized dataset they both read is left byte for byte as it was.
- A training run is stopped through Dagster while it trains, in a `dagster dev` on PostgreSQL (the storage of
  deploy/dagster.yaml on the test server: the `dagster dev` flow on both storages): terminated with
  `terminateRun` (-> CANCELED), its run worker killed (-> FAILURE). No torchrun or rank process is left, and
  launching the partition again resumes from the checkpoint and succeeds. Its step worker killed: the step's
  retry policy starts the step again in the same run, which resumes from the checkpoint and succeeds.
- Along the way: a fake HF_TOKEN given to the run through the environment is written to no file (artefacts,
  DAGSTER_HOME with its SQLite storage and compute logs, the console log), and every socket Dagster's own
  processes listen on is bound to 127.0.0.1.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from sae_pipeline.assets import tokenized_dataset
from tests.support.browser import group_members, stop_process_group
from tests.support.pipeline import (
    MODEL,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)
from tests.support.processes import (
    free_port,
    graphql,
    start_dagster_dev,
    training_processes,
    wait_until_gone,
    wait_until_serving,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "hf_FaultSuiteFakeToken0123456789abcdef"
# The queue looks for runs to start every second instead of every 5 s: each launch starts sooner, nothing else
# changes.
DAGSTER_YAML = """telemetry:
  enabled: false
auto_materialize:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""

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
    # ~620 optimizer steps of one 16-token sequence on 2 ranks: training outlasts the webserver's end. (At 32
    # tokens, ~310 steps, a quiet machine once finished the run before the webserver was killed.)
    entry = tiny_entry(
        tiny_model_dir,
        corpus_file,
        ctx_len=16,
        train={"batch_size": 1, "max_tokens": 20_000, "save_every": 25, "log_every": 1},
    )
    registry = write_registry(tmp_path / "models.yaml", entry)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tokenize(root, registry, instance)

    # The server's own registry is empty, so its sensor launches nothing; the run gets the registry by config.
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SAE_PIPELINE_ROOT": str(root),
        "OMP_NUM_THREADS": "1",
        "SAE_PIPELINE_REGISTRY": str(write_registry(tmp_path / "empty.yaml")),
        "HF_TOKEN": FAKE_TOKEN,
    }
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
        tags = {
            "dagster/partition": f"{MODEL}|1",
            "dagster/partition/model": MODEL,
            "dagster/partition/stride": "1",
        }
        params = {
            "selector": {
                "repositoryLocationName": location,
                "repositoryName": "__repository__",
                "jobName": "train_evaluate_publish_job",
                "assetSelection": [{"path": ["sae_checkpoints"]}],
            },
            "runConfigData": {
                "resources": {
                    "registry": {"config": {"path": str(registry)}},
                    "launcher": {"config": {"nproc_per_node": 2, "omp_num_threads": 1}},
                }
            },
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        launched = graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        deadline = time.monotonic() + 150
        while not (metrics.exists() and metrics.stat().st_size > 0):
            status = run_status(url, run_id)
            assert status not in FINISHED and time.monotonic() < deadline, (
                f"training did not start ({status})"
            )
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
        while (
            lingering := [p for p in group_members(first.pid) if p.is_running()]
        ) and time.monotonic() < deadline:
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
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_two_strides_of_one_model_trained_at_once_keep_to_their_own_folders(
    tmp_path, tiny_model_dir, corpus_file
):
    root = tmp_path / "artefacts"
    entry = tiny_entry(
        tiny_model_dir,
        corpus_file,
        train={"batch_size": 4, "max_tokens": 1_200, "save_every": 3, "log_every": 1},
    )
    registry = write_registry(tmp_path / "models.yaml", entry)
    tokenize(root, registry, dg.DagsterInstance.ephemeral())
    tokenized = root / "tokenized" / MODEL
    before = tree_digest(tokenized)

    layers = {1: ["layers.0", "layers.1", "layers.2"], 2: ["layers.0", "layers.2"]}
    children = {
        stride: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.run_training",
                str(root),
                str(registry),
                f"{MODEL}|{stride}",
            ],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for stride in layers
    }
    # Watch the process table until both are done: the two torchruns must have run side by side.
    both_seen = False
    deadline = time.monotonic() + 150
    while any(child.poll() is None for child in children.values()) and time.monotonic() < deadline:
        torchruns = [_cmdline(p) for p in training_processes(str(root))]
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
        ".stride-1.lock",
        ".stride-2.lock",
        "stride-1",
        "stride-2",
    ]
    # The shared tokenized dataset was only read: same files, same bytes, same mtimes, no cache written.
    assert tree_digest(tokenized) == before


# Stopping a run through Dagster itself: `terminateRun` from the UI's GraphQL API, the step worker or the run
# worker killed outright. One `dagster dev` serves these tests; each trains its own stride partition of the
# tiny model. Run monitoring is not enabled: with the default run launcher the code server itself notices a
# dead run worker (it polls its run processes every 0.5 s) and marks the run failed.
#
# In practice (Dagster 1.13.27, default run launcher, default multiprocess executor), for one run:
#   dagster dev -> code server (`dagster api grpc`) -> run worker (multiprocessing spawn child of the code
#   server) -> step worker (multiprocessing spawn child of the run worker, executing sae_checkpoints) ->
#   torchrun (own session, parent-death signal) -> the ranks (parent-death signal).
TERMINATE_RUN = """
mutation Terminate($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId } }
    ... on TerminateRunFailure { message }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}"""
TORCHRUN = "torch.distributed.run"
# One sequence of 32 tokens per rank and optimizer step, 20-30 steps a second here: 150 steps, long enough to
# stop the run well before its end (the tests stop it at step 15-45), short enough for the resumed run to
# finish in seconds.
LONG_TRAIN = {"batch_size": 1, "max_tokens": 9_600, "save_every": 10, "log_every": 1}
TOTAL_STEPS = 9_600 // 32 // 2


@dataclasses.dataclass
class Served:
    url: str
    location: str
    home: Path
    root: Path
    registry: Path
    log: Path


@pytest.fixture(scope="module")
def served(postgres, tmp_path_factory, tiny_model_dir, corpus_file):
    """`dagster dev` on 127.0.0.1 with its own DAGSTER_HOME on PostgreSQL (the storage of deploy/dagster.yaml,
    on a fresh database of the test server), the tiny model tokenized in its instance. The rest of the
    production instance (run queue, pool, run retries) is left out: these tests stop runs on purpose, and
    relaunch them themselves."""
    base = tmp_path_factory.mktemp("served")
    home, root = base / "dagster_home", base / "artefacts"
    home.mkdir()
    storage = {"storage": yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())["storage"]}
    (home / "dagster.yaml").write_text(DAGSTER_YAML + yaml.safe_dump(storage))
    registry = write_registry(base / "models.yaml", tiny_entry(tiny_model_dir, corpus_file, train=LONG_TRAIN))
    database = postgres.dagster_env(postgres.create_database())
    # This process reads the same instance (run messages, materializations): it needs the variables too.
    patch = pytest.MonkeyPatch()
    for key, value in database.items():
        patch.setenv(key, value)
    server, left = None, []
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            tokenize(root, registry, instance)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "SAE_PIPELINE_ROOT": str(root),
            "OMP_NUM_THREADS": "1",
            "SAE_PIPELINE_REGISTRY": str(write_registry(base / "empty.yaml")),
            # A retried step starts again 5 s after the failure: enough to see the failed attempt's end first.
            "SAE_PIPELINE_RETRY_DELAY_S": "5",
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = base / "dagster_dev.log"
        # Through the repository's workspace.yaml, as README documents `dagster dev -w workspace.yaml`.
        server = start_dagster_dev(port, env, base, log, target=("-w", str(REPO / "workspace.yaml")))
        wait_until_serving(server, url, log)
        [location] = [e["name"] for e in graphql(url, LOCATIONS)["workspaceOrError"]["locationEntries"]]
        assert location == "sae_pipeline"  # the workspace file's location_name
        yield Served(url, location, home, root, registry, log)
    finally:
        if server is not None:
            left = stop_process_group(server)
        patch.undo()
    assert not left, f"processes left running: {left}"


def launch_training(served: Served, stride: int) -> str:
    """Launch sae_checkpoints of partition tiny|<stride> on 2 ranks; return the run id."""
    tags = {
        "dagster/partition": f"{MODEL}|{stride}",
        "dagster/partition/model": MODEL,
        "dagster/partition/stride": str(stride),
    }
    params = {
        "selector": {
            "repositoryLocationName": served.location,
            "repositoryName": "__repository__",
            "jobName": "train_evaluate_publish_job",
            "assetSelection": [{"path": ["sae_checkpoints"]}],
        },
        "runConfigData": {
            "resources": {
                "registry": {"config": {"path": str(served.registry)}},
                "launcher": {"config": {"nproc_per_node": 2, "omp_num_threads": 1}},
            }
        },
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = graphql(served.url, LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in `run_dir`, the one a resume picks (only rank 0 writes
    trainer state when every rank trains every layer)."""
    from sae_core.checkpoint import latest_complete_step

    return latest_complete_step(run_dir, writer_ranks=1) if run_dir.exists() else None


def wait_for_checkpoint(served: Served, run_id: str, run_dir: Path, timeout_s: float = 150) -> None:
    """Wait until the run has logged a few steps past its first complete checkpoint."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while True:
        steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        saved = checkpoint_step(run_dir)
        if saved is not None and steps >= saved + 3:
            return
        status = run_status(served.url, run_id)
        assert status not in FINISHED and time.monotonic() < deadline, (
            f"no checkpoint yet ({status}, {steps} steps):\n{served.log.read_text()[-5000:]}"
        )
        time.sleep(0.3)


def wait_for_end(served: Served, run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := run_status(served.url, run_id)) not in FINISHED:
        assert time.monotonic() < deadline, f"the run is still {status} after {timeout_s} s"
        time.sleep(0.5)
    return status


def run_messages(served: Served, run_id: str) -> list[str]:
    with dg.DagsterInstance.from_config(str(served.home)) as instance:
        return [record.message or "" for record in instance.all_logs(run_id)]


def materialization_metadata(served: Served, run_id: str) -> dict:
    with dg.DagsterInstance.from_config(str(served.home)) as instance:
        events = [
            e
            for e in instance.all_logs(run_id)
            if e.is_dagster_event and e.dagster_event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
        ]
    [event] = events
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def assert_resumes(served: Served, stride: int, hookpoints: list[str]) -> None:
    """Launch the partition again: it resumes the newest checkpoint and finishes with complete SAEs."""
    run_dir = served.root / "runs" / MODEL / f"stride-{stride}"
    before = metrics_steps(run_dir / "metrics.jsonl")
    checkpoint = checkpoint_step(run_dir)
    assert checkpoint is not None and 0 < checkpoint <= before[-1] < TOTAL_STEPS, (checkpoint, before[-1])
    print(f"stopped at step {before[-1]}, checkpoint {checkpoint}")
    run_id = launch_training(served, stride)
    assert_resumed(served, run_id, stride, hookpoints, before, checkpoint)


def assert_resumed(
    served: Served, run_id: str, stride: int, hookpoints: list[str], before: list[int], checkpoint: int
) -> None:
    """Run `run_id` succeeds by resuming the checkpoint at step `checkpoint` of a training that had logged
    the steps `before`, and finishes with complete SAEs."""
    run_dir = served.root / "runs" / MODEL / f"stride-{stride}"
    assert (status := wait_for_end(served, run_id, timeout_s=150)) == "SUCCESS", (
        status,
        "\n".join(run_messages(served, run_id))[-5000:],
    )
    assert any(f"resuming the unfinished run in {run_dir}" in m for m in run_messages(served, run_id))
    meta = materialization_metadata(served, run_id)
    assert meta["resumed"] is True, meta
    # The new run went on from the checkpoint: its first step is the one after it, and it ran to the end.
    steps = metrics_steps(run_dir / "metrics.jsonl")
    assert steps[: len(before)] == before
    resumed = steps[len(before) :]
    assert resumed == list(range(checkpoint + 1, resumed[-1] + 1)), resumed[:5]
    info = json.loads((run_dir / "run.json").read_text())
    assert (
        info["steps"] == info["total_steps"] == resumed[-1] == TOTAL_STEPS
        and info["hookpoints"] == hookpoints
    )
    from sae_core.sae import Sae

    for hookpoint in hookpoints:
        assert Sae.load_from_disk(run_dir / hookpoint).hookpoint == hookpoint
    assert not (run_dir.parent / f"stride-{stride}.previous").exists()
    assert not (left := wait_until_gone(str(served.root), timeout_s=10)), [p.cmdline() for p in left]


def test_terminating_a_training_run_in_dagster_cancels_it_leaks_nothing_and_the_rerun_resumes(served):
    run_id, _, _ = train_until_checkpointed(served, stride=1)
    assert len(training_processes(str(served.root))) >= 3  # torchrun + 2 ranks

    started = time.monotonic()
    answer = graphql(served.url, TERMINATE_RUN, {"runId": run_id})["terminateRun"]
    assert answer["__typename"] == "TerminateRunSuccess", answer
    status = wait_for_end(served, run_id, timeout_s=90)
    took = time.monotonic() - started
    assert status == "CANCELED", "\n".join(run_messages(served, run_id))[-5000:]
    # The step stopped torchrun's whole tree before the run was marked canceled.
    assert not (left := wait_until_gone(str(served.root), timeout_s=5)), [p.cmdline() for p in left]
    messages = run_messages(served, run_id)
    assert any("interrupted: stopping torchrun" in m for m in messages), messages
    print(f"terminateRun -> {status} in {took:.1f} s")

    assert_resumes(served, stride=1, hookpoints=["layers.0", "layers.1", "layers.2"])


def train_until_checkpointed(served: Served, stride: int) -> tuple[str, psutil.Process, psutil.Process]:
    """Launch a partition's training, wait for its first checkpoint; (run id, step worker, run worker)."""
    assert not training_processes(str(served.root))
    run_id = launch_training(served, stride=stride)
    wait_for_checkpoint(served, run_id, served.root / "runs" / MODEL / f"stride-{stride}")
    [torchrun] = [p for p in training_processes(str(served.root)) if TORCHRUN in p.cmdline()]
    step_worker = torchrun.parent()
    run_worker = step_worker.parent()
    # Both workers are multiprocessing "spawn" children; the run worker's parent is the code server.
    assert all("spawn_main" in " ".join(p.cmdline()) for p in (step_worker, run_worker))
    assert run_worker.parent().cmdline()[1:5] == ["-m", "dagster", "api", "grpc"]
    return run_id, step_worker, run_worker


def test_killing_the_step_worker_retries_the_step_which_resumes_and_leaks_nothing(served):
    stride = 2
    run_id, step_worker, _ = train_until_checkpointed(served, stride=stride)
    run_dir = served.root / "runs" / MODEL / f"stride-{stride}"
    training = training_processes(str(served.root))

    started = time.monotonic()
    step_worker.kill()  # no cleanup code runs: the parent-death signals must stop torchrun and the ranks
    gone, alive = psutil.wait_procs(training, timeout=45)
    assert not alive, [p.cmdline() for p in alive]
    took = time.monotonic() - started
    # A step process that died by a signal is worth another try (sae_pipeline.retries): the run worker
    # retries the step (after SAE_PIPELINE_RETRY_DELAY_S, 5 s here), and the retry resumes the checkpoint.
    before = metrics_steps(run_dir / "metrics.jsonl")
    checkpoint = checkpoint_step(run_dir)
    assert checkpoint is not None and 0 < checkpoint <= before[-1] < TOTAL_STEPS, (checkpoint, before[-1])
    print(f"SIGKILL of the step worker -> torchrun and ranks gone in {took:.1f} s, at step {before[-1]}")
    assert_resumed(served, run_id, stride, ["layers.0", "layers.2"], before, checkpoint)
    messages = run_messages(served, run_id)
    assert any("child process for step sae_checkpoints" in m for m in messages), messages[-20:]


def test_killing_the_run_worker_fails_the_run_stops_the_orphaned_step_and_the_rerun_resumes(served):
    run_id, step_worker, run_worker = train_until_checkpointed(served, stride=4)

    started = time.monotonic()
    run_worker.kill()
    # The code server sees its run worker die and marks the run failed at once ...
    assert (status := wait_for_end(served, run_id, timeout_s=30)) == "FAILURE", status
    # ... but the step worker is not the code server's child: it notices it was orphaned and stops torchrun.
    assert not (left := wait_until_gone(str(served.root), timeout_s=45)), [p.cmdline() for p in left]
    psutil.wait_procs([step_worker], timeout=30)
    assert not step_worker.is_running()
    took = time.monotonic() - started
    messages = run_messages(served, run_id)
    assert any("was terminated by signal 9" in m for m in messages), messages[-10:]
    assert any("the parent of the step process" in m and "stopping torchrun" in m for m in messages), messages
    print(f"SIGKILL of the run worker -> {status}; no process left after {took:.1f} s")

    assert_resumes(served, stride=4, hookpoints=["layers.0"])


def _cmdline(process) -> str:
    """A process's command line, or "" if it exited between the listing and this read (a race seen in CI)."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""
