"""Trainer state on disk: what `--resume` needs to continue exactly where a run stopped.

Layout under the run folder:

    <hookpoint>/cfg.json, <hookpoint>/sae.safetensors    the SAEs (EleutherAI's layout; what users load)
    trainer_state/rank<R>-step<S>.pt                     optimizer, schedule, counters, data position,
                                                         and a copy of the SAE parameters of rank R
    run.json                                             config and progress summary (no secrets)

Each file is written atomically. The trainer state is self-contained (it holds the SAE parameters too), so a
crash between writing the SAE folders and the state never yields an inconsistent resume. A state file is
removed only after a newer complete one exists on every rank, and resume picks the newest step that every
rank completed. States load with `torch.load(weights_only=True)`: no pickled code runs.
"""

import json
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError
from .utils import atomic_open, first_line

STATE_DIR = "trainer_state"
_STATE_RE = re.compile(r"rank(\d+)-step(\d+)\.pt")


def state_path(run_dir: Path, rank: int, step: int) -> Path:
    return run_dir / STATE_DIR / f"rank{rank}-step{step:09d}.pt"


def save_state(run_dir: Path, rank: int, step: int, state: dict[str, Any]) -> Path:
    path = state_path(run_dir, rank, step)
    with atomic_open(path) as f:  # streamed: the state (Adam moments included) is never copied in memory
        torch.save(state, f)
    return path


def prune_states(run_dir: Path, rank: int, keep_step: int) -> None:
    """Remove this rank's states older than `keep_step` (call after every rank saved `keep_step`)."""
    for p in (run_dir / STATE_DIR).glob(f"rank{rank}-step*.pt"):
        m = _STATE_RE.fullmatch(p.name)
        if m and int(m.group(2)) < keep_step:
            p.unlink(missing_ok=True)


def has_state(run_dir: Path) -> bool:
    return any((run_dir / STATE_DIR).glob("rank*-step*.pt"))


def state_writers(world_size: int, distribute_layers: bool) -> int:
    """How many ranks write trainer states: all of them with --distribute_layers (each holds its own layers),
    else rank 0 alone (every rank holds the same SAEs)."""
    return world_size if distribute_layers else 1


def latest_complete_step(run_dir: Path, writer_ranks: int) -> int | None:
    """Newest step for which ranks 0..writer_ranks-1 all have a state file."""
    return _newest_complete(_state_files(run_dir), writer_ranks)


def newest_complete_states(run_dir: Path) -> list[dict[str, Any]]:
    """The trainer states of the newest step that every writing rank completed, in rank order; [] when the
    folder holds no trainer state.

    After a crash in the middle of a save, some ranks' newest state is missing: that step is passed over,
    never mixed with an older one. The number of writers comes from run.json (world_size,
    distribute_layers), else from the newest state file itself.
    """
    files = _state_files(run_dir)
    if not files:
        return []
    writers = _writers_of(run_dir, files)
    step = _newest_complete(files, writers)
    if step is None:
        raise CheckpointError(
            f"{run_dir / STATE_DIR}: no step has the trainer states of all {writers} writing ranks "
            "(a save was interrupted, or the states belong to another run)"
        )
    return [load_state(files[step][rank]) for rank in range(writers)]


def _state_files(run_dir: Path) -> dict[int, dict[int, Path]]:
    """{step: {rank: path}} of the state files in the run folder."""
    files: dict[int, dict[int, Path]] = {}
    for p in (run_dir / STATE_DIR).glob("rank*-step*.pt"):
        m = _STATE_RE.fullmatch(p.name)
        if m:
            files.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return files


def _newest_complete(files: dict[int, dict[int, Path]], writer_ranks: int) -> int | None:
    complete = [s for s, ranks in files.items() if set(ranks) >= set(range(writer_ranks))]
    return max(complete) if complete else None


def _writers_of(run_dir: Path, files: dict[int, dict[int, Path]]) -> int:
    try:
        run = json.loads((run_dir / "run.json").read_text())
        return state_writers(int(run["world_size"]), bool(run["distribute_layers"]))
    except (OSError, ValueError, KeyError, TypeError):  # no or an older run.json: a state says it too
        newest = files[max(files)]
        state = load_state(newest[min(newest)])
        return state_writers(int(state["world_size"]), bool(state["distribute_layers"]))


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: trainer state missing") from None
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(
            f"{path}: unreadable trainer state (corrupt, truncated or foreign file): {first_line(e, 200)}"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "saes" not in state:
        raise CheckpointError(
            f"{path}: not an sae_core trainer state "
            f"(keys: {sorted(state)[:8] if isinstance(state, dict) else type(state).__name__})"
        )
    return state


# Fields that may change between a run and its resume without changing what is computed.
RESUME_MUTABLE = frozenset(
    {
        "save_every",
        "log_every",
        "log_to_wandb",
        "log_to_tensorboard",
        "save_dir",
        "run_name",
        "resume",
        "device",
        "backend",
        "data_preprocessing_num_proc",
        "profile",
    }
)


def resumable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config that a resume must keep: everything that changes what is computed."""
    return {k: v for k, v in config.items() if k not in RESUME_MUTABLE}


def check_resumable(
    path: Path,
    state: dict[str, Any],
    config: dict[str, Any],
    world_size: int,
    distribute_layers: bool,
    hookpoints: list[str],
    defaults: dict[str, Any] | None = None,
) -> None:
    """`state` (read from `path`) was written by this rank layout and `config` (a `resumable_config`), and
    holds every SAE in `hookpoints`; else a one-line ConfigError or CheckpointError that says what to do."""
    if state["world_size"] != world_size or state["distribute_layers"] != distribute_layers:
        raise ConfigError(
            f"{path}: the run was saved with world size {state['world_size']} "
            f"(distribute_layers={state['distribute_layers']}); resume it with the same number of ranks "
            f"and mode (now {world_size}, distribute_layers={distribute_layers})"
        )
    # A field added after the checkpoint was written counts as its default (e.g. `optimizer`: adam).
    saved_cfg = {**(defaults or {}), **json.loads(state["config"])}
    for key, value in (defaults or {}).items():  # and a field added to a nested config (sae.transcode)
        if isinstance(value, dict) and isinstance(saved_cfg.get(key), dict):
            saved_cfg[key] = {**value, **saved_cfg[key]}
    diff = sorted(k for k in set(saved_cfg) | set(config) if saved_cfg.get(k) != config.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {config.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"--resume with a config that differs from the checkpoint's ({detail}); use the original values"
        )
    saved = set(state["saes"]) & set(state.get("optimizers", {}))
    missing = set(hookpoints) - saved
    if missing:
        raise CheckpointError(f"{path}: no state for {sorted(missing)}")
