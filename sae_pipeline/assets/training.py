"""sae_checkpoints: TopK SAEs on every stride-th layer of a model, trained by `torchrun ... -m sae_core`.

The training runs in the ranks of the `launcher` resource (a PipesClient: torchrun on this machine by default,
sae_pipeline.torchrun), never in the step process: the step builds the arguments, launches them through
Dagster Pipes and reports what global rank 0 sent back.

A run folder with an unfinished checkpoint (a failed or cancelled run) is resumed, so re-running a failed
partition loses at most the steps since the last checkpoint. The step's retry policy does that by itself
for failures that may pass (a rank killed, a collective timeout: sae_pipeline.retries); the step takes a
slot of the `gpu` concurrency pool while it runs. A finished run is kept as `stride-<s>.previous`
and training starts over (the retraining schedule); `restart: true` in the run config also discards an
unfinished one.

An entry with `cache: true` trains from its partition's activation cache (`--activations`, see
assets/activations.py), reused when it matches and written first when it does not; an unfinished run is not
resumed on a cache that was written again (other activations).
"""

import contextlib
import json
import shutil
from pathlib import Path

import dagster as dg
from pydantic import Field

from ..launcher import PipesLauncher
from ..partitions import model_stride_partitions
from ..resources import GPU_POOL, ArtefactStore, ModelRegistry
from ..retries import TRAINING_RETRY_POLICY
from ..versions import TRAINING_CODE_VERSION, checkpoint_data_version, with_data_version
from .activations import cache_dir, cached_activations, ensure_cache
from .common import fail_step_on_bad_input, partition_of, registry_entry
from .tokenized import tokenized_dataset


class TrainingConfig(dg.Config):
    """Per-run overrides of the registry's training settings."""

    max_tokens: int | None = Field(default=None, gt=0, description="Train on at most this many tokens.")
    restart: bool = Field(
        default=False, description="Discard an unfinished checkpoint instead of resuming it."
    )


@dg.asset(
    partitions_def=model_stride_partitions,
    deps=[tokenized_dataset],  # Dagster maps model x stride -> model (MultiToSingleDimensionPartitionMapping)
    group_name="sae",
    kinds={"pytorch"},
    pool=GPU_POOL,
    retry_policy=TRAINING_RETRY_POLICY,
    code_version=TRAINING_CODE_VERSION,
    # A new model's strides are trained once its tokenized dataset exists (the train_new_models sensor);
    # partitions that existed when automation was turned on, and retokenized data, are left to the schedule.
    automation_condition=dg.AutomationCondition.on_missing(),
    output_required=False,  # a stride the registry entry leaves out ends without a materialization
    description="SAEs on every stride-th layer, trained by torchrun (sae_core) on the tokenized dataset; "
    "<root>/runs/<model>/stride-<s>/<hookpoint>/{cfg.json,sae.safetensors}, run.json, metrics.jsonl.",
)
def sae_checkpoints(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    registry: ModelRegistry,
    artefacts: ArtefactStore,
    launcher: PipesLauncher,
):
    key = partition_of(context)
    entry = registry_entry(registry, key.model)
    if entry.strides is not None and key.stride not in entry.strides:
        # Automation asks for every stride partition of a new model: the ones its entry leaves out end here.
        # (Evaluating or publishing such a partition fails, naming the entry's strides.)
        context.log.warning(
            f"stride {key.stride} is not trained for {key.model}: its registry entry lists strides "
            f"{list(entry.strides)}; nothing to do"
        )
        return
    data = artefacts.tokenized_dir(key.model)
    if not (data / "dataset_info.json").is_file():
        raise dg.Failure(
            description=f"no tokenized dataset for {key.model} at {data}: materialize tokenized_dataset for "
            f"partition {key.model!r} first (tokenize_job)",
            allow_retries=False,
        )
    with fail_step_on_bad_input("launcher resource", also=(ValueError,)):
        launcher.check()
    run_dir = artefacts.run_dir(key.model, key.stride)
    with artefacts.exclusive(run_dir), contextlib.ExitStack() as holding:
        cache = None
        if entry.cache:
            # Held while training reads it: a cached_activations materialization cannot swap it meanwhile.
            holding.enter_context(artefacts.exclusive(cache_dir(artefacts, key.model, key.stride)))
            max_tokens = config.max_tokens or entry.train.get("max_tokens")
            cache = ensure_cache(context, entry, key, artefacts, launcher, max_tokens)
            if not cache.reused:
                context.log_event(
                    dg.AssetMaterialization(
                        cached_activations.key, partition=context.partition_key, metadata=cache.metadata()
                    )
                )
        fresh_cache = cache is not None and not cache.reused
        resume = prepare_run_dir(run_dir, restart=config.restart or fresh_cache, log=context.log)
        args = [
            entry.model,
            str(data),
            "--ctx_len",
            str(entry.ctx_len),
            "--layer_stride",
            str(key.stride),
            # The tokenize asset shuffled the documents already. Shuffling again would make `datasets` write
            # an index cache into the tokenized folder, which every stride of the model reads: it must stay
            # read-only.
            "--shuffle_seed",
            "none",
            *entry.train_args(),
            *entry.sweep_args(),  # a sweep: every variant in one pass, each in <run_dir>/<variant>/
            # A repeated flag: argparse keeps the last value, so the run config wins over the registry.
            *(["--max_tokens", str(config.max_tokens)] if config.max_tokens else []),
            "--save_dir",
            str(run_dir.parent),
            "--run_name",
            run_dir.name,
            *(["--resume"] if resume else []),
            *(["--activations", str(cache.path)] if cache is not None else []),
        ]
        invocation = launcher.run(
            context=context,
            module=launcher.entry_module,
            args=args,
            extras={"model": key.model, "stride": key.stride},
            metadata={
                "resumed": resume,
                "nproc_per_node": launcher.nproc_per_node,
                "nnodes": launcher.nnodes,
                **({"activations": str(cache.path), "cache_reused": cache.reused} if cache else {}),
            },
        )
        # Only what rank 0 reported: an implicit materialization would hide a rank 0 that said nothing.
        results = invocation.get_results(implicit_materializations=False)
        # Versioned by the SAE files' content (sae_pipeline.versions), read while the folder is still ours.
        results = with_data_version(results, checkpoint_data_version(run_dir))
    if not results:
        raise dg.Failure(
            description="training finished but rank 0 reported nothing (see the step's stderr)",
            allow_retries=False,
        )
    yield from results


def prepare_run_dir(run_dir: Path, *, restart: bool, log) -> bool:
    """Get `run_dir` ready for training; True when the run should resume its checkpoint."""
    from sae_core.checkpoint import has_state

    if not run_dir.exists():
        return False
    # A sweep's folder holds one run per variant (<variant>/run.json, <variant>/trainer_state/).
    runs = [run_dir, *(p for p in run_dir.iterdir() if p.is_dir())]
    if not any(has_state(run) for run in runs):
        # Leftovers of a run that died before its first checkpoint (a metrics.jsonl, empty folders): start
        # clean.
        shutil.rmtree(run_dir)
        return False
    finished = _is_finished(run_dir)
    if not finished and not restart:
        log.info(f"resuming the unfinished run in {run_dir}")
        return True
    previous = run_dir.with_name(run_dir.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    run_dir.rename(previous)
    state = "finished" if finished else "unfinished (restart: true)"
    log.info(f"{state} run moved to {previous}; training afresh")
    return False


def _is_finished(run_dir: Path) -> bool:
    """Whether the run (or every variant of a sweep) trained to its last step."""
    if not (run_dir / "run.json").exists():
        variants = [
            p for p in run_dir.iterdir() if (p / "trainer_state").is_dir() or (p / "run.json").exists()
        ]
        return bool(variants) and all(_is_finished(v) for v in variants)
    try:
        info = json.loads((run_dir / "run.json").read_text())
        return int(info["steps"]) >= int(info["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
