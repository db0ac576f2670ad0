"""Code and data versions of the assets, so that Dagster's UI marks partitions stale (and says why).

- Code versions: one string per asset, bumped by hand when the asset's output for the same inputs changes
  meaning (a new on-disk format, a changed training recipe the registry does not name). A partition
  materialized under an older code version shows "code version changed".
- Data versions: what a materialization holds, not when it was made. `tokenized_dataset` is versioned by what
  decides its sequences (the registry's tokenization settings, the source dataset's fingerprint, the
  tokenizer, the number of sequences), so retokenizing with other settings or other source data marks every
  stride of the model stale ("has a new dependency data version"), and retokenizing the same data does not.
  `sae_checkpoints` is versioned by the content of its SAE files (cfg.json and sae.safetensors of every
  hookpoint), so a retraining marks its evaluation and publication stale only if the weights changed.
  The other assets get Dagster's logical version (code version + their inputs' versions).
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

TOKENIZED_CODE_VERSION = "1"
TRAINING_CODE_VERSION = "1"
EVALUATION_CODE_VERSION = "1"
PUBLISHING_CODE_VERSION = "1"
DASHBOARDS_CODE_VERSION = "1"
CACHE_CODE_VERSION = "1"

# The files that make a trained SAE: another file in the run folder (metrics, trainer state) is not its data.
_SAE_FILES = ("cfg.json", "sae.safetensors")
_HEX = 16  # characters of the sha256 kept: enough to tell versions apart, short in the UI
_CHUNK = 1 << 20


def tokenized_data_version(info: Mapping[str, Any]) -> dg.DataVersion:
    """The data version of a tokenized dataset from its pipeline.json content: everything in it but the run
    that made it and the document count (which the settings and the fingerprint decide)."""
    decisive = {k: v for k, v in info.items() if k not in ("dagster_run_id", "documents")}
    text = json.dumps(decisive, sort_keys=True, default=str)
    return dg.DataVersion(hashlib.sha256(text.encode()).hexdigest()[:_HEX])


def checkpoint_data_version(run_dir: Path) -> dg.DataVersion:
    """The data version of a run folder: a hash over the names and bytes of its hookpoints' SAE files."""
    from sae_core.models import list_hookpoints
    from sae_core.sweep import sweep_variants

    digest = hashlib.sha256()
    # The hookpoint folders sae_core loads (of every variant, in a sweep's folder): never trainer state, best/
    # copies or hidden staging folders.
    for folder in sweep_variants(run_dir) or [run_dir]:
        for hookpoint in list_hookpoints(folder):
            for name in _SAE_FILES:
                path = folder / hookpoint / name
                if not path.is_file():
                    continue
                digest.update(str(path.relative_to(run_dir)).encode() + b"\0")
                with open(path, "rb") as file:
                    while chunk := file.read(_CHUNK):
                        digest.update(chunk)
                digest.update(b"\0")
    return dg.DataVersion(digest.hexdigest()[:_HEX])


def with_data_version(
    results: Iterable[dg.MaterializeResult], version: dg.DataVersion
) -> list[dg.MaterializeResult]:
    """The results rank 0 reported through Pipes, carrying `version` (the step computes it from the files, so
    any launcher backend gets it)."""
    return [
        dg.MaterializeResult(
            asset_key=r.asset_key,
            metadata=r.metadata,
            check_results=r.check_results,
            data_version=r.data_version or version,
            tags=r.tags,
        )
        for r in results
    ]
