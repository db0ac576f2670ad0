"""The optimizers SAEs are trained with."""

from torch import Tensor, optim


def make_adam(params: list[Tensor], lr: float) -> optim.Adam:
    """Fused Adam where this torch supports it for the device (5x faster than foreach on CPU), else the
    default."""
    try:
        return optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return optim.Adam(params, lr=lr)
