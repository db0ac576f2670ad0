"""Helpers the assets share: bad input as clean step failures, registry look-ups, and atomic folder swaps."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from sae_core.errors import SaeCoreError
from sae_core.sweep import sweep_variants
from sae_core.utils import replace_folder, staging_folder

from ..partitions import ModelStride, PartitionKeyError, parse_model_stride
from ..registry import ModelEntry, RegistryError
from ..resources import ArtefactStore, ModelRegistry


@contextlib.contextmanager
def fail_step_on_bad_input(
    doing: str | None = None,
    *,
    also: tuple[type[BaseException], ...] = (),
    allow_retries: bool = False,
) -> Iterator[None]:
    """Turn an error that means bad input, raised in the block, into a step failure with a one-line message:
    "<doing>: <the error's first line>" (the error alone without `doing`).

    Bad input is sae_core's SaeCoreError and the kinds in `also`. Retrying cannot fix it, so retries are off
    unless asked for; any other exception is a bug and keeps its traceback.
    """
    try:
        yield
    except (SaeCoreError, *also) as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise dg.Failure(
            description=f"{doing}: {message}" if doing else message, allow_retries=allow_retries
        ) from None


def registry_entry(registry: ModelRegistry, model: str) -> ModelEntry:
    """The registry entry of a model partition; a missing entry or a bad registry fails the step with its
    message."""
    with fail_step_on_bad_input(also=(RegistryError,)):
        return registry.entry(model)


def partition_of(context: dg.AssetExecutionContext) -> ModelStride:
    """This step's (model, stride); a malformed key fails the step with its message."""
    with fail_step_on_bad_input(also=(PartitionKeyError,)):
        return parse_model_stride(context.partition_key)


def model_and_stride(
    context: dg.AssetExecutionContext, registry: ModelRegistry
) -> tuple[ModelStride, ModelEntry]:
    """This step's (model, stride) and the model's registry entry, checked against the entry's strides."""
    key = partition_of(context)
    entry = registry_entry(registry, key.model)
    if entry.strides is not None and key.stride not in entry.strides:
        raise dg.Failure(
            description=f"stride {key.stride} is not trained for {key.model}: its registry entry lists "
            f"strides {list(entry.strides)}",
            allow_retries=False,
        )
    return key, entry


def trained_run_dir(artefacts: ArtefactStore, key: ModelStride) -> Path:
    """The partition's run folder (one run, or a sweep's folder of variant runs); a non-retried failure when
    no training has completed there."""
    run_dir = artefacts.run_dir(key.model, key.stride)
    if not (run_dir / "run.json").is_file() and not sweep_variants(run_dir):
        raise dg.Failure(
            description=f"no trained SAEs in {run_dir}: materialize sae_checkpoints for this partition first",
            allow_retries=False,
        )
    return run_dir


def staging_dir(target: Path) -> Path:
    """An empty folder next to `target` (same filesystem, so `swap_in` is a rename)."""
    return staging_folder(target)


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` with renames: readers see the old folder or the new one, never a mix."""
    replace_folder(staging, target)
