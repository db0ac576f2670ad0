"""EvalReport: what an evaluation measured, as report.json, report.md and plots.

Every metric is defined in docs/metrics.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plots import plot_report
from .utils import atomic_write_bytes, atomic_write_json

# Per-hookpoint keys of report.json, in order. The Hub model card and the pipeline read them by name.
METRIC_KEYS = (
    "fvu",
    "mse",
    "cosine",
    "rel_bias",
    "l0",
    "dead_pct_eval",
    "dead_pct_train",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_mean",
    "delta_ce",
    "loss_recovered_zero",
    "loss_recovered_mean",
    "kl",
    "kl_zero",
    "kl_mean",
    "density_hist",
)
PLOT_FILES = ("fvu_l0_dead.png", "kl_dce.png", "density.png")


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
            ("FVU", "fvu"),
            ("L0", "l0"),
            ("dead % (eval)", "dead_pct_eval"),
            ("dead % (train)", "dead_pct_train"),
            ("ΔCE", "delta_ce"),
            ("KL", "kl"),
            ("loss recovered (zero)", "loss_recovered_zero"),
            ("loss recovered (mean)", "loss_recovered_mean"),
        ]
        lines = [intro, "", "| hookpoint | " + " | ".join(t for t, _ in columns) + " |"]
        lines.append("|" + "---|" * (len(columns) + 1))
        for h, m in self.hookpoints.items():
            lines.append(f"| `{h}` | " + " | ".join(_fmt(m.get(k)) for _, k in columns) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write report.json, report.md and the three PNG plots into `out_dir`; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "report.json", self.to_dict())
        atomic_write_bytes(out / "report.md", self.to_markdown().encode())
        return [out / "report.json", out / "report.md", *plot_report(self.to_dict(), out)]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
