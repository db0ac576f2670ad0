"""sae_evaluation: sae_core's evaluation report for one model x stride, judged by blocking quality checks.

The evaluation runs in ranks of the `launcher` resource (sae_pipeline.eval_entry), never in the step process:
rank 0 sends the report back through Pipes, and the step turns it into metadata and check results.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sae_core.sweep import sweep_variants

from ..checks import quality_check_results, quality_check_specs
from ..eval_entry import REPORT_MESSAGE_KEYS
from ..launcher import PipesLauncher
from ..partitions import ModelStride, model_stride_partitions
from ..registry import ModelEntry
from ..resources import GPU_POOL, ArtefactStore, ModelRegistry
from ..versions import EVALUATION_CODE_VERSION
from .common import fail_step_on_bad_input, model_and_stride, staging_dir, swap_in, trained_run_dir
from .training import sae_checkpoints

SUMMARY_METRICS = ("fvu", "l0", "dead_pct_eval", "delta_ce", "kl", "loss_recovered_zero")


class EvaluationConfig(dg.Config):
    """Per-run overrides of the registry's evaluation settings."""

    max_tokens: int | None = Field(default=None, gt=0, description="Evaluate on this many held-out tokens.")
    batch_size: int | None = Field(default=None, gt=0, description="Sequences per forward pass.")


@dg.asset(
    partitions_def=model_stride_partitions,
    deps=[sae_checkpoints],
    check_specs=quality_check_specs(),
    group_name="sae",
    code_version=EVALUATION_CODE_VERSION,
    automation_condition=dg.AutomationCondition.on_missing(),  # after a new model's training
    kinds={"pytorch"},
    pool=GPU_POOL,  # the launched evaluation rank uses the GPU while the step waits for it
    description="FVU, L0, dead latents, ΔCE and KL with each SAE spliced into the model, on held-out tokens "
    "(python -m sae_core.evaluate, in ranks of the launcher); <root>/evaluations/<model>/stride-<s>/"
    "report.{json,md} and plots.",
)
def sae_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    registry: ModelRegistry,
    artefacts: ArtefactStore,
    launcher: PipesLauncher,
) -> dg.MaterializeResult:
    key, entry = model_and_stride(context, registry)
    run_dir = trained_run_dir(artefacts, key)
    with fail_step_on_bad_input("launcher resource", also=(ValueError,)):
        launcher.check()
    target = artefacts.eval_dir(key.model, key.stride)
    staging = staging_dir(target)
    variants = sweep_variants(run_dir)
    try:
        # `python -m sae_core.evaluate` on `eval_nproc` ranks of the launcher, on whatever devices they have:
        # the step itself never loads the model. Bad input fails the launch (not retried), quoting the error.
        if variants:  # a sweep: every variant, each into <eval>/<variant>/, and their union at the top
            parts = {
                v.name: _evaluate(context, launcher, entry, config, key, v, staging / v.name)
                for v in variants
            }
            report, markdown = _sweep_report(parts)
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (staging / "report.md").write_text(markdown + "\n")
        else:
            report, markdown = _evaluate(context, launcher, entry, config, key, run_dir, staging)
        swap_in(staging, target)  # publishing never sees half a report
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    context.log.info("evaluation:\n" + markdown)
    return dg.MaterializeResult(
        metadata=evaluation_metadata(report, target, markdown),
        check_results=quality_check_results(report, entry.thresholds),
    )


def _evaluate(
    context: dg.AssetExecutionContext,
    launcher: PipesLauncher,
    entry: ModelEntry,
    config: EvaluationConfig,
    key: ModelStride,
    run_dir: Path,
    out: Path,
) -> tuple[dict[str, Any], str]:
    """One run folder evaluated in launched ranks into `out`: report.json's content and report.md's."""
    invocation = launcher.run(
        context=context,
        module=launcher.eval_entry_module,
        args=[
            entry.model,
            str(run_dir),
            "--max_tokens",
            str(config.max_tokens or entry.eval.max_tokens),
            "--batch_size",
            str(config.batch_size or entry.eval.batch_size),
            "--out",
            str(out),
        ],
        nproc=launcher.eval_nproc,
        what="evaluation",
        extras={"model": key.model, "stride": key.stride},
    )
    return _reported(invocation)


def _sweep_report(parts: dict[str, tuple[dict[str, Any], str]]) -> tuple[dict[str, Any], str]:
    """The variants' reports as one: a hookpoint per variant and hookpoint (`<variant>/<hookpoint>`), so the
    quality checks judge the worst SAE of every variant and name it."""
    first = next(iter(parts.values()))[0]
    report = {
        "settings": {**first.get("settings", {}), "variants": list(parts)},
        "hookpoints": {
            f"{v}/{h}": m for v, (r, _) in parts.items() for h, m in r.get("hookpoints", {}).items()
        },
    }
    markdown = "\n\n".join(f"## {v}\n\n{md}" for v, (_, md) in parts.items())
    return report, markdown


def _reported(invocation: dg.PipesClientCompletedInvocation) -> tuple[dict[str, Any], str]:
    """The report rank 0 sent (sae_pipeline.eval_entry): report.json's content and report.md's."""
    for message in reversed(invocation.get_custom_messages()):
        if isinstance(message, dict) and all(k in message for k in REPORT_MESSAGE_KEYS):
            return message["report"], message["markdown"]
    raise dg.Failure(
        description="evaluation finished but rank 0 reported no evaluation report (see the step's stderr)",
        allow_retries=False,
    )


def evaluation_metadata(report: dict[str, Any], folder: Path, table: str) -> dict[str, Any]:
    hookpoints: dict[str, dict[str, Any]] = report.get("hookpoints", {})
    settings = report.get("settings", {})
    metadata: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(folder)),
        "tokens": int(settings.get("tokens", 0)),
        "held_out": str(settings.get("held_out", "")),
        "report": dg.MetadataValue.md(table),
        "metrics": metrics_table(hookpoints),
    }
    for metric in SUMMARY_METRICS:
        values = [m[metric] for m in hookpoints.values() if m.get(metric) is not None]
        if values:
            worst = min(values) if metric == "loss_recovered_zero" else max(values)
            metadata[f"{metric}_worst"] = float(worst)
    # The plots stay files in the evaluation folder: their paths go into the event log, not the images (a few
    # hundred kB of base64 per materialization would bloat every query of the asset's history).
    for plot in sorted([*folder.glob("*.png"), *folder.glob("*/*.png")]):  # a sweep: <variant>/*.png
        name = plot.stem if plot.parent == folder else f"{plot.parent.name}/{plot.stem}"
        metadata[f"plot/{name}"] = dg.MetadataValue.path(str(plot))
    return metadata


def metrics_table(hookpoints: dict[str, dict[str, Any]]) -> dg.TableMetadataValue:
    """One row per hookpoint with the summary metrics: the UI shows it as a sortable table."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("hookpoint", "string"),
            *(dg.TableColumn(metric, "float") for metric in SUMMARY_METRICS),
        ]
    )
    rows = []
    for name, metrics in hookpoints.items():
        values = {m: None if metrics.get(m) is None else float(metrics[m]) for m in SUMMARY_METRICS}
        rows.append(dg.TableRecord({"hookpoint": name, **values}))
    return dg.MetadataValue.table(rows, schema)
