"""Evaluate SAEs: how well they reconstruct the residual stream, and what the LM loses when they replace it.

    python -m sae_core.evaluate MODEL SAE_PATH_OR_REPO [DATASET] [--max_tokens N] [--out DIR] ...
    evaluate(model, saes, input_ids)             -> EvalReport (the metrics; writes nothing)
    evaluate_run(model, sae_path, dataset, ...)  -> EvalReport on held-out tokens, written to out_dir if given

Definitions (DESIGN.md section 2). For every hookpoint, over the eval tokens t whose input token is not
excluded (BOS and pad by default), with x_t the block output, x̂_t the SAE reconstruction and x̄ the mean
of x over ALL eval tokens:

    fvu       Σ‖x − x̂‖² / Σ‖x − x̄‖², float64, two passes (x̄ comes from the first, so nothing cancels)
    mse       Σ‖x − x̂‖² / (N·d)
    cosine    mean over tokens of x·x̂ / (‖x‖‖x̂‖)
    rel_bias  Σ‖x̂‖² / Σ x·x̂, the γ of argmin_γ Σ‖x̂/γ − x‖² (Rajamanoharan et al. 2024, "Improving
              dictionary learning with gated SAEs", eq. 10; SAEBench's relative_reconstruction_bias).
              1 = unbiased, < 1 = shrinkage; the reciprocal of the best scalar gain on x̂
    l0        mean number of latents with activation > 0 per token
    dead_pct_eval   % of latents that never fired on the eval tokens
    dead_pct_train  % of latents dead per the training counters (tokens_since_fired >=
                    dead_feature_threshold, as the trainer counts), when the run has a trainer state
    density_hist    histogram of log10(firing frequency) of the latents that fired, + the never-fired count

Spliced metrics use next-token predictions: position t predicts token t+1 and counts only when neither its
input token nor its target is excluded (an excluded target, e.g. a pad, is not text to predict). The
block's output is replaced by x̂ (0, x̄) at every non-excluded position; excluded positions keep their
clean value: the SAE never saw them in training, and their outlier norms would dominate the damage.

    ce_clean, ce_sae, ce_zero, ce_mean   mean next-token cross-entropy (nats): clean, spliced, ablated
    delta_ce                             ce_sae − ce_clean
    loss_recovered_zero / _mean          (ce_A − ce_sae) / (ce_A − ce_clean)
    kl (kl_zero, kl_mean)                mean over positions of KL(p_clean ‖ p_spliced (p_ablated))

Cost per batch, with L blocks, hooked layers i ∈ S and "head" = final norm + unembedding:
    pass 1 (x̄)              blocks 0 .. max(S), stopping there
    pass 2 (clean)          one full forward: every hookpoint's x and x̂, and the clean logits
    3 variants per hookpoint (SAE, zero, mean): blocks i+1 .. L−1 and the head only, called with the
                            arguments that the clean forward gave them (masks, rotary tables, positions)
i.e. (max(S)+1) + L + 3·Σ_{i∈S}(L−1−i) blocks and 1 + 3·|S| heads, where a naive evaluation runs
1 + 3·|S| full forwards. This suffix path is used for models whose final norm is known (Llama-like
`model.norm`, GPT-NeoX, GPT-2), after checking on the first batch that it reproduces the clean logits;
otherwise every variant is a full forward with a hook that replaces the block's output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EvalError
from .models import module_device

# Enough for a stable FVU and ΔCE, in minutes rather than hours on a laptop CPU (SmolLM2-135M, 4 layers).
DEFAULT_MAX_TOKENS = 8192
# Without run.json the training context length is unknown: a common one, capped by the model's.
FALLBACK_CTX_LEN = 1024
# The final norm after the block list, per block-list path (see models.BLOCK_LIST_PATHS).
FINAL_NORMS = {
    "model.layers": "model.norm",  # Llama, Mistral, Qwen, SmolLM2; Gemma 2's logit soft-cap fails the check
    "gpt_neox.layers": "gpt_neox.final_layer_norm",
    "transformer.h": "transformer.ln_f",
}
VARIANTS = ("sae", "zero", "mean")
# Per-hookpoint keys of report.json, in order. The Hub model card and the pipeline read them by name.
METRIC_KEYS = (
    "fvu", "mse", "cosine", "rel_bias", "l0", "dead_pct_eval", "dead_pct_train",
    "ce_clean", "ce_sae", "ce_zero", "ce_mean", "delta_ce", "loss_recovered_zero", "loss_recovered_mean",
    "kl", "kl_zero", "kl_mean", "density_hist",
)
PLOT_FILES = ("fvu_l0_dead.png", "kl_dce.png", "density.png")


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclass
class EvalReport:
    """What `evaluate` measured: the settings, and one dict of metrics per hookpoint (keys: METRIC_KEYS)."""

    settings: dict[str, Any]
    hookpoints: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "hookpoints": self.hookpoints}

    def to_markdown(self) -> str:
        s = self.settings
        said = [f"{k} `{s[k]}`" for k in ("model", "dataset", "split") if s.get(k) is not None]
        said.append(f"{s.get('tokens', 0):,} tokens")
        intro = "Evaluated on " + ", ".join(said) + "."
        if s.get("held_out"):
            intro += f" Held out: {s['held_out']}."
        columns = [
            ("FVU", "fvu"), ("L0", "l0"), ("dead % (eval)", "dead_pct_eval"),
            ("dead % (train)", "dead_pct_train"),
            ("ΔCE", "delta_ce"), ("KL", "kl"), ("loss recovered (zero)", "loss_recovered_zero"),
            ("loss recovered (mean)", "loss_recovered_mean"),
        ]
        lines = [intro, "", "| hookpoint | " + " | ".join(t for t, _ in columns) + " |"]
        lines.append("|" + "---|" * (len(columns) + 1))
        for h, m in self.hookpoints.items():
            lines.append(f"| `{h}` | " + " | ".join(_fmt(m.get(k)) for _, k in columns) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write report.json, report.md and the three PNG plots into `out_dir`; returns the paths."""
        from .plots import plot_report
        from .utils import atomic_write_bytes, atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "report.json", self.to_dict())
        atomic_write_bytes(out / "report.md", self.to_markdown().encode())
        return [out / "report.json", out / "report.md", *plot_report(self.to_dict(), out)]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(v: float) -> float | None:
    """JSON has no NaN or infinity: an undefined metric (e.g. 0/0) is written as null."""
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------------------
# Running the LM with one block's output replaced


class _StopForward(Exception):
    """Raised after the deepest hooked block in pass 1: the layers above it are not needed there."""


def _get(model: nn.Module, path: str) -> nn.Module | None:
    mod: Any = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _first(output: Any) -> Tensor:
    """A block's hidden state: blocks return a tensor or a tuple whose first element is it."""
    return output[0] if isinstance(output, tuple) else output


class _Splicer:
    """The LM's logits with the output of block i replaced by a given hidden state.

    "suffix" mode: during the clean forward, record the (args, kwargs) each block after the shallowest
    hooked one was called with; a variant then calls blocks i+1 .. L-1 with those arguments and its own
    hidden state, then the final norm and the unembedding. "full" mode: a whole forward with a hook that
    replaces block i's output.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], mode: str):
        from .models import find_blocks

        self.model = model
        path, self.blocks = find_blocks(model)
        self.layers = sorted(set(layers))
        self.norm = _get(model, FINAL_NORMS[path]) if path in FINAL_NORMS else None
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        known = self.norm is not None and self.head is not None
        if mode == "suffix" and not known:
            raise EvalError(
                f"splice='suffix' needs a known final norm and unembedding, which {type(model).__name__} "
                "does not have here; use splice='auto' or 'full'"
            )
        self.mode = "suffix" if mode != "full" and known else "full"
        self.outputs: dict[int, Tensor] = {}
        self.inputs: dict[int, tuple[tuple, dict]] = {}

    @contextlib.contextmanager
    def recording(self, stop_after: int | None = None) -> Iterator[None]:
        """Within the context a forward fills `outputs` (hooked blocks) and, in suffix mode, `inputs`.

        With `stop_after`, the forward stops right after that block (`forward` then returns None).
        """
        self.outputs.clear()
        self.inputs.clear()
        handles = []

        def keep_output(i: int):
            def hook(_module, _args, output):
                self.outputs[i] = _first(output)
                if i == stop_after:
                    raise _StopForward

            return hook

        def keep_inputs(j: int):
            def hook(_module, args, kwargs):
                # Everything but the hidden state itself, which each variant brings: less memory held.
                if args:
                    self.inputs[j] = ((None, *args[1:]), kwargs)
                else:
                    self.inputs[j] = ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})

            return hook

        try:
            for i in self.layers:
                handles.append(self.blocks[i].register_forward_hook(keep_output(i)))
            if self.mode == "suffix" and stop_after is None:
                for j in range(self.layers[0] + 1, len(self.blocks)):
                    handles.append(self.blocks[j].register_forward_pre_hook(keep_inputs(j), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, input_ids: Tensor) -> Tensor | None:
        """Forward the LM (inside `recording`): its logits, or None when stopped early."""
        try:
            return self.model(input_ids=input_ids, use_cache=False).logits
        except _StopForward:
            return None

    def logits(self, layer: int, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """Logits with block `layer`'s output replaced by `hidden` (after a recorded clean forward)."""
        if self.mode == "full":

            def replace(_module, _args, output):
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = self.blocks[layer].register_forward_hook(replace)
            try:
                return self.model(input_ids=input_ids, use_cache=False).logits
            finally:
                handle.remove()
        for j in range(layer + 1, len(self.blocks)):
            args, kwargs = self.inputs[j]
            if args:
                hidden = _first(self.blocks[j](hidden, *args[1:], **kwargs))
            else:
                hidden = _first(self.blocks[j](hidden_states=hidden, **kwargs))
        return self.head(self.norm(hidden))


def _check_suffix(splicer: _Splicer, ids: Tensor, clean_logits: Tensor, required: bool) -> None:
    """The suffix path must reproduce the clean logits from the clean hidden state (first batch only).

    A model that does something between the last block and the logits that is not replayed here (logit
    soft-capping, a logit scale, ...) fails this check, and the evaluation falls back to full forwards.
    """
    layer = splicer.layers[0]
    replay = splicer.logits(layer, splicer.outputs[layer], ids)
    err = (replay - clean_logits).abs().max().item()
    if err <= 1e-4 * max(clean_logits.abs().max().item(), 1e-6):
        return
    name = type(splicer.model).__name__
    msg = f"the suffix forward of {name} does not reproduce its logits (max error {err:.3g})"
    if required:
        raise EvalError(msg + "; use splice='auto' or 'full'")
    warnings.warn(msg + "; using a full forward per spliced variant instead", stacklevel=3)
    splicer.mode = "full"


# ----------------------------------------------------------------------------------------------------------
# Accumulators: float64 sums over all eval tokens


class _Recon:
    """Reconstruction sums of one hookpoint."""

    def __init__(self, num_latents: int, mean: Tensor):
        self.mean = mean  # [d] float64: x̄ over all eval tokens, from pass 1
        self.n = 0
        self.sse = self.sst = self.cos = self.dot = self.xhat_sq = self.active = 0.0
        self.fired = torch.zeros(num_latents, dtype=torch.long)  # tokens on which each latent fired

    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor, indices: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sse += (x - x_hat).pow(2).sum().item()
        self.sst += (x - self.mean.to(x.device)).pow(2).sum().item()
        dots = (x * x_hat).sum(1)
        norms = x.norm(dim=1) * x_hat.norm(dim=1)
        # A zero vector has no direction: its cosine counts as 0 rather than NaN.
        self.cos += torch.where(norms > 0, dots / norms.clamp_min(1e-300), 0.0).sum().item()
        self.dot += dots.sum().item()
        self.xhat_sq += x_hat.pow(2).sum().item()
        on = acts > 0
        self.active += on.sum().item()
        self.fired += torch.bincount(indices[on].cpu(), minlength=self.fired.numel())

    def metrics(self) -> dict[str, Any]:
        never = int((self.fired == 0).sum())
        return {
            "fvu": _num(self.sse / self.sst) if self.sst > 0 else None,
            "mse": _num(self.sse / (self.n * self.mean.numel())),
            "cosine": _num(self.cos / self.n),
            "rel_bias": _num(self.xhat_sq / self.dot) if self.dot != 0 else None,
            "l0": _num(self.active / self.n),
            "dead_pct_eval": _num(100.0 * never / self.fired.numel()),
            "density_hist": density_histogram(self.fired, self.n),
        }


def density_histogram(fire_counts: Tensor, n_tokens: int, bins_per_decade: int = 4) -> dict[str, Any]:
    """Histogram of log10(firing frequency) over the latents that fired at least once.

    The bins run from the lowest measurable frequency (1 / n_tokens, rounded down to a decade) to 1.
    """
    freq = fire_counts[fire_counts > 0].double() / max(n_tokens, 1)
    lo = min(math.floor(math.log10(1.0 / max(n_tokens, 1))), -1)
    n_bins = -lo * bins_per_decade
    edges = torch.linspace(lo, 0.0, n_bins + 1, dtype=torch.float64)
    counts = torch.histc(freq.log10(), bins=n_bins, min=lo, max=0.0) if freq.numel() else torch.zeros(n_bins)
    return {
        "bin_edges": [round(e, 6) for e in edges.tolist()],
        "counts": [int(c) for c in counts.tolist()],
        "never_fired": int((fire_counts == 0).sum()),
        "num_latents": fire_counts.numel(),
        "tokens": n_tokens,
    }


def _log_probs(logits: Tensor, positions: Tensor) -> Tensor:
    """log p(next token) at the counted positions, [n, vocab], in float32 at least."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.log_softmax(logits[:, :-1][positions].to(dtype), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The API


def evaluate(
    model: nn.Module,
    saes: Mapping[str, Any],
    input_ids: Any,
    *,
    exclude_tokens: Sequence[int] | None = None,
    batch_size: int = 8,
    splice: str = "auto",
    dead_pct_train: Mapping[str, float] | None = None,
    progress: bool = False,
) -> EvalReport:
    """Measure every SAE of `saes` ({hookpoint: SAE}) on `input_ids` ([n_seq, T] tensor, or a Dataset with
    an "input_ids" column); the SAE of hookpoint `layers.<i>` reads the output of block i.

    exclude_tokens: token ids left out of every metric (e.g. `models.special_token_ids(tokenizer)`); None
    or [] keeps every token. splice: "auto" (suffix forwards when verified, else full ones), "suffix"
    (an error where unsupported) or "full". dead_pct_train: {hookpoint: %} from the training counters,
    copied into the report. An SAE is anything with `d_in`, `num_latents`, `encode(x) -> (acts, indices,
    ...)` and `decode(acts, indices)`, such as `sae_core.Sae`.
    """
    from tqdm.auto import tqdm

    if splice not in ("auto", "suffix", "full"):
        raise EvalError(f"splice must be 'auto', 'suffix' or 'full', got {splice!r}")
    if batch_size <= 0:
        raise EvalError(f"batch_size must be a positive integer, got {batch_size}")
    layer_of = check_saes(model, saes)
    n_seq, seq_len = _shape(input_ids)
    if n_seq == 0 or seq_len == 0:
        raise EvalError("no evaluation tokens: the input has no sequences (is the held-out part empty?)")

    device = module_device(model)
    exclude = torch.tensor(sorted(set(exclude_tokens or [])), dtype=torch.long, device=device)
    splicer = _Splicer(model, list(layer_of.values()), splice)
    batches = [(start, min(start + batch_size, n_seq)) for start in range(0, n_seq, batch_size)]
    bar = tqdm(total=2 * len(batches), desc="Evaluating", unit="batch", disable=not progress)

    # Pass 1: x̄, the mean of every hooked block's output over all eval tokens (FVU and mean-ablation).
    means, n_tokens = _block_means(splicer, layer_of, input_ids, batches, exclude, bar)
    if n_tokens == 0:
        raise EvalError(
            f"no evaluation tokens: all {n_seq * seq_len} tokens are excluded special tokens (ids "
            f"{exclude.tolist()}); pass include_special_tokens / --include_special_tokens, or other data"
        )

    # Pass 2: one clean forward per batch, then the spliced and ablated variants of every hookpoint.
    recon = {h: _Recon(sae.num_latents, means[h]) for h, sae in saes.items()}
    ce = {h: dict.fromkeys(VARIANTS, 0.0) for h in saes}
    kl = {h: dict.fromkeys(VARIANTS, 0.0) for h in saes}
    ce_clean, n_positions = 0.0, 0
    with torch.no_grad():
        for b, (start, stop) in enumerate(batches):
            ids = _rows(input_ids, start, stop).to(device)
            keep = ~torch.isin(ids, exclude)
            positions = keep[:, :-1] & keep[:, 1:]  # position t predicts token t+1: both must count
            targets = ids[:, 1:][positions]
            with splicer.recording():
                clean_logits = splicer.forward(ids)
            if b == 0 and splicer.mode == "suffix":
                _check_suffix(splicer, ids, clean_logits, required=splice == "suffix")
            clean_logp = _log_probs(clean_logits, positions)
            del clean_logits
            ce_clean -= clean_logp.gather(1, targets[:, None]).double().sum().item()
            n_positions += targets.numel()
            for h, sae in saes.items():
                i = layer_of[h]
                out = splicer.outputs[i]
                x = out[keep]
                enc = sae.encode(x.to(module_device(sae, x.device)))
                acts, indices = enc[0], enc[1]
                x_hat = sae.decode(acts, indices).to(x.device)
                recon[h].add(x, x_hat, acts, indices)
                # Excluded positions keep their clean value in every variant.
                for v, value in (("sae", x_hat.to(out.dtype)), ("zero", 0.0), ("mean", means[h].to(out))):
                    hidden = out.clone()
                    hidden[keep] = value
                    logp = _log_probs(splicer.logits(i, hidden, ids), positions)
                    ce[h][v] -= logp.gather(1, targets[:, None]).double().sum().item()
                    kl[h][v] += (clean_logp.exp() * (clean_logp - logp)).sum(-1).double().sum().item()
            bar.update()
    bar.close()

    report = EvalReport(settings={
        "tokens": n_tokens, "ce_positions": n_positions, "sequences": n_seq, "ctx_len": seq_len,
        "exclude_tokens": exclude.tolist(), "include_special_tokens": exclude.numel() == 0,
        "splice": splicer.mode,
    })
    npos = n_positions or float("nan")  # no countable position: CE and KL are undefined (null)
    for h in saes:
        m = recon[h].metrics()
        c = {v: ce[h][v] / npos for v in VARIANTS}
        clean = ce_clean / npos
        m.update(
            dead_pct_train=_num(dead_pct_train[h]) if dead_pct_train and h in dead_pct_train else None,
            ce_clean=_num(clean), ce_sae=_num(c["sae"]), ce_zero=_num(c["zero"]), ce_mean=_num(c["mean"]),
            delta_ce=_num(c["sae"] - clean),
            loss_recovered_zero=_recovered(c["zero"], c["sae"], clean),
            loss_recovered_mean=_recovered(c["mean"], c["sae"], clean),
            kl=_num(kl[h]["sae"] / npos), kl_zero=_num(kl[h]["zero"] / npos),
            kl_mean=_num(kl[h]["mean"] / npos),
        )
        report.hookpoints[h] = {k: m[k] for k in METRIC_KEYS}
    return report


def check_saes(model: nn.Module, saes: Mapping[str, Any]) -> dict[str, int]:
    """{hookpoint: block index}, after checking that the model has each hookpoint and each SAE fits it."""
    from .models import find_blocks, hidden_size
    from .sae import hookpoint_layer

    if not saes:
        raise EvalError("no SAEs to evaluate")
    _, blocks = find_blocks(model)
    n_layers, width = len(blocks), hidden_size(model)
    layer_of = {}
    for h, sae in saes.items():
        i = hookpoint_layer(h)
        if i is None or not 0 <= i < n_layers:
            raise EvalError(
                f"hookpoint {h!r} is not in the model: {type(model).__name__} has hookpoints layers.0 .. "
                f"layers.{n_layers - 1} (the outputs of its blocks)"
            )
        if sae.d_in != width:
            raise EvalError(
                f"the SAE for {h} has d_in={sae.d_in}, but the model's residual stream at {h} has width "
                f"{width}: it was trained on another model"
            )
        layer_of[h] = i
    return layer_of


def _block_means(
    splicer: _Splicer, layer_of: Mapping[str, int], input_ids: Any, batches: list[tuple[int, int]],
    exclude: Tensor, bar: Any,
) -> tuple[dict[str, Tensor], int]:
    """({hookpoint: mean block output over the non-excluded tokens}, float64 on the CPU; their number)."""
    sums: dict[str, Tensor] = {}
    n_tokens = 0
    with torch.no_grad():
        for start, stop in batches:
            ids = _rows(input_ids, start, stop).to(exclude.device)
            keep = ~torch.isin(ids, exclude)
            with splicer.recording(stop_after=max(layer_of.values())):
                splicer.forward(ids)
            for h, i in layer_of.items():
                part = splicer.outputs[i][keep].double().sum(0).cpu()
                sums[h] = sums[h] + part if h in sums else part
            n_tokens += int(keep.sum())
            bar.update()
    return {h: s / max(n_tokens, 1) for h, s in sums.items()}, n_tokens


def _recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float | None:
    denom = ce_ablated - ce_clean
    return _num((ce_ablated - ce_sae) / denom) if denom != 0 else None


def _shape(input_ids: Any) -> tuple[int, int]:
    if isinstance(input_ids, Tensor):
        if input_ids.ndim != 2:
            shape = tuple(input_ids.shape)
            raise EvalError(f"input_ids must be a [sequences, tokens] tensor, got shape {shape}")
        return input_ids.shape[0], input_ids.shape[1]
    if "input_ids" not in getattr(input_ids, "column_names", []):
        raise EvalError("input_ids must be a tensor or a Dataset with an 'input_ids' column (see data.py)")
    n = len(input_ids)
    return n, (len(input_ids[0]["input_ids"]) if n else 0)


def _rows(input_ids: Any, start: int, stop: int) -> Tensor:
    if isinstance(input_ids, Tensor):
        return input_ids[start:stop].long()
    rows = input_ids[start:stop]["input_ids"]
    return rows.long() if isinstance(rows, Tensor) else torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------
# A training run, on held-out tokens


def training_dead_pct(run_dir: str | Path) -> dict[str, float]:
    """{hookpoint: % dead} from the newest trainer states of a run folder that every writing rank completed
    (--distribute_layers: each rank holds its own layers); {} if none.

    Dead means what it meant in training: tokens_since_fired >= dead_feature_threshold.
    """
    from .checkpoint import CheckpointError, newest_complete_states

    dead: dict[str, float] = {}
    try:
        for state in newest_complete_states(Path(run_dir)):
            threshold = json.loads(state["config"])["dead_feature_threshold"]
            for h, counters in state["tokens_since_fired"].items():
                dead[h] = 100.0 * (counters >= threshold).double().mean().item()
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        warnings.warn(f"training dead-latent counters unavailable: {e}", stacklevel=2)
        return {}
    return dead


def evaluate_run(
    model_name_or_path: str | None,
    sae_path_or_repo: str,
    dataset: str | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    ctx_len: int | None = None,
    split: str | None = None,
    offset: int | None = None,
    out_dir: str | Path | None = None,
    include_special_tokens: bool = False,
    batch_size: int = 8,
    hookpoints: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    splice: str = "auto",
    text_column: str | None = None,
    token: str | None = None,
    progress: bool = False,
) -> EvalReport:
    """Load a model (None: the run's, else the embedded one), its SAEs (a run folder, a folder of hookpoint
    folders, or a Hub repo; `hookpoints` is a glob) and held-out data; evaluate; write report.json,
    report.md and the plots into `out_dir` when it is given.

    Held-out tokens: when the dataset is the run's own (default: the dataset in run.json, else the embedded
    corpus) and so is the split, it is loaded and tokenized as in training (split, shuffle seed,
    max_examples, text column), and evaluation starts after the tokens training consumed (its
    `train_sequences`; at another ctx_len, after every sequence that overlaps them). `offset` (the first
    sequence) or another `split` overrides that. settings["held_out"] records the choice.
    """
    from transformers import AutoTokenizer

    from .embedded import EMBEDDED_MODEL_NAME, embedded_model_path, is_embedded_model
    from .models import load_model, max_context, special_token_ids
    from .sae import Sae

    if max_tokens <= 0:
        raise EvalError(f"max_tokens must be positive, got {max_tokens}")
    if offset is not None and offset < 0:
        raise EvalError(f"offset must be >= 0 (a sequence index), got {offset}")
    if ctx_len is not None and ctx_len < 2:
        raise EvalError(f"ctx_len must be at least 2, got {ctx_len}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    saes = Sae.load_many_from_hub(sae_path_or_repo, hookpoints, device=device, token=token)
    local = Path(sae_path_or_repo).expanduser()
    run = _read_run_json(local / "run.json") if local.is_dir() else {}

    model_name = model_name_or_path or run.get("model") or EMBEDDED_MODEL_NAME
    model_path = str(embedded_model_path()) if is_embedded_model(model_name) else model_name
    model = load_model(model_path, dtype=dtype, device=device, token=token)
    check_saes(model, saes)  # before tokenizing: a wrong model should fail in seconds
    tokenizer = AutoTokenizer.from_pretrained(model_path, token=token)

    data, settings = _held_out_sequences(
        run, tokenizer, dataset, split=split, offset=offset, ctx_len=ctx_len, text_column=text_column,
        max_tokens=max_tokens, model_max=max_context(model), token=token,
    )
    exclude = [] if include_special_tokens else special_token_ids(tokenizer)
    dead_train = training_dead_pct(local) if local.is_dir() else {}
    report = evaluate(model, saes, data, exclude_tokens=exclude, batch_size=batch_size, splice=splice,
                      dead_pct_train=dead_train, progress=progress)
    report.settings = {
        "model": model_name, **settings, **report.settings, "include_special_tokens": include_special_tokens,
        "sae_path": str(sae_path_or_repo),
    }
    if out_dir is not None:
        report.save(out_dir)
    return report


def _read_run_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not valid JSON (corrupt or truncated?): {e}") from None
    return run if isinstance(run, dict) else {}


def _held_out_sequences(
    run: Mapping[str, Any],
    tokenizer: Any,
    dataset: str | None,
    *,
    split: str | None,
    offset: int | None,
    ctx_len: int | None,
    text_column: str | None,
    max_tokens: int,
    model_max: int | None,
    token: str | None,
) -> tuple[Any, dict[str, Any]]:
    """The evaluation sequences (a slice of a tokenized Dataset) and the settings that say which they are."""
    from .data import chunk_and_tokenize, load_text_dataset, parse_data_args

    cfg = run.get("config") or {}
    trained_on = _dataset_name(run.get("dataset")) if run else None
    name = _dataset_name(dataset) if dataset is not None else (trained_on or "embedded")
    same_data = bool(run) and _same_dataset(name, trained_on)
    train_split = cfg.get("split", "train")
    split = split or (train_split if same_data else "train")

    # The training data is loaded as in training, so that its token stream is the same one.
    text_column = text_column or (cfg.get("text_column", "text") if same_data else "text")
    ds = load_text_dataset(
        None if name == "embedded" else name, split=split, text_column=text_column,
        data_args=parse_data_args(cfg.get("data_args", "")) if same_data else None,
        max_examples=cfg.get("max_examples") if same_data else None,
        shuffle_seed=cfg.get("shuffle_seed", 42) if same_data else 42, token=token,
    )
    train_len = run.get("seq_len") or cfg.get("ctx_len")
    if "input_ids" in ds.column_names:  # already tokenized: its sequence length is fixed
        ds = ds.with_format("torch", columns=["input_ids"])
    else:
        ctx_len = ctx_len or train_len or min(FALLBACK_CTX_LEN, model_max or FALLBACK_CTX_LEN)
        if model_max is not None and ctx_len > model_max:
            raise EvalError(f"ctx_len={ctx_len} exceeds the model's maximum context of {model_max} tokens")
        ds = chunk_and_tokenize(ds, tokenizer, text_key=text_column, max_seq_len=ctx_len)
    seq_len = len(ds[0]["input_ids"]) if len(ds) else (ctx_len or 0)

    if offset is not None:
        start, held_out = offset, f"from sequence {offset} (given offset)"
    elif same_data and split == train_split and "train_sequences" in run:
        # Training consumed the first train_sequences chunks of the stream, each one BOS (if the tokenizer
        # has one) + train_len - 1 text tokens. At another ctx_len, skip every chunk that overlaps them.
        bos = 1 if tokenizer.bos_token_id is not None else 0
        used = run["train_sequences"] * ((train_len or seq_len) - bos)
        start = math.ceil(used / max(seq_len - bos, 1))
        held_out = (f"sequences after the {run['train_sequences']} training sequences of the same dataset "
                    f"and split (from sequence {start})")
    elif same_data and split != train_split:
        start, held_out = 0, f"split {split!r}; training used split {train_split!r}"
    elif same_data:
        start, held_out = 0, "unknown: run.json does not record train_sequences; from sequence 0"
    elif run:
        start, held_out = 0, f"a dataset other than the training one ({trained_on})"
    else:
        start, held_out = 0, "unknown: no run.json tells the training data; from sequence 0"
    available = len(ds) - start
    if available <= 0:
        raise EvalError(
            f"no held-out tokens left: {name} (split {split!r}) has {len(ds)} sequences of {seq_len} tokens "
            f"and evaluation starts at sequence {start} ({held_out}); use more data, another --split, or "
            "--offset"
        )
    n_seq = min(available, max(1, math.ceil(max_tokens / max(seq_len, 1))))
    settings = {"dataset": name, "split": split, "offset": start, "held_out": held_out}
    return ds.select(range(start, start + n_seq)), settings


def _same_dataset(a: str, b: str | None) -> bool:
    """Same name, or two spellings of one local path (run.json keeps the path as the trainer got it)."""
    if b is None:
        return False
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _dataset_name(name: str | None) -> str:
    from .data import EMBEDDED_DATASET_NAMES

    return "embedded" if name is None or name in EMBEDDED_DATASET_NAMES else str(name)


# ----------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m sae_core.evaluate",
        description="Evaluate SAEs on held-out tokens: FVU, L0, dead latents, and the LM's cross-entropy "
        "and KL with each SAE spliced in. Writes report.json, report.md and PNG plots.",
    )
    p.add_argument("model", help="Hub id or local folder of the LM; 'smollm2-135m' or 'embedded' for the "
                   "embedded one")
    p.add_argument("sae", metavar="sae_path_or_repo",
                   help="run folder, folder of hookpoint folders, or Hub repo")
    p.add_argument("dataset", nargs="?", default=None,
                   help="dataset (default: the run's training dataset, else the embedded corpus)")
    p.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="evaluation tokens (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    p.add_argument("--ctx_len", type=int, default=None, help="tokens per sequence (default: the run's)")
    p.add_argument("--split", default=None, help="dataset split (default: the run's)")
    p.add_argument("--offset", type=int, default=None,
                   help="first sequence to evaluate (default: right after the training sequences)")
    p.add_argument("--out", default=None,
                   help="output folder (default: SAE_PATH/eval; ./eval for a Hub repo)")
    p.add_argument("--include_special_tokens", action="store_true",
                   help="count BOS and pad tokens in every metric (default: excluded)")
    p.add_argument("--hookpoints", default=None, help="glob of the hookpoints to evaluate, e.g. 'layers.1*'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32",
                   help="LM dtype: float32, bfloat16, float16 (default: %(default)s)")
    p.add_argument("--splice", choices=("auto", "suffix", "full"), default="auto",
                   help="spliced variants run from the block on (suffix; auto = when verified) or in full")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    local = Path(args.sae).expanduser()
    out = Path(args.out) if args.out else (local / "eval" if local.is_dir() else Path("eval"))
    try:
        report = evaluate_run(
            args.model, args.sae, args.dataset, max_tokens=args.max_tokens, ctx_len=args.ctx_len,
            split=args.split, offset=args.offset, out_dir=out,
            include_special_tokens=args.include_special_tokens, batch_size=args.batch_size,
            hookpoints=args.hookpoints, device=args.device, dtype=args.dtype, splice=args.splice,
            progress=True,
        )
    except (ValueError, OSError) as e:  # EvalError, ConfigError, ModelLoadError, SaeLoadError, no such file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report.to_markdown())
    print(f"wrote {out / 'report.json'}, report.md and {', '.join(PLOT_FILES)}")


if __name__ == "__main__":
    main()
