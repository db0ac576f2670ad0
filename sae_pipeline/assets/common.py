"""Helpers the assets share: registry look-ups that fail as clean step failures, and atomic folder swaps."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from sae_core.utils import replace_folder, staging_folder

from ..partitions import ModelStride, PartitionKeyError, parse_model_stride
from ..registry import ModelEntry, RegistryError
from ..resources import ModelRegistry


def registry_entry(registry: ModelRegistry, model: str) -> ModelEntry:
    """The registry entry of a model partition; a missing entry or a bad registry fails the step with its
    message."""
    try:
        return registry.entry(model)
    except RegistryError as e:
        raise dg.Failure(description=str(e), allow_retries=False) from None


def model_and_stride(
    context: dg.AssetExecutionContext, registry: ModelRegistry
) -> tuple[ModelStride, ModelEntry]:
    """This step's (model, stride) and the model's registry entry, checked against the entry's strides."""
    try:
        key = parse_model_stride(context.partition_key)
    except PartitionKeyError as e:
        raise dg.Failure(description=str(e), allow_retries=False) from None
    entry = registry_entry(registry, key.model)
    if entry.strides is not None and key.stride not in entry.strides:
        raise dg.Failure(
            description=f"stride {key.stride} is not trained for {key.model}: its registry entry lists "
            f"strides {list(entry.strides)}",
            allow_retries=False,
        )
    return key, entry


def staging_dir(target: Path) -> Path:
    """An empty folder next to `target` (same filesystem, so `swap_in` is a rename)."""
    return staging_folder(target)


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` with renames: readers see the old folder or the new one, never a mix."""
    replace_folder(staging, target)
