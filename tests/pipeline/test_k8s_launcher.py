"""K8sLauncher, the launcher backend that runs a launch as one Kubernetes pod through dagster-k8s's
PipesK8sClient, tested without a cluster (there is none here, and a fake API server would only test the fake):

- the pod dagster-k8s's own `build_pod_body` makes of our launch inside a real Pipes session, field by field;
- the refusals (nnodes > 1, a GPU limit the overrides took away) before anything is created;
- the failure mapping from real kubernetes V1Pod objects, against the torchrun launcher's for the same cause;
- the message path end to end: the built pod's container command runs here, with the pod's environment, as
  the kubelet would run it (torchrun, 2 CPU ranks of tests.support.fake_rank), and its combined output goes
  through dagster-k8s's PipesK8sPodLogsMessageReader in a real Pipes session, so rank 0's materialization
  reaches Dagster by the pod-log path. The one stand-in is the object the reader asks for the log stream
  (`read_namespaced_pod_log`): it returns the container's real output in the API's `timestamps=True` format.

Not tested: the Kubernetes API calls themselves (create, watch, read the log, delete).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster_k8s.pipes import PipesK8sPodLogsMessageReader
from dagster_pipes import decode_env_var
from kubernetes import client as k8s

from sae_core.errors import ConfigError
from sae_pipeline.k8s import GPU_RESOURCE
from sae_pipeline.k8s_launcher import (
    LAUNCH_LABEL,
    LAUNCHES_DIR,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    POD_UID_ENV,
    api_failure,
    pod_failure,
)
from sae_pipeline.resources import K8sLauncher, TorchrunLauncher
from sae_pipeline.torchrun import RANK_ERRORS_ENV, launch_failure, rank_errors
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[2]
ROOT = "/mnt/sae-artefacts"
ARGS = ["smollm2-135m", f"{ROOT}/tokenized/smollm2-135m", "--layer_stride", "4"]
TOKEN = "hf_secret_value_in_the_step_environment_123"
COMMAND = ["python", "-m", "torch.distributed.run", "--nproc-per-node", "4"]


def gpu_launcher(**settings) -> K8sLauncher:
    return K8sLauncher(
        **{
            "image": "registry.example/sae-pipeline:1.0",
            "artefact_root": ROOT,
            "namespace": "sae",
            "nproc_per_node": 4,
            "hf_token_secret": "hf-token",
            "service_account": "sae-pipeline",
            "container_overrides": {
                "resources": {"limits": {GPU_RESOURCE: 4, "cpu": "32", "memory": "200Gi"}}
            },
            "pod_overrides": {"nodeSelector": {"gpu": "h100"}},
            "max_runtime_s": 7200,
            **settings,
        }
    )


def in_a_pipes_session(launcher: K8sLauncher, body, partition: str | None = None):
    """Run `body(context, session)` inside a real Pipes session opened in a materialization, with the
    context injector and message reader of the PipesK8sClient the launcher uses; return what it returned."""
    out = {}

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition([partition]) if partition else None)
    def sae_checkpoints(context: dg.AssetExecutionContext):
        pipes = launcher.pipes_client()
        with dg.open_pipes_session(
            context=context,
            context_injector=pipes.context_injector,
            message_reader=pipes.message_reader,
            extras={"model": "smollm2-135m"},
        ) as session:
            out["value"] = body(context, session, pipes)
        # What rank 0 reported, or an empty materialization when the body launched nothing.
        yield from session.get_results(implicit_materializations=False) or [dg.MaterializeResult()]

    result = dg.materialize([sae_checkpoints], partition_key=partition, raise_on_error=False)
    out["result"] = result
    return out


def built_pod(context, session, launcher: K8sLauncher, module: str | None = None):
    """The V1Pod PipesK8sClient.run would create for this launch: its own build_pod_body, on the manifest
    K8sLauncher.run passes it, with the session's bootstrap variables (PipesK8sClient.run's arguments)."""
    from dagster_k8s.pipes import build_pod_body

    launch = launcher.plan(context, module=module or launcher.entry_module, args=ARGS)
    pod = build_pod_body(
        pod_name="dagster-pod",
        image=None,
        command=None,
        env_vars=session.get_bootstrap_env_vars(),
        base_pod_meta=launch.manifest["metadata"],
        base_pod_spec=launch.manifest["spec"],
    )
    return launch, pod


def test_the_pod_runs_the_torchrun_command_on_its_gpus_with_the_pipes_environment_and_no_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # in the step's environment: it must not reach the pod spec
    launcher = gpu_launcher()
    out = in_a_pipes_session(launcher, lambda c, s, _: built_pod(c, s, launcher), partition="smollm2-135m|4")
    assert out["result"].success
    launch, pod = out["value"]
    [container] = pod.spec.containers
    # The command line TorchrunLauncher builds for one node (the pod is a network of its own: a fixed port).
    torchrun = TorchrunLauncher(python_executable="python", nproc_per_node=4, master_port=29500)
    assert container.command == torchrun.command(ARGS, run_id="any")
    assert container.command[:5] == COMMAND
    assert container.image == "registry.example/sae-pipeline:1.0"
    assert container.resources.limits == {GPU_RESOURCE: "4", "cpu": "32", "memory": "200Gi"}
    assert {m.name: m.mount_path for m in container.volume_mounts} == {"artefacts": ROOT, "dshm": "/dev/shm"}
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["artefacts"].persistent_volume_claim.claim_name == "sae-artefacts"
    assert volumes["dshm"].empty_dir.medium == "Memory"
    env = {e.name: e for e in container.env}
    # 32 cpus shared by 4 ranks; the rank errors go to a per-launch folder on the shared volume.
    assert env["OMP_NUM_THREADS"].value == "8" and env["TOKENIZERS_PARALLELISM"].value == "false"
    assert env[RANK_ERRORS_ENV].value == str(launch.launch_dir)
    assert launch.launch_dir.parent == Path(ROOT, LAUNCHES_DIR) and not launch.launch_dir.exists()
    # The Pipes bootstrap: the context in the environment, messages on stderr (read from the pod's log).
    context = decode_env_var(env["DAGSTER_PIPES_CONTEXT"].value)["data"]  # the context itself, inline
    assert context["extras"] == {"model": "smollm2-135m"} and context["partition_key"] == "smollm2-135m|4"
    assert decode_env_var(env["DAGSTER_PIPES_MESSAGES"].value) == {"stdio": "stderr"}
    assert env["HF_TOKEN"].value is None and env["HF_TOKEN"].value_from.secret_key_ref.name == "hf-token"
    labels = pod.metadata.labels
    assert (
        labels["sae-pipeline/step"] == "sae_checkpoints"
        and labels["sae-pipeline/partition"] == "smollm2-135m_4"
    )
    assert labels["sae-pipeline/run-id"] == out["result"].run_id
    assert labels[LAUNCH_LABEL] == launch.launch_dir.name
    assert pod.metadata.namespace == "sae" and pod.spec.service_account_name == "sae-pipeline"
    assert pod.spec.node_selector == {"gpu": "h100"} and pod.spec.restart_policy == "Never"
    assert pod.spec.active_deadline_seconds == 7200  # max_runtime_s: Kubernetes stops a hung launch
    assert pod.metadata.owner_references is None and "not in a run pod" in launch.no_owner
    assert TOKEN not in json.dumps(k8s.ApiClient().sanitize_for_serialization(pod))


def test_the_pod_is_owned_by_the_run_pod_only_in_the_run_pods_namespace(monkeypatch):
    monkeypatch.setenv(POD_NAME_ENV, "dagster-run-0b1c7a0e-abcde")
    monkeypatch.setenv(POD_UID_ENV, "1234-5678")
    monkeypatch.setenv(POD_NAMESPACE_ENV, "sae")
    assert gpu_launcher().owner("sae") == (
        {"name": "dagster-run-0b1c7a0e-abcde", "uid": "1234-5678"},
        "owned by the run pod dagster-run-0b1c7a0e-abcde",
    )
    # Kubernetes would take an owner in another namespace for a missing one and delete the pod at once.
    owner, why = gpu_launcher(namespace="gpu-jobs").owner("gpu-jobs")
    assert owner is None and why == "the run pod is in namespace 'sae', the training pod in 'gpu-jobs'"


def test_the_launcher_takes_its_settings_from_run_config_as_in_the_launchpad():
    seen = {}

    @dg.asset
    def launched(launcher: K8sLauncher):
        seen["manifest"] = launcher.pod_manifest(
            module=launcher.entry_module, args=[], nproc=2, run_id="r", step_key="s", launch_dir="/x/y"
        )

    config = {
        "image": "img",
        "artefact_root": ROOT,
        "nproc_per_node": 2,
        "container_overrides": {"resources": {"limits": {GPU_RESOURCE: 2, "cpu": "16"}}},
        "pod_overrides": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists"}]},
        "max_runtime_s": 3600,
    }
    result = dg.materialize(
        [launched],
        resources={"launcher": K8sLauncher.configure_at_launch()},
        run_config={"resources": {"launcher": {"config": config}}},
    )
    assert result.success
    spec = seen["manifest"]["spec"]
    assert spec["containers"][0]["resources"]["limits"] == {GPU_RESOURCE: 2, "cpu": "16"}
    assert spec["tolerations"] == [{"key": GPU_RESOURCE, "operator": "Exists"}]
    assert spec["activeDeadlineSeconds"] == 3600


def test_evaluation_gets_its_own_rank_count_and_the_cpus_its_ranks_share():
    launcher = gpu_launcher(eval_nproc=2, omp_num_threads=3)
    manifest = launcher.pod_manifest(
        module=launcher.eval_entry_module, args=["m"], nproc=2, run_id="r", step_key="s", launch_dir="/x/y"
    )
    [container] = manifest["spec"]["containers"]
    assert container["command"][3:5] == ["--nproc-per-node", "2"]
    assert container["command"][-2:] == ["sae_pipeline.eval_entry", "m"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OMP_NUM_THREADS"] == "16"  # omp_num_threads is for training ranks; 32 cpus / 2 ranks here
    training = launcher.pod_manifest(
        module=launcher.entry_module, args=["m"], nproc=4, run_id="r", step_key="s", launch_dir="/x/y"
    )
    assert {e["name"]: e.get("value") for e in training["spec"]["containers"][0]["env"]}[
        "OMP_NUM_THREADS"
    ] == "3"


def test_several_nodes_and_a_gpu_limit_taken_away_are_refused_in_one_line_before_anything_is_created():
    with pytest.raises(ConfigError) as error:
        gpu_launcher(nnodes=2).check()
    assert str(error.value) == (
        "K8sLauncher: nnodes=2, but a pod is one node; train on several nodes with TorchrunLauncher "
        "(rdzv_backend: static, node_rank: 0 on the step's node), or set nnodes: 1"
    )
    with pytest.raises(ConfigError, match="the launcher asks for 4 GPUs but container 'torchrun' has no "):
        gpu_launcher(container_overrides={"resources": {"limits": {"memory": "64Gi"}}}).check()
    with pytest.raises(ConfigError, match="has a 1-GPU nvidia.com/gpu limit"):  # evaluation on 2 of 1
        gpu_launcher(
            eval_nproc=2, nproc_per_node=1, container_overrides={"resources": {"limits": {GPU_RESOURCE: 1}}}
        ).check()
    with pytest.raises(ConfigError, match="artefact_root must be the absolute mount path"):
        gpu_launcher(artefact_root="artefacts").check()
    with pytest.raises(ConfigError, match="the token must not be inlined") as error:
        gpu_launcher(extra_env={"HF_TOKEN": TOKEN}).check()
    assert TOKEN not in str(error.value)
    gpu_launcher(gpus=False, container_overrides={}).check()  # CPU ranks need no GPU limit


def test_the_training_step_refuses_several_nodes_before_touching_the_run_folder(
    tmp_path, tiny_model_dir, corpus_file
):
    from sae_pipeline.assets import sae_checkpoints
    from tests.support.pipeline import (
        MODEL,
        failure_text,
        materialize,
        resources_for,
        tiny_entry,
        write_registry,
    )

    root = tmp_path / "artefacts"
    (root / "tokenized" / MODEL).mkdir(parents=True)
    (root / "tokenized" / MODEL / "dataset_info.json").write_text("{}")
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    launcher = K8sLauncher(image="img", artefact_root=str(root), nnodes=2, nproc_per_node=2)
    resources = {**resources_for(root, registry), "launcher": launcher}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    result = materialize([sae_checkpoints], f"{MODEL}|2", instance, resources)
    assert not result.success
    assert "launcher resource: K8sLauncher: nnodes=2, but a pod is one node" in failure_text(result)
    assert not (root / "runs").exists() and not (root / LAUNCHES_DIR).exists()


# --- the failure mapping, from real kubernetes V1Pod objects ---


def pod(
    phase="Failed", *, terminated=None, waiting=None, running=False, reason=None, message=None, conditions=()
):
    state = k8s.V1ContainerState(
        terminated=k8s.V1ContainerStateTerminated(**terminated) if terminated else None,
        waiting=k8s.V1ContainerStateWaiting(**waiting) if waiting else None,
        running=k8s.V1ContainerStateRunning() if running else None,
    )
    statuses = [
        k8s.V1ContainerStatus(
            name="torchrun", image="img", image_id="", ready=running, restart_count=0, state=state
        )
    ]
    return k8s.V1Pod(
        status=k8s.V1PodStatus(
            phase=phase,
            reason=reason,
            message=message,
            container_statuses=statuses if (terminated or waiting or running) else None,
            conditions=[k8s.V1PodCondition(**c) for c in conditions] or None,
        )
    )


PYTHON_ERROR = [(1, "Traceback (most recent call last):\n  ...\nValueError: bad settings\n")]
GLOO_TIMEOUT = [(0, "Traceback ...\nRuntimeError: [gloo] Timed out waiting 3000ms for recv operation\n")]
VANISHED = [
    "Root Cause (first observed failure):",
    "[0]:",
    "  rank      : 1 (local_rank: 1)",
    "  exitcode  : -9",
]


def verdict(failure: dg.Failure) -> tuple[bool, str]:
    return failure.allow_retries, failure.metadata["diagnosis"].value


@pytest.mark.parametrize(
    ("status", "errors", "tail", "torchrun_returncode"),
    [
        ({"terminated": {"exit_code": 1, "reason": "Error"}}, PYTHON_ERROR, [], 1),  # a rank's bug
        ({"terminated": {"exit_code": 1, "reason": "Error"}}, GLOO_TIMEOUT, [], 1),  # a collective timed out
        ({"terminated": {"exit_code": 1, "reason": "Error"}}, [], VANISHED, 1),  # rank 1 SIGKILLed
        ({"terminated": {"exit_code": 137, "reason": "Error"}}, PYTHON_ERROR, [], -9),  # torchrun SIGKILLed
        ({"terminated": {"exit_code": 143, "reason": "Error"}}, [], [], -15),  # torchrun SIGTERMed
    ],
)
def test_a_container_exit_fails_the_step_as_the_same_torchrun_exit_would(
    tmp_path, status, errors, tail, torchrun_returncode
):
    for rank, text in errors:
        (tmp_path / f"rank{rank}.txt").write_text(text)
    command = ["python", "-m", "torch.distributed.run"]
    from_pod = pod_failure(pod(**status), rank_errors(tmp_path), tail, command)
    from_torchrun = launch_failure(torchrun_returncode, command, rank_errors(tmp_path), tail)
    assert verdict(from_pod) == verdict(from_torchrun)
    assert from_pod.metadata["exit_code"].value == torchrun_returncode
    assert (
        f"the pod's container ended with exit code {status['terminated']['exit_code']}"
        in from_pod.description
    )


def test_kubernetes_reasons_decide_over_the_exit_code():
    oom = pod_failure(pod(terminated={"exit_code": 137, "reason": "OOMKilled"}), PYTHON_ERROR, [], COMMAND)
    assert verdict(oom) == (
        True,
        "the container ran out of memory (OOMKilled: raise its memory limit, or lower the batch size)",
    )
    assert "exit code 137 (OOMKilled)" in oom.description and "ValueError: bad settings" in oom.description
    evicted = pod(reason="Evicted", message="The node was low on resource: memory. ")
    assert verdict(pod_failure(evicted, [], [], COMMAND)) == (
        True,
        "Kubernetes stopped the pod (Evicted: The node was low on resource: memory.)",
    )
    drained = pod(
        terminated={"exit_code": 143, "reason": "Error"},
        conditions=[
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
            }
        ],
    )
    assert verdict(pod_failure(drained, PYTHON_ERROR, [], COMMAND)) == (
        True,
        "Kubernetes disrupted the pod (EvictionByEvictionAPI: Eviction API: evicting)",
    )
    bad_image = pod("Pending", waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling "img"'})
    retry, why = verdict(pod_failure(bad_image, [], [], COMMAND))
    assert not retry and why.startswith(
        'the container never started (ImagePullBackOff: Back-off pulling "img")'
    )
    no_secret = pod(
        "Pending", waiting={"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
    )
    assert not pod_failure(no_secret, [], [], COMMAND).allow_retries


def test_a_pod_stopped_at_its_deadline_unscheduled_still_running_or_gone_is_retryable():
    deadline = pod(
        reason="DeadlineExceeded", message="Pod was active on the node longer than the specified deadline"
    )
    assert verdict(pod_failure(deadline, [], ["step 40 ..."], COMMAND)) == (
        True,
        "Kubernetes stopped the pod (DeadlineExceeded: Pod was active on the node longer than the specified "
        "deadline)",
    )
    hung = pod_failure(pod("Running", running=True), [], ["step 40 ..."], COMMAND)
    assert verdict(hung) == (
        True,
        "the pod had not ended when dagster-k8s stopped waiting for it (phase Running)",
    )
    assert hung.metadata["exit_code"].value == "unknown" and "step 40 ..." in hung.description
    pending = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    assert verdict(pod_failure(pending, [], [], COMMAND)) == (
        True,
        "the pod was never scheduled (Unschedulable: 0/3 nodes are available: 3 Insufficient "
        "nvidia.com/gpu.)",
    )
    gone = pod_failure(None, [], [], COMMAND)
    assert verdict(gone) == (True, "the pod disappeared before it ended (deleted, or lost with its node)")


def test_an_api_refusal_is_retried_only_when_the_api_server_was_in_trouble():
    forbidden = k8s.ApiException(status=403, reason="Forbidden")
    forbidden.body = 'pods is forbidden: User "system:serviceaccount:sae:default" cannot create resource'
    failure = api_failure(forbidden)
    assert not failure.allow_retries
    assert failure.description.startswith(
        "the Kubernetes API refused the pod: 403 Forbidden (pods is forbidden"
    )
    assert api_failure(k8s.ApiException(status=503, reason="Service Unavailable")).allow_retries
    assert api_failure(RuntimeError("not an API error")) is None


# --- the message path, end to end, with the container command run here ---


class ContainerLog:
    """What the API server's pod-log endpoint (follow=True, timestamps=True) returns for the container: its
    output, line by line, each line after an RFC 3339 timestamp with nanoseconds, as the kubelet records it.
    The container itself is a real process (started by the test); this only relays its output."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines = process, []
        self._last_ns = 0

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        assert kwargs["follow"] and kwargs["timestamps"] and not kwargs["_preload_content"]
        for raw in iter(self.process.stdout.readline, b""):
            self._last_ns = max(time.time_ns(), self._last_ns + 1)  # the kubelet's stamps never repeat here
            seconds, nanos = divmod(self._last_ns, 10**9)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            yield f"{stamp} ".encode() + raw


def run_the_container(context, session, pipes, launcher: K8sLauncher):
    """Build the pod, run its container's command with its environment (and what the image would provide:
    PATH, the project on PYTHONPATH), and feed the output to dagster-k8s's pod-log message reader."""
    launch, pod = built_pod(context, session, launcher)
    launch.launch_dir.mkdir(parents=True)
    [container] = pod.spec.containers
    env = {e.name: e.value for e in container.env if e.value is not None}  # HF_TOKEN: its Secret is absent
    image = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "/root")}
    process = subprocess.Popen(
        container.command, env={**image, **env}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert isinstance(pipes.message_reader, PipesK8sPodLogsMessageReader)  # PipesK8sClient's default reader
    log = ContainerLog(process)
    try:
        pipes.message_reader.consume_pod_logs(
            context=context, core_api=log, pod_name=pod.metadata.name, namespace=launch.namespace
        )
    finally:
        exit_code = process.wait(timeout=60)
    return launch, container.command, exit_code, log.lines


def cpu_launcher(tmp_path, mode: str) -> K8sLauncher:
    return K8sLauncher(
        image="local",
        namespace="sae",
        artefact_root=str(tmp_path / "root"),
        gpus=False,
        nproc_per_node=2,
        omp_num_threads=1,
        python_executable=sys.executable,
        master_port=free_port(),
        entry_module="tests.support.fake_rank",
        extra_env={
            "FAKE_RANK_DIR": str(tmp_path / "ranks"),
            "FAKE_RANK_SLEEP_S": "0",
            "FAKE_RANK_MODE": mode,
        },
    )


def test_rank_0s_materialization_reaches_dagster_through_the_pod_log(tmp_path):
    launcher = cpu_launcher(tmp_path, "ok")
    out = in_a_pipes_session(launcher, lambda c, s, p: run_the_container(c, s, p, launcher))
    result = out["result"]
    assert result.success
    launch, command, exit_code, lines = out["value"]
    assert exit_code == 0 and command[:5] == [sys.executable, *COMMAND[1:4], "2"]
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["fake"].value is True  # reported by rank 0 inside the "pod"
    ranks = [
        json.loads(line)["rank"] for line in (tmp_path / "ranks" / "events.jsonl").read_text().splitlines()
    ]
    assert sorted(ranks) == [0, 0, 1, 1]
    # The messages travelled on the log (rank 0's stderr, through torchrun), among the ordinary lines.
    assert any(
        line.startswith('{"__dagster_pipes_version"') and "report_asset_materialization" in line
        for line in lines
    )


def test_a_rank_error_in_the_pod_is_read_from_the_shared_volume_and_not_retried(tmp_path):
    launcher = cpu_launcher(tmp_path, "python-error")

    def fail_as_the_launcher_would(context, session, pipes):
        launch, command, exit_code, lines = run_the_container(context, session, pipes, launcher)
        # What the kubelet reports for that container, read back from the API by PodOutcomeClient.
        ended = pod(terminated={"exit_code": exit_code, "reason": "Error"})
        raise pod_failure(ended, rank_errors(launch.launch_dir), lines[-40:], command)

    out = in_a_pipes_session(launcher, fail_as_the_launcher_would)
    result = out["result"]
    assert not result.success
    [failure] = [e.step_failure_data.user_failure_data for e in result.get_step_failure_events()]
    assert failure.metadata["retryable"].value is False and failure.metadata["exit_code"].value == 1
    assert failure.metadata["diagnosis"].value == "rank 1 raised RuntimeError: a bug in the training code"
    assert "the pod's container ended with exit code 1" in failure.description
