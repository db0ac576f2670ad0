"""Triton kernels for the sparse parts of a TopK SAE step (`--kernels triton`); sae_core/kernels.py, the torch
implementation, stays the reference, the CPU path and the default.

Only the encoder's pre-activations x @ W_enc.T + b_enc are dense; they stay one cuBLAS product. Everything
else touches the N*k selected (token, latent) pairs, and each kernel here reads those pairs, the selected
weight rows and the dense [N, d] inputs once, in fp32 registers, without any N x k x d or N x M intermediate:

- top-k with ReLU fused: each (token, tile of latents) program packs every pre-activation with its index into
  one int64 key whose integer order is (value, -index) order, and keeps the tile's top keys (`tl.topk`); the
  per-tile candidates are merged by the same kernel until one tile is left. AuxK's top-k over the dead latents
  runs in the same pass over the pre-activations, with the dead-latent mask as a [M] bool tensor (no
  `nonzero`, no host synchronisation): its width is min(k_aux, M) whatever the number of dead latents, and
  the slots beyond them hold 0.
  Ties go to the lower latent index.
- gather-sum: out[t] = sum_j vals[t, j] * W[idx[t, j]] (+ b), tiled over tokens and d: the decoder's forward
  and the encoder's input gradient.
- row dots: out[t, j] = <dense[t], W[idx[t, j]]>, the decoder's gradient of the activations.
- segment sum: grad_W[m] = sum over the pairs (t, j) that selected m of vals[t, j] * dense[t] (and their sum
  of vals, the bias gradient): both weight gradients. The pairs are sorted by latent first (one torch.sort of
  N*k integers, then searchsorted for the row offsets: no host sync), and each program owns one output row:
  no atomics, every row written once (unselected rows get their zeros), and a fixed summation order, so runs
  are reproducible as the torch path's are. Atomics would skip the sort but make fp32 sums order-dependent and
  need a zeroed M x d buffer first.
- the fused SAE step (`encode_decode`, what Sae.forward runs with --kernels triton): top-k, decode (and AuxK's
  decode) forward; one backward that makes the latents' gradients (row dots against W_dec), the input
  gradient (gather-sum over W_enc) and, from one sort of the N*(k + k_aux) selected pairs, both weight
  gradients and the encoder bias gradient in one kernel (`dual_segment_sum`): each program owns one latent
  and reads each of its pairs' input row and output gradient row once.
- the decoder's step in one pass per row: radial-gradient removal, the optimizer's update (ScheduleFreeAdam's:
  `decoder_schedule_free_step`; torch's Adam's: `decoder_adam_step`), renormalisation; the trainer runs it
  with --kernels triton (sae_core/fused_optim.py).

Kernels accumulate in fp32 whatever the tensors' dtype. On CPU tensors they run only under Triton's
interpreter (TRITON_INTERPRET=1 set before triton is first imported in the process), which is how CI checks
them against the torch path (tests/core/test_triton_kernels.py); on CUDA tensors they are compiled.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .errors import ConfigError
from .kernels import EncoderOutput, _autocast_off, autocast_compute_dtype

# Whether the @triton.jit kernels below were built for the interpreter (decided when this module is imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tile sizes. Tests shrink them to cross tile edges at tiny shapes; the GPU values are first guesses, to be
# tuned on a GPU (issue 17).
BLOCKS = {
    "tokens": 16,  # gather-sum: tokens per program
    "d": 128,  # columns of d per program (gather-sum, segment sum) and per loop step (row dots)
    "slots": 32,  # row dots: top-k slots per program
    "entries": 32,  # segment sum: selected pairs per loop step
    "latents": 1024,  # top-k: latents per tile (at least the padded k)
}

# The key of a masked-out slot: below the key of every float (its high word would be a negative NaN).
_SENTINEL = -(2**63)


def check_device(*tensors: Tensor) -> None:
    """A one-line ConfigError where these kernels cannot run on the tensors' device."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRETED:
            continue
        raise ConfigError(
            f"--kernels triton runs on CUDA tensors (got a {t.device.type} tensor); use --kernels torch "
            "here, or set TRITON_INTERPRET=1 before triton is imported to interpret them"
        )


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ------------------------------------------------------------------------------------------------ top-k
@triton.jit
def _pack_keys(v, cols, M):
    """int64 keys whose signed order is the fp32 order of v, ties broken towards the lower column."""
    bits = v.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude so larger is larger
    return (bits.to(tl.int64) << 32) | (M - 1 - cols).to(tl.int64)


@triton.jit
def _tile_topk_kernel(
    keys_ptr,
    aux_keys_ptr,
    pre_ptr,
    dead_ptr,
    M,
    stride_pre,
    TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    K_PAD: tl.constexpr,
    KA_PAD: tl.constexpr,
    HAS_AUX: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = cols < M
    v = tl.load(pre_ptr + row.to(tl.int64) * stride_pre + cols, mask=inside, other=0.0).to(tl.float32)
    sentinel = tl.full([BLOCK_M], -2147483648, tl.int32).to(tl.int64) << 32
    keys = tl.where(inside, _pack_keys(v, cols, M), sentinel)
    out = (row.to(tl.int64) * TILES + tile) * K_PAD + tl.arange(0, K_PAD)
    tl.store(keys_ptr + out, tl.topk(keys, K_PAD))
    if HAS_AUX:
        dead = tl.load(dead_ptr + cols, mask=inside, other=0) != 0
        aux_out = (row.to(tl.int64) * TILES + tile) * KA_PAD + tl.arange(0, KA_PAD)
        tl.store(aux_keys_ptr + aux_out, tl.topk(tl.where(dead, keys, sentinel), KA_PAD))


@triton.jit
def _merge_topk_kernel(out_ptr, keys_ptr, C, TILES: tl.constexpr, BLOCK: tl.constexpr, K_PAD: tl.constexpr):
    """Top K_PAD of each tile of BLOCK keys of a row of C candidate keys."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    sentinel = tl.full([BLOCK], -2147483648, tl.int32).to(tl.int64) << 32
    keys = tl.load(keys_ptr + row.to(tl.int64) * C + cols, mask=cols < C, other=0)
    keys = tl.where(cols < C, keys, sentinel)
    out = (row.to(tl.int64) * TILES + tile) * K_PAD + tl.arange(0, K_PAD)
    tl.store(out_ptr + out, tl.topk(keys, K_PAD))


def _merge(keys: Tensor, k_pad: int) -> Tensor:
    """[N, C] candidate keys -> [N, k_pad], the largest of each row, largest first."""
    n, c = keys.shape
    block = max(4 * k_pad, min(_pow2(c), BLOCKS["latents"]))
    while True:
        tiles = triton.cdiv(c, block)
        out = keys.new_empty(n, tiles * k_pad)
        _merge_topk_kernel[(n, tiles)](out, keys, c, TILES=tiles, BLOCK=block, K_PAD=k_pad)
        keys, c = out, tiles * k_pad
        if tiles == 1:
            return keys


def _unpack(keys: Tensor, k: int, m: int) -> tuple[Tensor, Tensor]:
    """The first k keys of each row -> (ReLU of the value, latent index); a sentinel gives (0, m - 1)."""
    keys = keys[:, :k]
    idx = (m - 1) - (keys & 0xFFFFFFFF)
    high = (keys >> 32).to(torch.int32)
    values = (high ^ ((high >> 31) & 0x7FFFFFFF)).view(torch.float32)
    values = torch.where(keys == _SENTINEL, 0.0, values).relu_()
    return values, idx


def topk_relu(
    pre: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ReLU of the top k of each row of pre, their indices, the same for the top k_aux among the latents
    where dead_mask is True); values in fp32. With dead_mask, the aux outputs are [N, min(k_aux, M)] wide
    whatever the number of dead latents: slots beyond it hold 0 (with an arbitrary index)."""
    check_device(pre)
    n, m = pre.shape
    if not 0 < k <= m:
        raise ConfigError(f"k={k} must be in [1, {m}] (the number of latents)")
    pre = pre.contiguous()
    use_aux = dead_mask is not None and k_aux > 0
    if use_aux and tuple(dead_mask.shape) != (m,):
        shape = tuple(dead_mask.shape)
        raise ConfigError(f"dead_mask has shape {shape}; it needs one entry per latent: ({m},)")
    k_aux = min(k_aux, m) if use_aux else 0
    k_pad, ka_pad = _pow2(k), _pow2(k_aux)
    # A tile at least 4x the candidates it keeps: the candidate keys (8 bytes each) take at most half the
    # bytes of fp32 pre-activations, even for AuxK's k_aux = d/2.
    block = max(4 * max(k_pad, ka_pad), min(_pow2(m), BLOCKS["latents"]))
    tiles = triton.cdiv(m, block)
    keys = torch.empty(n, tiles * k_pad, dtype=torch.int64, device=pre.device)
    aux_keys = torch.empty(n, tiles * ka_pad if use_aux else 1, dtype=torch.int64, device=pre.device)
    dead = dead_mask.to(torch.uint8).contiguous() if use_aux else keys
    _tile_topk_kernel[(n, tiles)](
        keys,
        aux_keys,
        pre,
        dead,
        m,
        pre.stride(0),
        TILES=tiles,
        BLOCK_M=block,
        K_PAD=k_pad,
        KA_PAD=ka_pad,
        HAS_AUX=use_aux,
    )
    acts, idx = _unpack(keys if tiles == 1 else _merge(keys, k_pad), k, m)
    if not use_aux:
        empty = pre.new_empty(n, 0, dtype=torch.float32)
        return acts, idx, empty, torch.empty(n, 0, dtype=torch.long, device=pre.device)
    aux_acts, aux_idx = _unpack(aux_keys if tiles == 1 else _merge(aux_keys, ka_pad), k_aux, m)
    return acts, idx, aux_acts, aux_idx


# ------------------------------------------------------------------------------------------------ gathers
@triton.jit
def _gather_sum_kernel(
    out_ptr,
    vals_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    N,
    D,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_in, col_in = rows < N, cols < D
    mask = row_in[:, None] & col_in[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(K):
        i = tl.load(idx_ptr + rows64 * K + j, mask=row_in, other=0)
        v = tl.load(vals_ptr + rows64 * K + j, mask=row_in, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + i[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(vals: Tensor, idx: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[t] = sum_j vals[t, j] * weight[idx[t, j]] (+ bias), in weight's dtype."""
    n, k = idx.shape
    d = weight.shape[1]
    out = weight.new_empty(n, d)
    if n == 0:
        return out
    vals, idx, weight = vals.contiguous(), idx.contiguous(), weight.contiguous()
    grid = (triton.cdiv(n, BLOCKS["tokens"]), triton.cdiv(d, BLOCKS["d"]))
    _gather_sum_kernel[grid](
        out,
        vals,
        idx,
        weight,
        bias.contiguous() if bias is not None else weight,
        n,
        d,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=BLOCKS["tokens"],
        BLOCK_D=BLOCKS["d"],
    )
    return out


@triton.jit
def _row_dots_kernel(
    out_ptr, dense_ptr, idx_ptr, w_ptr, D, K, stride_w, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_in = slots < K
    i = tl.load(idx_ptr + t * K + slots, mask=slot_in, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_in = cols < D
        g = tl.load(dense_ptr + t * D + cols, mask=col_in, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + i[:, None] * stride_w + cols[None, :], mask=slot_in[:, None] & col_in[None, :], other=0.0
        )
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(out_ptr + t * K + slots, acc, mask=slot_in)


def row_dots(dense: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """out[t, j] = <dense[t], weight[idx[t, j]]>, in fp32."""
    n, k = idx.shape
    out = torch.empty(n, k, dtype=torch.float32, device=idx.device)
    if n == 0 or k == 0:
        return out
    dense, idx, weight = dense.contiguous(), idx.contiguous(), weight.contiguous()
    block_k = min(BLOCKS["slots"], _pow2(k))
    _row_dots_kernel[(n, triton.cdiv(k, block_k))](
        out, dense, idx, weight, weight.shape[1], k, weight.stride(0), BLOCK_K=block_k, BLOCK_D=BLOCKS["d"]
    )
    return out


@triton.jit
def _segment_sum_kernel(
    out_ptr,
    sums_ptr,
    order_ptr,
    offsets_ptr,
    vals_ptr,
    dense_ptr,
    D,
    K,
    HAS_SUMS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_in = cols < D
    start = tl.load(offsets_ptr + m)
    end = tl.load(offsets_ptr + m + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    val_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_in = e < end
        flat = tl.load(order_ptr + e, mask=e_in, other=0)  # position in the [N, K] selections
        v = tl.load(vals_ptr + flat, mask=e_in, other=0.0).to(tl.float32)
        tokens = flat // K
        rows = tl.load(
            dense_ptr + tokens[:, None] * D + cols[None, :], mask=e_in[:, None] & col_in[None, :], other=0.0
        )
        acc += tl.sum(v[:, None] * rows.to(tl.float32), axis=0)
        val_acc += v
    tl.store(out_ptr + m * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_in)
    if HAS_SUMS:
        if tl.program_id(1) == 0:
            tl.store(sums_ptr + m, tl.sum(val_acc).to(sums_ptr.dtype.element_ty))


def segment_sum(
    idx: Tensor, vals: Tensor, dense: Tensor, num_rows: int, with_sums: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(grad_w, sums): grad_w[m] = sum over (t, j) with idx[t, j] = m of vals[t, j] * dense[t], in dense's
    dtype, and sums[m] = the sum of those vals (None unless with_sums)."""
    n, k = idx.shape
    d = dense.shape[1]
    out = dense.new_empty(num_rows, d)
    sums = dense.new_empty(num_rows) if with_sums else None
    flat = idx.reshape(-1)
    # Stable: the pairs of a row are summed in token order, the same on every run.
    sorted_rows, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=idx.device))
    _segment_sum_kernel[(num_rows, triton.cdiv(d, BLOCKS["d"]))](
        out,
        sums if sums is not None else out,
        order,
        offsets,
        vals.contiguous(),
        dense.contiguous(),
        d,
        max(k, 1),
        HAS_SUMS=with_sums,
        BLOCK_E=BLOCKS["entries"],
        BLOCK_D=BLOCKS["d"],
    )
    return out, sums


@triton.jit
def _dual_segment_sum_kernel(
    grad_enc_ptr,
    grad_bias_ptr,
    grad_dec_ptr,
    order_ptr,
    offsets_ptr,
    g_ptr,
    acts_ptr,
    x_ptr,
    g_out_ptr,
    g_aux_ptr,
    D_IN,
    D_OUT,
    K,
    K_ALL,
    HAS_AUX_GRAD: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row m of both weight gradients from the pairs that selected latent m (slots j < K: the top-k, whose
    output gradient is g_out; j >= K: AuxK's, whose output gradient is g_aux)."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_enc, in_dec = cols < D_IN, cols < D_OUT
    start = tl.load(offsets_ptr + m)
    end = tl.load(offsets_ptr + m + 1)
    acc_enc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dec = tl.zeros([BLOCK_D], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_in = e < end
        flat = tl.load(order_ptr + e, mask=e_in, other=0)  # position in the [N, K_ALL] selections
        g = tl.load(g_ptr + flat, mask=e_in, other=0.0).to(tl.float32)
        a = tl.load(acts_ptr + flat, mask=e_in, other=0.0).to(tl.float32)
        tokens = flat // K_ALL
        main = e_in & (flat % K_ALL < K)
        aux = e_in & (flat % K_ALL >= K)
        x = tl.load(
            x_ptr + tokens[:, None] * D_IN + cols[None, :], mask=e_in[:, None] & in_enc[None, :], other=0.0
        )
        acc_enc += tl.sum(g[:, None] * x.to(tl.float32), axis=0)
        rows = tokens[:, None] * D_OUT + cols[None, :]
        up = tl.load(g_out_ptr + rows, mask=main[:, None] & in_dec[None, :], other=0.0).to(tl.float32)
        if HAS_AUX_GRAD:  # else AuxK's output had no gradient: its slots add nothing to the decoder's
            up += tl.load(g_aux_ptr + rows, mask=aux[:, None] & in_dec[None, :], other=0.0).to(tl.float32)
        acc_dec += tl.sum(a[:, None] * up, axis=0)
        g_acc += g
    tl.store(grad_enc_ptr + m * D_IN + cols, acc_enc.to(grad_enc_ptr.dtype.element_ty), mask=in_enc)
    tl.store(grad_dec_ptr + m * D_OUT + cols, acc_dec.to(grad_dec_ptr.dtype.element_ty), mask=in_dec)
    if tl.program_id(1) == 0:
        tl.store(grad_bias_ptr + m, tl.sum(g_acc).to(grad_bias_ptr.dtype.element_ty))


def dual_segment_sum(
    ids: Tensor,
    g: Tensor,
    acts: Tensor,
    x: Tensor,
    g_out: Tensor,
    g_aux: Tensor | None,
    k: int,
    num_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Both weight gradients of the SAE step from one sort of the selected pairs ids [N, K_ALL] (the first k
    slots the top-k, the rest AuxK's):
        grad_enc[m] = sum over (t, j) with ids[t, j] = m of g[t, j] * x[t],   grad_bias[m] = the sum of g,
        grad_dec[m] = the same sum of acts[t, j] * (g_out[t] if j < k else g_aux[t]),
    in x's dtype (grad_enc, grad_bias) and g_out's (grad_dec); g_aux may be None when no slot is AuxK's."""
    k_all = ids.shape[1]
    d_in, d_out = x.shape[1], g_out.shape[1]
    grad_enc = x.new_empty(num_rows, d_in)
    grad_bias = x.new_empty(num_rows)
    grad_dec = g_out.new_empty(num_rows, d_out)
    # Stable: each latent's pairs are summed in (token, slot) order, the same on every run.
    sorted_rows, order = torch.sort(ids.reshape(-1), stable=True)
    offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=ids.device))
    g_out = g_out.contiguous()
    _dual_segment_sum_kernel[(num_rows, triton.cdiv(max(d_in, d_out), BLOCKS["d"]))](
        grad_enc,
        grad_bias,
        grad_dec,
        order,
        offsets,
        g.contiguous(),
        acts.contiguous(),
        x.contiguous(),
        g_out,
        g_aux.contiguous() if g_aux is not None else g_out,
        d_in,
        d_out,
        k,
        max(k_all, 1),
        HAS_AUX_GRAD=g_aux is not None,
        BLOCK_E=BLOCKS["entries"],
        BLOCK_D=BLOCKS["d"],
    )
    return grad_enc, grad_bias, grad_dec


# -------------------------------------------------------------------------------------------- decoder step
@triton.jit
def _decoder_schedule_free_kernel(
    y_ptr, g_ptr, z_ptr, v_ptr, D, lr, beta2, eps, c, bias2, y_coef, norm_eps, BLOCK_D: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * D + tl.arange(0, BLOCK_D)
    inside = tl.arange(0, BLOCK_D) < D
    y = tl.load(y_ptr + offsets, mask=inside, other=0.0)
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0)
    z = tl.load(z_ptr + offsets, mask=inside, other=0.0)
    v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
    g -= tl.sum(g * y) * y  # the radial part of the gradient (the row is at unit norm)
    v = v * beta2 + (1 - beta2) * g * g
    u = g / (tl.sqrt(v / bias2) + eps)
    y = y + c * (z - y) + y_coef * u
    z -= lr * u
    y = y / (tl.sqrt(tl.sum(y * y)) + norm_eps)
    tl.store(y_ptr + offsets, y, mask=inside)
    tl.store(z_ptr + offsets, z, mask=inside)
    tl.store(v_ptr + offsets, v, mask=inside)


@torch.no_grad()
def decoder_schedule_free_step(
    y: Tensor,
    grad: Tensor,
    z: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    c: float,
    bias2: float,
) -> None:
    """One pass per decoder row of what the trainer does in three: remove the radial part of the gradient,
    take optim.ScheduleFreeAdam's step (c and bias2: that step's averaging weight and second-moment bias
    correction), renormalise the row; y, z and exp_avg_sq are updated in place, grad is left as it is.
    fp32 rows of at most a few thousand columns (one row per program). The trainer calls it through
    fused_optim.step_with_fused_decoder with --kernels triton."""
    check_device(y)
    if y.dtype != torch.float32 or not all(t.is_contiguous() for t in (y, grad, z, exp_avg_sq)):
        raise ConfigError("decoder_schedule_free_step takes contiguous float32 tensors")
    rows, d = y.shape
    _decoder_schedule_free_kernel[(rows,)](
        y,
        grad,
        z,
        exp_avg_sq,
        d,
        lr,
        beta2,
        eps,
        c,
        bias2,
        lr * (beta1 * (1 - c) - 1),
        torch.finfo(y.dtype).eps,
        BLOCK_D=_pow2(d),
    )


@triton.jit
def _decoder_adam_kernel(
    y_ptr, g_ptr, m_ptr, v_ptr, step_ptr, D, lr, beta1, beta2, eps, norm_eps, BLOCK_D: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * D + tl.arange(0, BLOCK_D)
    inside = tl.arange(0, BLOCK_D) < D
    y = tl.load(y_ptr + offsets, mask=inside, other=0.0)
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0)
    m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
    v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
    # Adam's step count lives on the device (torch's fused Adam keeps it there): read, not synchronised.
    t = tl.load(step_ptr).to(tl.float32) + 1.0
    g -= tl.sum(g * y) * y  # the radial part of the gradient (the row is at unit norm)
    m = m * beta1 + (1 - beta1) * g
    v = v * beta2 + (1 - beta2) * g * g
    bias1 = 1 - tl.exp(t * tl.log(beta1))
    bias2 = 1 - tl.exp(t * tl.log(beta2))
    y -= (lr / bias1) * m / (tl.sqrt(v) / tl.sqrt(bias2) + eps)
    y = y / (tl.sqrt(tl.sum(y * y)) + norm_eps)
    tl.store(y_ptr + offsets, y, mask=inside)
    tl.store(m_ptr + offsets, m, mask=inside)
    tl.store(v_ptr + offsets, v, mask=inside)


@torch.no_grad()
def decoder_adam_step(
    y: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """torch.optim.Adam's step (no weight decay) for the decoder in one pass per row, with the radial-gradient
    removal before it and the renormalisation after it; y, exp_avg and exp_avg_sq are updated in place and
    `step` (Adam's step count, a one-element tensor on any device) is incremented."""
    check_device(y)
    if y.dtype != torch.float32 or not all(t.is_contiguous() for t in (y, grad, exp_avg, exp_avg_sq)):
        raise ConfigError("decoder_adam_step takes contiguous float32 tensors")
    rows, d = y.shape
    _decoder_adam_kernel[(rows,)](
        y,
        grad,
        exp_avg,
        exp_avg_sq,
        step.to(y.device),
        d,
        lr,
        beta1,
        beta2,
        eps,
        torch.finfo(y.dtype).eps,
        BLOCK_D=_pow2(d),
    )
    step += 1


# ------------------------------------------------------------------------------------------------ autograd
class _TritonTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, dead_mask, k_aux, compute_dtype):
        dtype = compute_dtype if compute_dtype is not None else x.dtype
        check_device(x, weight)
        pre = torch.addmm(bias.to(dtype), x.to(dtype), weight.to(dtype).t())
        acts, idx, aux_acts, aux_idx = topk_relu(pre, k, dead_mask, k_aux)
        del pre
        acts, aux_acts = acts.to(x.dtype), aux_acts.to(x.dtype)
        ctx.save_for_backward(x, weight, idx, acts, aux_idx, aux_acts)
        ctx.device_type = x.device.type
        ctx.mark_non_differentiable(idx, aux_idx)
        return acts, idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, g_acts, _g_idx, g_aux, _g_aux_idx):
        with _autocast_off(ctx.device_type):  # as the torch path: gradients in the parameters' dtype
            x, weight, idx, acts, aux_idx, aux_acts = ctx.saved_tensors
            g_acts = torch.zeros_like(acts) if g_acts is None else g_acts
            g_aux = torch.zeros_like(aux_acts) if g_aux is None else g_aux
            g = torch.cat([g_acts * (acts > 0), g_aux * (aux_acts > 0)], dim=1).to(weight.dtype)
            ids = torch.cat([idx, aux_idx], dim=1)
            grad_x = gather_sum(g, ids, weight).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad_b = None
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # both from one pass over the pairs
                grad_w, grad_b = segment_sum(ids, g, x.to(weight.dtype), weight.shape[0], with_sums=True)
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.needs_input_grad[2] else None
            return grad_x, grad_w, grad_b, None, None, None, None


class _TritonSparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, idx, weight, bias):
        check_device(acts, weight)
        ctx.save_for_backward(acts, idx, weight)
        ctx.has_bias = bias is not None
        return gather_sum(acts.to(weight.dtype), idx, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        acts, idx, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)
        grad_acts = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_acts = row_dots(grad_out, idx, weight).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            grad_w, _ = segment_sum(idx, acts.to(weight.dtype), grad_out, weight.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_out.sum(0)
        return grad_acts, None, grad_w, grad_b


def topk_encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> EncoderOutput:
    """kernels.topk_encode with the Triton top-k and sparse backward; the dead latents are given as a [M]
    bool mask instead of indices, and the AuxK outputs are min(k_aux, M) wide whatever their number (slots
    beyond the dead latents hold 0)."""
    compute_dtype = autocast_compute_dtype(x.device.type, compute_dtype)
    with _autocast_off(x.device.type):
        return EncoderOutput(*_TritonTopKEncode.apply(x, weight, bias, k, dead_mask, k_aux, compute_dtype))


def sparse_decode(acts: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """kernels.sparse_decode with Triton gathers and the sorted-segment decoder gradient."""
    if indices.shape[1] == 0:
        out = acts.new_zeros(acts.shape[0], weight.shape[1], dtype=weight.dtype)
        return out + bias if bias is not None else out
    return _TritonSparseDecode.apply(acts, indices, weight, bias)


class SaeStep(NamedTuple):
    out: Tensor  # [N, d_out] sum_j acts[t, j] W_dec[idx[t, j]] (no bias)
    acts: Tensor  # [N, k]
    indices: Tensor  # [N, k]
    aux_out: Tensor  # [N, d_out] the same from AuxK's selections ([0, d_out] without AuxK)
    aux_acts: Tensor  # [N, min(k_aux, M)] ([N, 0] without AuxK)
    aux_indices: Tensor


class _TritonEncodeDecode(torch.autograd.Function):
    """Encoder, top-k and decoder in one Function, so that its backward can share one sort of the selected
    pairs between the two weight gradients."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, k, dead_mask, k_aux, compute_dtype):
        dtype = compute_dtype if compute_dtype is not None else x.dtype
        check_device(x, w_enc, w_dec)
        pre = torch.addmm(b_enc.to(dtype), x.to(dtype), w_enc.to(dtype).t())
        acts, idx, aux_acts, aux_idx = topk_relu(pre, k, dead_mask, k_aux)
        del pre
        acts, aux_acts = acts.to(x.dtype), aux_acts.to(x.dtype)
        out = gather_sum(acts.to(w_dec.dtype), idx, w_dec)
        has_aux = aux_idx.shape[1] > 0
        aux_out = gather_sum(aux_acts.to(w_dec.dtype), aux_idx, w_dec) if has_aux else w_dec.new_empty(0, 0)
        ctx.save_for_backward(x, w_enc, w_dec, idx, acts, aux_idx, aux_acts)
        ctx.device_type = x.device.type
        ctx.mark_non_differentiable(idx, aux_idx)
        return out, acts, idx, aux_out, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, g_out, g_acts, _g_idx, g_aux_out, g_aux_acts, _g_aux_idx):
        with _autocast_off(ctx.device_type):  # as the torch path: gradients in the parameters' dtype
            x, w_enc, w_dec, idx, acts, aux_idx, aux_acts = ctx.saved_tensors
            n, k = idx.shape
            has_aux = aux_idx.shape[1] > 0
            g_out = w_dec.new_zeros(n, w_dec.shape[1]) if g_out is None else g_out.to(w_dec.dtype)
            # The latents' gradients: the decoder's (row dots) plus any gradient the caller put on the acts.
            g_lat = row_dots(g_out, idx, w_dec)
            if g_acts is not None:
                g_lat += g_acts
            g_aux_out = g_aux_out.to(w_dec.dtype) if has_aux and g_aux_out is not None else None
            g_aux_lat = (
                row_dots(g_aux_out, aux_idx, w_dec)
                if g_aux_out is not None
                else aux_acts.new_zeros(aux_acts.shape)
            )
            if g_aux_acts is not None:
                g_aux_lat = g_aux_lat + g_aux_acts
            # ReLU: latents whose value was clamped to 0 pass no gradient to the encoder.
            g = torch.cat([g_lat * (acts > 0), g_aux_lat * (aux_acts > 0)], dim=1).to(w_enc.dtype)
            ids = torch.cat([idx, aux_idx], dim=1)
            vals = torch.cat([acts, aux_acts], dim=1).to(w_dec.dtype)
            grad_x = gather_sum(g, ids, w_enc).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w_enc = grad_b_enc = grad_w_dec = None
            if any(ctx.needs_input_grad[1:4]):
                grad_w_enc, grad_b_enc, grad_w_dec = dual_segment_sum(
                    ids, g, vals, x.to(w_enc.dtype), g_out, g_aux_out, k, w_enc.shape[0]
                )
            return (
                grad_x,
                grad_w_enc if ctx.needs_input_grad[1] else None,
                grad_b_enc if ctx.needs_input_grad[2] else None,
                grad_w_dec if ctx.needs_input_grad[3] else None,
                None,
                None,
                None,
                None,
            )


def encode_decode(
    x: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> SaeStep:
    """topk_encode, then sparse_decode of its top-k and of its AuxK selections (without bias), with one fused
    backward: no N x k x d intermediate, and one sort of the selected pairs for both weight gradients."""
    compute_dtype = autocast_compute_dtype(x.device.type, compute_dtype)
    with _autocast_off(x.device.type):
        return SaeStep(*_TritonEncodeDecode.apply(x, w_enc, b_enc, w_dec, k, dead_mask, k_aux, compute_dtype))
