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
