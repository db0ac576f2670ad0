"""The launcher resource: a PipesClient whose backend can be swapped (a plain-process one here), and the
torchrun backend refusing multi-node settings under which global rank 0, the only rank that reports to
Dagster, could run on another node than the one Dagster launched: several nodes need the static rendezvous
with this node as node 0."""

import json
import os
import subprocess
import sys

import dagster as dg
import pytest

from sae_pipeline.assets import sae_checkpoints
from sae_pipeline.launcher import PipesLauncher
from sae_pipeline.resources import TorchrunLauncher
from tests.support.pipeline import MODEL, failure_text, materialize, resources_for, tiny_entry, write_registry

WHAT_WORKS = "use rdzv_backend: static with node_rank: 0 here (the other nodes take node_rank 1, 2, ...)"


@pytest.mark.parametrize(
    "settings",
    [
        {"rdzv_backend": "c10d"},  # torch assigns ranks: rank 0 may land on the other node
        {"rdzv_backend": "static", "node_rank": 1},  # this node is not node 0
        {"rdzv_backend": "static"},  # no node rank
    ],
)
def test_multi_node_without_this_node_as_node_0_is_refused_in_one_line(settings):
    launcher = TorchrunLauncher(nnodes=2, rdzv_endpoint="head:29400", **settings)
    with pytest.raises(ValueError) as error:
        launcher.command(["model"], run_id="run")
    message = str(error.value)
    assert message.startswith("nnodes=2 with rdzv_backend=") and message.endswith(WHAT_WORKS)
    assert "\n" not in message


def test_static_rendezvous_with_this_node_as_node_0_is_launched_as_asked():
    launcher = TorchrunLauncher(nnodes=2, rdzv_endpoint="head:29400", rdzv_backend="static", node_rank=0)
    command = " ".join(launcher.command(["model"], run_id="run"))
    assert "--nnodes 2 --rdzv-backend static" in command and "--node-rank 0" in command
    assert "--rdzv-endpoint head:29400" in command


def test_evaluation_ranks_stay_on_this_node_when_training_spans_several():
    launcher = TorchrunLauncher(
        nnodes=2,
        nproc_per_node=4,
        rdzv_endpoint="head:29400",
        rdzv_backend="static",
        node_rank=0,
        eval_nproc=2,
    )
    command = " ".join(launcher.command(["model"], run_id="run", module=launcher.eval_entry_module, nproc=2))
    assert "--nproc-per-node 2 --nnodes 1 --master-port " in command and "rdzv" not in command
    assert command.endswith("-m sae_pipeline.eval_entry model")


def test_omp_num_threads_sizes_the_training_ranks_and_evaluation_takes_the_cores_its_ranks_leave():
    launcher = TorchrunLauncher(nproc_per_node=2, omp_num_threads=1)
    cores = os.cpu_count() or 1
    assert launcher.env()["OMP_NUM_THREADS"] == "1"
    assert launcher.env(1, training=False)["OMP_NUM_THREADS"] == str(cores)
    assert launcher.env(2, training=False)["OMP_NUM_THREADS"] == str(max(1, cores // 2))


def test_the_training_step_fails_on_it_before_touching_the_run_folder(tmp_path, tiny_model_dir, corpus_file):
    root = tmp_path / "artefacts"
    (root / "tokenized" / MODEL).mkdir(parents=True)
    (root / "tokenized" / MODEL / "dataset_info.json").write_text("{}")
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    resources = resources_for(root, registry, nnodes=2, rdzv_endpoint="head:29400")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    result = materialize([sae_checkpoints], f"{MODEL}|2", instance, resources)
    assert not result.success
    assert "launcher resource: nnodes=2 with rdzv_backend='c10d', node_rank=None: global rank 0" in (
        failure_text(result)
    )
    assert not (root / "runs").exists()


class PlainProcessLauncher(PipesLauncher):
    """Another backend, as a user would write one: rank 0 alone, as a plain `python -m module` child in a
    Pipes session (no torchrun)."""

    def run(self, *, context, extras=None, module, args, nproc=None, what="training", metadata=None):
        if (nproc or self.nproc_per_node) != 1:
            raise ValueError("PlainProcessLauncher runs one rank")
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesTempFileContextInjector(),
            message_reader=dg.PipesTempFileMessageReader(),
            extras=dict(extras or {}),
        ) as session:
            env = {**os.environ, **self.extra_env, **session.get_bootstrap_env_vars()}
            done = subprocess.run([sys.executable, "-m", module, *args], env=env, check=False)
        if done.returncode != 0:
            raise dg.Failure(description=f"{what} failed: exit code {done.returncode}", allow_retries=False)
        return dg.PipesClientCompletedInvocation(session, metadata=metadata)


def test_another_launcher_backend_can_be_swapped_in_as_the_launcher_resource(
    tmp_path, tiny_model_dir, corpus_file
):
    root, records = tmp_path / "artefacts", tmp_path / "ranks"
    (root / "tokenized" / MODEL).mkdir(parents=True)
    (root / "tokenized" / MODEL / "dataset_info.json").write_text("{}")
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    launcher = PlainProcessLauncher(
        entry_module="tests.support.fake_rank",
        extra_env={"FAKE_RANK_DIR": str(records), "FAKE_RANK_SLEEP_S": "0"},
    )
    assert isinstance(launcher, dg.PipesClient)
    resources = {**resources_for(root, registry), "launcher": launcher}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    result = materialize([sae_checkpoints], f"{MODEL}|2", instance, resources)
    assert result.success, failure_text(result)
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    # What the fake rank 0 reported through Pipes, with what the step adds.
    assert metadata["fake"] is True and metadata["resumed"] is False and metadata["nproc_per_node"] == 1
    assert [json.loads(line)["rank"] for line in (records / "events.jsonl").read_text().splitlines()] == [
        0,
        0,
    ]


def test_a_two_node_training_on_loopback_reports_through_rank_0_on_this_node(
    tmp_path, tiny_model_dir, corpus_file
):
    """Node 0 is launched by Dagster, node 1 by the test (as a cluster's tooling would), with the static
    rendezvous on 127.0.0.1; one fake rank per node."""
    from tests.support.processes import free_port

    root, records = tmp_path / "artefacts", tmp_path / "ranks"
    (root / "tokenized" / MODEL).mkdir(parents=True)
    (root / "tokenized" / MODEL / "dataset_info.json").write_text("{}")
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    endpoint = f"127.0.0.1:{free_port()}"
    env = {"FAKE_RANK_DIR": str(records), "FAKE_RANK_SLEEP_S": "1"}
    settings = {"nnodes": 2, "nproc_per_node": 1, "rdzv_backend": "static", "rdzv_endpoint": endpoint}
    # Node 1 runs this node's command with its own node rank, as the README says to start the other nodes.
    node0 = TorchrunLauncher(
        **settings, node_rank=0, rdzv_id="two-nodes", entry_module="tests.support.fake_rank"
    )
    command = node0.command(["--layer_stride", "1"], run_id="unused")
    command[command.index("--node-rank") + 1] = "1"
    other = subprocess.Popen(
        command,
        env={**os.environ, **node0.env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        resources = resources_for(
            root,
            registry,
            **settings,
            node_rank=0,
            rdzv_id="two-nodes",
            entry_module="tests.support.fake_rank",
            extra_env=env,
        )
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("models", [MODEL])
        result = materialize([sae_checkpoints], f"{MODEL}|1", instance, resources)
        assert result.success, failure_text(result)
        _, stderr = other.communicate(timeout=60)
        assert other.returncode == 0, stderr[-2000:]
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["fake"] is True and metadata["nnodes"] == 2
    starts = {e["rank"]: e for e in map(json.loads, (records / "events.jsonl").read_text().splitlines())}
    assert sorted(starts) == [0, 1]
    # Each rank recorded its torchrun's pid (tests/support/fake_rank.py): global rank 0, which reported, ran
    # under node 0's torchrun (Dagster's), rank 1 under the test's node 1.
    torchruns = (records / "launches-1").read_text().split()
    assert torchruns[starts[1]["attempt"] - 1] == str(other.pid)
    assert torchruns[starts[0]["attempt"] - 1] != str(other.pid)
