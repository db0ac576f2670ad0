"""K8sLauncher: the launcher resource (a Dagster PipesClient, sae_pipeline.launcher) that runs the ranks of a
launch as one Kubernetes pod on one node, through dagster-k8s's `PipesK8sClient`.

One launch is one pod: `torchrun --nproc-per-node N` (the command line TorchrunLauncher builds for one node:
sae_pipeline.torchrun.torchrun_command) in the pod sae_pipeline.k8s.torchrun_pod_manifest builds: N GPUs, the
artefact root on its shared volume, a memory-backed /dev/shm, the HF token from a Secret, labels naming the
Dagster run. dagster-k8s creates it, puts the Pipes bootstrap variables in its environment, reads rank 0's
Pipes messages out of the pod's log (rank 0 writes them to stderr, which torchrun passes through), waits for
the pod to end, and deletes it in a `finally`, so a cancelled step deletes its pod too. A run worker that dies
outright deletes nothing: the pod names the run worker's pod as its owner (when the run pod's name, uid and
namespace are in its environment, from the downward API, and the training pod goes to the same namespace),
so Kubernetes deletes it with the run pod; the `delete_orphaned_pods` sensor (sae_pipeline.orphaned_pods)
catches the rest.

Failures are told apart as for torchrun (sae_pipeline.retries): the ranks write their tracebacks into a
per-launch folder on the shared artefact volume (`<artefact root>/.launches/<run id>-<launch>`), which the
step reads once the pod has ended, and removes. `pod_failure`, a pure function of the pod as it was when the
wait ended, the rank errors and the end of its log, makes the same dg.Failure(allow_retries=...) as
TorchrunLauncher's: an eviction or other disruption (preemption, node drain), an OOM-killed container, a
signal (exit code 128 + n), a vanished rank, a collective timeout, a pod stopped at its `max_runtime_s`, a pod
never scheduled, or one dagster-k8s stopped waiting for are retryable; a rank's own exception, or a container
that never started (a wrong image, a missing Secret), is not.
"""

import contextlib
import functools
import os
import shlex
import shutil
import signal
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
from pydantic import Field

from sae_core.errors import ConfigError

from .k8s import CONTAINER_NAME, HF_TOKEN_ENV, LABEL_PREFIX, label_value, torchrun_pod_manifest
from .launcher import PipesLauncher
from .retries import Diagnosis
from .torchrun import (
    RANK_ERRORS_ENV,
    _metadata_value,
    launch_failure,
    rank_env,
    rank_errors,
    single_node_rendezvous,
    torchrun_command,
)

# The same variable as sae_pipeline.resources.ROOT_ENV (resources re-exports this module, so it cannot be
# imported from there): the run pods get it from deploy/k8s's ConfigMap.
ROOT_ENV = "SAE_PIPELINE_ROOT"
# The run worker's own pod, from the downward API (deploy/k8s/dagster-instance.yaml sets them).
POD_NAME_ENV = "SAE_PIPELINE_POD_NAME"
POD_UID_ENV = "SAE_PIPELINE_POD_UID"
POD_NAMESPACE_ENV = "SAE_PIPELINE_POD_NAMESPACE"
LAUNCH_LABEL = f"{LABEL_PREFIX}/launch"
LAUNCHES_DIR = ".launches"
_LOG_TAIL_LINES = 40
_PIPES_MESSAGE_PREFIX = '{"__dagster_pipes_version"'
# A container waiting for one of these will not start by itself: the image or the pod's config is wrong.
_NEVER_STARTS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)


class PodLaunch(NamedTuple):
    """One launch as K8sLauncher.run starts it."""

    namespace: str
    manifest: dict[str, Any]
    launch_dir: Path
    no_owner: str | None  # why the pod names no owner, when it does not


class K8sLauncher(PipesLauncher):
    """The ranks of a launch as one Kubernetes pod (torchrun on N GPUs of one node), through PipesK8sClient.

    The step's run pod and the training pods mount the artefact volume at the same path (`artefact_root`), so
    the paths on the command line mean the same in both. A pod is one node: for several nodes use
    TorchrunLauncher with the static rendezvous.
    """

    image: str = Field(description="Container image of the training pods (the project and its GPU torch).")
    namespace: str | None = Field(
        default=None, description="Namespace of the training pods (default: the run pod's own)."
    )
    artefact_root: str = Field(
        default_factory=lambda: os.environ.get(ROOT_ENV, ""),
        description=f"Mount path of the artefact volume, as in the run pods (default: ${ROOT_ENV}).",
    )
    artefact_claim: str = Field(
        default="sae-artefacts", description="PersistentVolumeClaim of the artefact volume (ReadWriteMany)."
    )
    hf_token_secret: str | None = Field(
        default=None, description="Secret holding the Hugging Face token (never put the token in extra_env)."
    )
    hf_token_key: str = Field(default=HF_TOKEN_ENV, description="Key of the token in hf_token_secret.")
    service_account: str | None = Field(default=None, description="Service account of the training pods.")
    gpus: bool = Field(default=True, description="One nvidia.com/gpu per rank (false: ranks on CPUs).")
    shm_size: str = Field(default="16Gi", description="Size of the memory-backed /dev/shm (NCCL needs it).")
    python_executable: str = Field(default="python", description="Python of the image, runs torchrun.")
    master_port: int = Field(default=29500, description="torchrun's port inside the pod.")
    omp_num_threads: int | None = Field(
        default=None,
        description="OMP_NUM_THREADS per training rank (default: the container's cpu limit / ranks, if set).",
    )
    container_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Keys replaced in the torchrun container (e.g. resources)."
    )
    pod_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Keys replaced in the pod spec (e.g. tolerations, nodeSelector)."
    )
    termination_grace_s: int = Field(
        default=60, gt=30, description="Grace period of a deleted pod (> torchrun's own 30 s)."
    )
    max_runtime_s: int | None = Field(
        default=None,
        gt=0,
        description="Kubernetes stops a pod running longer, e.g. a hung collective (activeDeadlineSeconds).",
    )
    poll_interval_s: float = Field(default=10.0, gt=0, description="Seconds between pod status polls.")
    load_incluster_config: bool | None = Field(
        default=None, description="Use the service account's credentials (default: when in a cluster)."
    )
    kubeconfig_file: str | None = Field(default=None, description="Kubeconfig, when not in a cluster.")
    kube_context: str | None = Field(default=None, description="Context of the kubeconfig.")

    def check(self) -> None:
        if self.nnodes > 1:
            raise ConfigError(
                f"K8sLauncher: nnodes={self.nnodes}, but a pod is one node; train on several nodes with "
                "TorchrunLauncher (rdzv_backend: static, node_rank: 0 on the step's node), or set nnodes: 1"
            )
        if not self.artefact_root.startswith("/"):
            raise ConfigError(
                f"K8sLauncher: artefact_root must be the absolute mount path of the artefact volume, as in "
                f"the run pods (e.g. /mnt/sae-artefacts), got {self.artefact_root!r}; set it or ${ROOT_ENV}"
            )
        # The manifest of the biggest launch, with the overrides applied: a GPU limit the overrides took away,
        # or an inlined token, is refused here, before the step touches a folder or the cluster.
        self.pod_manifest(
            module=self.entry_module,
            args=[],
            nproc=max(self.nproc_per_node, self.eval_nproc),
            run_id="check",
            step_key="check",
            launch_dir=f"{self.artefact_root}/{LAUNCHES_DIR}/check",
        )

    def pod_manifest(
        self,
        *,
        module: str,
        args: Sequence[str],
        nproc: int,
        run_id: str,
        step_key: str,
        launch_dir: str,
        partition: str | None = None,
        namespace: str | None = None,
        owner: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The pod of one launch: `python -m module args` on `nproc` ranks, the ranks' errors into
        `launch_dir` (a folder on the artefact volume)."""
        command = torchrun_command(
            self.python_executable, nproc, module, args, single_node_rendezvous(self.master_port)
        )
        env = rank_env(self.threads(nproc, training=module == self.entry_module), self.extra_env)
        env[RANK_ERRORS_ENV] = launch_dir
        # The time limit is the pod's own: dagster-k8s follows the log until the container ends, so its wait
        # timeout only starts counting after that.
        deadline = {"activeDeadlineSeconds": self.max_runtime_s} if self.max_runtime_s else {}
        manifest = torchrun_pod_manifest(
            image=self.image,
            command=command,
            nproc=nproc,
            artefact_root=self.artefact_root,
            artefact_claim=self.artefact_claim,
            run_id=run_id,
            step_key=step_key,
            partition=partition,
            gpus=self.gpus,
            env=env,
            hf_token_secret=self.hf_token_secret,
            hf_token_key=self.hf_token_key,
            shm_size=self.shm_size,
            termination_grace_s=self.termination_grace_s,
            namespace=namespace,
            service_account=self.service_account,
            owner=owner,
            container_overrides=self.container_overrides,
            pod_overrides={**deadline, **self.pod_overrides},
        )
        manifest["metadata"]["labels"][LAUNCH_LABEL] = label_value(Path(launch_dir).name)
        return manifest

    def threads(self, nproc: int, *, training: bool = True) -> int | None:
        """OMP_NUM_THREADS of each rank: omp_num_threads for training, else the container's cpu limit shared
        among the ranks; None (torchrun's 1 per rank) when neither is known."""
        if training and self.omp_num_threads:
            return self.omp_num_threads
        cpus = _cpu_limit(self.container_overrides)
        return max(1, int(cpus // nproc)) if cpus else None

    def pipes_client(self) -> Any:
        """The PipesK8sClient of one launch (it keeps the pod's last status for the failure)."""
        return _pod_outcome_client_class()(
            load_incluster_config=self.load_incluster_config,
            kubeconfig_file=self.kubeconfig_file,
            kube_context=self.kube_context,
            poll_interval=self.poll_interval_s,
        )

    def owner(self, namespace: str) -> tuple[dict[str, str] | None, str]:
        """The run worker's pod as the owner of a training pod in `namespace`, or None and why not.

        Kubernetes ignores an owner in another namespace and then deletes the dependent at once, so an owner
        is only named in the run pod's own namespace."""
        name, uid = os.environ.get(POD_NAME_ENV), os.environ.get(POD_UID_ENV)
        if not (name and uid):
            return None, f"${POD_NAME_ENV}/${POD_UID_ENV} are not set (not in a run pod)"
        own = os.environ.get(POD_NAMESPACE_ENV) or _current_namespace(self.kubeconfig_file)
        if own != namespace:
            return None, f"the run pod is in namespace {own!r}, the training pod in {namespace!r}"
        return {"name": name, "uid": uid}, f"owned by the run pod {name}"

    def plan(
        self, context: dg.AssetExecutionContext, *, module: str, args: Sequence[str], nproc: int | None = None
    ) -> "PodLaunch":
        """What `run` starts for one launch of `module` on `nproc` ranks (default: nproc_per_node): the
        namespace, the pod manifest, the rank error folder (not created yet)."""
        self.check()
        run_id = context.run.run_id
        namespace = self.namespace or _current_namespace(self.kubeconfig_file) or "default"
        owner, why = self.owner(namespace)
        launch_dir = Path(
            self.artefact_root, LAUNCHES_DIR, f"{label_value(run_id)[:36]}-{uuid.uuid4().hex[:8]}"
        )
        manifest = self.pod_manifest(
            module=module,
            args=args,
            nproc=nproc or self.nproc_per_node,
            run_id=run_id,
            step_key=context.op_execution_context.op.name,
            partition=context.partition_key if context.has_partition_key else None,
            launch_dir=str(launch_dir),
            namespace=namespace,
            owner=owner,
        )
        return PodLaunch(namespace, manifest, launch_dir, None if owner else why)

    def run(  # type: ignore[override]
        self,
        *,
        context: dg.AssetExecutionContext,
        extras: Mapping[str, Any] | None = None,
        module: str,
        args: Sequence[str],
        nproc: int | None = None,
        what: str = "training",
        metadata: Mapping[str, Any] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        launch = self.plan(context, module=module, args=args, nproc=nproc)
        if launch.no_owner:
            context.log.warning(
                f"the training pod has no owner reference ({launch.no_owner}): if this step's run worker "
                "dies, the delete_orphaned_pods sensor deletes the pod once the run has ended"
            )
        namespace, manifest, launch_dir = launch.namespace, launch.manifest, launch.launch_dir
        command = manifest["spec"]["containers"][0]["command"]
        launch_dir.mkdir(parents=True)
        client = self.pipes_client()
        context.log.info(f"launching a pod in namespace {namespace}: {shlex.join(command)}")
        try:
            completed = client.run(
                context=context,
                extras=dict(extras or {}),
                namespace=namespace,
                base_pod_meta=manifest["metadata"],
                base_pod_spec=manifest["spec"],
            )
        except Exception as error:
            if not client.ended:  # no pod outcome to look at: the API refused the pod, or something else
                refused = api_failure(error)
                if refused is None:
                    raise
                raise refused from error
            raise pod_failure(
                client.pod,
                rank_errors(launch_dir),
                client.log_tail,
                command,
                what,
            ) from error
        finally:
            shutil.rmtree(launch_dir, ignore_errors=True)
        added = {k: _metadata_value(v) for k, v in (metadata or {}).items()}
        # PipesK8sClient.run takes no metadata for the results; its invocation holds the session as `_session`
        # (dagster 1.13.27), so the launch's metadata is added by a new invocation of that session.
        return dg.PipesClientCompletedInvocation(completed._session, metadata=added)  # noqa: SLF001


@functools.cache
def _pod_outcome_client_class() -> type:
    # dagster_k8s (and the kubernetes client) take 0.7 s to import: only a launch on Kubernetes pays for it,
    # not every load of the code location.
    from dagster_k8s.client import DagsterK8sError
    from dagster_k8s.pipes import PipesK8sClient

    class PodOutcomeClient(PipesK8sClient):
        """PipesK8sClient that takes a last look at its pod when the wait for it fails, before `run` deletes
        the pod in its `finally`: the pod's status and the end of its log make the step failure."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ended = False
            self.pod: Any = None
            self.log_tail: list[str] = []

        @contextlib.contextmanager
        def consume_pod_logs(self, context, client, namespace, pod_name, **kwargs) -> Iterator[None]:
            try:
                with super().consume_pod_logs(context, client, namespace, pod_name, **kwargs):
                    yield
            except DagsterK8sError:
                try:
                    self.pod, self.log_tail = _last_look(client, namespace, pod_name)
                    self.ended = True
                except Exception:  # the API is out of reach too: the step fails with dagster-k8s's error
                    context.log.warning(
                        f"could not read pod {namespace}/{pod_name} after it failed", exc_info=True
                    )
                raise

    return PodOutcomeClient


def _last_look(client: Any, namespace: str, pod_name: str) -> tuple[Any, list[str]]:
    """The pod (None if it is gone) and the last lines of its log, but not Pipes messages; raises when the
    API cannot say."""
    from kubernetes.client import ApiException

    try:
        pod = client.core_api.read_namespaced_pod(pod_name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None, []
        raise
    try:
        logs = client.retrieve_pod_logs(pod_name, namespace, container_name=CONTAINER_NAME, tail_lines=200)
    except ApiException:
        logs = ""
    lines = [
        line for line in logs.splitlines() if line.strip() and not line.startswith(_PIPES_MESSAGE_PREFIX)
    ]
    return pod, lines[-_LOG_TAIL_LINES:]


def pod_failure(
    pod: Any,
    errors: Sequence[tuple[int, str]],
    log_tail: Sequence[str],
    command: Sequence[str],
    what: str = "training",
) -> dg.Failure:
    """The step failure of a launch whose pod did not succeed: `pod` is the kubernetes V1Pod as it was when
    the wait for it ended (None: it was gone), `errors` the ranks' recorded tracebacks (earliest first),
    `log_tail` the end of the pod's log. The same dg.Failure as TorchrunLauncher's for the same cause."""
    returncode, ended, diagnosis = pod_outcome(pod)
    return launch_failure(returncode, command, errors, log_tail, what, ended=ended, diagnosis=diagnosis)


def api_failure(error: BaseException) -> dg.Failure | None:
    """The step failure of a Kubernetes API call that failed (creating the pod: forbidden, invalid, quota),
    or None for any other error. Retryable only when the API server itself was in trouble (429, 5xx)."""
    from kubernetes.client import ApiException

    if not isinstance(error, ApiException):
        return None
    status = int(error.status or 0)
    retryable = status == 429 or status >= 500
    body = _one_line(error.body if isinstance(error.body, str) else None)
    return dg.Failure(
        description=f"the Kubernetes API refused the pod: {status} {error.reason} ({body}) "
        f"({'retryable' if retryable else 'not retried'})",
        metadata={"api_status": status, "retryable": retryable},
        allow_retries=retryable,
    )


def pod_outcome(pod: Any) -> tuple[int | None, str, Diagnosis | None]:
    """(torchrun's returncode as subprocess would give it, or None; how the pod ended, in words; a diagnosis
    when the pod says more than the returncode and the rank errors can, else None)."""
    if pod is None:
        reason = "the pod disappeared before it ended (deleted, or lost with its node)"
        return None, "the pod disappeared", Diagnosis(True, reason)
    status = pod.status
    disruption = next(
        (c for c in status.conditions or [] if c.type == "DisruptionTarget" and c.status == "True"), None
    )
    container = next(
        (c for c in status.container_statuses or [] if c.name == CONTAINER_NAME),
        (status.container_statuses or [None])[0],
    )
    state = container.state if container is not None else None
    terminated = state.terminated if state is not None else None
    returncode = _returncode(terminated.exit_code, terminated.signal) if terminated is not None else None
    ended = (
        f"the pod's container ended with exit code {terminated.exit_code}"
        + (f" ({terminated.reason})" if terminated.reason not in (None, "Error", "Completed") else "")
        if terminated is not None
        else f"the pod ended in phase {status.phase}"
    )
    # Kubernetes itself stopped the pod: the container's exit code (143, 137) is only the consequence.
    if disruption is not None:
        why = f"Kubernetes disrupted the pod ({disruption.reason}: {_one_line(disruption.message)})"
        return returncode, ended, Diagnosis(True, why)
    if status.phase == "Failed" and status.reason:
        why = f"Kubernetes stopped the pod ({status.reason}: {_one_line(status.message)})"
        return returncode, ended, Diagnosis(True, why)
    if terminated is not None:
        if terminated.reason == "OOMKilled":
            why = (
                "the container ran out of memory (OOMKilled: raise its memory limit, or lower the batch size)"
            )
            return returncode, ended, Diagnosis(True, why)
        if returncode == 0:  # it succeeded, but the wait failed: Kubernetes or dagster-k8s trouble
            return returncode, ended, Diagnosis(True, "the pod succeeded but waiting for it failed")
        return returncode, ended, None  # torchrun's own verdict: diagnose_launch_failure
    waiting = state.waiting if state is not None else None
    if waiting is not None and waiting.reason in _NEVER_STARTS:
        why = (
            f"the container never started ({waiting.reason}: {_one_line(waiting.message)}); check the image "
            "and the Secrets and volumes the pod names"
        )
        return None, f"the pod's container waited ({waiting.reason})", Diagnosis(False, why)
    unschedulable = next(
        (c for c in status.conditions or [] if c.type == "PodScheduled" and c.status == "False"), None
    )
    if unschedulable is not None:
        why = f"the pod was never scheduled ({unschedulable.reason}: {_one_line(unschedulable.message)})"
        return None, f"the pod stayed {status.phase}", Diagnosis(True, why)
    # dagster-k8s gave up waiting (for a pod to start, or for a container to end after its log did).
    why = f"the pod had not ended when dagster-k8s stopped waiting for it (phase {status.phase})"
    return None, f"the pod was still {status.phase}", Diagnosis(True, why)


def _returncode(exit_code: int, signum: int | None) -> int:
    """A container's exit as subprocess reports a process's: -n when killed by signal n (the runtime says
    128 + n)."""
    if signum:
        return -int(signum)
    if exit_code > 128:
        try:
            return -signal.Signals(exit_code - 128)
        except ValueError:
            pass
    return int(exit_code)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())[:300] or "no message"


def _cpu_limit(container_overrides: Mapping[str, Any]) -> float | None:
    """The cpu limit of the container (`8`, `"8"`, `"7500m"`), if its overrides set one."""
    raw = ((container_overrides.get("resources") or {}).get("limits") or {}).get("cpu")
    if raw is None:
        return None
    text = str(raw)
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ConfigError(
            f"K8sLauncher: container_overrides resources.limits.cpu={raw!r} is not a cpu quantity "
            "(e.g. 8 or 7500m)"
        ) from None


def _current_namespace(kubeconfig_file: str | None) -> str | None:
    from dagster_k8s.utils import detect_current_namespace

    return detect_current_namespace(kubeconfig_file)
