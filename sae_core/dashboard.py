"""Latent dashboards: what makes each latent of an SAE fire, collected in one streaming pass.

    python -m sae_core.dashboard MODEL RUN_DIR [DATASET] --hookpoints layers.8 --latents 0:200 --out DIR
    collect_latent_stats(model, saes, input_ids, latents) -> {hookpoint: LatentStats}   (writes nothing)
    build_dashboards(model, run, dataset, ...)            -> {hookpoint: [record]}; the site in out_dir

The pass reads the evaluation's held-out tokens (`evaluate.load_run_inputs`), runs the LM up to the deepest
hookpoint (`activations.LiveActivations`) and encodes every kept token with each SAE. Per selected latent it
keeps, in buffers whose size is fixed before the pass:
- its top contexts: each sequence is cut into blocks as long as a context window, a block's candidate is its
  peak token, and the `n_top` highest candidates are kept (so that the neighbours of one strong token do not
  fill the list), with the activation on every token of the window (`window_before` tokens before the peak,
  `window_after` after);
- a uniform random sample of the tokens it fired on (`samples` of them: those with the largest random keys, a
  reservoir that merges batch by batch like the top contexts), sorted at the end into `n_quantiles` groups of
  equal count, `per_quantile` contexts shown from each;
- its firing count (density = count / tokens) and activation sum, for every latent of the SAE;
- a histogram of its non-zero activations with `hist_bins` bins from 0, whose width (a power of two) doubles
  when a larger activation arrives: a doubled bin is the sum of two old ones, so the counts stay exact.
The logit lens needs no tokens: `logit_lens` passes the latent's decoder row through the final norm and the
unembedding. dashboard_html.py renders the records; the same records are written as JSON.
"""

import argparse
import copy
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .activations import LiveActivations
from .data import sequence_rows, sequence_shape
from .distributed import DistContext
from .errors import ConfigError, EvalError
from .evaluate import (
    DEFAULT_MAX_TOKENS,
    OneLineErrorParser,
    add_held_out_arguments,
    held_out_kwargs,
    load_run_inputs,
)
from .loggers import Profiler
from .models import (
    canonical_hookpoint,
    find_blocks,
    hidden_size,
    hookpoint_layer,
    hookpoint_module,
    module_device,
    submodule,
)
from .splice import FINAL_NORMS, check_saes
from .utils import atomic_folder, atomic_write_bytes, atomic_write_json, exit_on_bad_input

__all__ = [
    "DashboardConfig",
    "LatentStats",
    "build_dashboards",
    "collect_latent_stats",
    "latent_records",
    "logit_lens",
    "main",
    "parse_latents",
    "residual_role",
    "write_dashboards",
]

# Modules of a block whose output the block adds to the residual stream (Llama, GPT-NeoX, GPT-2 spellings).
RESIDUAL_WRITERS = ("mlp", "self_attn", "attn", "attention")
# The dense [tokens, latents] activations of one batch are built this many elements at a time.
DENSE_CHUNK = 1 << 24


@dataclass
class DashboardConfig:
    """What each latent's dashboard holds; every buffer's size is fixed by these numbers."""

    n_top: int = 20
    """top-activating contexts per latent (at most one per block of a window's length)"""
    window_before: int = 16
    """tokens shown before the peak token of a context"""
    window_after: int = 8
    """tokens shown after the peak token of a context"""
    samples: int = 100
    """tokens kept per latent in the uniform random sample that the quantiles are drawn from"""
    n_quantiles: int = 5
    """groups of equal count the sample is split into, by activation"""
    per_quantile: int = 3
    """contexts shown from each group"""
    hist_bins: int = 32
    """bins of the activation histogram (even: bins merge in pairs when the range doubles)"""
    logit_k: int = 10
    """tokens listed as most promoted and most suppressed by the logit lens"""
    seed: int = 0
    """seed of the random sample (and of --random latents)"""

    def __post_init__(self) -> None:
        for name in ("n_top", "samples", "n_quantiles", "per_quantile", "logit_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("window_before", "window_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hist_bins < 2 or self.hist_bins % 2:
            raise ConfigError(f"hist_bins must be an even number >= 2, got {self.hist_bins}")

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


# ----------------------------------------------------------------------------------------------------------
# Choosing latents


def parse_latents(spec: str, num_latents: int, hookpoint: str = "the SAE") -> Tensor:
    """Latent ids from `spec`: comma-separated ids and ranges `a:b` (b excluded, as in Python), e.g.
    '0:200' or '3,17,40:48'; every id must be below `num_latents`."""
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?::(\d+))?", part)
        if not m:
            raise ConfigError(
                f"latents {spec!r}: {part!r} is not an id or a range a:b (e.g. 0:200 or 3,17,40:48)"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo + 1
        if hi <= lo:
            raise ConfigError(f"latents {spec!r}: the range {part!r} is empty")
        ids += range(lo, hi)
    bad = [i for i in ids if i >= num_latents]
    if bad:
        raise ConfigError(
            f"latent {bad[0]} is out of range: {hookpoint}'s SAE has {num_latents} latents "
            f"(0 .. {num_latents - 1})"
        )
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def _count_choice(name: str, n: int, num_latents: int, hookpoint: str) -> None:
    if not 1 <= n <= num_latents:
        raise ConfigError(
            f"{name} {n}: {hookpoint}'s SAE has {num_latents} latents; choose 1 .. {num_latents}"
        )


# ----------------------------------------------------------------------------------------------------------
# The streaming statistics


class _Buffer:
    """Per latent, the `size` entries with the largest keys seen so far, in no particular order (key -inf: an
    empty slot). A merge gathers the context windows of the entries that get in only: after the first
    batches few candidates beat the entries already kept."""

    def __init__(self, n_latents: int, size: int, window: int, device: torch.device):
        self.key = torch.full((n_latents, size), -math.inf, device=device)
        self.value = torch.zeros(n_latents, size, device=device)
        self.seq = torch.full((n_latents, size), -1, dtype=torch.long, device=device)
        self.pos = torch.full((n_latents, size), -1, dtype=torch.long, device=device)
        self.acts = torch.zeros(n_latents, size, window, device=device)  # NaN: no activation there
        self.tokens = torch.full((n_latents, size, window), -1, dtype=torch.int32, device=device)  # -1: none

    def merge(self, c0: int, c1: int, key: Tensor, value: Tensor, seq: Tensor, pos: Tensor, windows) -> None:
        """Candidates [C, n] for latents c0..c1-1; `windows(rows, cands)` gives the (acts, tokens) [P, window]
        of the candidates (rows[p], cands[p]) that get in."""
        size = self.key.shape[1]
        best = torch.cat([self.key[c0:c1], key], 1).topk(size, dim=1).indices
        chosen = torch.zeros(key.shape[0], size + key.shape[1], dtype=torch.bool, device=key.device)
        chosen.scatter_(1, best, True)
        incoming = chosen[:, size:] & (key > -math.inf)
        if not incoming.any():
            return
        # The r-th incoming candidate of a row takes the row's r-th slot that was not chosen: there are at
        # least as many of those, and every non-empty entry pushed out is among the slots filled.
        rows, cands = incoming.nonzero(as_tuple=True)
        rank = (incoming.cumsum(1) - 1)[rows, cands]
        free_first = torch.argsort(chosen[:, :size].to(torch.int8), dim=1, stable=True)
        slots = free_first[rows, rank]
        at = (rows + c0, slots)
        self.key[at], self.value[at] = key[rows, cands], value[rows, cands]
        self.seq[at], self.pos[at] = seq[rows, cands], pos[rows, cands]
        self.acts[at], self.tokens[at] = windows(rows, cands)

    def select(self, cols: Tensor) -> "_Buffer":
        """The entries of the latent columns `cols` only."""
        out = copy.copy(self)
        for name in ("key", "value", "seq", "pos", "acts", "tokens"):
            setattr(out, name, getattr(self, name)[cols])
        return out


class LatentStats:
    """The streaming statistics of one SAE's selected latents (`latents`, sorted ids), batch by batch."""

    def __init__(self, num_latents: int, latents: Tensor, cfg: DashboardConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.latents = latents.to(device)
        n = latents.numel()
        self.column = torch.full((num_latents,), -1, dtype=torch.long, device=device)
        self.column[self.latents] = torch.arange(n, device=device)
        self.fired = torch.zeros(num_latents, dtype=torch.long, device=device)  # every latent
        self.tokens = 0
        self.act_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.hist_counts = torch.zeros(n, cfg.hist_bins, dtype=torch.long, device=device)
        self.hist_width = torch.zeros(n, dtype=torch.float64, device=device)  # 0: has not fired yet
        self.top = _Buffer(n, cfg.n_top, cfg.window, device)
        self.sample = _Buffer(n, cfg.samples, cfg.window, device)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.offsets = torch.arange(-cfg.window_before, cfg.window_after + 1, device=device)

    def add(self, seq_start: int, ids: Tensor, keep: Tensor, acts: Tensor, indices: Tensor) -> None:
        """One batch: token ids [B, T], the kept positions [B, T] and the SAE's top-k (acts, indices) [N, k]
        of the kept tokens in order; sequence b of the batch is sequence seq_start + b of the pass."""
        ids, keep = ids.to(self.device), keep.to(self.device)
        acts, indices = acts.to(self.device).float(), indices.to(self.device)
        batch, length = ids.shape
        on = acts > 0
        self.fired += torch.bincount(indices[on], minlength=self.fired.numel())
        self.tokens += acts.shape[0]
        col = self.column[indices]
        chosen = on & (col >= 0)
        flat = keep.flatten().nonzero().squeeze(1)  # position in the batch of each kept token
        rows = flat[:, None].expand_as(indices)[chosen]
        cols, vals = col[chosen], acts[chosen]
        self.act_sum.index_add_(0, cols, vals.double())
        self._histogram(cols, vals)
        n = self.latents.numel()
        step = max(1, DENSE_CHUNK // max(batch * length, 1))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            part = (cols >= c0) & (cols < c1)
            dense = torch.zeros(batch * length, c1 - c0, device=self.device)
            dense[rows[part], cols[part] - c0] = vals[part]
            self._add_top(dense.view(batch, length, -1), seq_start, ids, keep, c0, c1)
            self._add_sample(dense.view(batch, length, -1), seq_start, ids, keep, c0, c1)

    def _windows(self, dense: Tensor, ids: Tensor, keep: Tensor, b: Tensor, t: Tensor, c: Tensor):
        """Activations and token ids [P, window] around positions (b, t) [P] of latent columns c [P]."""
        length = dense.shape[1]
        tpos = t[:, None] + self.offsets  # [P, W]
        inside = (tpos >= 0) & (tpos < length)
        tpos = tpos.clamp(0, length - 1)
        bb, cc = b[:, None].expand_as(tpos), c[:, None].expand_as(tpos)
        acts = torch.where(inside & keep[bb, tpos], dense[bb, tpos, cc], math.nan)  # excluded: no activation
        return acts, torch.where(inside, ids[bb, tpos], -1).int()

    def _add_top(self, dense: Tensor, seq_start: int, ids: Tensor, keep: Tensor, c0: int, c1: int) -> None:
        batch, length, n = dense.shape
        span = self.cfg.window
        blocks = -(-length // span)
        padded = torch.cat([dense, dense.new_zeros(batch, blocks * span - length, n)], 1)
        peak, t = padded.view(batch, blocks, span, n).max(2)  # [B, blocks, C]: each block's peak
        t = t + torch.arange(0, blocks * span, span, device=self.device)[:, None]
        peak, t = peak.reshape(batch * blocks, n).T, t.reshape(batch * blocks, n).T  # [C, B*blocks]
        b = torch.arange(batch, device=self.device).repeat_interleave(blocks).expand_as(t)
        key = torch.where(peak > 0, peak, -math.inf)
        self.top.merge(
            c0,
            c1,
            key,
            peak,
            b + seq_start,
            t,
            lambda r, n: self._windows(dense, ids, keep, b[r, n], t[r, n], r),
        )

    def _add_sample(self, dense: Tensor, seq_start: int, ids: Tensor, keep: Tensor, c0: int, c1: int) -> None:
        batch, length, n = dense.shape
        flat = dense.view(batch * length, n).T  # [C, B*T]
        keys = torch.rand(flat.shape, generator=self.generator, device=self.device)
        keys = torch.where(flat > 0, keys, -math.inf)
        key, where = keys.topk(min(self.cfg.samples, flat.shape[1]), dim=1)
        b, t = where // length, where % length
        self.sample.merge(
            c0,
            c1,
            key,
            flat.gather(1, where),
            b + seq_start,
            t,
            lambda r, m: self._windows(dense, ids, keep, b[r, m], t[r, m], r),
        )

    def _histogram(self, cols: Tensor, vals: Tensor) -> None:
        if cols.numel() == 0:
            return
        bins, width = self.cfg.hist_bins, self.hist_width
        v = vals.double()
        top = torch.zeros_like(width).scatter_reduce_(0, cols, v, "amax")
        new = (width == 0) & (top > 0)
        # The smallest power of two w with top < bins * w (the loop below fixes log2's rounding).
        width[new] = torch.exp2(torch.floor(torch.log2(top[new] / bins)) + 1)
        while (grow := (width > 0) & (top >= bins * width)).any():
            merged = self.hist_counts[grow].view(-1, bins // 2, 2).sum(-1)
            self.hist_counts[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
            width[grow] *= 2
        b = torch.floor(v / width[cols]).long()
        self.hist_counts.index_put_((cols, b), torch.ones_like(b), accumulate=True)

    def keep_only(self, latents: Tensor) -> "LatentStats":
        """These statistics restricted to `latents` (a subset of the collected ones: the most frequent)."""
        cols = self.column[latents.to(self.device)]
        out = copy.copy(self)
        out.latents = latents.to(self.device)
        out.column = torch.full_like(self.column, -1)
        out.column[out.latents] = torch.arange(latents.numel(), device=self.device)
        out.act_sum, out.hist_counts, out.hist_width = (
            self.act_sum[cols],
            self.hist_counts[cols],
            self.hist_width[cols],
        )
        out.top, out.sample = self.top.select(cols), self.sample.select(cols)
        return out


def collect_latent_stats(
    model: nn.Module,
    saes: Mapping[str, Any],
    input_ids: Any,
    latents: Mapping[str, Tensor | None],
    *,
    cfg: DashboardConfig | None = None,
    exclude_tokens: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, LatentStats]:
    """One pass over `input_ids` ([n_seq, T] tensor or tokenized Dataset): the statistics of the latents
    `latents[h]` (sorted ids; None = every latent) of each SAE `saes[h]`. Excluded tokens (BOS, pad) and
    tokens whose activation is not finite are not encoded; they still appear, without an activation, in the
    context windows."""
    cfg = cfg or DashboardConfig()
    if batch_size <= 0:
        raise EvalError(f"batch_size must be a positive integer, got {batch_size}")
    check_saes(model, saes)
    n_seq, seq_len = sequence_shape(input_ids)
    if n_seq == 0 or seq_len == 0:
        raise EvalError("no tokens: the input has no sequences (is the held-out part empty?)")
    if seq_len < cfg.window:
        raise EvalError(
            f"the sequences have {seq_len} tokens, fewer than a context window of {cfg.window} "
            f"(window_before {cfg.window_before} + 1 + window_after {cfg.window_after}); use a longer "
            "ctx_len or a smaller window"
        )
    device = module_device(model)
    excluded = torch.tensor(sorted(set(exclude_tokens or [])), dtype=torch.long)
    hookpoints = list(saes)
    # A transcoder encodes its module's input: the source then yields inputs (all SAEs of a run are alike).
    transcode = {bool(sae.cfg.transcode) for sae in saes.values()}
    if len(transcode) > 1:
        raise ConfigError("mixing transcoders and autoencoders in one dashboard pass is not supported")
    first = next(iter(saes.values()))
    source = LiveActivations(
        model,
        input_ids,
        hookpoints=hookpoints,
        owners=dict.fromkeys(hookpoints, 0),
        ctx=DistContext(device=device),
        batch_size=batch_size,
        d_in=first.d_in if transcode == {True} else hidden_size(model),
        excluded=excluded,
        gather=False,
        profiler=Profiler(device, enabled=False),
        transcode=transcode == {True},
        d_out=first.d_out if transcode == {True} else None,
        keep_nonfinite=True,  # rows stay aligned with the kept positions; dropped below, where they are known
    )
    stats = {}
    for h, sae in saes.items():
        chosen = latents.get(h)
        chosen = torch.arange(sae.num_latents) if chosen is None else torch.as_tensor(chosen).long().unique()
        if chosen.numel() and not 0 <= int(chosen.min()) <= int(chosen.max()) < sae.num_latents:
            bad = int(chosen.max()) if int(chosen.max()) >= sae.num_latents else int(chosen.min())
            raise ConfigError(
                f"latent {bad} is out of range: {h}'s SAE has {sae.num_latents} latents "
                f"(0 .. {sae.num_latents - 1})"
            )
        stats[h] = LatentStats(sae.num_latents, chosen, cfg, module_device(sae, device))
    n_batches = math.ceil(n_seq / batch_size)
    with torch.no_grad():
        for index in tqdm(range(n_batches), desc="Dashboards", unit="batch", disable=not progress):
            start = index * batch_size
            ids = sequence_rows(input_ids, start, min(start + batch_size, n_seq))
            keep = ~torch.isin(ids, excluded)
            batch = source.batch(index)
            for h, sae in saes.items():
                x = batch.inputs[h]
                finite = x.isfinite().all(-1)
                kept = keep.clone()
                if not finite.all():
                    kept[kept.clone()] = finite.cpu()
                    x = x[finite]
                enc = sae.encode(x.to(module_device(sae, x.device)))
                stats[h].add(start, ids, kept, enc[0], enc[1])
    return stats


# ----------------------------------------------------------------------------------------------------------
# Logit lens


def residual_role(model: nn.Module, hookpoint: str) -> str | None:
    """How a hookpoint's output reaches the residual stream, in words; None when it does not (directly)."""
    module = hookpoint_module(model, hookpoint)
    hookpoint = canonical_hookpoint(model, hookpoint)  # GPT-2's `h.1.mlp` is our `layers.1.mlp`
    layer = hookpoint_layer(hookpoint)
    if layer is not None:
        return f"the residual stream after block {layer}"
    if hasattr(model, "get_input_embeddings") and module is model.get_input_embeddings():
        return "the residual stream before block 0 (the token embeddings)"
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", hookpoint)
    if m and m.group(2) in RESIDUAL_WRITERS:
        return (
            f"added to the residual stream by block {m.group(1)} (its {m.group(2)} output): the direct path"
        )
    return None


def logit_lens(
    model: nn.Module, sae: Any, hookpoint: str, latents: Tensor, k: int = 10
) -> tuple[dict[str, Tensor] | None, str]:
    """The tokens each latent's decoder row promotes and suppresses most: logits = head(norm(W_dec[i])) -
    head(norm(0)), with the model's own final norm module and unembedding (norm(0) removes what any input
    gets: LayerNorm's bias, the head's bias). Returns ({"promoted", "promoted_ids", "suppressed",
    "suppressed_ids"}: [S, k] each, or None, and a sentence saying what was computed or why not)."""
    role = residual_role(model, hookpoint)
    path, _ = find_blocks(model)
    norm = submodule(model, FINAL_NORMS[path]) if path in FINAL_NORMS else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if role is None:
        return None, f"no logit lens: {hookpoint}'s output is not written into the residual stream"
    if norm is None or head is None or getattr(sae, "W_dec", None) is None:
        return (
            None,
            f"no logit lens: the final norm or unembedding of {type(model).__name__} is not known here",
        )
    device, dtype = head.weight.device, head.weight.dtype
    k = min(k, head.weight.shape[0])
    out: dict[str, list[Tensor]] = {
        "promoted": [],
        "promoted_ids": [],
        "suppressed": [],
        "suppressed_ids": [],
    }
    with torch.no_grad():
        base = head(norm(torch.zeros(1, 1, sae.d_in, device=device, dtype=dtype)))[0, 0].float()
        rows = sae.W_dec.detach()[latents.to(sae.W_dec.device)]
        for chunk in rows.split(256):
            logits = head(norm(chunk.to(device, dtype)[None]))[0].float() - base
            up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            out["promoted"].append(up.values.cpu())
            out["promoted_ids"].append(up.indices.cpu())
            out["suppressed"].append(down.values.cpu())
            out["suppressed_ids"].append(down.indices.cpu())
    what = (
        f"decoder row of a latent of {role}, through the final norm ({FINAL_NORMS[path]}) and the "
        "unembedding as the model applies them; logits relative to those of a zero vector"
    )
    return {name: torch.cat(parts) for name, parts in out.items()}, what


# ----------------------------------------------------------------------------------------------------------
# Records: what a page shows, as JSON-ready dicts


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


class _Text:
    """Token ids to their text, each decoded once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            if self.tokenizer is None:
                self.cache[token] = f"<{token}>"
            else:
                self.cache[token] = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
        return self.cache[token]


def _context(buffer: _Buffer, col: int, slot: int, text: _Text, cfg: DashboardConfig, offset: int) -> dict:
    tokens = buffer.tokens[col, slot].tolist()
    acts = buffer.acts[col, slot].tolist()
    inside = [i for i, t in enumerate(tokens) if t >= 0]
    return {
        "activation": float(buffer.value[col, slot]),
        "sequence": offset + int(buffer.seq[col, slot]),
        "position": int(buffer.pos[col, slot]),
        "peak": cfg.window_before - inside[0],  # index of the peak token in the lists below
        "token_ids": [tokens[i] for i in inside],
        "tokens": [text(tokens[i]) for i in inside],
        "activations": [_finite(acts[i]) for i in inside],
    }


def latent_records(
    stats: LatentStats,
    hookpoint: str,
    tokenizer: Any = None,
    lens: tuple[dict[str, Tensor] | None, str] | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """One JSON-ready dict per latent of `stats`, in its order; `offset` is added to sequence indices."""
    cfg, text = stats.cfg, _Text(tokenizer)
    records = []
    lens_values, lens_note = lens if lens is not None else (None, "no logit lens computed")
    for col, latent in enumerate(stats.latents.tolist()):
        fired = int(stats.fired[latent])
        width = float(stats.hist_width[col])
        filled = (stats.top.key[col] > -math.inf).nonzero().squeeze(1)
        ranked = filled[stats.top.value[col, filled].argsort(descending=True, stable=True)]
        top = [_context(stats.top, col, int(slot), text, cfg, offset) for slot in ranked]
        valid = (stats.sample.key[col] > -math.inf).nonzero().squeeze(1)
        order = valid[stats.sample.value[col, valid].argsort()]
        quantiles = []
        for q, group in enumerate(order.tensor_split(cfg.n_quantiles)):
            if group.numel() == 0:
                continue
            picks = torch.linspace(0, group.numel() - 1, min(cfg.per_quantile, group.numel())).round().long()
            quantiles.append(
                {
                    "quantile": [q / cfg.n_quantiles, (q + 1) / cfg.n_quantiles],
                    "range": [
                        float(stats.sample.value[col, group[0]]),
                        float(stats.sample.value[col, group[-1]]),
                    ],
                    "contexts": [
                        _context(stats.sample, col, int(group[i]), text, cfg, offset) for i in picks
                    ],
                }
            )
        logit = None
        if lens_values is not None:
            logit = {
                side: [
                    {"token_id": int(t), "token": text(int(t)), "logit": float(v)}
                    for t, v in zip(lens_values[f"{side}_ids"][col], lens_values[side][col], strict=True)
                ]
                for side in ("promoted", "suppressed")
            }
        records.append(
            {
                "hookpoint": hookpoint,
                "latent": latent,
                "tokens": stats.tokens,
                "fired": fired,
                "density": fired / stats.tokens if stats.tokens else 0.0,
                "mean_activation": float(stats.act_sum[col]) / fired if fired else None,
                "max_activation": top[0]["activation"] if top else None,
                "histogram": {
                    "bin_width": width,
                    "bin_edges": [i * width for i in range(cfg.hist_bins + 1)],
                    "counts": stats.hist_counts[col].tolist(),
                },
                "top_contexts": top,
                "sample_size": int(valid.numel()),
                "quantiles": quantiles,
                "logit_lens": logit,
                "logit_lens_note": lens_note,
            }
        )
    return records


# ----------------------------------------------------------------------------------------------------------
# A run's dashboards, on held-out tokens


def _choose(
    sae: Any, hookpoint: str, latents: str | None, top_firing: int | None, random_n: int | None, seed: int
):
    """(latent ids to collect, None for every latent, and how many of the most frequent to keep)."""
    given = [x is not None for x in (latents, top_firing, random_n)]
    if sum(given) > 1:
        raise ConfigError("choose latents one way: latents, top_firing or random")
    m = sae.num_latents
    if top_firing is not None:
        _count_choice("top_firing", top_firing, m, hookpoint)
        return None, top_firing
    if random_n is not None:
        _count_choice("random", random_n, m, hookpoint)
        return torch.tensor(sorted(random.Random(seed).sample(range(m), random_n))), None
    return parse_latents(latents or f"0:{min(m, 100)}", m, hookpoint), None


def build_dashboards(
    model_name_or_path: str | None,
    sae_path_or_repo: str,
    dataset: str | None = None,
    *,
    hookpoints: Sequence[str] | str | None = None,
    latents: str | None = None,
    top_firing: int | None = None,
    random_latents: int | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    cfg: DashboardConfig | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    ctx_len: int | None = None,
    split: str | None = None,
    offset: int | None = None,
    include_special_tokens: bool = False,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    token: str | None = None,
    progress: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Dashboards of the chosen latents of a run's SAEs on the evaluation's held-out tokens: {hookpoint:
    [record per latent]}; with `out_dir`, the HTML site and JSON are written there (atomically: the folder
    is complete or absent). Latents: `latents` ('0:200', '3,17'), the `top_firing` N most frequent on these
    tokens, or `random_latents` N (seeded by cfg.seed); default '0:100'. An existing `out_dir` is replaced
    only with `overwrite`."""
    cfg = cfg or DashboardConfig()
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise ConfigError(
            f"{out_dir} exists: pass --overwrite (overwrite=True) to replace it, or another --out"
        )
    inputs = load_run_inputs(
        model_name_or_path,
        sae_path_or_repo,
        dataset,
        max_tokens=max_tokens,
        ctx_len=ctx_len,
        split=split,
        offset=offset,
        include_special_tokens=include_special_tokens,
        hookpoints=hookpoints,
        device=device,
        dtype=dtype,
        token=token,
    )
    chosen, keep_top = {}, {}
    for h, sae in inputs.saes.items():
        chosen[h], keep_top[h] = _choose(sae, h, latents, top_firing, random_latents, cfg.seed)
    stats = collect_latent_stats(
        inputs.model,
        inputs.saes,
        inputs.data,
        chosen,
        cfg=cfg,
        exclude_tokens=inputs.exclude_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    records = {}
    for h, s in stats.items():
        if keep_top[h] is not None:  # the most frequent latents; ties go to the lower id
            order = sorted(range(s.fired.numel()), key=lambda i, f=s.fired.tolist(): (-f[i], i))
            s = s.keep_only(torch.tensor(sorted(order[: keep_top[h]])))
        lens = logit_lens(inputs.model, inputs.saes[h], h, s.latents, cfg.logit_k)
        records[h] = latent_records(s, h, inputs.tokenizer, lens, inputs.settings.get("offset", 0))
    settings = {
        **inputs.settings,
        "sae_path": str(sae_path_or_repo),
        "tokens": {h: s.tokens for h, s in stats.items()},
        "ctx_len": sequence_shape(inputs.data)[1],
        "include_special_tokens": include_special_tokens,
        "selection": (
            f"top_firing {top_firing}"
            if top_firing is not None
            else f"random {random_latents} (seed {cfg.seed})"
            if random_latents is not None
            else f"latents {latents or '0:100'}"
        ),
        "config": vars(cfg),
    }
    if out_dir is not None:
        write_dashboards(out_dir, records, settings)
    return records


def write_dashboards(
    out_dir: str | Path, records: Mapping[str, list[dict]], settings: dict[str, Any]
) -> None:
    """The site and its JSON into `out_dir`, replacing it as a whole (see utils.atomic_folder):
    index.html, dashboard.json (settings and one summary row per latent), <hookpoint>/<latent>.{html,json}."""
    from . import dashboard_html

    with atomic_folder(out_dir) as staging:
        summary = {h: [dashboard_html.summary_row(r) for r in rs] for h, rs in records.items()}
        atomic_write_json(staging / "dashboard.json", {"settings": settings, "hookpoints": summary})
        for h, rs in records.items():
            for r in rs:
                data = json.dumps(
                    r, separators=(",", ":"), allow_nan=False
                )  # compact: most of the site's size
                atomic_write_bytes(staging / h / f"{r['latent']}.json", data.encode())
                atomic_write_bytes(
                    staging / h / f"{r['latent']}.html", dashboard_html.latent_page(r, settings).encode()
                )
        atomic_write_bytes(staging / "index.html", dashboard_html.index_page(summary, settings).encode())


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = DashboardConfig()
    p = OneLineErrorParser(
        prog="python -m sae_core.dashboard",
        allow_abbrev=False,
        description="Latent dashboards on the evaluation's held-out tokens: top-activating contexts, "
        "quantile samples, density, activation histogram and logit lens per latent, as a static HTML site "
        "and JSON.",
    )
    add_held_out_arguments(p, sae_metavar="run_dir")
    p.add_argument("--hookpoints", nargs="+", default=None, help="hookpoints or globs (default: every one)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--latents", default=None, help="ids and ranges, e.g. 0:200 or 3,17,40:48 (default 0:100)"
    )
    which.add_argument("--top_firing", type=int, default=None, help="the N latents that fire most often")
    which.add_argument("--random", type=int, default=None, help="N latents drawn at random (--seed)")
    p.add_argument(
        "--out", default=None, help="output folder (default: RUN_DIR/dashboard; ./dashboard for a repo)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for name in DashboardConfig.__dataclass_fields__:
        p.add_argument(
            f"--{name}", type=int, default=getattr(d, name), help=f"{_doc(name)} (default: %(default)s)"
        )
    return p


def _doc(field: str) -> str:
    """The docstring under a DashboardConfig field (the source is the one place it is written)."""
    import inspect

    source = inspect.getsource(DashboardConfig)
    m = re.search(rf"\n\s+{field}: [^\n]+\n\s+\"\"\"(.+?)\"\"\"", source)
    return m.group(1) if m else field


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    local = Path(args.sae).expanduser()
    out = Path(args.out) if args.out else (local / "dashboard" if local.is_dir() else Path("dashboard"))
    with exit_on_bad_input():
        cfg = DashboardConfig(**{name: getattr(args, name) for name in DashboardConfig.__dataclass_fields__})
        records = build_dashboards(
            args.model,
            args.sae,
            args.dataset,
            hookpoints=args.hookpoints,
            latents=args.latents,
            top_firing=args.top_firing,
            random_latents=args.random,
            out_dir=out,
            overwrite=args.overwrite,
            cfg=cfg,
            progress=True,
            **held_out_kwargs(args),
        )
    n = sum(len(r) for r in records.values())
    print(f"wrote {out / 'index.html'}: {n} latents of {', '.join(records)} (data: {out / 'dashboard.json'})")


if __name__ == "__main__":
    main()
