"""The two products of a TopK SAE, written so that only the encoder's forward is dense.

A TopK SAE step is bounded by one dense product, pre-activations = x @ W_enc.T (N x d by d x M).
Everything after the top-k touches only k of the M latents per token, so:

- `topk_encode` is an autograd Function whose backward is sparse: the gradients of W_enc, b_enc and x
  involve only the N*k selected (token, latent) pairs, never an N x M matrix. It also selects, in the same
  pass over the pre-activations, the AuxK candidates among the dead latents, and routes their gradient
  into the encoder too (a fused kernel that dropped this gradient was one of the seed library's bugs).
- `sparse_decode` is an embedding-bag: x_hat[t] = sum_j acts[t, j] * W_dec[idx[t, j]] (+ bias).
"""

import contextlib
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError


class EncoderOutput(NamedTuple):
    acts: Tensor  # [N, k] activations of the selected latents (post-ReLU, may contain zeros)
    indices: Tensor  # [N, k] latent indices
    aux_acts: Tensor  # [N, k_aux] activations of the top dead latents ([N, 0] when AuxK is off)
    aux_indices: Tensor  # [N, k_aux]


def _sparse_rows_times_dense(rows: Tensor, vals: Tensor, dense: Tensor, num_rows: int) -> Tensor:
    """Compute S @ dense where S [num_rows, N] has entries S[rows[t, j], t] = vals[t, j].

    One index_add per top-k slot: within a slot each token adds to one row. On CPU this beat a COO sparse
    product (which sorts the N*k entries first) and an embedding-bag backward.
    """
    out = dense.new_zeros(num_rows, dense.shape[1])
    for j in range(rows.shape[1]):
        out.index_add_(0, rows[:, j], dense * vals[:, j : j + 1])
    return out


def _csr_rows_times_dense(rows: Tensor, vals: Tensor, dense: Tensor, num_rows: int) -> Tensor:
    """The same product as `_sparse_rows_times_dense`, with S built as a CSR matrix (entries sorted by row)
    and multiplied by the sparse BLAS: one pass over each output row instead of k scattered passes."""
    n, k = rows.shape
    flat = rows.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: a fixed summation order, so runs are reproducible
    counts = torch.bincount(flat, minlength=num_rows)
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        s = torch.sparse_csr_tensor(
            crow, order // k, vals.reshape(-1)[order], size=(num_rows, n), check_invariants=False
        )
        return s @ dense


# How the encoder's weight gradient is computed, per device type: "csr" (a sorted sparse-dense product; best
# on CPU: 0.067 s vs 0.128 s for index_add at N=4096, k=32, d=576, M=18432), "index_add" (k index_add calls)
# or "embedding_bag" (the backward of the embedding bag that gives grad_x; one sorted segment reduction,
# no atomics; 7% faster than index_add on an H100). benchmarks/sae_step.py --grad_w overrides it to compare.
GRAD_W_METHOD = {"cpu": "csr", "cuda": "embedding_bag"}

# On CPU the encoder's pre-activations are computed this many elements (tokens x latents) at a time.
ENCODE_BLOCK_ELEMENTS = 1 << 24


def _encoder_grads(ids: Tensor, g: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool):
    """grad_x = sum_j g[t, j] * weight[ids[t, j]] and
    grad_w[m] = sum over (t, j) with ids[t, j] = m of g[t, j] * x[t].

    grad_w is the backward of the embedding bag that computes grad_x (with x as its upstream gradient).
    """
    method = GRAD_W_METHOD.get(weight.device.type, "index_add")
    if need_w and method == "embedding_bag":
        with torch.enable_grad():
            w = weight.detach().requires_grad_()
            gx = F.embedding_bag(ids, w, per_sample_weights=g, mode="sum")
            (grad_w,) = torch.autograd.grad(gx, w, grad_outputs=x.to(weight.dtype))
        return (gx.detach() if need_x else None), grad_w
    grad_x = F.embedding_bag(ids, weight, per_sample_weights=g, mode="sum") if need_x else None
    grad_w = None
    if need_w:
        product = _csr_rows_times_dense if method == "csr" else _sparse_rows_times_dense
        grad_w = product(ids, g, x.to(weight.dtype), weight.shape[0])
    return grad_x, grad_w


def _autocast_off(device_type: str):
    """A region where autocast is off for this device type (nothing to do where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, dead_idx, k_aux, compute_dtype):
        n, m = x.shape[0], weight.shape[0]
        dtype = compute_dtype if compute_dtype is not None else x.dtype
        w_t, b = weight.to(dtype).t(), bias.to(dtype)
        use_aux = dead_idx is not None and dead_idx.numel() > 0 and k_aux > 0
        k_aux = min(k_aux, dead_idx.numel()) if use_aux else 0
        acts = x.new_empty(n, k, dtype=dtype)
        idx = torch.empty(n, k, dtype=torch.long, device=x.device)
        aux_acts = x.new_empty(n, k_aux, dtype=dtype)
        aux_idx = torch.empty(n, k_aux, dtype=torch.long, device=x.device)
        # The pre-activations are the only N x M tensor of the step. They are made a block of tokens at a time
        # into one reused buffer, so that tensor never exists whole: peak memory falls by ~N x M x 4 bytes
        # and top-k reads a block that was just written (still in cache) instead of the whole matrix.
        rows = max(1, min(n, ENCODE_BLOCK_ELEMENTS // m)) if x.device.type == "cpu" else n
        pre = x.new_empty(rows, m, dtype=dtype)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            block = pre[: stop - start]
            torch.addmm(b, x[start:stop].to(dtype), w_t, out=block)
            # ReLU is monotonic, so top-k of ReLU(pre) = ReLU(top-k of pre): apply it to the k survivors
            # only instead of making a pass over the block.
            torch.topk(block, k, dim=1, sorted=False, out=(acts[start:stop], idx[start:stop]))
            if use_aux:
                candidates = block.index_select(1, dead_idx)
                _, pos = torch.topk(
                    candidates, k_aux, dim=1, sorted=False, out=(aux_acts[start:stop], aux_idx[start:stop])
                )
                aux_idx[start:stop] = dead_idx[pos]
        del pre
        acts.relu_()
        aux_acts.relu_()
        acts, aux_acts = acts.to(x.dtype), aux_acts.to(x.dtype)
        ctx.save_for_backward(x, weight, idx, acts, aux_idx, aux_acts)
        ctx.device_type = x.device.type
        ctx.mark_non_differentiable(idx, aux_idx)
        return acts, idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, g_acts, _g_idx, g_aux, _g_aux_idx):
        # A backward called inside an autocast region would have its products recast (the CPU CSR product has
        # no bf16 kernel at all): the gradients are computed in the parameters' dtype whatever the caller's
        # autocast state, as they are without autocast. (torch.amp.custom_bwd would instead replay the
        # forward's autocast state.)
        with _autocast_off(ctx.device_type):
            return _TopKEncode._backward(ctx, g_acts, g_aux)

    @staticmethod
    def _backward(ctx, g_acts, g_aux):
        x, weight, idx, acts, aux_idx, aux_acts = ctx.saved_tensors
        if g_acts is None:
            g_acts = torch.zeros_like(acts)
        if g_aux is None:
            g_aux = torch.zeros_like(aux_acts)
        # ReLU: latents whose value was clamped to 0 pass no gradient.
        g = torch.cat([g_acts * (acts > 0), g_aux * (aux_acts > 0)], dim=1).to(weight.dtype)
        ids = torch.cat([idx, aux_idx], dim=1)
        grad_x, grad_w = _encoder_grads(ids, g, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, ids.reshape(-1), g.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None, None


def encoder_compute_dtype(setting: str | None, device: torch.device | str) -> torch.dtype | None:
    """The dtype of the encoder product for the `autocast` setting on `device` (None: the SAE's own, exact).

    "auto" is bfloat16 on CUDA devices that support it and exact elsewhere. Measured (benchmarks/RESULTS.md,
    `sae_step`): one step at N=4096, d=576, M=18,432 took 5.26 ms in fp32 and 4.01 ms in bf16 on an H100,
    5.01 and 3.54 ms on an H200 (1.98x at N=32,768), and bf16 training ends within 1% of the fp32 FVU
    (tests/core/test_sae.py::test_bf16_encoder_trains_to_within_one_percent_of_fp32_fvu). CPUs stay exact:
    on CPUs without bf16 units bf16 is several times slower (README, Benchmarks). On a 2-core Xeon with AMX,
    bf16 made the step itself 1.74x faster (100.7 -> 57.9 ms at N=2048, d=576, M=4608, quiet machine; a first
    measurement under heavy load had shown no gain), but the LM forward is most of a CPU run's time and the
    end-to-end gain is not measured yet: pass --autocast bfloat16 there.
    """
    if setting in (None, "float32"):
        return None
    if setting == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return getattr(torch, setting)


def topk_encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    dead_idx: Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> EncoderOutput:
    """ReLU(x @ weight.T + bias), keep the top k per row; optionally also the top k_aux among `dead_idx`.

    `compute_dtype` (e.g. bfloat16) runs the dense product in that dtype; outputs and gradients stay in
    the parameters' dtype. Without it, an enclosing `torch.autocast` for x's device type sets it: the result
    is exactly that of passing `compute_dtype=<autocast's dtype>`. An explicit `compute_dtype` wins.
    """
    compute_dtype = autocast_compute_dtype(x.device.type, compute_dtype)
    # The forward casts to compute_dtype itself; with autocast off inside it, it runs exactly as it does
    # for an explicit compute_dtype (no op is recast on top).
    with _autocast_off(x.device.type):
        return EncoderOutput(*_TopKEncode.apply(x, weight, bias, k, dead_idx, k_aux, compute_dtype))


def autocast_compute_dtype(device_type: str, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """`compute_dtype`, or when it is None the dtype of an enclosing `torch.autocast` on that device type."""
    autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if compute_dtype is None and autocast_on:
        return torch.get_autocast_dtype(device_type)
    return compute_dtype


def sparse_decode(acts: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """sum_j acts[t, j] * weight[indices[t, j]] (+ bias), without building an N x M matrix."""
    if indices.shape[1] == 0:
        out = acts.new_zeros(acts.shape[0], weight.shape[1])
    else:
        out = F.embedding_bag(indices, weight, per_sample_weights=acts.to(weight.dtype), mode="sum")
    return out + bias if bias is not None else out


def triton_kernels(setting: str):
    """The module sae_core.triton_kernels when `setting` (SaeConfig.kernels) is "triton", else None (these
    torch kernels; "auto" stays torch until GPU measurements justify Triton). Imported here, lazily: sae_core
    works without the triton package."""
    if setting != "triton":
        return None
    try:
        from . import triton_kernels as module
    except ImportError as e:
        raise ConfigError(
            f"--kernels triton needs the triton package ({e}): pip install 'triton==3.9.0' (Linux), "
            "or use --kernels torch"
        ) from None
    return module
