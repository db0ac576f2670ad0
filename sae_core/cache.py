"""The activation cache: the LM's activations computed once, written to disk, and read back for training.

Writing (`python -m sae_core.cache MODEL DATASET --layers ... --out DIR`, or `write_cache`): the training
sequences are run through the LM in order, batch by batch (`LiveActivations`, the same code live training
uses), and the rows of the tokens SAEs train on (BOS/pad excluded) are appended to one folder per hookpoint
as safetensors shards of exactly `shard_tokens` rows (the last one shorter):

    DIR/manifest.json                           what was cached, how, and each shard's rows and sha256
    DIR/<hookpoint>/shard-00000.safetensors     "activations": [shard_tokens, d_in] in the storage dtype

Row i of every hookpoint is the same token. NaN/Inf rows are stored too (counted in the manifest) and dropped
when read, as live training drops them. Each shard is written atomically and the manifest after it, with the
position in the token stream where the next shard starts: an interrupted cache resumes there, and since the
LM sees the same batches, a resumed cache is byte-identical to an uninterrupted one. A lock file keeps a
second writer out. Under torchrun, rank r runs batches r, r + world_size, ... and writes `rank<r>-shard-*`
files and `progress-rank<r>.json` (its resume position); rank 0 merges them into the manifest at the end.

Held-out data: only the first `ceil(max_tokens / ctx_len)` sequences are cached (all when max_tokens is
unset), and a run trained from the cache records every cached sequence as trained on (run.json's
`train_sequences`), so evaluation (heldout.py) starts after them, as it does after a live run.

Reading (`ActivationCache`, `CachedActivations`): a batch of batch_size sequences is batch_size x (kept rows
per cached sequence) rows, the same count as a live batch. Rows are visited in a seeded order that is a
function of the batch index only (so `--resume` continues exactly): shards are taken in a random order,
`cache_shuffle_shards` at a time, and the rows of those shards are shuffled together. Each rank takes its
share of every global batch (under --distribute_layers, the owner of a hookpoint takes the whole batch).
"""

import bisect
import hashlib
import json
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from .activations import Batch, LiveActivations, excluded_token_ids
from .data import sequence_shape
from .distributed import DistContext, barrier
from .errors import ConfigError, DatasetLoadError, SaeCoreError
from .loggers import Profiler
from .models import hidden_size, hookpoint_layer, select_hookpoints, selects_hookpoint
from .utils import atomic_write_bytes, atomic_write_json, natural_key
from .version import __version__

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
TENSOR = "activations"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# Fields of the training run's config that come from the cache's manifest (what heldout.py reads).
SOURCE_FIELDS = ("model", "dataset", "split", "text_column", "data_args", "max_examples", "shuffle_seed")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------------- writing
def write_cache(
    model: Any,
    tokenizer: Any,
    sequences: Any,
    out: str | Path,
    *,
    hookpoints: Sequence[str] = (),
    layers: Sequence[int] = (),
    layer_stride: int = 1,
    exclude_tokens: Sequence[int] | None = None,
    max_tokens: int | None = None,
    dtype: str = "bfloat16",
    shard_tokens: int = 32_768,
    batch_size: int = 8,
    source: dict[str, Any] | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Cache the activations of `model` on `sequences` (token ids [n, T] or a Dataset with 'input_ids') in
    `out`; resume an interrupted cache of the same settings. Returns the manifest.

    `source` describes where model and data came from (model name, revision, dataset, split, tokenization
    settings); it is recorded in the manifest and must match when resuming. Under torchrun (`ctx` of several
    ranks) rank r runs every world_size-th batch from batch r and writes shards of its own.
    """
    ctx = ctx or DistContext()
    from filelock import FileLock, Timeout

    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if shard_tokens <= 0 or batch_size <= 0:
        raise ConfigError(f"shard_tokens and batch_size must be positive, got {shard_tokens}, {batch_size}")
    if max_tokens is not None and max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK))
    try:
        if ctx.is_main:  # one lock per writing job (torchrun tears the job down when rank 0 fails)
            lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"{out} is being written by another process (it holds {out / LOCK}); wait for it to finish "
            "or choose another --out"
        ) from None
    try:
        return _write_locked(
            model,
            tokenizer,
            sequences,
            out,
            selection={"hookpoints": list(hookpoints), "layers": list(layers), "layer_stride": layer_stride},
            exclude_tokens=exclude_tokens,
            max_tokens=max_tokens,
            dtype=dtype,
            shard_tokens=shard_tokens,
            batch_size=batch_size,
            # What the manifest says the activations are of; the CLI passes the full source description.
            source={
                "model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
                "dataset": None,
                **(source or {}),
            },
            progress=progress and ctx.is_main,
            ctx=ctx,
        )
    finally:
        if lock.is_locked:
            lock.release()


def _write_locked(
    model: Any,
    tokenizer: Any,
    sequences: Any,
    out: Path,
    *,
    selection: dict[str, Any],
    exclude_tokens: Sequence[int] | None,
    max_tokens: int | None,
    dtype: str,
    shard_tokens: int,
    batch_size: int,
    source: dict[str, Any],
    progress: bool,
    ctx: DistContext,
) -> dict[str, Any]:
    chosen = select_hookpoints(model, **selection)
    d_in = hidden_size(model)
    excluded = excluded_token_ids(exclude_tokens, tokenizer, warn=True)
    n_seq, seq_len = sequence_shape(sequences)
    cached_seqs = n_seq if max_tokens is None else min(n_seq, math.ceil(max_tokens / seq_len))
    if cached_seqs == 0:
        raise ConfigError("the dataset is empty: nothing to cache")
    settings = {
        **source,
        "hookpoints": chosen,
        "excluded_token_ids": excluded.tolist(),
        "max_tokens": max_tokens,
        "sequences": cached_seqs,
        "ctx_len": seq_len,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "batch_size": batch_size,
        "world_size": ctx.world_size,  # which batches each rank wrote: a resume needs the same
    }
    barrier(ctx)  # every rank checks the folder before rank 0 writes to it
    manifest = _existing_manifest(out, settings)
    barrier(ctx)
    if manifest is None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "sae_core_version": __version__,
            "complete": False,
            **settings,
            "d_in": d_in,
            "bos_token_id": getattr(tokenizer, "bos_token_id", None),
            "eos_token_id": getattr(tokenizer, "eos_token_id", None),
            "tokens": 0,
            "excluded_tokens": 0,
            "nonfinite_rows": {h: 0 for h in chosen},
            "shards": {h: [] for h in chosen},
            "next": {"batch": 0, "row": 0},  # where the next shard starts: batch index, row within its rows
            "settings": settings,
        }
    elif manifest["complete"]:
        return manifest
    if ctx.is_main:
        # Before any shard, so that a writer killed at any moment leaves a folder it can resume; and we hold
        # the lock, so temporary files are leftovers of a killed writer.
        atomic_write_json(out / MANIFEST, manifest)
        for leftover in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
            leftover.unlink(missing_ok=True)
    barrier(ctx)
    # What this rank has written: one process keeps it in the manifest; under torchrun each rank has a
    # progress file, merged into the manifest when every rank is done.
    state, state_path, prefix = manifest, out / MANIFEST, ""
    if ctx.enabled:
        state_path, prefix = out / f"progress-rank{ctx.rank}.json", f"rank{ctx.rank:03d}-"
        state = {
            "tokens": 0,
            "excluded_tokens": 0,
            "nonfinite_rows": {h: 0 for h in chosen},
            "shards": {h: [] for h in chosen},
            "next": {"batch": ctx.rank, "row": 0},
        }
        if state_path.exists():
            state = json.loads(state_path.read_text())
    job = _Job(out, chosen, excluded, cached_seqs, seq_len, d_in, dtype, shard_tokens, batch_size)
    _write_rank(model, sequences, job, state, state_path, prefix, progress, ctx)
    barrier(ctx)
    if ctx.enabled:
        if ctx.is_main:
            _merge_progress(out, manifest, ctx.world_size)
        barrier(ctx)
        return read_manifest(out)
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _merge_progress(out: Path, manifest: dict[str, Any], world_size: int) -> None:
    """The manifest of a torchrun cache: every rank's shards, in rank order, and their totals."""
    parts = [json.loads((out / f"progress-rank{r}.json").read_text()) for r in range(world_size)]
    manifest["tokens"] = sum(p["tokens"] for p in parts)
    manifest["excluded_tokens"] = sum(p["excluded_tokens"] for p in parts)
    for h in manifest["hookpoints"]:
        manifest["nonfinite_rows"][h] = sum(p["nonfinite_rows"][h] for p in parts)
        manifest["shards"][h] = [shard for p in parts for shard in p["shards"][h]]
    manifest["next"] = None
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)


class _Job(NamedTuple):
    """What every rank of one cache write shares."""

    out: Path
    hookpoints: list[str]
    excluded: Tensor  # token ids left out
    sequences: int  # sequences cached: the first ones of the dataset
    seq_len: int
    d_in: int
    dtype: str
    shard_tokens: int
    batch_size: int  # sequences per LM forward


def _write_rank(
    model: Any,
    sequences: Any,
    job: _Job,
    state: dict[str, Any],
    state_path: Path,
    prefix: str,
    progress: bool,
    ctx: DistContext,
) -> None:
    """Run this rank's batches (from state["next"]) and write their rows as shards, `state` after each."""
    out, chosen, excluded, cached_seqs, seq_len, d_in, dtype, shard_tokens, batch_size = job
    device = next(model.parameters()).device
    live = LiveActivations(
        model,
        sequences,
        hookpoints=chosen,
        owners={h: 0 for h in chosen},
        ctx=DistContext(device=device),
        batch_size=batch_size,
        d_in=d_in,
        excluded=excluded,
        gather=False,
        profiler=Profiler(device, enabled=False),
        order=torch.arange(cached_seqs),  # only the first cached_seqs sequences, in order
        keep_nonfinite=True,
    )
    n_batches = math.ceil(cached_seqs / batch_size)
    batch_index, skip = state["next"]["batch"], state["next"]["row"]
    pending: dict[str, list[Tensor]] = {h: [] for h in chosen}
    buffered = 0
    bar = _bar(progress, len(range(ctx.rank, n_batches, ctx.world_size)), batch_index // ctx.world_size)
    while batch_index < n_batches:
        rows = live.batch(batch_index).inputs
        batch_rows = rows[chosen[0]].shape[0]
        first = batch_index * batch_size
        tokens_in_batch = (min(first + batch_size, cached_seqs) - first) * seq_len
        if skip == 0:  # counted once per batch, in the shard set that starts in it
            state["excluded_tokens"] += tokens_in_batch - batch_rows
        for h in chosen:
            pending[h].append(rows[h][skip:].to(STORAGE_DTYPES[dtype]))
        buffered += batch_rows - skip
        skip = 0
        following = batch_index + ctx.world_size  # this rank's next batch
        while buffered >= shard_tokens or (following >= n_batches and buffered > 0):
            take = min(shard_tokens, buffered)
            buffered -= take
            # What remains comes from this batch (the buffer held < shard_tokens rows before it): its last
            # `buffered` rows, so the next shard starts at row batch_rows - buffered of this batch.
            next_position = (
                {"batch": batch_index, "row": batch_rows - buffered}
                if buffered
                else {"batch": following, "row": 0}
            )
            done = len(state["shards"][chosen[0]])
            try:
                for h in chosen:
                    block = torch.cat(pending[h])
                    pending[h] = [block[take:]]
                    _write_shard(out, state, h, block[:take], prefix)
                state["tokens"] += take
                state["next"] = next_position
                atomic_write_json(state_path, state)
            except OSError as e:
                # Disk full, quota, permissions: every write is atomic and the manifest on disk still ends at
                # the last complete shard set.
                raise SaeCoreError(
                    f"cannot write shard {done} of the cache in {out}: {e.strerror or e}; the first {done} "
                    "shards of each hookpoint are intact (free space, then run the same command to resume)"
                ) from None
        batch_index = following
        bar.update(1)
    bar.close()


def _write_shard(out: Path, state: dict[str, Any], hookpoint: str, rows: Tensor, prefix: str) -> None:
    shards = state["shards"][hookpoint]
    name = prefix + shard_name(len(shards))
    data = save_safetensors({TENSOR: rows.contiguous().cpu()})
    atomic_write_bytes(out / hookpoint / name, data)
    nonfinite = int((~rows.float().isfinite().all(-1)).sum())
    state["nonfinite_rows"][hookpoint] += nonfinite
    shards.append({"file": name, "rows": rows.shape[0], "sha256": _sha256(data)})


def _existing_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier (maybe interrupted) write of these settings in `out`; None when new."""
    if not (out / MANIFEST).exists():
        if any(p.name != LOCK and not p.name.startswith(".") for p in out.iterdir()):
            raise ConfigError(f"{out} is not empty and holds no {MANIFEST}; choose an empty or new --out")
        return None
    manifest = read_manifest(out)
    diff = sorted(
        k for k in set(settings) | set(manifest["settings"]) if settings.get(k) != manifest["settings"].get(k)
    )
    if diff:
        raise ConfigError(
            f"{out} holds a cache written with other settings ({', '.join(diff)} differ); "
            "choose another --out, or repeat the original settings to resume it"
        )
    return manifest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="caching", unit="batch")


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A cache folder's manifest; a one-line error when it is missing, unreadable or of a newer format."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetLoadError(
            f"{folder}: no {MANIFEST}: not an activation cache (write one with python -m sae_core.cache)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetLoadError(f"{path}: not valid JSON (corrupt or truncated?): {e}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise DatasetLoadError(f"{path}: no format_version: not an activation cache manifest")
    if version > FORMAT_VERSION:
        raise DatasetLoadError(
            f"{path}: cache format {version} is newer than this sae_core reads ({FORMAT_VERSION}, "
            f"sae_core {__version__}); upgrade sae_core (written by {manifest.get('sae_core_version')})"
        )
    return manifest


class ActivationCache:
    """An activation cache folder, opened and checked: complete, every shard present at its full size."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        if not m["complete"]:
            raise DatasetLoadError(
                f"{self.folder}: the cache is incomplete ({m['tokens']} tokens written so far); finish it by "
                "running the same python -m sae_core.cache command again"
            )
        self.d_in: int = m["d_in"]
        self.dtype: str = m["dtype"]
        self.hookpoints: list[str] = m["hookpoints"]
        self.tokens: int = m["tokens"]
        self.sequences: int = m["sequences"]
        self.seq_len: int = m["ctx_len"]
        # Kept rows per cached sequence (ctx_len - 1 with BOS excluded): a batch of batch_size sequences is
        # batch_size times this many rows, as many as a live batch.
        self.rows_per_sequence = max(1, self.tokens // max(self.sequences, 1))
        for hookpoint in self.hookpoints:
            for shard in m["shards"][hookpoint]:
                self._check_size(hookpoint, shard)

    @property
    def excluded_token_ids(self) -> Tensor:
        return torch.tensor(self.manifest["excluded_token_ids"], dtype=torch.long)

    def sequence_shape(self) -> tuple[int, int]:
        """(sequences of rows_per_sequence rows the cache holds, tokens per source sequence): the units of
        the trainer's step budget."""
        return self.tokens // self.rows_per_sequence, self.seq_len

    def select_hookpoints(
        self, *, layers: Sequence[int] = (), layer_stride: int = 1, hookpoints: Sequence[str] = ()
    ) -> list[str]:
        """The cached hookpoints a run selects: glob patterns, layer indices, or every layer_stride-th one."""
        cached = sorted(self.hookpoints, key=natural_key)
        listing = ", ".join(cached)
        if hookpoints:
            chosen: list[str] = []
            for pattern in hookpoints:
                matches = [h for h in cached if selects_hookpoint(pattern, h)]
                if not matches:
                    raise ConfigError(f"hookpoint {pattern!r} is not in the cache {self.folder} ({listing})")
                chosen += [m for m in matches if m not in chosen]
            return sorted(chosen, key=natural_key)
        if layers:
            missing = [i for i in layers if f"layers.{i}" not in cached]
            if missing:
                raise ConfigError(f"layer {missing[0]} is not in the cache {self.folder} ({listing})")
            return [f"layers.{i}" for i in sorted(set(layers))]
        chosen = [h for h in cached if (hookpoint_layer(h) or 0) % layer_stride == 0]
        if not chosen:
            raise ConfigError(f"no cached hookpoint is a multiple of layer_stride={layer_stride} ({listing})")
        return chosen

    def check_exclusion(self, exclude_tokens: Sequence[int] | None) -> None:
        cached = sorted(self.manifest["excluded_token_ids"])
        if exclude_tokens is not None and sorted(exclude_tokens) != cached:
            raise ConfigError(
                f"exclude_tokens={list(exclude_tokens)} but the cache {self.folder} left out the tokens "
                f"{self.manifest['excluded_token_ids']}; drop --exclude_tokens or write a new cache"
            )

    def shards(self, hookpoint: str) -> list[dict[str, Any]]:
        return self.manifest["shards"][hookpoint]

    def load_shard(self, hookpoint: str, index: int) -> Tensor:
        """Shard `index` of `hookpoint` as stored, after checking its size and sha256."""
        shard = self.shards(hookpoint)[index]
        path = self._check_size(hookpoint, shard)
        data = path.read_bytes()
        if _sha256(data) != shard["sha256"]:
            raise DatasetLoadError(
                f"{path}: sha256 does not match the manifest (the file was changed or corrupted); "
                "write the cache again"
            )
        return load_safetensors(data)[TENSOR]

    def _check_size(self, hookpoint: str, shard: dict[str, Any]) -> Path:
        """The shard's path, after checking that it exists and its header and size fit the manifest."""
        path = self.folder / hookpoint / shard["file"]
        try:
            with path.open("rb") as f:
                size = path.stat().st_size
                head = f.read(8)
                header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                header = json.loads(f.read(header_len)) if 0 < header_len < size else None
        except FileNotFoundError:
            raise DatasetLoadError(f"{path}: shard missing from the cache; write the cache again") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or TENSOR not in header:
            raise DatasetLoadError(f"{path}: not a readable safetensors shard (truncated or corrupt?)")
        info = header[TENSOR]
        if len(info["shape"]) != 2 or info["shape"][1] != self.d_in:
            raise DatasetLoadError(
                f"{path}: rows of width {info['shape'][-1]}, but the manifest says d_in={self.d_in}: "
                "the shard belongs to another model's cache"
            )
        itemsize = torch.tensor([], dtype=STORAGE_DTYPES[self.dtype]).element_size()
        expected = 8 + header_len + shard["rows"] * self.d_in * itemsize
        if info["shape"][0] != shard["rows"] or size != expected:
            raise DatasetLoadError(
                f"{path}: {size} bytes, expected {expected} for {shard['rows']} rows (truncated?); "
                "write the cache again"
            )
        return path


class CachedActivations:
    """Activations read from an `ActivationCache`; `batch(i)` has LiveActivations' contract."""

    def __init__(
        self,
        cache: ActivationCache,
        *,
        hookpoints: list[str],
        owners: dict[str, int],
        ctx: DistContext,
        batch_size: int,
        whole_batch: bool,
        seed: int,
        shuffle_shards: int,
        profiler: Profiler,
    ):
        self.cache, self.ctx, self.profiler = cache, ctx, profiler
        profiler.seconds.setdefault("cache_read_s", 0.0)  # --profile: reading replaces lm_forward_s
        self.local_hookpoints = [h for h in hookpoints if owners[h] == ctx.rank]
        self.rows_per_batch = batch_size * cache.rows_per_sequence  # per rank
        self.whole_batch = whole_batch  # --distribute_layers: the owner takes every rank's share
        self.seed = seed
        rows = [s["rows"] for s in cache.shards(cache.hookpoints[0])]
        # The visiting order: windows of shuffle_shards shards (in a seeded random order) whose rows are
        # shuffled together. Window w covers rows [self.starts[w], self.starts[w + 1]) of the stream.
        if shuffle_shards == 0:
            self.windows = [[i] for i in range(len(rows))]
        else:
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
            self.windows = [order[i : i + shuffle_shards] for i in range(0, len(order), shuffle_shards)]
        self.shuffled = shuffle_shards > 0
        self.starts = [0]
        for window in self.windows:
            self.starts.append(self.starts[-1] + sum(rows[i] for i in window))
        self._loaded: dict[str, tuple[int, Tensor]] = {}  # per hookpoint: the window in memory

    def batch(self, index: int) -> Batch:
        """This rank's SAE inputs of global batch `index`, for the SAEs it owns."""
        start = index * self.rows_per_batch * self.ctx.world_size
        if self.whole_batch:
            stop = start + self.rows_per_batch * self.ctx.world_size
        else:
            start += self.ctx.rank * self.rows_per_batch
            stop = start + self.rows_per_batch
        inputs, nonfinite = {}, {}
        with self.profiler.timed("cache_read_s", sync=True):
            for hookpoint in self.local_hookpoints:
                x = self._rows(hookpoint, start, min(stop, self.starts[-1])).to(self.ctx.device).float()
                finite = x.isfinite().all(-1)
                nonfinite[hookpoint] = int(x.shape[0] - finite.sum())
                inputs[hookpoint] = x[finite] if nonfinite[hookpoint] else x
        return Batch(inputs, nonfinite)

    def _rows(self, hookpoint: str, start: int, stop: int) -> Tensor:
        parts = []
        while start < stop:
            w = bisect.bisect_right(self.starts, start) - 1
            window = self._window(hookpoint, w)
            end = min(stop, self.starts[w + 1])
            parts.append(window[start - self.starts[w] : end - self.starts[w]])
            start = end
        if not parts:
            return torch.zeros(0, self.cache.d_in)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _window(self, hookpoint: str, w: int) -> Tensor:
        loaded = self._loaded.get(hookpoint)
        if loaded is not None and loaded[0] == w:
            return loaded[1]
        self._loaded.pop(hookpoint, None)  # free the previous window first
        rows = torch.cat([self.cache.load_shard(hookpoint, i) for i in self.windows[w]])
        if self.shuffled:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + w + 1)
            rows = rows[torch.randperm(rows.shape[0], generator=g)]
        self._loaded[hookpoint] = (w, rows)
        return rows


def open_for_run(cfg: Any) -> tuple[ActivationCache, Any, dict[str, Any]]:
    """For `python -m sae_core --activations DIR`: the opened cache, the run config with the model and data
    settings of the cache's manifest (what evaluation reads back from run.json), and the run's run_info."""
    cache = ActivationCache(cfg.activations)
    m = cache.manifest
    from .data import EMBEDDED_DATASET_NAMES
    from .embedded import is_embedded_model

    embedded = is_embedded_model(cfg.model) and is_embedded_model(m["model"])  # two spellings of one model
    if cfg.model is not None and cfg.model != m["model"] and not embedded:
        raise ConfigError(
            f"MODEL is {cfg.model!r} but the cache {cache.folder} holds activations of {m['model']!r}; "
            "leave MODEL out with --activations, or write a cache of this model"
        )
    both_embedded = {cfg.dataset, m.get("dataset")} <= set(EMBEDDED_DATASET_NAMES)
    if cfg.dataset is not None and cfg.dataset != m.get("dataset") and not both_embedded:
        raise ConfigError(
            f"DATASET is {cfg.dataset!r} but the cache {cache.folder} was written from {m.get('dataset')!r}; "
            "leave DATASET out with --activations"
        )
    cache.check_exclusion(cfg.exclude_tokens)
    cfg = replace(
        cfg,
        # Only what the manifest knows (a cache written from token ids by write_cache has no text settings).
        **{name: m[name] for name in SOURCE_FIELDS if name in m},
        ctx_len=m["ctx_len"],
        revision=m.get("revision"),
        dtype=m.get("model_dtype", cfg.dtype),
        activations=str(cfg.activations),
    )
    # A cache written by write_cache from token ids does not know their dataset: evaluation then needs one.
    return cache, cfg, {"model": m["model"], "dataset": m.get("dataset") or "unknown"}


# ---------------------------------------------------------------------------------------------- the CLI
@dataclass(kw_only=True)
class CacheConfig:
    """What `python -m sae_core.cache` caches: the source (as for training), the hookpoints, the format."""

    out: str = ""
    """Folder of the cache (created; an interrupted cache there is resumed)."""

    hookpoints: list[str] = field(default_factory=list)
    """Hookpoint names or glob patterns, e.g. 'layers.*'."""

    layers: list[int] = field(default_factory=list)
    """Layer indices to cache (default: all)."""

    layer_stride: int = 1
    """Cache every layer_stride-th layer (ignored when layers is given)."""

    max_tokens: int | None = None
    """Cache the first ceil(max_tokens / ctx_len) sequences (default: all; evaluation holds out the rest)."""

    dtype: str = "bfloat16"
    """Storage dtype: float16, bfloat16 (default: the residual stream's outliers fit its range) or float32."""

    shard_tokens: int = 32_768
    """Rows (tokens) per shard file; training holds cache_shuffle_shards shards per hookpoint in memory."""

    batch_size: int = 8
    """Sequences per LM forward."""

    exclude_tokens: list[int] | None = None
    """Token ids not cached; default: the tokenizer's BOS id, and pad's when it is not EOS."""

    model_dtype: str = "float32"
    """Dtype of the language model: float32, bfloat16, float16."""

    ctx_len: int = 2048
    """Tokens per sequence."""

    split: str = "train"
    """Dataset split."""

    text_column: str = "text"
    """Column holding the text."""

    data_args: str = ""
    """Extra load_dataset arguments as key=value,key=value."""

    max_examples: int | None = None
    """Use at most this many documents of the dataset."""

    shuffle_seed: int | None = 42
    """Shuffle documents with this seed before tokenizing (None: keep order)."""

    data_preprocessing_num_proc: int | None = None
    """Processes for tokenization (default: half the cores)."""

    hf_token: str | None = None
    """Hugging Face token (default: HF_TOKEN); never logged or saved."""

    revision: str | None = None
    """Model revision (branch, tag or commit)."""

    attn_implementation: str | None = None
    """Attention implementation passed to transformers (e.g. eager, sdpa)."""

    load_in_8bit: bool = False
    """Load the language model in 8 bit with bitsandbytes."""

    trust_remote_code: bool = False
    """Allow model code from the Hub to run (off unless asked)."""

    device: str | None = None
    """cpu or cuda (default: cuda when available)."""

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        for name in ("shard_tokens", "batch_size", "layer_stride", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if self.ctx_len < 2:
            raise ConfigError(f"ctx_len must be at least 2, got {self.ctx_len}")


# Without MODEL: the embedded model and corpus, with the training demo's data settings (run.DEMO_DEFAULTS), so
# `python -m sae_core --activations DIR` then trains the demo from the cache.
CACHE_DEMO_DEFAULTS = {"ctx_len": 256, "batch_size": 8, "layer_stride": 8, "max_tokens": 120_000}


def main(argv: Sequence[str] | None = None) -> None:
    from .distributed import destroy, init_distributed
    from .run import _CFG, _optional_dests, _Parser, load_source
    from .utils import exit_on_bad_input

    class Parser(_Parser):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self._nullable = _optional_dests(CacheConfig, _CFG)

    def parser_for(defaults: CacheConfig | None) -> Any:
        parser = Parser(
            prog="python -m sae_core.cache",
            description="Run a language model once over a dataset and write the activations of the chosen "
            "hookpoints to a folder of shards, for `python -m sae_core --activations DIR`.",
        )
        parser.add_argument("model_pos", nargs="?", metavar="MODEL", help="Hub id or local folder.")
        parser.add_argument("dataset_pos", nargs="?", metavar="DATASET", help="Hub id, local file/folder.")
        parser.add_arguments(CacheConfig, dest=_CFG, default=defaults)
        return parser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser_for(None)
    try:
        ns = parser.parse_args(argv)
        if ns.model_pos is None:
            ns = parser_for(CacheConfig(**CACHE_DEMO_DEFAULTS)).parse_args(argv)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    cfg: CacheConfig = getattr(ns, _CFG)
    if not cfg.out:
        parser.exit(2, f"{parser.prog}: error: --out DIR is required (the cache folder)\n")
    with exit_on_bad_input():
        from .config import RunConfig

        source_cfg = RunConfig(
            model=ns.model_pos,
            dataset=ns.dataset_pos,
            ctx_len=cfg.ctx_len,
            split=cfg.split,
            text_column=cfg.text_column,
            data_args=cfg.data_args,
            max_examples=cfg.max_examples,
            shuffle_seed=cfg.shuffle_seed,
            data_preprocessing_num_proc=cfg.data_preprocessing_num_proc,
            hf_token=cfg.hf_token,
            revision=cfg.revision,
            dtype=cfg.model_dtype,
            attn_implementation=cfg.attn_implementation,
            load_in_8bit=cfg.load_in_8bit,
            trust_remote_code=cfg.trust_remote_code,
            device=cfg.device,
        )
        ctx = init_distributed(cfg.device)  # under torchrun: each rank runs its share of the batches
        try:
            model, tokenizer, sequences, model_name = load_source(source_cfg, ctx)
            source = {
                "model": model_name,
                "revision": cfg.revision,
                "model_dtype": cfg.model_dtype,
                "load_in_8bit": cfg.load_in_8bit,
                "dataset": ns.dataset_pos or "embedded",
                **{k: v for k, v in asdict(cfg).items() if k in SOURCE_FIELDS[2:]},
            }
            manifest = write_cache(
                model,
                tokenizer,
                sequences,
                cfg.out,
                hookpoints=cfg.hookpoints,
                layers=cfg.layers,
                layer_stride=cfg.layer_stride,
                exclude_tokens=cfg.exclude_tokens,
                max_tokens=cfg.max_tokens,
                dtype=cfg.dtype,
                shard_tokens=cfg.shard_tokens,
                batch_size=cfg.batch_size,
                source=source,
                ctx=ctx,
            )
        finally:
            destroy()
        if ctx.is_main:
            print(
                f"cached {manifest['tokens']:,} tokens x {len(manifest['hookpoints'])} hookpoints "
                f"({', '.join(manifest['hookpoints'])}) of {model_name} in {cfg.out}",
                flush=True,
            )


if __name__ == "__main__":
    main()
