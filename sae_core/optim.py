"""The optimizers SAEs are trained with, their default learning rates, and the learning-rate schedule.

    adam    torch's Adam (fused where the device supports it); lr 3.2e-3 / sqrt(M / 2**14) (6e-3 at M = 4608).
    signum  sign of a momentum average of the gradient (Bernstein et al. 2018, "signSGD"), momentum 0.95.
            lr 5e-3 / sqrt(M / 2**14), the scale EleutherAI's sparsify uses for its sign-descent optimizer.
    schedule_free_adam
            Adam without momentum whose iterates are averaged instead of annealed (Defazio et al. 2024, "The
            Road Less Scheduled"): warm-up, then a constant lr, no decay; the saved SAEs are the average.
            lr 2.92e-3 / sqrt(M / 2**14) (5.5e-3 at M = 4608). The default optimizer.
    muon    torch's Muon on the two weight matrices (orthogonalised momentum, update RMS matched to AdamW's:
            0.2 * sqrt(max(rows, cols))), Adam on the two biases; lr 2e-3 for both, whatever the width (the
            orthogonalised update already has a fixed size per matrix).

Every optimizer follows the same schedule, counted in optimizer steps: linear warm-up over
`warmup_steps(lr_warmup_steps, total_steps)` steps, then linear decay to exactly 0 after the last step
(schedule-free Adam: constant after the warm-up; its averaging does what the decay does).
"""

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, get_args

import torch
from torch import Tensor, nn, optim

from .config import OptimizerName

OPTIMIZERS = get_args(OptimizerName)
# Peak learning rates at 2**14 latents (muon: at any width). Adam's was Gao et al.'s 2e-4, tuned for runs of
# billions of tokens. On the embedded SmolLM2 (M = 4608, 2048 tokens per step; README "Recipe measurements")
# that left held-out FVU at 0.65 / 0.67 (layers 6 / 18) after 60k tokens and 0.22 / 0.41 after 400k, against
# 0.19 / 0.33 and 0.10 / 0.22 at 6e-3. Schedule-free Adam (the default) at 5.5e-3: 0.168 / 0.319 at 60k
# (5e-3: 0.172 / 0.301 and, seed 1, 0.173 / 0.305; 6e-3: 0.166 / 0.356; 4e-3: 0.189 / 0.306), and at 400k the
# same FVU as Adam with far fewer dead latents (1.5 / 6.3% vs 7.8 / 16.0%). Signum's is sparsify's.
BASE_LR = {"adam": 3.2e-3, "schedule_free_adam": 2.92e-3, "signum": 5e-3, "muon": 2e-3}
SIGNUM_MOMENTUM = 0.95
# Warm-up is never longer than this fraction of the run: a 29-step run asked for 1000 warm-up steps would
# otherwise never reach its learning rate and never decay.
MAX_WARMUP_FRACTION = 0.1


# The 1/sqrt(M) rule is fitted at M >= 4608; below, it extrapolates to rates that diverge: Adam at 0.036 on
# the test suite's tiny models (M = 128) ended at FVU 1.5. The default never exceeds this.
MAX_DEFAULT_LR = 1e-2


def default_lr(optimizer: str, num_latents: int) -> float:
    """The peak learning rate `optimizer` uses when --lr is not given."""
    if optimizer == "muon":
        return BASE_LR["muon"]
    return min(BASE_LR[optimizer] / math.sqrt(num_latents / 2**14), MAX_DEFAULT_LR)


def warmup_steps(requested: int, total_steps: int) -> int:
    """The warm-up actually used: `requested`, capped at MAX_WARMUP_FRACTION of the run (at least 1 step when
    any warm-up was asked for)."""
    if requested <= 0:
        return 0
    return min(requested, max(1, math.floor(MAX_WARMUP_FRACTION * total_steps)))


def lr_at(step: int, total_steps: int, warmup: int, peak: float, decay: bool = True) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up that reaches `peak` at step
    `warmup - 1`, then linear decay from `peak` at step `warmup` to 0 after the last step (a run without
    warm-up starts at the peak); without `decay`, `peak` after the warm-up."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not decay:
        return peak
    return peak * max(total_steps - step, 0) / max(total_steps - warmup, 1)


def decays(optimizer: str) -> bool:
    """Whether `optimizer`'s learning rate decays after the warm-up (not for schedule-free averaging)."""
    return optimizer != "schedule_free_adam"


class Signum(optim.Optimizer):
    """p -= lr * sign(m), m = momentum * m + (1 - momentum) * grad: steepest descent in the max norm, with
    the momentum average damping the sign's noise."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = SIGNUM_MOMENTUM):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                p.add_(buf.sign(), alpha=-group["lr"])


class ScheduleFreeAdam(optim.Optimizer):
    """Schedule-free Adam (Defazio et al. 2024). Three sequences per parameter: z takes Adam-normalised steps
    without momentum, x is the average of the z's weighted by (largest lr so far)^2, and the gradient is taken
    at y = beta1 x + (1 - beta1) z. The parameter holds y while training; `average(p)` is x, the weights to
    save and evaluate. Only z and the second moment are stored (x follows from y and z), so the state is as
    large as Adam's.

    Written in y: with u = g / (sqrt(v / (1 - beta2^t)) + eps) and c_t = w_t / sum(w),
        y <- (1 - c) y + c z + lr (beta1 (1 - c) - 1) u,    z <- z - lr u
    which is x <- (1 - c) x + c z_new, y = beta1 x + (1 - beta1) z_new. A change made to y between steps (the
    trainer renormalises the decoder rows) moves x with it.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        defaults = {"lr": lr, "betas": betas, "eps": 1e-8, "steps": 0, "lr_max": 0.0, "weight_sum": 0.0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            group["steps"] += 1
            group["lr_max"] = max(group["lr_max"], lr)
            weight = group["lr_max"] ** 2
            group["weight_sum"] += weight
            c, bias2 = self.step_coefficients(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.param_state(p)
                z, v = state["z"], state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                u = p.grad / (v / bias2).sqrt_().add_(group["eps"])
                p.lerp_(z, c).add_(u, alpha=lr * (beta1 * (1 - c) - 1))
                z.add_(u, alpha=-lr)

    @staticmethod
    def step_coefficients(group: dict) -> tuple[float, float]:
        """(c, bias2) of the step the group's bookkeeping was last advanced to (`step` advances it): the
        weight of the new z in the average, and the second moment's bias correction 1 - beta2^t."""
        c = group["lr_max"] ** 2 / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
        return c, 1 - group["betas"][1] ** group["steps"]

    def param_state(self, p: Tensor) -> dict:
        """p's state (z and the second moment), created at p's first step: z starts at p."""
        state = self.state[p]
        if not state:
            state["z"] = p.detach().clone()
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def average(self, p: Tensor) -> Tensor:
        """x for parameter p (p itself before its first step)."""
        state = self.state.get(p)
        if not state:
            return p.detach().clone()
        beta1 = next(g["betas"][0] for g in self.param_groups if any(q is p for q in g["params"]))
        return (p - (1 - beta1) * state["z"]) / beta1

    def averages(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, its x) for every parameter."""
        return [(p, self.average(p)) for group in self.param_groups for p in group["params"]]


def make_adam(params: list[Tensor], lr: float) -> optim.Adam:
    """Fused Adam where this torch supports it for the device (5x faster than foreach on CPU), else the
    default."""
    try:
        return optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return optim.Adam(params, lr=lr)


class SaeOptimizer:
    """The optimizer of one SAE: one torch optimizer (adam, signum), or Muon for its matrices plus Adam for
    its biases (muon). The trainer sets the learning rate of every step."""

    def __init__(self, name: str, sae: nn.Module, lr: float):
        params = list(sae.parameters())
        if name == "adam":
            self.parts: dict[str, optim.Optimizer] = {"adam": make_adam(params, lr)}
        elif name == "schedule_free_adam":
            self.parts = {"schedule_free_adam": ScheduleFreeAdam(params, lr)}
        elif name == "signum":
            self.parts = {"signum": Signum(params, lr)}
        elif name == "muon":
            matrices = [p for p in params if p.ndim == 2]
            vectors = [p for p in params if p.ndim != 2]
            muon = optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
            self.parts = {"muon": muon, "adam": make_adam(vectors, lr)}
        else:
            raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Within: the SAE's parameters hold the weights to save and evaluate (schedule-free: the average;
        otherwise the parameters themselves); the training weights are restored exactly after."""
        part = self.parts.get("schedule_free_adam")
        if not isinstance(part, ScheduleFreeAdam):
            yield
            return
        averages = part.averages()
        training = [p.detach().clone() for p, _ in averages]
        with torch.no_grad():
            for p, x in averages:
                p.copy_(x)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), y in zip(averages, training):
                    p.copy_(y)

    @torch.no_grad()
    def keep_averaged_weights(self) -> None:
        """At the end of training: the parameters take the weights to save and evaluate for good."""
        part = self.parts.get("schedule_free_adam")
        if isinstance(part, ScheduleFreeAdam):
            for p, x in part.averages():
                p.copy_(x)
                part.state.pop(p, None)  # z no longer matches: nothing trains on from here

    def set_lr(self, lr: float) -> None:
        for part in self.parts.values():
            for group in part.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        # One part: its own state dict, the layout checkpoints had before optimizers were selectable.
        if len(self.parts) == 1:
            return next(iter(self.parts.values())).state_dict()
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(self.parts) == 1:
            next(iter(self.parts.values())).load_state_dict(state)
        else:
            for name, part in self.parts.items():
                part.load_state_dict(state[name])
