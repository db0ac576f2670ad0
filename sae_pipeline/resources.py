"""Resources: where artefacts live, which models exist, how torchrun is launched, where SAEs are published.

Every artefact path is built here, from validated partition keys, under one root:

    <root>/tokenized/<model>/                       tokenized_dataset   (Dataset.save_to_disk + pipeline.json)
    <root>/runs/<model>/stride-<s>/                 sae_checkpoints     (sae_core's run folder)
    <root>/evaluations/<model>/stride-<s>/          sae_evaluation      (report.json, report.md, plots)
    <root>/published/<model>/stride-<s>/            published_saes      (when no Hub repo is configured)

so two partitions never share a file, and nothing a registry says can point outside the root.
"""

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from filelock import FileLock, Timeout
from pydantic import Field

from .partitions import check_model_key
from .registry import ModelEntry, Registry, load_registry, registry_path

ROOT_ENV = "SAE_PIPELINE_ROOT"
# The concurrency pool of the steps that need the GPUs (training, evaluation). Its size is the instance's:
# deploy/dagster.yaml gives every pool 1 slot; `dagster instance concurrency set gpu N` changes it.
GPU_POOL = "gpu"


class ArtefactStore(dg.ConfigurableResource):
    """The folder under which every asset of the pipeline writes its files."""

    root: str = Field(
        default_factory=lambda: os.environ.get(ROOT_ENV) or "artefacts",
        description=f"Artefact root (default: ${ROOT_ENV}, else ./artefacts).",
    )

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def _under_root(self, *parts: str) -> Path:
        path = self.root_path.joinpath(*parts).resolve()
        # Keys are validated, so this cannot fail; it is the last line of defence if that ever changes.
        if self.root_path not in path.parents:
            raise ValueError(f"refusing to use {path}: it is outside the artefact root {self.root_path}")
        return path

    def tokenized_dir(self, model: str) -> Path:
        return self._under_root("tokenized", check_model_key(model))

    def run_dir(self, model: str, stride: int) -> Path:
        return self._under_root("runs", check_model_key(model), f"stride-{int(stride)}")

    def eval_dir(self, model: str, stride: int) -> Path:
        return self._under_root("evaluations", check_model_key(model), f"stride-{int(stride)}")

    def publish_dir(self, model: str, stride: int) -> Path:
        return self._under_root("published", check_model_key(model), f"stride-{int(stride)}")

    def dashboard_dir(self, model: str, stride: int) -> Path:
        return self._under_root("dashboards", check_model_key(model), f"stride-{int(stride)}")

    @contextlib.contextmanager
    def exclusive(self, folder: Path) -> Iterator[None]:
        """Hold an exclusive lock on `folder` (a sibling lock file) for the block, or fail at once.

        Two runs of one partition at the same time would write one run folder; the second is refused instead.
        The kernel releases the lock when the holder dies, so a killed run never leaves a stale lock behind.
        """
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder.parent / f".{folder.name}.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise dg.Failure(
                description=f"{folder} is in use by another run of the same partition; wait for it",
                allow_retries=False,
            ) from None
        try:
            yield
        finally:
            lock.release()


class ModelRegistry(dg.ConfigurableResource):
    """The YAML registry of models (see sae_pipeline/registry.py for the format)."""

    path: str | None = Field(
        default=None,
        description="Registry file (default: $SAE_PIPELINE_REGISTRY, else the packaged models.yaml, which "
        "lists the embedded model).",
    )

    def load(self) -> Registry:
        return load_registry(self.path)

    def entry(self, name: str) -> ModelEntry:
        return self.load().get(name)

    @property
    def resolved_path(self) -> Path:
        return registry_path(self.path)


class TorchrunLauncher(dg.ConfigurableResource):
    """How training processes are started: `torchrun` with these options, one process per rank.

    Only this node is launched by Dagster. For several nodes, start the same command on the other nodes (with
    your cluster's tooling) against the same rendezvous endpoint; global rank 0 must run on this node, because
    it is the rank that reports to Dagster. So several nodes need the static rendezvous with this node as node
    0 (`rdzv_backend: static`, `node_rank: 0`); with c10d, torch assigns ranks itself and rank 0 may land on
    another node, so it is refused.
    """

    python_executable: str = Field(default_factory=lambda: sys.executable, description="Python for torchrun.")
    nproc_per_node: int = Field(default=1, ge=1, description="Ranks on this node (GPUs, or CPU processes).")
    nnodes: int = Field(default=1, ge=1, description="Number of nodes.")
    node_rank: int | None = Field(default=None, ge=0, description="This node's rank (static rendezvous).")
    rdzv_backend: str = Field(default="c10d", description="torchrun --rdzv-backend (multi-node).")
    rdzv_endpoint: str | None = Field(default=None, description="host:port of the rendezvous (multi-node).")
    rdzv_id: str | None = Field(default=None, description="Rendezvous id (default: the Dagster run id).")
    master_port: int | None = Field(
        default=None, description="Port of a single-node run (default: a free one, so runs never clash)."
    )
    entry_module: str = Field(
        default="sae_pipeline.rank_entry", description="Module each rank runs (wraps `python -m sae_core`)."
    )
    extra_env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every rank.")
    omp_num_threads: int | None = Field(
        default=None, description="OMP_NUM_THREADS per rank (default: the cores divided by the ranks)."
    )
    termination_timeout_s: float = Field(
        default=45.0, gt=30, description="On cancel: SIGTERM, then SIGKILL after this many seconds (> 30)."
    )

    def check(self) -> None:
        """Raise ValueError for settings torchrun would reject, before the step touches any folder."""
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (a host:port every node can reach)")
        if self.nnodes > 1 and (self.rdzv_backend != "static" or self.node_rank != 0):
            raise ValueError(
                f"nnodes={self.nnodes} with rdzv_backend={self.rdzv_backend!r}, node_rank={self.node_rank}: "
                "global rank 0, the rank that reports to Dagster, must run on this node; use "
                "rdzv_backend: static with node_rank: 0 here (the other nodes take node_rank 1, 2, ...)"
            )

    def command(self, train_args: list[str], run_id: str) -> list[str]:
        self.check()
        cmd = [self.python_executable, "-m", "torch.distributed.run"]  # torchrun, with this Python
        cmd += ["--nproc-per-node", str(self.nproc_per_node)]
        if self.nnodes > 1 or self.rdzv_endpoint:
            cmd += [
                "--nnodes",
                str(self.nnodes),
                "--rdzv-backend",
                self.rdzv_backend,
                "--rdzv-id",
                self.rdzv_id or run_id,
            ]
            if self.rdzv_endpoint:
                cmd += ["--rdzv-endpoint", self.rdzv_endpoint]
            if self.node_rank is not None:
                cmd += ["--node-rank", str(self.node_rank)]
        else:
            # --standalone would pick a port too, but through a c10d store that prints a warning per rank;
            # a free port chosen here keeps two runs on one machine apart just as well.
            cmd += ["--nnodes", "1", "--master-port", str(self.master_port or _free_port())]
        return [*cmd, "-m", self.entry_module, *train_args]

    def env(self) -> dict[str, str]:
        threads = self.omp_num_threads or max(1, (os.cpu_count() or 1) // self.nproc_per_node)
        return {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **self.extra_env}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubPublisher(dg.ConfigurableResource):
    """Where `published_saes` goes: a Hub repo when `repo_template` is set, else a folder under the artefact
    root.

    The token comes from the environment (`token: {env: HF_TOKEN}` in run config, or EnvVar("HF_TOKEN") in
    code) and is only handed to the Hub client: it never appears in config shown by the UI, metadata, or logs.
    """

    repo_template: str | None = Field(
        default=None,
        description="Hub repo id with {model} and {stride} placeholders, e.g. 'org/sae-{model}-s{stride}'. "
        "Unset: publish to <root>/published/<model>/stride-<s>.",
    )
    endpoint: str | None = Field(default=None, description="Hub endpoint (default: HF_ENDPOINT or the Hub).")
    private: bool = Field(default=False, description="Create new repos as private.")
    token: str | None = Field(default=None, description="Hub token; set it from the environment (HF_TOKEN).")

    def repo_id(self, model: str, stride: int) -> str | None:
        if not self.repo_template:
            return None
        try:
            return self.repo_template.format(model=check_model_key(model), stride=int(stride))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"hub repo_template {self.repo_template!r}: only {{model}} and {{stride}} may be used ({e})"
            ) from None
