"""The `gpu` pool under a real `dagster dev`: a backfill over 2 models x 3 strides, with the pool at the one
slot deploy/dagster.yaml gives it, trains one partition at a time and leaves no slot claimed.

`dagster dev` serves the pipeline's code location with cheap ranks (tests/support/fake_definitions.py: each
training is a real torchrun of tests.support.fake_rank, whose ranks record when they start and end) on the
production instance: deploy/dagster.yaml (only the queue looks more often) on a fresh database of the
test's PostgreSQL: queued runs, every pool at 1 slot claimed per step, run monitoring. The backfill is
launched as the UI launches one from the asset graph (GraphQL `launchPartitionBackfill` of sae_checkpoints);
the backfill daemon submits all its runs, and the run queue and the pool alone keep the trainings apart. (A
killed run freeing its slot, on the production services: tests/pipeline/test_production.py.)
"""

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.support.browser import stop_process_group
from tests.support.pipeline import tiny_entry, write_registry
from tests.support.processes import (
    free_port,
    graphql,
    start_dagster_dev,
    training_processes,
    wait_for_code_location,
    wait_until_serving,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MODELS = ("tiny-a", "tiny-b")
STRIDES = ("1", "2", "4")  # the stride partitions of the code location ($SAE_PIPELINE_STRIDES unset)
PARTITIONS = sorted(f"{model}|{stride}" for model in MODELS for stride in STRIDES)
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
  }
}"""


def rank_zero_spans(records: Path) -> dict[int, dict]:
    """Every fake training by the pid of its rank 0: its partition, start and end (None if it never ended)."""
    spans: dict[int, dict] = {}
    for event in map(json.loads, (records / "events.jsonl").read_text().splitlines()):
        if event["rank"] == 0:
            span = spans.setdefault(event["pid"], {"partition": f"{event['model']}|{event['stride']}"})
            span[event["event"]] = event["time"]
    return {pid: {"end": None, **span} for pid, span in spans.items()}


def test_a_backfill_of_two_models_by_three_strides_with_one_gpu_slot_trains_one_partition_at_a_time(
    postgres, tmp_path, tiny_model_dir, corpus_file, monkeypatch
):
    home, root, records = tmp_path / "dagster_home", tmp_path / "artefacts", tmp_path / "ranks"
    home.mkdir()
    # deploy/dagster.yaml, with one change: the queue looks for runs to start every second instead of every
    # 5 s (each of the 6 runs starts sooner; the limits and pools are the same).
    instance_config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    instance_config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config))
    entries = [tiny_entry(tiny_model_dir, corpus_file, name=model) for model in MODELS]
    registry = write_registry(tmp_path / "models.yaml", *entries)
    for model in MODELS:  # the training step checks that the model's tokenized dataset is there
        (root / "tokenized" / model).mkdir(parents=True)
        (root / "tokenized" / model / "dataset_info.json").write_text("{}")
    instance_env = {
        **postgres.dagster_env(postgres.create_database()),
        "DAGSTER_HOME": str(home),
        "DAGSTER_COMPUTE_LOGS_DIR": str(tmp_path / "compute_logs"),
    }
    env = {
        **{k: v for k, v in os.environ.items() if k != "SAE_PIPELINE_STRIDES"},
        **instance_env,
        "SAE_PIPELINE_ROOT": str(root),
        "SAE_PIPELINE_REGISTRY": str(registry),
        "FAKE_RANK_DIR": str(records),
        "FAKE_RANK_SLEEP_S": "1",
    }
    # This process reads the same instance (partitions, runs, pool slots).
    for key, value in instance_env.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "dagster_dev.log"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("models", list(MODELS))
        server = start_dagster_dev(port, env, REPO, log, target=("-m", "tests.support.fake_definitions"))
        left: list[str] = []
        try:
            wait_until_serving(server, url, log)
            wait_for_code_location(url, [log])
            params = {"partitionNames": PARTITIONS, "assetSelection": [{"path": ["sae_checkpoints"]}]}
            launched = graphql(url, BACKFILL, {"params": params})["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            backfill = dg.RunsFilter(tags={"dagster/backfill": launched["backfillId"]})

            deadline = time.monotonic() + 400
            while True:
                records_of_runs = instance.get_run_records(filters=backfill)
                runs = [r.dagster_run for r in records_of_runs]
                if len(runs) >= len(PARTITIONS) and all(r.status in FINISHED for r in runs):
                    break
                assert time.monotonic() < deadline, (
                    [(r.tags, r.status) for r in runs],
                    log.read_text()[-5000:],
                )
                time.sleep(1)
            pool = instance.event_log_storage.get_concurrency_info("gpu")
        finally:
            left = stop_process_group(server)
    assert not left, f"processes left running: {left}"
    assert not training_processes(str(root))

    # One run per partition, tagged with it, and every one trained its partition to the end.
    assert sorted(r.tags.get("dagster/partition", "") for r in runs) == PARTITIONS, [r.tags for r in runs]
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), log.read_text()[-5000:]
    spans = sorted(rank_zero_spans(records).values(), key=lambda span: span["start"])
    assert sorted(span["partition"] for span in spans) == PARTITIONS, spans
    assert all(span["end"] is not None for span in spans), spans
    # The runs were all there, queued, before the first training ended ...
    assert max(r.create_timestamp.timestamp() for r in records_of_runs) < spans[0]["end"]
    # ... and still no training started before the one before it had ended.
    for before, after in zip(spans, spans[1:]):
        assert before["end"] <= after["start"], f"two trainings at once: {before}, {after}"
    # The pool is the instance's 1 slot, and no run holds it any more.
    assert pool.slot_count == 1 and not pool.claimed_slots, pool
