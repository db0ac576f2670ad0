"""Orphaned-pod cleanup (sae_pipeline/orphaned_pods.py): which training pods the sensor deletes, decided
against the runs of a real Dagster instance. The Kubernetes API calls themselves are not tested (no cluster).
"""

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from sae_core.errors import ConfigError
from sae_pipeline.k8s import orphaned_pods_selector, torchrun_pod_manifest
from sae_pipeline.orphaned_pods import NAMESPACE_ENV, Pod, delete_orphaned_pods, pods_to_delete, run_statuses

S = dg.DagsterRunStatus
# Ended, then not yet ended (a QUEUED run cannot be created without a code location origin).
STATUSES = (S.SUCCESS, S.FAILURE, S.CANCELED, S.STARTED, S.NOT_STARTED, S.STARTING, S.CANCELING)


def training_pod(name: str, run_id: str) -> Pod:
    """A pod as the cluster would list it, with the labels sae_pipeline.k8s puts in its manifest."""
    manifest = torchrun_pod_manifest(
        image="sae:1",
        command=["torchrun", "-m", "sae_pipeline.rank_entry"],
        nproc=2,
        artefact_root="/artefacts",
        artefact_claim="artefacts",
        run_id=run_id,
        step_key="sae_checkpoints",
        partition="tiny|2",
    )
    return Pod(name, "sae", manifest["metadata"]["labels"])


def test_the_pods_of_runs_that_ended_are_deleted_and_no_other():
    with dg.instance_for_test() as instance:
        runs = {
            status: create_run_for_test(instance, job_name="train_evaluate_publish_job", status=status).run_id
            for status in STATUSES
        }
        pods = [training_pod(f"train-{status.value.lower()}", run_id) for status, run_id in runs.items()]
        unknown_run = training_pod("train-of-another-instance", "0c9e7a2e-5a55-4b5e-9c1a-4f2f0d0b0b0b")
        # Someone else's pod that happens to carry our run-id label: not managed by us, never touched.
        foreign = Pod("not-ours", "sae", {"sae-pipeline/run-id": runs[S.FAILURE], "app": "other"})
        unlabelled = Pod("bare", "sae", {})
        everything = [*pods, unknown_run, foreign, unlabelled]

        statuses = run_statuses(instance, everything)
        assert statuses == {run_id: status for status, run_id in runs.items()}
        doomed = pods_to_delete(everything, statuses)
        assert sorted(p.name for p in doomed) == ["train-canceled", "train-failure", "train-success"]
        # The sensor lists pods with this selector: it matches every training pod's labels.
        wanted = dict(term.split("=") for term in orphaned_pods_selector().split(","))
        assert all(wanted.items() <= dict(p.labels).items() for p in pods)
        assert not wanted.items() <= foreign.labels.items()

        # A run that ends later: its pod goes on the next tick.
        instance.report_run_failed(instance.get_run_by_id(runs[S.STARTED]))
        doomed = pods_to_delete(everything, run_statuses(instance, everything))
        assert "train-started" in {p.name for p in doomed}
        assert run_statuses(instance, [unlabelled, foreign]) == {}


def test_the_sensor_without_kubernetes_credentials_fails_its_tick_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(NAMESPACE_ENV, "sae")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance) as context:
        with pytest.raises(ConfigError, match="no Kubernetes credentials") as raised:
            delete_orphaned_pods(context)
    assert "\n" not in str(raised.value) and "KUBECONFIG" in str(raised.value)


def test_the_sensor_is_part_of_the_code_location_only_with_a_namespace(monkeypatch):
    import importlib

    import sae_pipeline.definitions as definitions

    def sensors() -> set[str]:
        return {s.name for s in importlib.reload(definitions).defs.sensors}

    monkeypatch.delenv(NAMESPACE_ENV, raising=False)
    try:
        assert "delete_orphaned_pods" not in sensors()
        monkeypatch.setenv(NAMESPACE_ENV, "sae")
        assert "delete_orphaned_pods" in sensors()
    finally:
        monkeypatch.delenv(NAMESPACE_ENV, raising=False)
        importlib.reload(definitions)
