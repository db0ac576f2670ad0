"""What each torchrun rank runs: `python -m sae_pipeline.rank_entry <python -m sae_core arguments>`.

It is `python -m sae_core` plus three things the pipeline needs, so that sae_core never imports Dagster:

- the rank asks the kernel for SIGTERM when its parent (torchrun) dies, first thing (sae_core.distributed's
  die_with_parent), and exits if torchrun is already gone;
- global rank 0, and only it, opens the Dagster Pipes session that every rank inherited in its environment: it
  passes a logger into sae_core.run.run that streams training progress into the run's log and, at the end,
  reports the materialization with the run's metrics;
- a rank that fails writes its traceback to $SAE_PIPELINE_RANK_ERRORS/rank<R>.txt, which the step failure
  quotes.

This module imports only the standard library and dagster_pipes at the top: it runs once per rank.
"""

import contextlib
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The same name as in sae_pipeline.torchrun, which is not imported here because it needs dagster.
RANK_ERRORS_ENV = "SAE_PIPELINE_RANK_ERRORS"
PROGRESS_INTERVAL_S = 2.0
_TRACEBACK_LINES = 30


def main(
    argv: list[str] | None = None, train_fn: Callable[[list[str], Any | None], None] | None = None
) -> None:
    """Run `train_fn(argv, pipes)` as a rank: `train` below by default (tests pass a cheap stand-in)."""
    train_fn = train_fn or train
    # Imported here, not at the top: it loads torch, and the module docstring promises a light import.
    from sae_core.parent_death import die_with_parent

    # SIGTERM this rank when torchrun dies, even when torchrun is SIGKILLed. Had it died already (during the
    # imports), this rank would now be a child of init.
    if not die_with_parent():
        sys.exit("torchrun exited before this rank started")
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if rank == 0 and PipesEnvVarParamsLoader().is_dagster_pipes_process():
            with open_dagster_pipes() as pipes:
                train_fn(argv, pipes)
        else:
            train_fn(argv, None)
    except BaseException as error:
        if not (isinstance(error, SystemExit) and error.code in (0, None)):
            _record_failure(rank, error)
        raise


def train(argv: list[str], pipes: Any | None) -> None:
    """Train as `python -m sae_core argv` would; with `pipes`, report progress and the result to Dagster."""
    # Imported here, not at the top: sae_core.run loads transformers and datasets.
    from sae_core.run import parse_run_config, run

    cfg = _parse(argv, parse_run_config)
    run_dir = Path(cfg.save_dir) / (cfg.run_name or "run")
    progress = PipesProgress(pipes) if pipes is not None else None
    try:
        final = run(cfg, loggers=[progress] if progress is not None else [])
    finally:
        if progress is not None:
            progress.flush()
    if pipes is not None:
        from sae_core.sweep import sweep_variants  # sae_core is loaded by now: no cost

        variants = sweep_variants(run_dir)
        metadata = sweep_metadata(run_dir, variants, final) if variants else run_metadata(run_dir, final)
        pipes.report_asset_materialization(metadata=metadata)


def _parse(argv: list[str], parse_run_config: Any) -> Any:
    """parse_run_config, but a usage error becomes an exception that carries argparse's message."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_run_config(argv)
    except SystemExit:
        raise ValueError(f"invalid training arguments: {captured.getvalue().strip()}") from None


def run_metadata(run_dir: Path, final: dict[str, float] | None = None) -> dict[str, Any]:
    """Materialization metadata of a finished run: from run.json and the final metrics."""
    info = json.loads((run_dir / "run.json").read_text())
    final = dict(final or {}) or _last_metrics(run_dir / "metrics.jsonl")
    hookpoints = list(info.get("hookpoints", []))
    fvu = {h: final.get(f"fvu/{h}") for h in hookpoints}
    dead = {h: final.get(f"dead_pct/{h}") for h in hookpoints}
    rows = ["| hookpoint | FVU | dead % |", "|---|---|---|"]
    rows += [f"| `{h}` | {_fmt(fvu[h])} | {_fmt(dead[h])} |" for h in hookpoints]
    metadata: dict[str, Any] = {
        "path": {"type": "path", "raw_value": str(run_dir)},
        "tokens": int(info.get("tokens", 0)),
        "steps": int(info.get("steps", 0)),
        "wall_time_s": float(info.get("wall_time_s", 0.0)),
        "world_size": int(info.get("world_size", 1)),
        "hookpoints": {"type": "json", "raw_value": hookpoints},
        "final_metrics": {"type": "md", "raw_value": "\n".join(rows)},
    }
    known_fvu = [v for v in fvu.values() if v is not None]
    known_dead = [v for v in dead.values() if v is not None]
    if known_fvu:
        metadata["fvu_mean"] = sum(known_fvu) / len(known_fvu)
        metadata["fvu_max"] = max(known_fvu)
    if known_dead:
        metadata["dead_pct_max"] = max(known_dead)
    # One number per layer as well, so the UI can plot each across materializations.
    for h in hookpoints:
        if fvu[h] is not None:
            metadata[f"fvu/{h}"] = float(fvu[h])
        if dead[h] is not None:
            metadata[f"dead_pct/{h}"] = float(dead[h])
    return metadata


def sweep_metadata(run_dir: Path, variants: list[Path], final: Any) -> dict[str, Any]:
    """Materialization metadata of a finished sweep: the shared numbers, and each variant's per hookpoint
    (`fvu/<variant>/<hookpoint>`), with the worst over all variants."""
    first = run_metadata(variants[0], (final or {}).get(variants[0].name))
    metadata = {k: first[k] for k in ("tokens", "steps", "wall_time_s", "world_size", "hookpoints")}
    metadata["path"] = {"type": "path", "raw_value": str(run_dir)}
    metadata["variants"] = {"type": "json", "raw_value": [v.name for v in variants]}
    rows = ["| variant | FVU mean | FVU max | dead % max |", "|---|---|---|---|"]
    fvu_max, dead_max = [], []
    for variant in variants:
        each = run_metadata(variant, (final or {}).get(variant.name))
        rows.append(
            f"| `{variant.name}` | {_fmt(each.get('fvu_mean'))} | {_fmt(each.get('fvu_max'))} "
            f"| {_fmt(each.get('dead_pct_max'))} |"
        )
        fvu_max += [each["fvu_max"]] if "fvu_max" in each else []
        dead_max += [each["dead_pct_max"]] if "dead_pct_max" in each else []
        for key, value in each.items():
            if key.startswith(("fvu/", "dead_pct/")):
                name, hookpoint = key.split("/", 1)
                metadata[f"{name}/{variant.name}/{hookpoint}"] = value
    metadata["final_metrics"] = {"type": "md", "raw_value": "\n".join(rows)}
    if fvu_max:
        metadata["fvu_max"] = max(fvu_max)
    if dead_max:
        metadata["dead_pct_max"] = max(dead_max)
    return metadata


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _last_metrics(path: Path) -> dict[str, float]:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, json.JSONDecodeError):
        return {}


class PipesProgress:
    """A training logger: the trainer's metrics records reach Dagster's log as progress lines, at most one
    every PROGRESS_INTERVAL_S (the newest record then), so a fast run does not flood the run's log."""

    def __init__(self, pipes: Any, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.pipes, self.interval_s = pipes, interval_s
        self._pending: dict[str, Any] | None = None
        self._last_logged = time.monotonic()

    def __call__(self, record: dict[str, Any]) -> None:
        self._pending = record
        if time.monotonic() - self._last_logged >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Log the newest record not logged yet, if any."""
        if self._pending is not None:
            self.pipes.log.info(progress_line(self._pending))
            self._pending = None
            self._last_logged = time.monotonic()


def progress_line(record: dict[str, Any]) -> str:
    fvu = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("fvu/")}
    dead = [v for k, v in record.items() if k.startswith("dead_pct/")]
    per_layer = ", ".join(f"{h} {v:.3f}" for h, v in fvu.items())
    mean = sum(fvu.values()) / len(fvu) if fvu else float("nan")
    return (
        f"step {record.get('step')}: {record.get('tokens', 0):,} tokens, "
        f"{record.get('tokens_per_s', 0):,.0f} tok/s, FVU mean {mean:.3f} ({per_layer}), "
        f"dead max {max(dead, default=0.0):.1f} %"
    )


def _record_failure(rank: int, error: BaseException) -> None:
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder:
        return
    lines = "".join(traceback.format_exception(error)).splitlines()
    text = "\n".join(lines[-_TRACEBACK_LINES:]) + "\n"
    with contextlib.suppress(OSError):
        Path(folder, f"rank{rank}.txt").write_text(text)


if __name__ == "__main__":
    main()
