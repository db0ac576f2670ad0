"""The quality bars of `sae_evaluation`: blocking asset checks, so SAEs that fail one are never published.

Each check compares the worst hookpoint of the evaluation report with a threshold from the model's registry
entry (`thresholds:`). They are declared on the evaluation asset itself (check specs), because the numbers
come out of the evaluation: a failed check fails the evaluation step, and Dagster then skips `published_saes`
in that run. `published_saes` re-applies the same bars to the report before publishing, which also covers a
later run that selects the publish step alone.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from .partitions import model_stride_partitions
from .registry import Thresholds

EVALUATION_ASSET = dg.AssetKey("sae_evaluation")


@dataclass(frozen=True)
class QualityCheck:
    name: str
    metric: str  # key of report.json's per-hookpoint metrics
    threshold: str  # field of registry.Thresholds
    label: str


QUALITY_CHECKS = (
    QualityCheck("fvu_below_threshold", "fvu", "max_fvu", "FVU"),
    # Latents that never fired on the evaluation tokens. The trainer's own count only calls a latent dead
    # after dead_feature_threshold (10M by default) silent tokens, which a short run never reaches.
    QualityCheck("dead_pct_below_threshold", "dead_pct_eval", "max_dead_pct", "dead latents (%)"),
    QualityCheck("delta_ce_below_threshold", "delta_ce", "max_delta_ce", "ΔCE (nats)"),
    QualityCheck("kl_below_threshold", "kl", "max_kl", "KL (nats)"),
)


def quality_check_specs(asset: dg.AssetKey = EVALUATION_ASSET) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            check.name,
            asset=asset,
            blocking=True,
            # Per partition: each model x stride has its own result, as the UI's check page shows.
            partitions_def=model_stride_partitions,
            description=f"The worst hookpoint's {check.label} is at most the registry's "
            f"thresholds.{check.threshold}.",
        )
        for check in QUALITY_CHECKS
    ]


def quality_check_results(report: Mapping[str, Any], thresholds: Thresholds) -> list[dg.AssetCheckResult]:
    """One result per check for an evaluation report ({"hookpoints": {name: {metric: value}}})."""
    hookpoints: Mapping[str, Mapping[str, Any]] = report.get("hookpoints") or {}
    results = []
    for check in QUALITY_CHECKS:
        limit = getattr(thresholds, check.threshold)
        values = {h: m.get(check.metric) for h, m in hookpoints.items()}
        missing = sorted(h for h, v in values.items() if v is None)
        known = {h: float(v) for h, v in values.items() if v is not None}
        metadata: dict[str, Any] = {
            "threshold": limit if limit is not None else "none",
            "per_hookpoint": known,
        }
        if limit is None:
            passed, why = True, "no threshold set in the registry"
        elif not hookpoints or missing:
            passed, why = False, f"the report has no {check.metric} for {missing or 'any hookpoint'}"
        else:
            worst = max(known, key=known.__getitem__)
            metadata.update(worst_hookpoint=worst, worst_value=known[worst])
            passed = known[worst] <= limit
            why = f"{check.label} of {worst} is {known[worst]:.4g} ({'<=' if passed else '>'} {limit:g})"
        results.append(
            dg.AssetCheckResult(
                check_name=check.name,
                asset_key=EVALUATION_ASSET,
                passed=passed,
                description=why,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata=metadata,
            )
        )
    return results


def failed_checks(results: list[dg.AssetCheckResult]) -> list[str]:
    return [f"{r.check_name}: {r.description}" for r in results if not r.passed]
