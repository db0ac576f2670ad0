"""Where the SAEs' inputs come from: the language model's forward pass, batch by batch.

`LiveActivations.batch(i)` runs this rank's share of global batch `i` through the LM (eval mode, stopping
after the deepest hooked block), sends each hookpoint's activations to the rank that trains its SAE under
--distribute_layers, and returns the rows the SAEs may see: excluded tokens (BOS, pad) and non-finite rows
left out, the latter counted. For transcoders (`transcode`) the same forward also captures each module's
input: `inputs` are then what the transcoders encode and `targets` the module outputs they predict.
"""

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .data import sequence_rows
from .distributed import DistContext, gather_to
from .errors import ConfigError
from .loggers import Profiler
from .models import capture_residuals, run_until_captured, special_token_ids


class Batch(NamedTuple):
    """One batch of this rank's SAE inputs."""

    inputs: dict[str, Tensor]  # {hookpoint: [tokens, d]}: finite rows of the tokens not excluded
    nonfinite: dict[str, int]  # {hookpoint: rows dropped because an activation was NaN/Inf}
    targets: dict[str, Tensor] | None = None  # transcoders: {hookpoint: [tokens, d_out]}, the same rows


def excluded_token_ids(exclude_tokens: Sequence[int] | None, tokenizer: Any, warn: bool) -> Tensor:
    """Token ids never fed to the SAEs: `exclude_tokens`, else the tokenizer's special tokens."""
    if exclude_tokens is not None:
        return torch.tensor(exclude_tokens, dtype=torch.long)
    if tokenizer is None:
        if warn:
            warnings.warn(
                "no tokenizer and no exclude_tokens: every token trains the SAEs, BOS included "
                "(pass tokenizer= or exclude_tokens to leave special tokens out)",
                stacklevel=4,
            )
        return torch.tensor([], dtype=torch.long)
    return torch.tensor(special_token_ids(tokenizer), dtype=torch.long)


class LiveActivations:
    """Activations computed on the fly by `model` from the token ids of `dataset`."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        hookpoints: list[str],
        owners: dict[str, int],
        ctx: DistContext,
        batch_size: int,
        d_in: int,
        excluded: Tensor,
        gather: bool,
        profiler: Profiler,
        order: Tensor | None = None,
        keep_nonfinite: bool = False,
        transcode: bool = False,
        d_out: int | None = None,
    ):
        self.model, self.dataset, self.hookpoints, self.owners = model, dataset, hookpoints, owners
        self.ctx, self.batch_size, self.d_in, self.excluded = ctx, batch_size, d_in, excluded
        self.gather, self.profiler = gather, profiler
        # The order in which the training sequences are visited (None: dataset order).
        self.order = order
        # The activation cache keeps NaN/Inf rows (every hookpoint then has one row per kept token); its
        # reader drops and counts them as this class does.
        self.keep_nonfinite = keep_nonfinite
        self.transcode, self.d_out = transcode, d_out or d_in
        self.local_hookpoints = [h for h in hookpoints if owners[h] == ctx.rank]

    def token_ids(self, index: int) -> tuple[Tensor, Tensor]:
        """(the token ids of global batch `index`, this rank's share of them), [sequences, tokens] each."""
        per_batch = self.batch_size * self.ctx.world_size
        global_ids = sequence_rows(self.dataset, index * per_batch, (index + 1) * per_batch, self.order)
        return global_ids, global_ids[self.ctx.rank * self.batch_size : (self.ctx.rank + 1) * self.batch_size]

    def batch(self, index: int) -> Batch:
        """This rank's SAE inputs of global batch `index`, for the SAEs it owns."""
        global_ids, rank_ids = self.token_ids(index)
        module_inputs: dict[str, Tensor] | None = {} if self.transcode else None
        with self.profiler.timed("lm_forward_s", sync=True):
            with (
                torch.no_grad(),
                eval_mode(self.model),
                capture_residuals(self.model, self.hookpoints, inputs=module_inputs) as acts,
            ):
                run_until_captured(self.model, rank_ids.to(self.ctx.device))
        for hookpoint, act in acts.items():
            if act.shape[-1] != self.d_out:
                raise ConfigError(
                    f"{hookpoint} has width {act.shape[-1]}, expected {self.d_out} (as when the run started)"
                )
        ids = rank_ids
        if self.gather:  # --distribute_layers: each owner gets its hookpoint's whole global batch
            ids = global_ids
            acts = self._gather(acts)
            module_inputs = self._gather(module_inputs) if module_inputs is not None else None
        keep = ~torch.isin(ids, self.excluded)
        inputs, targets, nonfinite = {}, {}, {}
        for hookpoint in self.local_hookpoints:
            y = acts[hookpoint][keep.to(acts[hookpoint].device)].float()
            x = module_inputs[hookpoint][keep.to(y.device)].float() if module_inputs is not None else y
            if self.keep_nonfinite:
                inputs[hookpoint], nonfinite[hookpoint] = x, 0
                continue
            # One NaN/Inf row would turn every SAE parameter into NaN at the next update: drop it, count it.
            finite = x.isfinite().all(-1) & y.isfinite().all(-1)
            nonfinite[hookpoint] = int(x.shape[0] - finite.sum())
            inputs[hookpoint] = x[finite] if nonfinite[hookpoint] else x
            targets[hookpoint] = y[finite] if nonfinite[hookpoint] else y
        return Batch(inputs, nonfinite, targets if self.transcode else None)

    def _gather(self, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """--distribute_layers: each hookpoint's whole global batch, on the rank that owns its SAE."""
        gathered = {}
        for hookpoint in self.hookpoints:
            full = gather_to(acts[hookpoint].float(), self.owners[hookpoint], self.ctx)
            if full is not None:
                gathered[hookpoint] = full
        return gathered


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (dropout off: the SAEs learn the activations the model has at inference), each
    module's own mode restored after."""
    training = [module for module in model.modules() if module.training]
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True  # not .train(): that would also switch the module's children
