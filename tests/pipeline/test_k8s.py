"""The Kubernetes stage that can be tested without a cluster: the training pod's manifest (a pure function),
checked field by field and by dagster-k8s's own pod builder, and the K8sRunLauncher instance block of
deploy/k8s/dagster-instance.yaml, validated by Dagster's config loader."""

import json
from pathlib import Path

import pytest

from sae_core.errors import ConfigError
from sae_pipeline.k8s import (
    GPU_RESOURCE,
    check_gpu_limits,
    label_value,
    orphaned_pods_selector,
    torchrun_pod_manifest,
)
from sae_pipeline.resources import TorchrunLauncher

REPO = Path(__file__).resolve().parents[2]
ROOT = "/mnt/sae-artefacts"
RUN_ID = "0b1c7a0e-7a51-4c3e-9d4f-3f0c2b9a1e11"


def manifest(**overrides):
    launcher = TorchrunLauncher(python_executable="python", nproc_per_node=4, master_port=29500)
    settings = {
        "image": "registry.example/sae-pipeline:1.0",
        "command": launcher.command(["smollm2-135m", f"{ROOT}/tokenized/smollm2-135m"], run_id=RUN_ID),
        "nproc": 4,
        "artefact_root": ROOT,
        "artefact_claim": "sae-artefacts",
        "run_id": RUN_ID,
        "step_key": "sae_checkpoints",
        "partition": "smollm2-135m|4",
        "env": {"OMP_NUM_THREADS": "8"},
        "hf_token_secret": "hf-token",
        **overrides,
    }
    return torchrun_pod_manifest(**settings)


def test_the_pod_gets_one_gpu_per_rank_the_shared_root_a_memory_shm_and_the_torchrun_command():
    pod = manifest()
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["resources"] == {"limits": {GPU_RESOURCE: "4"}, "requests": {GPU_RESOURCE: "4"}}
    assert container["command"][:6] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4",
        "--nnodes",
    ]
    assert container["command"][-4:] == [
        "-m",
        "sae_pipeline.rank_entry",
        "smollm2-135m",
        f"{ROOT}/tokenized/smollm2-135m",
    ]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"artefacts": ROOT, "dshm": "/dev/shm"}  # the same path as in the run pods
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["artefacts"]["persistentVolumeClaim"] == {"claimName": "sae-artefacts"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    # Dagster retries; the grace period outlasts torchrun's 30 s shutdown of its ranks.
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] > 30


def test_the_token_comes_from_a_secret_and_an_inline_token_is_refused():
    [container] = manifest()["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}},
    }
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": "8"}
    with pytest.raises(ConfigError, match="the token must not be inlined in a pod manifest") as error:
        manifest(env={"HF_TOKEN": "hf_secret_value_123"})
    assert "hf_secret_value_123" not in str(error.value) and "\n" not in str(error.value)


def test_labels_find_the_pods_of_a_run_and_an_owner_reference_ties_them_to_the_run_worker():
    pod = manifest(owner={"name": "dagster-run-0b1c7a0e-abcde", "uid": "1234-5678"})
    labels = pod["metadata"]["labels"]
    assert labels["sae-pipeline/run-id"] == RUN_ID and labels["sae-pipeline/step"] == "sae_checkpoints"
    assert labels["sae-pipeline/partition"] == "smollm2-135m_4"  # '|' is not allowed in a label value
    selector = orphaned_pods_selector(RUN_ID)
    assert all(labels[k] == v for k, v in (pair.split("=") for pair in selector.split(",")))
    assert pod["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "dagster-run-0b1c7a0e-abcde", "uid": "1234-5678"}
    ]
    assert label_value("a" * 70 + "|") == "a" * 63 and label_value("|") == "none"


def test_a_manifest_without_a_gpu_limit_is_refused_in_one_line_when_the_launcher_asks_for_gpus():
    with pytest.raises(ConfigError) as error:
        manifest(container_overrides={"resources": {"limits": {"memory": "64Gi"}}})
    message = str(error.value)
    assert message.startswith("pod manifest: the launcher asks for 4 GPUs but container 'torchrun' has no")
    assert "set resources.limits.nvidia.com/gpu: 4" in message and "\n" not in message
    with pytest.raises(ConfigError, match="has a 2-GPU nvidia.com/gpu limit"):
        manifest(container_overrides={"resources": {"limits": {GPU_RESOURCE: 2}}})
    # On CPUs (gpus: false) no limit is asked for, and none is required.
    cpu = manifest(gpus=False)
    assert cpu["spec"]["containers"][0]["resources"] == {}
    check_gpu_limits(cpu, 0)
    with pytest.raises(ConfigError, match="asks for 4 GPUs"):
        check_gpu_limits(cpu, 4)


def test_dagster_k8s_builds_the_pod_from_the_manifest_as_pipes_k8s_client_would():
    pipes = pytest.importorskip("dagster_k8s.pipes")
    pod = manifest(
        namespace="sae", service_account="sae-pipeline", pod_overrides={"nodeSelector": {"gpu": "h100"}}
    )
    body = pipes.build_pod_body(
        "dagster-sae-checkpoints-0b1c7a0e",
        image=None,
        command=None,
        env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msg"},
        base_pod_meta=pod["metadata"],
        base_pod_spec=pod["spec"],
    )
    built = body.to_dict()
    [container] = built["spec"]["containers"]
    assert container["resources"]["limits"] == {GPU_RESOURCE: "4"}
    assert container["image"] == "registry.example/sae-pipeline:1.0"
    assert {e["name"] for e in container["env"]} >= {"HF_TOKEN", "DAGSTER_PIPES_CONTEXT", "OMP_NUM_THREADS"}
    assert built["spec"]["node_selector"] == {"gpu": "h100"}
    assert built["spec"]["service_account_name"] == "sae-pipeline"
    assert built["metadata"]["labels"]["sae-pipeline/run-id"] == RUN_ID
    assert [v["empty_dir"] for v in built["spec"]["volumes"] if v["name"] == "dshm"] == [
        {"medium": "Memory", "size_limit": "16Gi"}
    ]
    json.dumps(pod)  # the manifest itself is plain JSON (kubectl apply -f takes it)


def test_the_k8s_run_launcher_instance_block_passes_dagsters_config_loader(monkeypatch):
    k8s = pytest.importorskip("dagster_k8s")
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config

    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("DAGSTER_PG_PORT", "5432")
    # The loader `dagster-daemon` and the webserver use; it raises on any key or type Dagster does not know.
    config, _ = dagster_instance_config(str(REPO / "deploy" / "k8s"), config_filename="dagster-instance.yaml")
    block = config["run_launcher"]
    assert (block["module"], block["class"]) == ("dagster_k8s", "K8sRunLauncher")
    # The run launcher's own schema, which the instance checks only when it builds the launcher (that
    # needs a cluster): K8sRunLauncher.from_config_value would receive exactly this.
    launcher = process_config(k8s.K8sRunLauncher.config_type(), block["config"])
    assert launcher.success, launcher.errors
    settings = launcher.value
    assert settings["env_secrets"] == ["hf-token"]  # the token reaches run pods from a Secret only
    assert {m["name"]: m["mountPath"] for m in settings["volume_mounts"]} == {"artefacts": ROOT}
    broken = {**block["config"], "volume_mount": block["config"]["volume_mounts"]}  # a typo is caught
    assert not process_config(k8s.K8sRunLauncher.config_type(), broken).success
