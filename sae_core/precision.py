"""TF32 matmuls for the float32 products of training on CUDA (`--tf32`).

TF32 keeps float32's range with a 10-bit mantissa (bfloat16 has 7, float32 23); on Ampere and later GPUs
cuBLAS then runs float32 products on the tensor cores. EleutherAI sparsify turns it on for the whole process.
Here it is a setting of the run, on only while the trainer steps (then the previous value is back: evaluation
and other code in the process keep theirs), and only on CUDA: on a CPU nothing is read or set. The legacy
flag (torch.backends.cuda.matmul.allow_tf32) is the one used, as in the tests and benchmarks: torch refuses
to read the TF32 state once both its old and its new API have set it.
"""

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32_matmuls(enabled: bool, device: torch.device | str) -> Iterator[None]:
    """Within: float32 CUDA matmuls use TF32 iff `enabled`; a no-op for any other device type."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
