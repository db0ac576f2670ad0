"""Step retries match the failure: a rank that vanished (killed by a signal) or a collective that timed out
is retried, a Python error in a rank is not. Real torchrun with 2 ranks, the fake rank of
tests/support/fake_rank.py in place of training (a retry of a real training resuming its checkpoint:
test_faults_pipeline.py)."""

import json
from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.assets import sae_checkpoints
from sae_pipeline.retries import diagnose_launch_failure
from tests.support.pipeline import MODEL, failure_text, materialize, resources_for, tiny_entry, write_registry

pytestmark = pytest.mark.slow
PARTITION = f"{MODEL}|1"


def train_with_fake_ranks(tmp_path: Path, tiny_model_dir, corpus_file, mode: str):
    """Materialize sae_checkpoints of tiny|1 with 2 fake ranks in `mode`; (result, fake ranks' events)."""
    root, records = tmp_path / "artefacts", tmp_path / "ranks"
    (root / "tokenized" / MODEL).mkdir(parents=True)
    (root / "tokenized" / MODEL / "dataset_info.json").write_text("{}")  # the step checks it is there
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    resources = resources_for(
        root,
        registry,
        entry_module="tests.support.fake_rank",
        extra_env={"FAKE_RANK_DIR": str(records), "FAKE_RANK_MODE": mode, "FAKE_RANK_SLEEP_S": "2"},
    )
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    result = materialize([sae_checkpoints], PARTITION, instance, resources)
    events = [json.loads(line) for line in (records / "events.jsonl").read_text().splitlines()]
    return result, events


def retries_of(result: dg.ExecuteInProcessResult) -> list[str]:
    """The error message of every retry the step asked for."""
    return [
        e.event_specific_data.error.to_string()
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("killed-once", "rank 1 vanished: killed by signal 9 (SIGKILL)"),
        ("timeout-once", "rank 0: a collective timed out or lost its peer"),
    ],
)
def test_a_vanished_rank_or_a_collective_timeout_is_retried_and_the_retry_succeeds(
    mode, reason, tmp_path, tiny_model_dir, corpus_file
):
    result, events = train_with_fake_ranks(tmp_path, tiny_model_dir, corpus_file, mode)
    assert result.success, failure_text(result)
    [retry] = retries_of(result)
    assert reason in retry and "(retryable)" in retry, retry
    # The first attempt never finished; the second ran both ranks to the end.
    ends = sorted((e["attempt"], e["rank"]) for e in events if e["event"] == "end")
    assert ends == [(2, 0), (2, 1)], events
    [materialization] = result.get_asset_materialization_events()
    assert materialization.materialization.metadata["attempt"].value == 2


def test_a_python_error_in_a_rank_is_not_retried(tmp_path, tiny_model_dir, corpus_file):
    result, events = train_with_fake_ranks(tmp_path, tiny_model_dir, corpus_file, "python-error")
    assert not result.success and not retries_of(result)
    text = failure_text(result)
    assert "rank 1 raised RuntimeError: a bug in the training code (not retried)" in text, text
    assert {e["attempt"] for e in events} == {1}


def test_diagnosis_reads_torchruns_root_cause_not_the_ranks_it_stopped_itself():
    # torchrun lists the rank it SIGTERMed after the first failure too; only the root cause counts.
    tail = [
        "Failures:",
        "[1]:",
        "  rank      : 0 (local_rank: 0)",
        "  exitcode  : -15 (pid: 11282)  (SIGTERM)",
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 1 (pid: 11283)",
    ]
    error = [(1, "Traceback (most recent call last):\nValueError: bad settings\n")]
    assert diagnose_launch_failure(1, error, tail) == (False, "rank 1 raised ValueError: bad settings")
    assert diagnose_launch_failure(-9, [], []).retryable  # torchrun itself killed
    nccl = "torch.distributed.DistBackendError: Watchdog caught collective operation timeout: WorkNCCL(...)"
    assert diagnose_launch_failure(1, [(3, nccl)], tail).retryable
    assert not diagnose_launch_failure(1, [], ["ModuleNotFoundError: No module named 'x'"]).retryable
