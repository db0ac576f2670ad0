"""Resources: where artefacts live, which models exist, where SAEs are published; the launchers of the ranks
(PipesClients: TorchrunLauncher, sae_pipeline.torchrun; K8sLauncher, sae_pipeline.k8s_launcher) are
re-exported here.

Every artefact path is built here, from validated partition keys, under one root:

    <root>/tokenized/<model>/                       tokenized_dataset   (Dataset.save_to_disk + pipeline.json)
    <root>/runs/<model>/stride-<s>/                 sae_checkpoints     (sae_core's run folder)
    <root>/evaluations/<model>/stride-<s>/          sae_evaluation      (report.json, report.md, plots)
    <root>/published/<model>/stride-<s>/            published_saes      (when no Hub repo is configured)

so two partitions never share a file, and nothing a registry says can point outside the root.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from filelock import FileLock, Timeout
from pydantic import Field

from .k8s_launcher import K8sLauncher
from .partitions import check_model_key
from .registry import ModelEntry, Registry, load_registry, registry_path
from .torchrun import TorchrunLauncher

__all__ = ["GPU_POOL", "ArtefactStore", "HubPublisher", "K8sLauncher", "ModelRegistry", "TorchrunLauncher"]

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
