"""SAE quality per token: train on the embedded SmolLM2-135M at fixed token budgets and score held-out data.

    python benchmarks/quality.py [--budgets 60000 400000] [--layers 6 18] [--label NAME] [-- extra CLI flags]

For each budget a fresh run trains SAEs on the given layers (ctx 256, batch 8, expansion 8, k 32, seeded, the
library's default recipe unless extra flags after `--` change it: e.g. `-- --lr 6e-3 --auxk_alpha 0`), then
`evaluate_run` scores every SAE on the 64 chunks of 256 tokens that follow the training tokens: FVU, dead %
(never fired on those tokens), ΔCE and KL with the SAE spliced in. Writes a PNG of held-out FVU against
training tokens (plus the training FVU curves) and appends one row per budget to benchmarks/RESULTS.md.
`--fvu_only` scores FVU and dead % alone on the same chunks (no spliced forwards), for quick sweeps.

The embedded corpus makes 1,777 chunks of 256 tokens (`len(prepare_dataset(None, tokenizer,
ctx_len=256).sequences)`, 2026-11-30), so the largest budget that leaves 64 held-out chunks is 438,528 tokens:
the default long budget is 400k.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, child_env  # noqa: E402

CTX_LEN = 256
HELD_OUT_CHUNKS = 64
EMBEDDED_CHUNKS = 1777  # chunks of CTX_LEN tokens in the embedded corpus (measured; see the docstring)


def train(budget: int, args: argparse.Namespace, save_dir: Path) -> tuple[Path, float]:
    """One training run through the CLI; returns its folder and wall time."""
    cmd = [
        sys.executable,
        "-m",
        "sae_core",
        "smollm2-135m",
        "embedded",
        "--layers",
        *map(str, args.layers),
        "--expansion_factor",
        str(args.expansion),
        "--k",
        str(args.k),
        "--ctx_len",
        str(CTX_LEN),
        "--batch_size",
        str(args.batch_size),
        "--max_tokens",
        str(budget),
        "--seed",
        str(args.seed),
        "--save_dir",
        str(save_dir),
        "--run_name",
        f"tokens{budget}",
        "--save_every",
        "1000000",
        "--log_every",
        "1",
        *args.extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return save_dir / f"tokens{budget}", time.perf_counter() - t0


def score(run_dir: Path) -> dict[str, dict[str, float]]:
    """Held-out metrics per hookpoint: the 64 chunks right after the training tokens."""
    from sae_core.evaluate import evaluate_run

    report = evaluate_run(None, str(run_dir), max_tokens=HELD_OUT_CHUNKS * CTX_LEN, ctx_len=CTX_LEN)
    return {
        h: {"fvu": m["fvu"], "dead_pct": m["dead_pct_eval"], "delta_ce": m["delta_ce"], "kl": m["kl"]}
        for h, m in report.hookpoints.items()
    }


def score_fvu_only(run_dir: Path) -> dict[str, dict[str, float]]:
    """Held-out FVU and dead % only, on the chunks `score` uses (heldout.py picks them for both), without the
    spliced forwards: a sweep's quick pass. ΔCE and KL are left out (NaN)."""
    from transformers import AutoTokenizer

    from sae_core import Sae
    from sae_core.data import sequence_rows
    from sae_core.embedded import embedded_model_path
    from sae_core.heldout import held_out_sequences, read_run_json
    from sae_core.models import (
        capture_residuals,
        load_model,
        max_context,
        run_until_captured,
        special_token_ids,
    )

    model = load_model(str(embedded_model_path()))
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    data, _ = held_out_sequences(
        read_run_json(run_dir / "run.json"),
        tokenizer,
        None,
        split=None,
        offset=None,
        ctx_len=CTX_LEN,
        text_column=None,
        max_tokens=HELD_OUT_CHUNKS * CTX_LEN,
        model_max=max_context(model),
        token=None,
    )
    ids = sequence_rows(data, 0, len(data))
    excluded = torch.tensor(special_token_ids(tokenizer))
    saes = Sae.load_many_from_disk(str(run_dir))
    inputs: dict[str, list] = {h: [] for h in saes}
    with torch.no_grad(), capture_residuals(model, sorted(saes)) as acts:
        for start in range(0, len(ids), 8):
            batch = ids[start : start + 8]
            run_until_captured(model, batch)
            keep = ~torch.isin(batch, excluded)
            for h in saes:
                inputs[h].append(acts[h][keep].float())
    metrics = {}
    for h, sae in saes.items():
        x = torch.cat(inputs[h])
        with torch.no_grad():
            enc = sae.encode(x)
            x_hat = sae.decode(enc.acts, enc.indices)
        fired = torch.zeros(sae.num_latents, dtype=torch.bool)
        fired[enc.indices[enc.acts > 0]] = True
        fvu = (x - x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum()
        nan = float("nan")
        metrics[h] = {"fvu": fvu.item(), "dead_pct": 100 * (1 - fired.double().mean().item())}
        metrics[h].update(delta_ce=nan, kl=nan)
    return metrics


def training_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith("fvu/"):
                xs, ys = curves.setdefault(key[4:], ([], []))
                xs.append(record["tokens"])
                ys.append(value)
    return curves


def plot(results: dict[int, dict], curves: dict[str, tuple[list[int], list[float]]], path: Path, label: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (hookpoint, (xs, ys)) in enumerate(sorted(curves.items())):
        color = f"C{i}"
        ax.plot(xs, ys, color=color, alpha=0.4, label=f"{hookpoint} training (longest run)")
        budgets = sorted(results)
        ax.plot(
            budgets,
            [results[b]["metrics"][hookpoint]["fvu"] for b in budgets],
            "o-",
            color=color,
            label=f"{hookpoint} held-out",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("FVU")
    ax.set_title(f"SAE quality per token: {label}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument(
        "--budgets", type=int, nargs="+", default=[60_000, 400_000], help="training tokens per run"
    )
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 18])
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="defaults", help="name of the recipe in the row and the plot")
    ap.add_argument(
        "--plot", type=Path, default=None, help="PNG path (default: benchmarks/quality_<label>.png)"
    )
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument(
        "--fvu_only", action="store_true", help="score FVU and dead %% only (no spliced CE/KL): quick sweeps"
    )
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: further training flags, as they are")
    args = ap.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    max_budget = (EMBEDDED_CHUNKS - HELD_OUT_CHUNKS) * CTX_LEN
    if max(args.budgets) > max_budget:
        ap.error(
            f"the embedded corpus leaves {HELD_OUT_CHUNKS} held-out chunks only up to {max_budget:,} "
            f"training tokens; got --budgets {max(args.budgets):,}"
        )

    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in sorted(args.budgets):
            run_dir, seconds = train(budget, args, Path(tmp))
            run = json.loads((run_dir / "run.json").read_text())
            metrics = score_fvu_only(run_dir) if args.fvu_only else score(run_dir)
            results[budget] = {"metrics": metrics, "seconds": seconds, "tokens": run["tokens"]}
            curves = training_curves(run_dir)
            for hookpoint, m in results[budget]["metrics"].items():
                print(
                    f"{budget:>8,} tokens  {hookpoint:<10} FVU {m['fvu']:.3f}  dead {m['dead_pct']:.2f}%  "
                    f"dCE {m['delta_ce']:.3f}  KL {m['kl']:.3f}  ({seconds:.0f} s)",
                    flush=True,
                )
    path = args.plot or ROOT / "benchmarks" / f"quality_{args.label}.png"
    plot(results, curves, path, args.label)
    print(f"plot: {path}")
    if not args.no_record:
        recipe = " ".join(args.extra) or "library defaults"
        for _, r in sorted(results.items()):
            per_layer = "; ".join(
                f"{h}: FVU {m['fvu']:.3f}, dead {m['dead_pct']:.2f}%, "
                f"dCE {m['delta_ce']:.3f}, KL {m['kl']:.3f}"
                for h, m in r["metrics"].items()
            )
            append_row(
                "quality",
                f"{args.label} ({recipe}): {r['tokens']:,} tokens -> {per_layer} "
                f"[expansion {args.expansion}, k {args.k}, batch {args.batch_size}x{CTX_LEN}, seed "
                f"{args.seed}, {HELD_OUT_CHUNKS} held-out chunks{', FVU only' if args.fvu_only else ''}; "
                f"{r['seconds']:.0f} s]",
            )


if __name__ == "__main__":
    main()
