"""Kubernetes: delete the training pods that runs which have ended left behind.

A pod built by sae_pipeline.k8s carries its Dagster run's id as a label. When a run worker dies without
stopping its launch (OOM-killed, its node lost) and no ownerReference took the training pod down with it, the
pod keeps its GPUs. The `delete_orphaned_pods` sensor lists the pipeline's pods (`orphaned_pods_selector()`),
looks up each pod's run in the Dagster instance, and deletes the pods of runs that have ended (success,
failure, canceled). Pods of runs still queued, starting, running or cancelling are left alone, and so are pods
whose run this instance does not know (another deployment sharing the namespace) or that lack the labels.

`pods_to_delete` decides, as a pure function of the pods' labels and the runs' statuses; it is tested on a
real instance. The Kubernetes API calls (list, delete) are not tested: there is no cluster in CI, and fakes of
the API server would only test the fake. The sensor is part of the code location when
$SAE_PIPELINE_K8S_NAMESPACE is set as it loads.
"""

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dagster as dg

from sae_core.errors import ConfigError

from .k8s import LABEL_PREFIX, MANAGED_BY, label_value, orphaned_pods_selector

NAMESPACE_ENV = "SAE_PIPELINE_K8S_NAMESPACE"
RUN_ID_LABEL = f"{LABEL_PREFIX}/run-id"
ENDED = frozenset({dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED})


@dataclass(frozen=True)
class Pod:
    """What the decision needs of a pod: where it is and its labels."""

    name: str
    namespace: str
    labels: Mapping[str, str]

    @property
    def run_id(self) -> str | None:
        if any(self.labels.get(k) != v for k, v in MANAGED_BY.items()):
            return None  # not one of ours, whatever its other labels say
        return self.labels.get(RUN_ID_LABEL)


def pods_to_delete(pods: Iterable[Pod], run_statuses: Mapping[str, dg.DagsterRunStatus]) -> list[Pod]:
    """The pods whose run has ended; `run_statuses` maps a run id label value to the run's status (runs the
    instance does not know are missing from it, and their pods are kept)."""
    return [p for p in pods if p.run_id is not None and run_statuses.get(p.run_id) in ENDED]


def run_statuses(instance: dg.DagsterInstance, pods: Iterable[Pod]) -> dict[str, dg.DagsterRunStatus]:
    """The statuses of the pods' runs, by run id label value (a run id is a UUID: its own label value)."""
    wanted = sorted({p.run_id for p in pods if p.run_id})
    if not wanted:
        return {}
    runs = instance.get_runs(filters=dg.RunsFilter(run_ids=wanted))
    return {label_value(run.run_id): run.status for run in runs}


def _core_api():
    """The Kubernetes API client: in-cluster credentials (the code server's service account), else the
    kubeconfig; neither is a one-line ConfigError."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(
                f"delete_orphaned_pods: no Kubernetes credentials (not in a pod, and no usable kubeconfig: "
                f"{first}); run the code server in the cluster with a service account that may list and "
                f"delete pods, or set KUBECONFIG, or unset {NAMESPACE_ENV}"
            ) from None
    return client.CoreV1Api()


@dg.sensor(
    name="delete_orphaned_pods",
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Deletes the training pods of runs that have ended (labels from sae_pipeline.k8s), in "
    f"${NAMESPACE_ENV}.",
)
def delete_orphaned_pods(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    namespace = os.environ.get(NAMESPACE_ENV, "")
    if not namespace:
        raise ConfigError(f"delete_orphaned_pods: set {NAMESPACE_ENV} to the namespace of the training pods")
    api = _core_api()
    listed = api.list_namespaced_pod(namespace, label_selector=orphaned_pods_selector())
    pods = [
        Pod(p.metadata.name, p.metadata.namespace or namespace, p.metadata.labels or {}) for p in listed.items
    ]
    doomed = pods_to_delete(pods, run_statuses(context.instance, pods))
    for pod in doomed:
        context.log.info(f"deleting pod {pod.namespace}/{pod.name}: its run {pod.run_id} has ended")
        api.delete_namespaced_pod(pod.name, pod.namespace)
    return dg.SkipReason(f"{len(pods)} pipeline pods, {len(doomed)} of ended runs deleted")
