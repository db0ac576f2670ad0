"""The launcher resource: a Dagster `PipesClient` that starts a step's ranks somewhere else than in the step.

Training (`sae_pipeline.rank_entry`, i.e. `python -m sae_core`) and evaluation (`sae_pipeline.eval_entry`,
i.e. `python -m sae_core.evaluate`) never run in Dagster's step process: the step asks the `launcher`
resource to run a module on N ranks inside a Pipes session, and reads back what global rank 0 reported. So
Dagster's own workers never need a GPU, and where the ranks run is the launcher's business:

- `TorchrunLauncher` (sae_pipeline.torchrun): torchrun on this machine, as a child of the step.
- `K8sLauncher` (sae_pipeline.k8s_launcher): one Kubernetes pod per launch, through dagster-k8s's
  PipesK8sClient (the pod from sae_pipeline.k8s).
- another backend (a Slurm job, ...): subclass `PipesLauncher`, implement `run` (and `check` for settings it
  refuses), and give it as the `launcher` resource.

What every backend owes the steps: each rank runs `python -m <module> <args>` with `extra_env`; rank 0 opens
the Pipes session; a launch that fails raises dg.Failure saying which rank failed and whether a retry may help
(sae_pipeline.retries); a cancelled step leaves nothing running.
"""

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from pydantic import Field

TRAINING_ENTRY = "sae_pipeline.rank_entry"
EVALUATION_ENTRY = "sae_pipeline.eval_entry"


class PipesLauncher(dg.ConfigurableResource, dg.PipesClient):
    """Runs a Python module on N ranks in a Dagster Pipes session (the base of every launcher backend)."""

    nproc_per_node: int = Field(default=1, ge=1, description="Training ranks per node (GPUs, or CPUs).")
    nnodes: int = Field(default=1, ge=1, description="Number of nodes of a training.")
    entry_module: str = Field(
        default=TRAINING_ENTRY, description="Module each training rank runs (wraps `python -m sae_core`)."
    )
    eval_entry_module: str = Field(
        default=EVALUATION_ENTRY,
        description="Module the evaluation ranks run (wraps `python -m sae_core.evaluate`).",
    )
    eval_nproc: int = Field(
        default=1, ge=1, description="Evaluation ranks on one node (the SAEs are shared among them)."
    )
    extra_env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every rank.")

    def check(self) -> None:
        """Raise ValueError for settings this backend would reject, before the step touches any folder."""

    @abstractmethod
    def run(  # type: ignore[override]  # PipesClient.run takes backend-specific keywords by design
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
        """Run `python -m module args` on `nproc` ranks (default: nproc_per_node) and wait for the end.

        `what` names the launch in messages ("training failed: rank 1 raised ..."); `metadata` is added to
        every result rank 0 reports. Raises dg.Failure when a rank fails, with allow_retries saying whether
        trying again may help.
        """
