"""--save_best: keep, for each hookpoint, the SAE whose running FVU was the lowest at a checkpoint, as
sparsify's `save_best` does.

An SAE's running FVU is the mean of its training FVU over the optimizer steps since the previous checkpoint
(each measured on its step's batch, before that step's update). At every checkpoint (every save_every steps
and at the end) an SAE whose running FVU is below its best so far is written to run_dir/best/<hookpoint>/:
cfg.json and sae.safetensors as any SAE folder, and best.json with that FVU, the step and the number of
steps averaged. The bests are part of the trainer state, so --resume carries them on.
"""

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .sae import Sae
from .utils import atomic_write_json

BEST_DIR = "best"
BEST_FILE = "best.json"


class BestSaes:
    """The running FVU of each of a rank's SAEs since the last checkpoint, and its best so far."""

    def __init__(self, hookpoints: Iterable[str]):
        self.best = {hookpoint: math.inf for hookpoint in hookpoints}
        self.sums = dict.fromkeys(self.best, 0.0)
        self.steps = dict.fromkeys(self.best, 0)

    def observe(self, metrics: Mapping[str, float]) -> None:
        """Add one optimizer step's `fvu/<hookpoint>` metrics (a skipped, non-finite step counts not)."""
        for hookpoint in self.sums:
            fvu = metrics.get(f"fvu/{hookpoint}")
            if fvu is not None and math.isfinite(fvu):
                self.sums[hookpoint] += fvu
                self.steps[hookpoint] += 1

    def save(
        self, saes: Mapping[str, Sae], run_dir: Path, step: int, input_scales: Mapping[str, float]
    ) -> None:
        """At a checkpoint: write every SAE whose running FVU beats its best, then start a new window."""
        for hookpoint, sae in saes.items():
            steps = self.steps.get(hookpoint, 0)
            running = self.sums[hookpoint] / steps if steps else math.inf
            if running < self.best[hookpoint]:
                folder = run_dir / BEST_DIR / hookpoint
                sae.save_to_disk(folder, input_scale=input_scales.get(hookpoint, 1.0))
                atomic_write_json(folder / BEST_FILE, {"fvu": running, "step": step, "steps_averaged": steps})
                self.best[hookpoint] = running
        self.sums = dict.fromkeys(self.best, 0.0)
        self.steps = dict.fromkeys(self.best, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"best_fvu": dict(self.best)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """From a trainer state (one written without --save_best has none: every best starts afresh)."""
        self.best.update({h: v for h, v in state.get("best_fvu", {}).items() if h in self.best})
