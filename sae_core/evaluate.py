"""Evaluate SAEs: how well they reconstruct the residual stream, and what the LM loses when they replace it.

    python -m sae_core.evaluate MODEL SAE_PATH_OR_REPO [DATASET] [--max_tokens N] [--out DIR] ...
    evaluate(model, saes, input_ids)             -> EvalReport (the metrics; writes nothing)
    evaluate_run(model, sae_path, dataset, ...)  -> EvalReport on held-out tokens, written to out_dir if given

Every field of the report is defined in docs/metrics.md.

Pass 1 computes x̄, pass 2 the clean forward and the spliced variants; splice.py says what each costs and
when a variant runs only the blocks after the hooked one. heldout.py says which tokens a run did not train on.
"""

import argparse
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint
from .data import sequence_rows, sequence_shape
from .embedded import EMBEDDED_MODEL_NAME, embedded_model_path, is_embedded_model
from .errors import CheckpointError, EvalError
from .heldout import FALLBACK_CTX_LEN, held_out_sequences, read_run_json
from .models import load_model, max_context, module_device, special_token_ids
from .report import METRIC_KEYS, PLOT_FILES, EvalReport
from .sae import Sae
from .splice import FINAL_NORMS, Splicer, block_means, check_saes, transcodes
from .utils import exit_on_bad_input, natural_key

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "FALLBACK_CTX_LEN",
    "FINAL_NORMS",
    "METRIC_KEYS",
    "PLOT_FILES",
    "EvalError",
    "EvalReport",
    "build_parser",
    "check_saes",
    "density_histogram",
    "evaluate",
    "evaluate_run",
    "load_run_inputs",
    "main",
    "training_dead_pct",
]

# Enough for a stable FVU and ΔCE, in minutes rather than hours on a laptop CPU (SmolLM2-135M, 4 layers).
DEFAULT_MAX_TOKENS = 8192
VARIANTS = ("sae", "zero", "mean")


def _num(v: float) -> float | None:
    """JSON has no NaN or infinity: an undefined metric (e.g. 0/0) is written as null."""
    v = float(v)
    return v if math.isfinite(v) else None


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


def _spliced(out: Tensor, keep: Tensor, value: Tensor | float) -> Tensor:
    """A block output with `value` at the kept positions; excluded ones keep their clean value."""
    hidden = out.clone()
    hidden[keep] = value
    return hidden


def _ce_kl(logits: Tensor, positions: Tensor, targets: Tensor, clean_logp: Tensor) -> tuple[float, float]:
    """(summed cross-entropy, summed KL from the clean distribution) of a variant's logits."""
    logp = _log_probs(logits, positions)
    ce = -logp.gather(1, targets[:, None]).double().sum().item()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).double().sum().item()
    return ce, kl


def _add(ce: dict[str, float], kl: dict[str, float], variant: str, ce_kl: tuple[float, float]) -> None:
    ce[variant] += ce_kl[0]
    kl[variant] += ce_kl[1]


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
    an "input_ids" column); the SAE of hookpoint `layers.<i>` reads the output of block i, that of any
    other module path (`layers.3.mlp`, see `models.hookpoint_modules`) the output of that module.

    exclude_tokens: token ids left out of every metric (e.g. `models.special_token_ids(tokenizer)`); None
    or [] keeps every token. splice: "auto" (suffix forwards when verified, else full ones), "suffix"
    (an error where unsupported) or "full". dead_pct_train: {hookpoint: %} from the training counters,
    copied into the report. An SAE is anything with `d_in`, `num_latents`, `encode(x) -> (acts, indices,
    ...)` and `decode(acts, indices)`, such as `sae_core.Sae`. A transcoder (`cfg.transcode`, also with
    `d_out` and `skip(x)`) reads the module's input and its prediction replaces the module's output: every
    metric, FVU included, is then of that output.
    """
    if splice not in ("auto", "suffix", "full"):
        raise EvalError(f"splice must be 'auto', 'suffix' or 'full', got {splice!r}")
    if batch_size <= 0:
        raise EvalError(f"batch_size must be a positive integer, got {batch_size}")
    layer_of = check_saes(model, saes)
    n_seq, seq_len = sequence_shape(input_ids)
    if n_seq == 0 or seq_len == 0:
        raise EvalError("no evaluation tokens: the input has no sequences (is the held-out part empty?)")

    device = module_device(model)
    exclude = torch.tensor(sorted(set(exclude_tokens or [])), dtype=torch.long, device=device)
    transcoders = [h for h, sae in saes.items() if transcodes(sae)]
    splicer = Splicer(model, list(layer_of.values()), splice, [layer_of[h] for h in transcoders])
    batches = [(start, min(start + batch_size, n_seq)) for start in range(0, n_seq, batch_size)]
    bar = tqdm(total=2 * len(batches), desc="Evaluating", unit="batch", disable=not progress)

    # Pass 1: x̄, the mean of every hooked block's output over all eval tokens (FVU and mean-ablation).
    rows = (sequence_rows(input_ids, start, stop).to(device) for start, stop in batches)
    means, n_tokens = block_means(splicer, layer_of, rows, exclude, bar)
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
            ids = sequence_rows(input_ids, start, stop).to(device)
            keep = ~torch.isin(ids, exclude)
            positions = keep[:, :-1] & keep[:, 1:]  # position t predicts token t+1: both must count
            targets = ids[:, 1:][positions]
            with splicer.recording():
                clean_logits = splicer.forward(ids)
            if b == 0 and splicer.mode == "suffix":
                splicer.check_suffix(ids, clean_logits, required=splice == "suffix")
            clean_logp = _log_probs(clean_logits, positions)
            del clean_logits
            ce_clean -= clean_logp.gather(1, targets[:, None]).double().sum().item()
            n_positions += targets.numel()

            mean_scored = b == 0 and splicer.mode == "suffix"
            if mean_scored:
                # A perturbed splice per hookpoint, against a full forward, before any variant is scored: the
                # mean-ablated one, a real perturbation whatever the SAE; its full logits score that variant.
                for h in saes:
                    out = splicer.outputs[layer_of[h]]
                    hidden = _spliced(out, keep, means[h].to(out))
                    logits = splicer.check_splice(layer_of[h], hidden, ids, required=splice == "suffix")
                    _add(ce[h], kl[h], "mean", _ce_kl(logits, positions, targets, clean_logp))
            for h, sae in saes.items():
                i = layer_of[h]
                out = splicer.outputs[i]
                x = out[keep]
                # A transcoder predicts the module's output x from the module's input.
                source = splicer.module_inputs[i][keep] if h in transcoders else x
                source = source.to(module_device(sae, x.device))
                enc = sae.encode(source)
                acts, indices = enc[0], enc[1]
                x_hat = sae.decode(acts, indices)
                if hasattr(sae, "skip"):  # the skip connection's term (0 without one)
                    x_hat = x_hat + sae.skip(source)
                x_hat = x_hat.to(x.device)
                recon[h].add(x, x_hat, acts, indices)
                for v, value in (("sae", x_hat.to(out.dtype)), ("zero", 0.0), ("mean", means[h].to(out))):
                    if not (v == "mean" and mean_scored):
                        logits = splicer.logits(i, _spliced(out, keep, value), ids)
                        _add(ce[h], kl[h], v, _ce_kl(logits, positions, targets, clean_logp))
            bar.update()
    bar.close()

    report = EvalReport(
        settings={
            "tokens": n_tokens,
            "ce_positions": n_positions,
            "sequences": n_seq,
            "ctx_len": seq_len,
            "exclude_tokens": exclude.tolist(),
            "include_special_tokens": exclude.numel() == 0,
            "splice": splicer.mode,
            **({"transcoders": transcoders} if transcoders else {}),
        }
    )
    npos = n_positions or float("nan")  # no countable position: CE and KL are undefined (null)
    for h in saes:
        m = recon[h].metrics()
        c = {v: ce[h][v] / npos for v in VARIANTS}
        clean = ce_clean / npos
        m.update(
            dead_pct_train=_num(dead_pct_train[h]) if dead_pct_train and h in dead_pct_train else None,
            ce_clean=_num(clean),
            ce_sae=_num(c["sae"]),
            ce_zero=_num(c["zero"]),
            ce_mean=_num(c["mean"]),
            delta_ce=_num(c["sae"] - clean),
            loss_recovered_zero=_recovered(c["zero"], c["sae"], clean),
            loss_recovered_mean=_recovered(c["mean"], c["sae"], clean),
            kl=_num(kl[h]["sae"] / npos),
            kl_zero=_num(kl[h]["zero"] / npos),
            kl_mean=_num(kl[h]["mean"] / npos),
        )
        report.hookpoints[h] = {k: m[k] for k in METRIC_KEYS}
    return report


def _recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float | None:
    denom = ce_ablated - ce_clean
    return _num((ce_ablated - ce_sae) / denom) if denom != 0 else None


# ----------------------------------------------------------------------------------------------------------
# A training run, on held-out tokens


def training_dead_pct(run_dir: str | Path) -> dict[str, float]:
    """{hookpoint: % dead} from the newest trainer states of a run folder that every writing rank completed
    (--distribute_layers: each rank holds its own layers); {} if none.

    Dead means what it meant in training: tokens_since_fired >= the run's dead threshold.
    """
    dead: dict[str, float] = {}
    try:
        for state in checkpoint.newest_complete_states(Path(run_dir)):
            # The threshold the run used (capped for short runs); states before the cap hold only the config.
            threshold = state.get("dead_threshold") or json.loads(state["config"])["dead_feature_threshold"]
            for h, counters in state["tokens_since_fired"].items():
                dead[h] = 100.0 * (counters >= threshold).double().mean().item()
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        warnings.warn(f"training dead-latent counters unavailable: {e}", stacklevel=2)
        return {}
    return dead


class RunInputs(NamedTuple):
    """What an evaluation of a run reads: the LM, its tokenizer, the SAEs and the held-out tokens."""

    model: nn.Module
    tokenizer: Any
    saes: dict[str, Sae]
    data: Any  # the held-out sequences (a tokenized Dataset slice)
    settings: dict[str, Any]  # model name and which tokens were held out (heldout.py)
    exclude_tokens: list[int]  # special tokens left out ([] with include_special_tokens)
    run_dir: Path | None  # the local run folder, None for a Hub repo


def load_run_inputs(
    model_name_or_path: str | None,
    sae_path_or_repo: str,
    dataset: str | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    ctx_len: int | None = None,
    split: str | None = None,
    offset: int | None = None,
    include_special_tokens: bool = False,
    hookpoints: str | Sequence[str] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    text_column: str | None = None,
    token: str | None = None,
) -> RunInputs:
    """Load a model (None: the run's, else the embedded one), its SAEs (a run folder, a folder of hookpoint
    folders, or a Hub repo; `hookpoints` is a glob or a list of them) and held-out data, as `evaluate_run`
    evaluates them (the latent dashboards read the same tokens).

    Held-out tokens: by default the sequences after those the run trained on (heldout.py says how);
    `offset` (the first sequence) or another `split` overrides that. settings["held_out"] records the choice.
    """
    from transformers import AutoTokenizer  # heavy: only a run evaluation needs it

    if max_tokens <= 0:
        raise EvalError(f"max_tokens must be positive, got {max_tokens}")
    if offset is not None and offset < 0:
        raise EvalError(f"offset must be >= 0 (a sequence index), got {offset}")
    if ctx_len is not None and ctx_len < 2:
        raise EvalError(f"ctx_len must be at least 2, got {ctx_len}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    patterns = [hookpoints] if hookpoints is None or isinstance(hookpoints, str) else list(hookpoints)
    saes: dict[str, Sae] = {}
    for pattern in patterns:
        saes.update(Sae.load_many_from_hub(sae_path_or_repo, pattern, device=device, token=token))
    if len(patterns) > 1:  # several globs: natural order, as one glob loads them
        saes = dict(sorted(saes.items(), key=lambda item: natural_key(item[0])))
    local = Path(sae_path_or_repo).expanduser()
    run = read_run_json(local / "run.json") if local.is_dir() else {}

    model_name = model_name_or_path or run.get("model") or EMBEDDED_MODEL_NAME
    model_path = str(embedded_model_path()) if is_embedded_model(model_name) else model_name
    model = load_model(model_path, dtype=dtype, device=device, token=token)
    check_saes(model, saes)  # before tokenizing: a wrong model should fail in seconds
    tokenizer = AutoTokenizer.from_pretrained(model_path, token=token)

    data, settings = held_out_sequences(
        run,
        tokenizer,
        dataset,
        split=split,
        offset=offset,
        ctx_len=ctx_len,
        text_column=text_column,
        max_tokens=max_tokens,
        model_max=max_context(model),
        token=token,
    )
    exclude = [] if include_special_tokens else special_token_ids(tokenizer)
    return RunInputs(
        model,
        tokenizer,
        saes,
        data,
        {"model": model_name, **settings},
        exclude,
        local if local.is_dir() else None,
    )


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
    """Load a model, its SAEs and held-out data (`load_run_inputs`); evaluate; write report.json,
    report.md and the plots into `out_dir` when it is given. settings["held_out"] records which tokens.
    """
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
        text_column=text_column,
        token=token,
    )
    dead_train = training_dead_pct(inputs.run_dir) if inputs.run_dir is not None else {}
    report = evaluate(
        inputs.model,
        inputs.saes,
        inputs.data,
        exclude_tokens=inputs.exclude_tokens,
        batch_size=batch_size,
        splice=splice,
        dead_pct_train=dead_train,
        progress=progress,
    )
    report.settings = {
        **inputs.settings,
        **report.settings,
        "include_special_tokens": include_special_tokens,
        "sae_path": str(sae_path_or_repo),
    }
    if out_dir is not None:
        report.save(out_dir)
    return report


# ----------------------------------------------------------------------------------------------------------
# Command line


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


# The flags that choose the LM, the SAEs and the held-out tokens; `python -m sae_core.dashboard` shares them.
HELD_OUT_FLAGS = (
    "max_tokens",
    "ctx_len",
    "split",
    "offset",
    "include_special_tokens",
    "batch_size",
    "device",
    "dtype",
)


def add_held_out_arguments(p: argparse.ArgumentParser, sae_metavar: str = "sae_path_or_repo") -> None:
    """MODEL SAE [DATASET] and the HELD_OUT_FLAGS, as `load_run_inputs` takes them."""
    p.add_argument(
        "model", help="Hub id or local folder of the LM; 'smollm2-135m' or 'embedded' for the embedded one"
    )
    p.add_argument("sae", metavar=sae_metavar, help="run folder, folder of hookpoint folders, or Hub repo")
    p.add_argument(
        "dataset",
        nargs="?",
        default=None,
        help="dataset (default: the run's training dataset, else the embedded corpus)",
    )
    p.add_argument(
        "--max_tokens", type=int, default=DEFAULT_MAX_TOKENS, help="held-out tokens (default: %(default)s)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    p.add_argument("--ctx_len", type=int, default=None, help="tokens per sequence (default: the run's)")
    p.add_argument("--split", default=None, help="dataset split (default: the run's)")
    p.add_argument(
        "--offset",
        type=int,
        default=None,
        help="first sequence to read (default: right after the training sequences)",
    )
    p.add_argument(
        "--include_special_tokens",
        action="store_true",
        help="count BOS and pad tokens too (default: excluded; pad only when it is not EOS)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype", default="float32", help="LM dtype: float32, bfloat16, float16 (default: %(default)s)"
    )


def held_out_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed HELD_OUT_FLAGS as keyword arguments of `evaluate_run` / `build_dashboards`."""
    return {name: getattr(args, name) for name in HELD_OUT_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m sae_core.evaluate",
        allow_abbrev=False,
        description="Evaluate SAEs on held-out tokens: FVU, L0, dead latents, and the LM's cross-entropy "
        "and KL with each SAE spliced in. Writes report.json, report.md and PNG plots.",
    )
    add_held_out_arguments(p)
    p.add_argument(
        "--out", default=None, help="output folder (default: SAE_PATH/eval; ./eval for a Hub repo)"
    )
    p.add_argument("--hookpoints", default=None, help="glob of the hookpoints to evaluate, e.g. 'layers.1*'")
    p.add_argument(
        "--splice",
        choices=("auto", "suffix", "full"),
        default="auto",
        help="spliced variants run from the block on (suffix; auto = when verified) or in full",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    from .sweep import sweep_variants

    args = build_parser().parse_args(argv)
    local = Path(args.sae).expanduser()
    # A sweep's folder (python -m sae_core --sweep ...): every variant, each into its own eval folder.
    variants = sweep_variants(local)
    targets = [(str(v), Path(args.out) / v.name if args.out else v / "eval") for v in variants] or [
        (args.sae, Path(args.out) if args.out else (local / "eval" if local.is_dir() else Path("eval")))
    ]
    for sae, out in targets:
        with exit_on_bad_input():
            report = evaluate_run(
                args.model,
                sae,
                args.dataset,
                out_dir=out,
                hookpoints=args.hookpoints,
                splice=args.splice,
                **held_out_kwargs(args),
                progress=True,
            )
        if variants:
            print(f"## {Path(sae).name}")
        print(report.to_markdown())
        print(f"wrote {out / 'report.json'}, report.md and {', '.join(PLOT_FILES)}")


if __name__ == "__main__":
    main()
