"""The production setup of deploy/, for real: its dagster.yaml on a real PostgreSQL 15, and the three services
of deploy/systemd/ started from their own ExecStart lines (code server, daemon, webserver, with the gRPC
workspace of deploy/workspace.yaml).

The code location is the pipeline's own with cheap ranks (tests/support/fake_definitions.py): each training is
a real torchrun of tests.support.fake_rank, which logs when it starts and ends. What is checked:

- the instance deploy/dagster.yaml describes (storage, run queue and limits, pools, monitoring, retries,
  retention, compute logs, telemetry) is what Dagster loads;
- (a backfill with the `gpu` pool at 1 slot, 2 models x 3 strides under `dagster dev` on this instance:
  tests/pipeline/test_gpu_pool.py)
- a run whose worker is killed while it holds the slot frees it (run monitoring), the queued run then gets it,
  and the crashed run is retried (run_retries);
- PostgreSQL restarted while a training runs: the run goes on and its record is complete.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psutil
import pytest

from tests.support.browser import stop_process_group
from tests.support.pipeline import MODEL, tiny_entry, write_registry
from tests.support.processes import (
    free_port,
    graphql,
    training_processes,
    wait_for_code_location,
    wait_until_serving,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = "/opt/sae-pipeline/venv/bin/"
# The console scripts of the units, as this Python runs them.
EXECUTABLES = {
    "dagster": [sys.executable, "-m", "dagster"],
    "dagster-daemon": [sys.executable, "-m", "dagster._daemon"],
    "dagster-webserver": [sys.executable, "-m", "dagster_webserver"],
}
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def environment_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_deploy_instance_loads_on_postgres_as_documented(postgres, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    for key, value in postgres.dagster_env(postgres.create_database()).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_COMPUTE_LOGS_DIR", str(tmp_path / "logs"))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.compute_log_manager._base_dir == str(tmp_path / "logs")  # noqa: SLF001
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 4 and len(queue.tag_concurrency_limits) == 2
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1 and pools.pool_granularity.value == "op"
        monitoring = instance.run_monitoring_settings
        assert instance.run_monitoring_enabled and monitoring["free_slots_after_run_end_seconds"] > 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure  # crashed workers only
        assert not instance.telemetry_enabled
    # Every variable the instance and the units read is set in the environment file (or is a secret).
    used = set(re.findall(r"\{env: (\w+)\}", (DEPLOY / "dagster.yaml").read_text()))
    for unit in (DEPLOY / "systemd").glob("*.service"):
        used |= set(re.findall(r"\$\{(\w+)\}", unit.read_text()))
    assert used - set(environment_file(DEPLOY / "sae-pipeline.env")) == {"DAGSTER_PG_PASSWORD"}


def test_an_unreachable_postgres_fails_the_instance_with_dagsters_message(postgres, tmp_path, monkeypatch):
    """What a service or `dagster job execute` meets when PostgreSQL is down as it starts: Dagster's own
    DagsterPostgresException after its retries (systemd then restarts the service every 5 s)."""
    from dagster_postgres.utils import DagsterPostgresException

    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    nobody = free_port()  # nothing listens there
    for key, value in {**postgres.dagster_env("postgres"), "DAGSTER_PG_PORT": str(nobody)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_COMPUTE_LOGS_DIR", str(tmp_path / "logs"))
    started = time.monotonic()
    with pytest.raises(DagsterPostgresException, match="too many retries for DB connection"):
        dg.DagsterInstance.from_config(str(tmp_path)).get_runs(limit=1)
    print(f"unreachable PostgreSQL: DagsterPostgresException after {time.monotonic() - started:.1f} s")


def unit_command(unit: str, env: dict[str, str], replace: dict[str, str]) -> list[str]:
    """The ExecStart line of deploy/systemd/`unit`, with ${VAR} expanded from `env`, the venv's console
    scripts run by this Python, and the words in `replace` replaced."""
    text = (DEPLOY / "systemd" / unit).read_text()
    [line] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    executable, *args = shlex.split(line.removeprefix("ExecStart="))
    assert executable.startswith(VENV_BIN), executable
    args = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in args]
    return [*EXECUTABLES[executable.removeprefix(VENV_BIN)], *(replace.get(a, a) for a in args)]


@dataclass
class Services:
    url: str
    home: Path
    root: Path
    records: Path
    registry: Path
    env: dict[str, str]
    logs: list[Path]
    shared: dg.DagsterInstance  # one for the module: polling opens no new storage connections each second

    def instance(self) -> contextlib.AbstractContextManager[dg.DagsterInstance]:
        # Storage without a connection pool (dagster-postgres' NullPool, outside the webserver): each query
        # connects anew, so this instance outlives the PostgreSQL restart below.
        return contextlib.nullcontext(self.shared)

    def rank_events(self) -> list[dict]:
        path = self.records / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def log_tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)


@pytest.fixture(scope="module")
def services(postgres, tmp_path_factory, tiny_model_dir, corpus_file):
    """Code server, daemon and webserver as deploy/systemd/ starts them, on deploy/dagster.yaml with a fresh
    PostgreSQL database; the partitions tiny|1,2,4 exist and their (fake) tokenized dataset too."""
    base = tmp_path_factory.mktemp("services")
    home, root, records = base / "dagster_home", base / "artefacts", base / "ranks"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    code_port, web_port = free_port(), free_port()
    workspace = base / "workspace.yaml"
    workspace.write_text((DEPLOY / "workspace.yaml").read_text().replace("port: 4266", f"port: {code_port}"))
    registry = write_registry(base / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    env = {
        **os.environ,
        **environment_file(DEPLOY / "sae-pipeline.env"),
        **postgres.dagster_env(postgres.create_database()),
        "DAGSTER_HOME": str(home),
        "DAGSTER_COMPUTE_LOGS_DIR": str(base / "compute_logs"),
        "SAE_PIPELINE_CODE_SERVER_PORT": str(code_port),
        "SAE_PIPELINE_WEBSERVER_PORT": str(web_port),
        "SAE_PIPELINE_ROOT": str(root),
        "SAE_PIPELINE_REGISTRY": str(registry),
        "FAKE_RANK_DIR": str(records),
        "FAKE_RANK_SLEEP_S": "4",
    }
    (root / "tokenized" / MODEL).mkdir(parents=True)
    (root / "tokenized" / MODEL / "dataset_info.json").write_text("{}")  # the training step checks it
    # This process reads the same instance (runs, events, pool slots): it needs the storage variables too.
    with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as opened:
        for key in [k for k in env if k.startswith("DAGSTER_")]:
            patch.setenv(key, env[key])
        shared = opened.enter_context(dg.DagsterInstance.from_config(str(home)))
        shared.add_dynamic_partitions("models", [MODEL])
        replace = {
            "/etc/sae-pipeline/workspace.yaml": str(workspace),
            "sae_pipeline.definitions": "tests.support.fake_definitions",
        }
        started: list[subprocess.Popen] = []
        logs: list[Path] = []
        try:
            for unit in ("sae-pipeline-code-server", "sae-pipeline-daemon", "sae-pipeline-webserver"):
                logs.append(base / f"{unit}.log")
                started.append(start_service(unit_command(f"{unit}.service", env, replace), env, logs[-1]))
            url = f"http://127.0.0.1:{web_port}"
            wait_until_serving(started[-1], url, logs[-1])
            # The webserver may start before the code server serves: it reloads the location when it does.
            wait_for_code_location(url, logs)
            yield Services(url, home, root, records, registry, env, logs, shared)
        finally:
            left = [line for server in reversed(started) for line in stop_process_group(server)]
    assert not left, f"processes left running: {left}"


def start_service(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_runs(services: Services, runs_filter: dg.RunsFilter, count: int, timeout_s: float) -> list:
    """Wait until `count` runs match and all have finished; return them."""
    deadline = time.monotonic() + timeout_s
    while True:
        with services.instance() as instance:
            runs = instance.get_runs(filters=runs_filter)
        if len(runs) >= count and all(r.status in FINISHED for r in runs):
            return runs
        assert time.monotonic() < deadline, ([(r.run_id, r.status) for r in runs], services.log_tail())
        time.sleep(1)


def trainings(events: list[dict]) -> dict[int, tuple[float, float | None]]:
    """(start, end or None) of every fake training, by the pid of its rank 0."""
    spans: dict[int, list] = {}
    for event in events:
        if event["rank"] == 0:
            which = 0 if event["event"] == "start" else 1
            spans.setdefault(event["pid"], [None, None])[which] = event["time"]
    return {pid: (start, end) for pid, (start, end) in spans.items()}


def assert_one_at_a_time(spans: list[tuple[float, float]]) -> None:
    ordered = sorted(spans)
    for (_, end), (next_start, _) in zip(ordered, ordered[1:]):
        assert end <= next_start, f"two trainings at once: {ordered}"


def launch_training(
    services: Services, stride: int, sleep_s: float, first_sleep_s: float | None = None
) -> str:
    """Launch the partition's training (fake ranks that sleep `sleep_s`, or `first_sleep_s` on the partition's
    first launch: a retry copies the run config, and need not sleep as long)."""
    tags = {
        "dagster/partition": f"{MODEL}|{stride}",
        "dagster/partition/model": MODEL,
        "dagster/partition/stride": str(stride),
    }
    params = {
        "selector": {
            "repositoryLocationName": "sae_pipeline",
            "repositoryName": "__repository__",
            "jobName": "train_evaluate_publish_job",
            "assetSelection": [{"path": ["sae_checkpoints"]}],
        },
        # Run config replaces the code location's launcher settings: all of them again, with this sleep.
        "runConfigData": {
            "resources": {
                "launcher": {
                    "config": {
                        "entry_module": "tests.support.fake_rank",
                        "omp_num_threads": 1,
                        "extra_env": {
                            "FAKE_RANK_SLEEP_S": str(sleep_s),
                            **({"FAKE_RANK_FIRST_SLEEP_S": str(first_sleep_s)} if first_sleep_s else {}),
                        },
                    }
                }
            }
        },
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = graphql(services.url, LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def fake_ranks(services: Services, stride: int) -> list[psutil.Process]:
    """The rank processes (not torchrun) training partition tiny|`stride`."""
    found = []
    for p in training_processes(str(services.root)):
        command = " ".join(p.cmdline())
        if f"--layer_stride {stride} " in command and "-m tests.support.fake_rank" in command:
            if "torch.distributed.run" in command:
                continue
            found.append(p)
    return found


def run_status(services: Services, run_id: str) -> dg.DagsterRunStatus:
    with services.instance() as instance:
        return instance.get_run_by_id(run_id).status


def test_a_killed_run_frees_its_gpu_slot_and_is_retried(services):
    holder = launch_training(services, stride=4, sleep_s=1, first_sleep_s=12)
    deadline = time.monotonic() + 120
    while not (ranks := fake_ranks(services, stride=4)):
        assert time.monotonic() < deadline, services.log_tail()
        time.sleep(0.5)
    waiting = launch_training(services, stride=1, sleep_s=1)
    # The slot is taken: the second run stays in the queue (the daemon looks every few seconds).
    for _ in range(5):
        assert run_status(services, waiting) == dg.DagsterRunStatus.QUEUED
        time.sleep(1)

    torchrun = ranks[0].parent()
    run_worker = torchrun.parent().parent()  # torchrun <- step worker <- run worker
    assert "spawn_main" in " ".join(run_worker.cmdline())
    killed_at = time.time()
    run_worker.kill()
    deadline = time.monotonic() + 60
    while run_status(services, holder) not in FINISHED:
        assert time.monotonic() < deadline, services.log_tail()
        time.sleep(0.5)
    assert run_status(services, holder) == dg.DagsterRunStatus.FAILURE
    # Nobody released the slot the dead worker held: run monitoring frees it after the run ended.
    with services.instance() as instance:
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    print("slot claims right after the run failed:", [(c.run_id == holder, c.step_key) for c in claimed])

    # The queued run gets the slot and trains; the crashed run is retried once (run_retries) and trains too.
    retried = wait_for_runs(services, dg.RunsFilter(tags={"dagster/parent_run_id": holder}), 1, 240)
    [retry] = retried
    for run_id in (waiting, retry.run_id):
        assert run_status(services, run_id) == dg.DagsterRunStatus.SUCCESS, services.log_tail()
    assert retry.tags["dagster/partition"] == f"{MODEL}|4"
    with services.instance() as instance:
        info = instance.event_log_storage.get_concurrency_info("gpu")
    assert not info.claimed_slots
    # One training at a time throughout: the killed one (until its kill) and the two that came after it.
    spans = [(start, end or killed_at) for start, end in trainings(services.rank_events()).values()]
    assert_one_at_a_time(spans)
    assert not training_processes(str(services.root))
    assert not psutil.pid_exists(run_worker.pid) or run_worker.status() == psutil.STATUS_ZOMBIE


def test_restarting_postgres_while_a_run_trains_keeps_the_run_and_its_record(services, postgres):
    run_id = launch_training(services, stride=2, sleep_s=10)
    deadline = time.monotonic() + 120
    while not fake_ranks(services, stride=2):
        assert time.monotonic() < deadline, services.log_tail()
        time.sleep(0.5)
    # Down for 3 s while the ranks train (no step writes an event then); every client loses its connection.
    postgres.restart(down_s=3)

    [run] = wait_for_runs(services, dg.RunsFilter(run_ids=[run_id]), 1, timeout_s=120)
    assert run.status == dg.DagsterRunStatus.SUCCESS, services.log_tail()
    with services.instance() as instance:
        kinds = [e.dagster_event.event_type for e in instance.all_logs(run_id) if e.is_dagster_event]
    for kind in ("RUN_START", "STEP_START", "ASSET_MATERIALIZATION", "STEP_SUCCESS", "RUN_SUCCESS"):
        assert dg.DagsterEventType[kind] in kinds, kinds
    # The services came through. The webserver keeps a pooled connection per storage (Dagster 1.13.27, no
    # pre-ping): a request that meets one of them after the restart fails with PostgreSQL's message, and the
    # pool reconnects. Then the webserver launches, the daemon dequeues, the code server runs.
    for attempt in range(4):
        try:
            after = launch_training(services, stride=2, sleep_s=1)
            break
        except AssertionError as error:
            assert "server closed the connection unexpectedly" in str(error) and attempt < 3, error
            print(f"request {attempt + 1} after the restart: server closed the connection unexpectedly")
    [run] = wait_for_runs(services, dg.RunsFilter(run_ids=[after]), 1, timeout_s=120)
    assert run.status == dg.DagsterRunStatus.SUCCESS, services.log_tail()
