"""PNG plots of an evaluation report (the dict of `EvalReport.to_dict()`, or a report.json read back).

    fvu_l0_dead.png   FVU, L0 and dead % (eval and training) per hookpoint
    kl_dce.png        KL(clean ‖ spliced) and ΔCE per hookpoint
    density.png       log10 latent firing-frequency histograms, one line per hookpoint

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot: no global backend is
switched, no window opens, and nothing is left in pyplot's figure registry (safe in servers and test runs).
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .utils import natural_key


def plot_report(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw the three plots of `report` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = report.get("hookpoints") or {}
    names = sorted(metrics, key=natural_key)
    return [
        plot_fvu_l0_dead(metrics, names, out / "fvu_l0_dead.png"),
        plot_kl_dce(metrics, names, out / "kl_dce.png"),
        plot_density(metrics, names, out / "density.png"),
    ]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _values(metrics: Mapping[str, Mapping[str, Any]], names: Sequence[str], key: str) -> list[float]:
    # null (undefined or unavailable) becomes NaN: matplotlib leaves a gap there.
    return [math.nan if metrics[h].get(key) is None else float(metrics[h][key]) for h in names]


def _per_hookpoint(ax, names: Sequence[str], series: Sequence[tuple[str, list[float]]], title: str) -> None:
    x = range(len(names))
    for label, values in series:
        ax.plot(x, values, marker="o", label=label)
    ax.set_title(title)
    crowded = len(names) > 6  # long runs of names: slant them so they do not overlap
    ax.set_xticks(list(x), names, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()


def plot_fvu_l0_dead(metrics: Mapping[str, Mapping[str, Any]], names: Sequence[str], path: Path) -> Path:
    fig = _figure(12, 3.6)
    ax_fvu, ax_l0, ax_dead = fig.subplots(1, 3)
    _per_hookpoint(ax_fvu, names, [("FVU", _values(metrics, names, "fvu"))], "FVU (lower is better)")
    _per_hookpoint(ax_l0, names, [("L0", _values(metrics, names, "l0"))], "L0 (active latents per token)")
    dead = [("eval tokens", _values(metrics, names, "dead_pct_eval"))]
    train = _values(metrics, names, "dead_pct_train")
    if not all(math.isnan(v) for v in train):
        dead.append(("training counters", train))
    _per_hookpoint(ax_dead, names, dead, "dead latents (%)")
    fig.savefig(path, dpi=100)
    return path


def plot_kl_dce(metrics: Mapping[str, Mapping[str, Any]], names: Sequence[str], path: Path) -> Path:
    fig = _figure(9, 3.6)
    ax_kl, ax_dce = fig.subplots(1, 2)
    kl, dce = _values(metrics, names, "kl"), _values(metrics, names, "delta_ce")
    _per_hookpoint(ax_kl, names, [("KL", kl)], "KL(clean ‖ spliced), nats per token")
    _per_hookpoint(ax_dce, names, [("ΔCE", dce)], "ΔCE = CE spliced − CE clean (nats)")
    fig.savefig(path, dpi=100)
    return path


def plot_density(metrics: Mapping[str, Mapping[str, Any]], names: Sequence[str], path: Path) -> Path:
    fig = _figure(7, 4)
    ax = fig.subplots()
    for h in names:
        hist = metrics[h].get("density_hist")
        if not hist:
            continue
        label = f"{h} ({hist.get('never_fired', 0)} never fired)"
        ax.stairs(hist["counts"], hist["bin_edges"], label=label)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title("latent density on the eval tokens")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path
