"""Kubernetes: the pod that runs one launch (torchrun on N GPUs of one node), as a pure function.

`torchrun_pod_manifest` builds the Pod manifest (camelCase, as `kubectl apply` takes it) for a single-node
multi-GPU launch; `check_gpu_limits` refuses a manifest whose container gets fewer GPUs than ranks. The
launcher backend sae_pipeline.k8s_launcher.K8sLauncher starts it through dagster-k8s's `PipesK8sClient`
(`base_pod_meta=manifest["metadata"]`, `base_pod_spec=manifest["spec"]`). What the pod holds, and why:

- `resources.limits["nvidia.com/gpu"] = nproc` (and the same request): one rank per GPU, all on this node.
- the artefact root, a shared volume (a ReadWriteMany PersistentVolumeClaim), mounted at the same path as in
  the Dagster run pods, so the paths in the command line mean the same thing in both.
- `/dev/shm` as a memory-backed emptyDir: NCCL and DataLoader workers exchange tensors through it, and a
  container's default 64 MiB makes NCCL fail with "unhandled system error".
- labels naming the Dagster run, step and partition, so pods a dead run worker left behind can be found and
  deleted (`orphaned_pods_selector`); with `owner` (the run worker's own pod, from the downward API), an
  ownerReference lets Kubernetes delete the training pod together with that pod.
- the HF token from a Secret (`secretKeyRef`), never inline: an HF_TOKEN in `env` is refused.
- `restartPolicy: Never`: retrying is Dagster's decision (sae_pipeline.retries), not the kubelet's; the grace
  period outlasts torchrun's own 30 s shutdown of its ranks.
"""

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sae_core.errors import ConfigError

GPU_RESOURCE = "nvidia.com/gpu"
CONTAINER_NAME = "torchrun"
LABEL_PREFIX = "sae-pipeline"
MANAGED_BY = {"app.kubernetes.io/managed-by": "sae-pipeline"}
SHM_MOUNT = "/dev/shm"
HF_TOKEN_ENV = "HF_TOKEN"
_LABEL_VALUE_MAX = 63


def torchrun_pod_manifest(
    *,
    image: str,
    command: Sequence[str],
    nproc: int,
    artefact_root: str,
    artefact_claim: str,
    run_id: str,
    step_key: str,
    partition: str | None = None,
    gpus: bool = True,
    env: Mapping[str, str] | None = None,
    hf_token_secret: str | None = None,
    hf_token_key: str = HF_TOKEN_ENV,
    shm_size: str = "16Gi",
    termination_grace_s: int = 60,
    namespace: str | None = None,
    service_account: str | None = None,
    owner: Mapping[str, str] | None = None,
    container_overrides: Mapping[str, Any] | None = None,
    pod_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Pod manifest of one launch: `command` (a torchrun command line) on `nproc` GPUs of one node.

    `owner` is the run worker's pod ({"name": ..., "uid": ...}); `container_overrides` and `pod_overrides`
    replace keys of the container and of the pod spec (e.g. tolerations, nodeSelector, other resources), and
    the result is checked again: overrides that take the GPUs away are refused (check_gpu_limits).
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be at least 1, got {nproc}")
    if not str(artefact_root).startswith("/"):
        raise ConfigError(f"artefact_root must be an absolute path (the mount path), got {artefact_root!r}")
    env = dict(env or {})
    if HF_TOKEN_ENV in env:
        raise ConfigError(
            f"env holds {HF_TOKEN_ENV}: the token must not be inlined in a pod manifest; "
            "name the Secret that holds it with hf_token_secret"
        )
    container_env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in sorted(env.items())]
    if hf_token_secret:
        container_env.append(
            {
                "name": HF_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": hf_token_secret, "key": hf_token_key}},
            }
        )
    resources: dict[str, Any] = {}
    if gpus:
        # Quantities are strings in the API (the Python client turns 4 into "4" anyway).
        resources = {"limits": {GPU_RESOURCE: str(nproc)}, "requests": {GPU_RESOURCE: str(nproc)}}
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": [str(part) for part in command],
        "env": container_env,
        "resources": resources,
        "volumeMounts": [
            {"name": "artefacts", "mountPath": artefact_root},
            {"name": "dshm", "mountPath": SHM_MOUNT},
        ],
    }
    container.update(copy.deepcopy(dict(container_overrides or {})))
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": int(termination_grace_s),
        "containers": [container],
        "volumes": [
            {"name": "artefacts", "persistentVolumeClaim": {"claimName": artefact_claim}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        ],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    spec.update(copy.deepcopy(dict(pod_overrides or {})))
    metadata: dict[str, Any] = {"labels": pod_labels(run_id, step_key, partition)}
    if namespace:
        metadata["namespace"] = namespace
    if owner:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"]}
        ]
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    check_gpu_limits(manifest, nproc if gpus else 0)
    return manifest


def check_gpu_limits(manifest: Mapping[str, Any], gpus: int) -> None:
    """Raise ConfigError, in one line, when the launch asks for `gpus` GPUs and the manifest's torchrun
    container has no GPU limit, or a smaller one."""
    if gpus <= 0:
        return
    containers = manifest.get("spec", {}).get("containers") or []
    container = next((c for c in containers if c.get("name") == CONTAINER_NAME), None)
    if container is None:
        raise ConfigError(f"pod manifest: no container named {CONTAINER_NAME!r} to run the ranks in")
    limit = (container.get("resources") or {}).get("limits", {}).get(GPU_RESOURCE)
    try:
        granted = int(limit) if limit is not None else 0
    except (TypeError, ValueError):
        raise ConfigError(f"pod manifest: {GPU_RESOURCE} limit {limit!r} is not a whole number") from None
    if granted < gpus:
        what = "no" if limit is None else f"a {granted}-GPU"
        asked = f"{gpus} GPU" + ("s" if gpus > 1 else "")
        raise ConfigError(
            f"pod manifest: the launcher asks for {asked} but container {CONTAINER_NAME!r} has {what} "
            f"{GPU_RESOURCE} limit; set resources.limits.{GPU_RESOURCE}: {gpus} "
            "(or launch on CPUs with gpus: false)"
        )


def pod_labels(run_id: str, step_key: str, partition: str | None = None) -> dict[str, str]:
    """The labels of a launch's pod: who made it, and for which Dagster run, step and partition."""
    labels = {
        **MANAGED_BY,
        f"{LABEL_PREFIX}/run-id": label_value(run_id),
        f"{LABEL_PREFIX}/step": label_value(step_key),
    }
    if partition is not None:
        labels[f"{LABEL_PREFIX}/partition"] = label_value(partition)
    return labels


def orphaned_pods_selector(run_id: str | None = None) -> str:
    """The label selector of the pipeline's pods (of one run, when given): `kubectl delete pods -l <it>`
    once the run has ended stops what a killed run worker left running."""
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    return selector + (f",{LABEL_PREFIX}/run-id={label_value(run_id)}" if run_id else "")


def label_value(text: str) -> str:
    """`text` as a label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric
    ("smollm2-135m|4" -> "smollm2-135m_4")."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:_LABEL_VALUE_MAX]
    return value.strip("._-") or "none"
