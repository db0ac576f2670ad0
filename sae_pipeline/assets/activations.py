"""cached_activations: the LM's activations at every stride-th layer of a model, written once by
`python -m sae_core.cache` in ranks of the `launcher` resource, and reused by every training that asks for it.

Only registry entries with `cache: true` have one; for the others the asset ends without a materialization
(the idiom of an optional asset: `output_required=False`). It is in no job and is not an upstream of
`sae_checkpoints`: Dagster skips every step downstream of an asset that did not materialize in the same run,
so in front of `sae_checkpoints` it would stop the training of every entry without a cache (and automation
would wait for it). Instead `sae_checkpoints` of a `cache: true` entry calls `ensure_cache` itself (the same
code, the same launcher), and the asset is there to write or refresh a cache ahead of training, and to show
it: tokens, disk, whether it was reused.

    <root>/activations/<model>/stride-<s>/     manifest.json, pipeline.json, <hookpoint>/shard-*.safetensors

Reuse rule: a complete cache is reused when what it was written from still holds — the model and its loading
options (revision, dtype, 8 bit, attention, excluded tokens), the tokenized dataset (its settings,
fingerprint and sequence count), the stride, the storage dtype — and it holds at least the tokens training
asks for (`max_tokens`). `pipeline.json` records that key. Otherwise it is written again into
`.stride-<s>.writing/` beside it (a retry after a crash resumes there), and swapped in by renames once
complete: the old cache is deleted only after the new one is in place.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from sae_core.utils import atomic_write_json

from ..launcher import PipesLauncher
from ..partitions import ModelStride, check_model_key, model_stride_partitions
from ..registry import ModelEntry
from ..resources import GPU_POOL, ArtefactStore, ModelRegistry
from ..retries import TRAINING_RETRY_POLICY
from ..versions import CACHE_CODE_VERSION
from .common import fail_step_on_bad_input, partition_of, registry_entry, swap_in
from .tokenized import PIPELINE_INFO, tokenized_dataset

CACHE_ENTRY = "sae_pipeline.cache_entry"
CACHE_KEY_FILE = "pipeline.json"  # in the cache folder: what it was written from (the reuse key)
# The key while the cache is written: hidden, because sae_core.cache refuses a new cache in a folder holding
# other (visible) files.
STAGED_KEY_FILE = "." + CACHE_KEY_FILE
# Training options that change the activations (so belong to the reuse key), and their `sae_core.cache` flag.
SOURCE_OPTIONS = {
    "revision": "revision",
    "dtype": "model_dtype",
    "load_in_8bit": "load_in_8bit",
    "attn_implementation": "attn_implementation",
    "trust_remote_code": "trust_remote_code",
    "exclude_tokens": "exclude_tokens",
}
# Training options that only change how the cache is computed: passed on, not part of the key.
RUNTIME_OPTIONS = {"device": "device", "batch_size": "batch_size", "data_preprocessing_num_proc": None}


def cache_dir(artefacts: ArtefactStore, model: str, stride: int) -> Path:
    """The cache folder of a model x stride partition, under the artefact root (keys are validated)."""
    return artefacts.root_path / "activations" / check_model_key(model) / f"stride-{int(stride)}"


@dataclass(frozen=True)
class CacheState:
    """A cache ready for training: where it is, whether an earlier one was reused, and why not if not."""

    path: Path
    reused: bool
    reason: str
    manifest: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        m = self.manifest
        files = [self.path / h / s["file"] for h in m["hookpoints"] for s in m["shards"][h]]
        return {
            "path": dg.MetadataValue.path(str(self.path)),
            "reused": self.reused,
            "reason": self.reason,
            "tokens": int(m["tokens"]),
            "hookpoints": dg.MetadataValue.json(list(m["hookpoints"])),
            "dtype": m["dtype"],
            "d_in": int(m["d_in"]),
            "shards": len(files),
            "disk_bytes": sum(f.stat().st_size for f in files),
        }


def cache_key(entry: ModelEntry, stride: int, tokenized: dict[str, Any], max_tokens: int | None) -> dict:
    """What the cache's activations are a function of (see the module docstring)."""
    return {
        "model": entry.model,
        "source_options": {k: entry.train[k] for k in SOURCE_OPTIONS if k in entry.train},
        "tokenized": {k: v for k, v in tokenized.items() if k != "dagster_run_id"},
        "stride": int(stride),
        "dtype": entry.cache_dtype,
        "max_tokens": max_tokens,
    }


def differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The fields of `wanted` that `existing` does not satisfy; [] when the cache can be reused. A cache of
    more tokens than asked for (or of all of them) serves a shorter training."""
    changed = [k for k in wanted if k != "max_tokens" and existing.get(k) != wanted[k]]
    have, need = existing.get("max_tokens", 0), wanted["max_tokens"]
    if not (have is None or (need is not None and isinstance(have, int) and have >= need)):
        changed.append("max_tokens")
    return changed


def _flag(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if value is None:
        return ["none"]
    return [str(value).lower() if isinstance(value, bool) else str(value)]


def cache_args(entry: ModelEntry, stride: int, data: Path, out: Path, max_tokens: int | None) -> list[str]:
    """The `python -m sae_core.cache` command line of a partition's cache."""
    args = [entry.model, str(data), "--ctx_len", str(entry.ctx_len), "--layer_stride", str(stride)]
    # The tokenized folder is shared by every stride and stays read-only (see sae_checkpoints).
    args += ["--shuffle_seed", "none", "--dtype", entry.cache_dtype, "--out", str(out)]
    if max_tokens is not None:
        args += ["--max_tokens", str(max_tokens)]
    for option, flag in {**SOURCE_OPTIONS, **RUNTIME_OPTIONS}.items():
        if option in entry.train:
            args += [f"--{flag or option}", *_flag(entry.train[option])]
    return args


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _usable_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache whose shards are all there at their full size; None otherwise."""
    from sae_core.cache import ActivationCache  # torch: only for entries with a cache
    from sae_core.errors import SaeCoreError

    try:
        return ActivationCache(folder).manifest
    except (SaeCoreError, OSError, KeyError, ValueError):
        return None


def ensure_cache(
    context: dg.AssetExecutionContext,
    entry: ModelEntry,
    key: ModelStride,
    artefacts: ArtefactStore,
    launcher: PipesLauncher,
    max_tokens: int | None,
) -> CacheState:
    """Reuse the partition's cache when it fits (module docstring), else write it through the launcher.

    The caller holds `artefacts.exclusive(cache_dir(...))`, so no training reads a cache being swapped.
    """
    target = cache_dir(artefacts, key.model, key.stride)
    data = artefacts.tokenized_dir(key.model)
    tokenized = _read_json(data / PIPELINE_INFO)
    if tokenized is None:
        raise dg.Failure(
            description=f"no tokenized dataset for {key.model} at {data}: materialize tokenized_dataset for "
            f"partition {key.model!r} first (tokenize_job)",
            allow_retries=False,
        )
    wanted = cache_key(entry, key.stride, tokenized, max_tokens)
    existing = _read_json(target / CACHE_KEY_FILE)
    manifest = _usable_manifest(target) if existing is not None else None
    if existing is None or manifest is None:
        reason = "no cache yet" if not target.exists() else "the cache there is incomplete or damaged"
    elif changed := differences(existing, wanted):
        reason = f"{', '.join(changed)} changed"
    else:
        context.log.info(f"reusing the activation cache {target} ({manifest['tokens']:,} tokens)")
        return CacheState(target, True, "its settings match", manifest)

    staging = target.with_name(f".{target.name}.writing")
    staged = _read_json(staging / STAGED_KEY_FILE)
    staged_manifest = _read_json(staging / "manifest.json") or {}
    # An interrupted write of the same settings, on as many ranks, resumes; anything else starts over.
    if (
        staged != wanted
        or staged_manifest.get("world_size", launcher.nproc_per_node) != launcher.nproc_per_node
    ):
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_json(staging / STAGED_KEY_FILE, wanted)
    context.log.info(f"writing the activation cache {target} ({reason})")
    launcher.run(
        context=context,
        module=CACHE_ENTRY,
        args=cache_args(entry, key.stride, data, staging, max_tokens),
        what="activation cache",
        extras={"model": key.model, "stride": key.stride},
    )
    manifest = _usable_manifest(staging)
    if manifest is None:
        raise dg.Failure(
            description=f"the cache writer ended without a complete cache in {staging} (see the stderr)",
            allow_retries=False,
        )
    (staging / STAGED_KEY_FILE).rename(staging / CACHE_KEY_FILE)
    swap_in(staging, target)  # the old cache goes only once the new one is complete
    return CacheState(target, False, reason, manifest)


@dg.asset(
    partitions_def=model_stride_partitions,
    deps=[tokenized_dataset],  # Dagster maps model x stride -> model (MultiToSingleDimensionPartitionMapping)
    group_name="sae",
    kinds={"pytorch"},
    pool=GPU_POOL,  # the launched ranks run the LM
    retry_policy=TRAINING_RETRY_POLICY,
    output_required=False,  # entries without `cache: true` end without a materialization
    code_version=CACHE_CODE_VERSION,
    description="The LM's activations at every stride-th layer (python -m sae_core.cache in ranks of the "
    "launcher), for registry entries with `cache: true`; reused while its settings match. "
    "<root>/activations/<model>/stride-<s>/{manifest.json,<hookpoint>/shard-*.safetensors}.",
)
def cached_activations(
    context: dg.AssetExecutionContext,
    registry: ModelRegistry,
    artefacts: ArtefactStore,
    launcher: PipesLauncher,
):
    key = partition_of(context)
    entry = registry_entry(registry, key.model)
    if not entry.cache or (entry.strides is not None and key.stride not in entry.strides):
        why = "`cache: true` is not set" if not entry.cache else f"strides are {list(entry.strides or ())}"
        context.log.info(
            f"no activation cache for {key.model}, stride {key.stride}: its registry entry's {why}"
        )
        return
    with fail_step_on_bad_input("launcher resource", also=(ValueError,)):
        launcher.check()
    target = cache_dir(artefacts, key.model, key.stride)
    with artefacts.exclusive(target):
        state = ensure_cache(context, entry, key, artefacts, launcher, entry.train.get("max_tokens"))
    yield dg.MaterializeResult(metadata=state.metadata())
