"""What keeps a run from going wrong silently: non-finite values are dropped, skipped or refused, and counted.

The trainer drops NaN/Inf activation rows (activations.py) and skips an SAE's update whose loss or
gradients are NaN/Inf on any rank. `DivergenceWatch` keeps the run totals that metrics.jsonl reports and stops
the run when one SAE's updates were skipped MAX_CONSECUTIVE_SKIPS times in a row; `refuse_nonfinite_weights`
keeps NaN/Inf weights from ever being saved over a good checkpoint.
"""

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import DistContext, all_reduce_sum
from .errors import TrainingDivergedError

# Ten non-finite steps in a row is no longer a stray bad batch: the SAE itself (or the model) has blown up.
MAX_CONSECUTIVE_SKIPS = 10
ADVICE = "lower --lr, or run the model in float32 (--dtype float32)"


@torch.no_grad()
def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether no element of `tensors` is NaN or Inf (one device sync)."""
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


class DivergenceWatch:
    """Run totals of dropped rows and skipped steps, and the consecutive non-finite skips of each SAE."""

    def __init__(self, hookpoints: Iterable[str]):
        self.nonfinite_tokens = 0  # token rows dropped because an activation was NaN/Inf
        self.skipped_steps = 0  # steps in which at least one SAE's update was skipped
        self.consecutive = {hookpoint: 0 for hookpoint in hookpoints}

    def after_step(
        self,
        step_number: int,
        nonfinite_tokens: int,
        nonfinite_skips: Sequence[str],
        empty_skips: Sequence[str],
    ) -> dict[str, float]:
        """Count one (rank-merged) step; raise TrainingDivergedError after MAX_CONSECUTIVE_SKIPS non-finite
        steps of one SAE. Every rank sees the same merged step, so every rank stops together."""
        self.nonfinite_tokens += nonfinite_tokens
        if nonfinite_skips or empty_skips:
            self.skipped_steps += 1
        for hookpoint in self.consecutive:
            if hookpoint in nonfinite_skips:
                self.consecutive[hookpoint] += 1
            elif hookpoint not in empty_skips:  # a step with no tokens says nothing either way
                self.consecutive[hookpoint] = 0
        diverged = [h for h, n in self.consecutive.items() if n >= MAX_CONSECUTIVE_SKIPS]
        if diverged:
            raise TrainingDivergedError(
                f"training diverged at step {step_number}: the loss or gradients of the SAE of "
                f"{', '.join(diverged)} were NaN/Inf for {MAX_CONSECUTIVE_SKIPS} steps in a row (those "
                f"updates were skipped); the last checkpoint is intact; {ADVICE}"
            )
        return {"nonfinite_tokens": self.nonfinite_tokens, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_tokens": self.nonfinite_tokens, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Both are absent from trainer states written before these counters existed.
        self.nonfinite_tokens = state.get("nonfinite_tokens", 0)
        self.skipped_steps = state.get("skipped_steps", 0)


def refuse_nonfinite_weights(
    saes: Mapping[str, nn.Module], ctx: DistContext, reduce: bool, step: int, run_dir: Path
) -> None:
    """Never write NaN/Inf weights over a good checkpoint. With `reduce` (each rank owns different SAEs) every
    rank learns of any rank's (one collective), so all stop together."""
    broken = [hookpoint for hookpoint, sae in saes.items() if not all_finite(list(sae.parameters()))]
    count = torch.tensor([len(broken)], dtype=torch.long)
    if reduce:
        all_reduce_sum(count, ctx)
    if count.item():
        where = f" ({', '.join(broken)})" if broken else " on another rank"
        raise TrainingDivergedError(
            f"refusing to save step {step}: SAE weights are NaN/Inf{where}; the last checkpoint in {run_dir} "
            f"is intact; {ADVICE}"
        )
