"""Registry entries, resources and in-process materialisation for the pipeline tests (tiny model)."""

import copy
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from sae_pipeline.assets import ALL_ASSETS
from sae_pipeline.resources import ArtefactStore, HubPublisher, ModelRegistry, TorchrunLauncher

MODEL = "tiny"


STRIDE = 2


PARTITION = f"{MODEL}|{STRIDE}"


def tiny_entry(model_dir: Path, data_file: Path, **overrides: Any) -> dict[str, Any]:
    """A registry entry small enough for CPU tests: a handful of optimizer steps, ~1k evaluation tokens."""
    entry = {
        "name": MODEL,
        "model": str(model_dir),
        "dataset": str(data_file),
        "ctx_len": 32,
        "train": {
            "expansion_factor": 4,
            "k": 8,
            "batch_size": 4,
            "max_tokens": 1000,
            "lr_warmup_steps": 2,
            "log_every": 1,
        },
        "eval": {"max_tokens": 512},
        "thresholds": {"max_fvu": 1.5, "max_dead_pct": 100, "max_delta_ce": 10, "max_kl": 10},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    return entry


def write_registry(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": [copy.deepcopy(e) for e in entries]}, sort_keys=False))
    return path


def resources_for(root: Path, registry: Path, **launcher: Any) -> dict[str, Any]:
    return {
        "artefacts": ArtefactStore(root=str(root)),
        "registry": ModelRegistry(path=str(registry)),
        "launcher": TorchrunLauncher(**{"nproc_per_node": 2, "omp_num_threads": 1, **launcher}),
        "hub": HubPublisher(),
    }


def materialize(
    selection: list,
    partition: str,
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    run_config: dict[str, Any] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize `selection` (the other assets are there so Dagster can resolve the dependencies)."""
    return dg.materialize(
        ALL_ASSETS,
        selection=selection,
        partition_key=partition,
        instance=instance,
        resources=resources,
        run_config=run_config,
        raise_on_error=False,
    )


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Everything a user would read about the failed steps: messages, descriptions and metadata."""
    parts = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        parts.append(data.error.to_string() if data.error else "")
        if data.user_failure_data is not None:
            parts.append(data.user_failure_data.description or "")
            parts.extend(str(v.value) for v in data.user_failure_data.metadata.values())
    return "\n".join(parts)
