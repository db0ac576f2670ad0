"""The decoder's optimizer step in one Triton pass per row (--kernels triton).

The torch path updates a unit-norm decoder in three passes over W_dec and its gradient: remove the gradient's
radial part, the optimizer's step, renormalise the rows. With --kernels triton and an optimizer whose update
has a kernel (schedule_free_adam, the default, and adam), the trainer runs the torch optimizer on every other
parameter and one kernel on W_dec (triton_kernels.decoder_schedule_free_step / decoder_adam_step). The
optimizer state keeps torch's layout (the same tensors under the same names), so checkpoints, resume and the
schedule-free average work as they do with the torch kernels.
"""

from types import ModuleType

import torch
from torch import Tensor, optim

from .kernels import triton_kernels
from .optim import SaeOptimizer, ScheduleFreeAdam


def fused_decoder_kernels(sae: torch.nn.Module, optimizer: SaeOptimizer) -> ModuleType | None:
    """sae_core.triton_kernels when W_dec of `sae` takes the fused step: --kernels triton, a unit-norm fp32
    decoder, schedule-free Adam or a plain Adam (no weight decay, amsgrad or maximize); else None."""
    kernels = triton_kernels(sae.cfg.kernels)
    w_dec = getattr(sae, "W_dec", None)
    if kernels is None or w_dec is None or not sae.unit_norm_decoder or w_dec.dtype != torch.float32:
        return None
    found = _owner(optimizer, w_dec)
    if found is None:
        return None
    part, group = found
    plain_adam = (
        type(part) is optim.Adam
        and group["weight_decay"] == 0
        and not group["amsgrad"]
        and not group["maximize"]
        and not torch.is_tensor(group["lr"])
    )
    return kernels if isinstance(part, ScheduleFreeAdam) or plain_adam else None


def _owner(optimizer: SaeOptimizer, p: Tensor) -> tuple[optim.Optimizer, dict] | None:
    for part in optimizer.parts.values():
        for group in part.param_groups:
            if any(q is p for q in group["params"]):
                return part, group
    return None


@torch.no_grad()
def step_with_fused_decoder(optimizer: SaeOptimizer, w_dec: Tensor, kernels: ModuleType) -> None:
    """optimizer.step() for every parameter but w_dec, then w_dec's radial-gradient removal, update and
    renormalisation in one kernel (`kernels`: what fused_decoder_kernels returned)."""
    grad = w_dec.grad
    w_dec.grad = None  # torch's optimizers (and ScheduleFreeAdam) pass over a parameter without gradient
    try:
        optimizer.step()
    finally:
        w_dec.grad = grad
    part, group = _owner(optimizer, w_dec)
    beta1, beta2 = group["betas"]
    grad = grad.contiguous()
    if isinstance(part, ScheduleFreeAdam):
        # The group's bookkeeping (steps, lr_max, weight_sum) was advanced by the step above.
        state = part.param_state(w_dec)
        c, bias2 = part.step_coefficients(group)
        kernels.decoder_schedule_free_step(
            w_dec.data,
            grad,
            state["z"],
            state["exp_avg_sq"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            c=c,
            bias2=bias2,
        )
        return
    state = part.state[w_dec]
    if not state:  # torch's own lazy initialisation: the step count on the device for its fused Adam
        on_device = group["fused"] or group["capturable"]
        state["step"] = torch.zeros((), dtype=torch.float32, device=w_dec.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(w_dec, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(w_dec, memory_format=torch.preserve_format)
    kernels.decoder_adam_step(
        w_dec.data,
        grad,
        state["exp_avg"],
        state["exp_avg_sq"],
        state["step"],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
    )
