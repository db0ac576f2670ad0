"""published_saes: the trained SAEs with their evaluation and a model card, on the Hub or in a local
folder."""

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sae_core.sweep import sweep_variants

from ..checks import failed_checks, quality_check_results
from ..partitions import ModelStride, model_stride_partitions
from ..resources import ArtefactStore, HubPublisher, ModelRegistry
from ..retries import PUBLISHING_RETRY_POLICY
from ..versions import PUBLISHING_CODE_VERSION
from .common import fail_step_on_bad_input, model_and_stride
from .evaluation import sae_evaluation


class PublishConfig(dg.Config):
    """Per-run overrides of where to publish."""

    repo_id: str | None = Field(
        default=None, description="Hub repo for this run (overrides the hub resource's repo_template)."
    )


@dg.asset(
    partitions_def=model_stride_partitions,
    deps=[sae_evaluation],
    group_name="sae",
    code_version=PUBLISHING_CODE_VERSION,
    automation_condition=dg.AutomationCondition.on_missing(),  # after a new model's training
    kinds={"huggingface"},
    retry_policy=PUBLISHING_RETRY_POLICY,
    description="The SAEs, their evaluation report and plots, and a model card: one Hub commit when the hub "
    "resource has a repo template, else <root>/published/<model>/stride-<s>/. Skipped when a quality check "
    "failed.",
)
def published_saes(
    context: dg.AssetExecutionContext,
    config: PublishConfig,
    registry: ModelRegistry,
    artefacts: ArtefactStore,
    hub: HubPublisher,
) -> dg.MaterializeResult:
    from sae_core.hub import publish

    key, entry = model_and_stride(context, registry)
    run_dir = artefacts.run_dir(key.model, key.stride)
    eval_dir = artefacts.eval_dir(key.model, key.stride)
    try:
        report = json.loads((eval_dir / "report.json").read_text())
    except (OSError, ValueError):
        raise dg.Failure(
            description=f"no evaluation report in {eval_dir}: materialize sae_evaluation for this partition "
            "first",
            allow_retries=False,
        ) from None
    # The checks block this step in the run that evaluated; a run that selects publishing alone is held to the
    # same bars here, so SAEs below them are never published.
    failed = failed_checks(quality_check_results(report, entry.thresholds))
    if failed:
        reasons = "; ".join(failed)
        raise dg.Failure(
            description=f"refusing to publish, quality checks failed: {reasons}", allow_retries=False
        )

    # ValueError: the hub resource's repo_template, which no retry can fix.
    with fail_step_on_bad_input("hub resource", also=(ValueError,)):
        repo_id = config.repo_id or hub.repo_id(key.model, key.stride)
    # A sweep publishes every variant to a repo (or folder) of its own, `<repo>-<variant>`: one repo per SAE
    # configuration, as EleutherAI publishes them, so every loader finds the hookpoint folders at the root.
    variants = sweep_variants(run_dir)
    local = artefacts.publish_dir(key.model, key.stride)
    targets = [
        (v, f"{repo_id}-{v.name}" if repo_id else None, local / v.name, eval_dir / v.name) for v in variants
    ] or [(run_dir, repo_id, local, eval_dir)]
    # Each variant's card lists where every variant went.
    sweep = [{"variant": v.name, "location": repo or str(out)} for v, repo, out, _ in targets if variants]
    results = [
        _publish_one(publish, context, hub, key, sae_dir, repo, folder, evals, sweep)
        for sae_dir, repo, folder, evals in targets
    ]
    pruned = prune_previous_trainer_state(run_dir)
    if pruned is not None:
        context.log.info(f"removed {pruned}: the new run is published, the old run's optimizer state is done")
    if variants:
        metadata = _sweep_metadata(local, variants, results)
    else:
        metadata = _published_metadata(results[0])
    if pruned is not None:
        metadata["pruned"] = dg.MetadataValue.path(str(pruned))
    return dg.MaterializeResult(metadata=metadata)


def _published_metadata(result: Any) -> dict[str, object]:
    metadata: dict[str, object] = {
        "revision": result.revision,
        "url": dg.MetadataValue.url(result.url),
        "created_commit": result.created_commit,
    }
    if result.repo_id:
        metadata["repo"] = result.repo_id
    else:
        metadata["path"] = dg.MetadataValue.path(str(result.local_dir))
        metadata["card"] = dg.MetadataValue.path(str(result.local_dir / "README.md"))
    return metadata


def _sweep_metadata(local: Path, variants: list[Path], results: list[Any]) -> dict[str, object]:
    """A sweep's publication: one row per variant (repo or folder, revision, new commit or not)."""
    rows = [
        {
            "variant": v.name,
            "where": r.repo_id or str(r.local_dir),
            "url": r.url,
            "revision": r.revision,
            "created_commit": r.created_commit,
        }
        for v, r in zip(variants, results, strict=True)
    ]
    metadata: dict[str, object] = {
        "variants": dg.MetadataValue.json(rows),
        "created_commit": any(r.created_commit for r in results),
    }
    if not results[0].repo_id:
        metadata["path"] = dg.MetadataValue.path(str(local))
    return metadata


def _publish_one(
    publish: Any,
    context: dg.AssetExecutionContext,
    hub: HubPublisher,
    key: ModelStride,
    run_dir: Path,
    repo_id: str | None,
    local_dir: Path,
    eval_dir: Path,
    sweep: list[dict[str, str]],
) -> Any:
    """One run folder published (sae_core.hub.publish); a failure says whether a retry may help."""
    # sae_core.hub's messages are one line and never hold the token. Bad input (HubError, a ValueError such as
    # an invalid repo id) is not retried; an OSError that may pass (no connection, a 5xx, rate limiting) is,
    # under the step's retry policy: the upload is one commit, so a retry never publishes half a run.
    try:
        with fail_step_on_bad_input(f"publishing {run_dir} failed", also=(ValueError,)):
            result = publish(
                run_dir,
                repo_id,
                token=hub.token or None,
                endpoint=hub.endpoint,
                private=hub.private,
                commit_message=f"SAEs for {key.model}, stride {key.stride} "
                f"(Dagster run {context.run.run_id})",
                eval_dir=eval_dir,
                local_dir=None if repo_id else local_dir,
                sweep=sweep,
            )
    except OSError as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise dg.Failure(
            description=f"publishing {run_dir} failed: {message}", allow_retries=is_transient(error)
        ) from None
    context.log.info(result.describe())
    return result


def is_transient(error: OSError) -> bool:
    """Whether an error of the Hub client may pass by itself: no HTTP answer at all (a connection error, a
    timeout), a server error, a timeout or rate limit answer. A refused token or a missing repo (other 4xx)
    and local file errors will not."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        return not isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError))
    return status >= 500 or status in (408, 429)


def prune_previous_trainer_state(run_dir: Path) -> Path | None:
    """Delete the trainer state (optimizer moments, a few times the SAEs' size) of the run this partition's
    retraining replaced, `stride-<s>.previous/trainer_state` (a sweep's: `<variant>/trainer_state`), once the
    new run is published; its SAEs stay. Returns the folder removed (a sweep's: its folder), if any."""
    previous = run_dir.with_name(run_dir.name + ".previous")
    state = previous / "trainer_state"
    if state.is_dir():
        shutil.rmtree(state)
        return state
    variant_states = [p for p in previous.glob("*/trainer_state") if p.is_dir()]
    for folder in variant_states:
        shutil.rmtree(folder)
    return previous if variant_states else None
