"""What a training run records besides its checkpoints.

Metrics loggers are plain callables `Logger = Callable[[dict], None]`: the trainer calls each of them on the
main rank with every metrics record ({"step", "tokens", "tokens_per_s", "fvu/<hookpoint>", ...}).
`run_loggers` gives the ones a run config asks for: metrics.jsonl always (it is part of the run folder),
Weights & Biases and TensorBoard when their flags are set and they are installed.

`Progress` is the main rank's view of the loop: a progress bar every step, a record to every logger every
`log_every` steps and at the last one. `Profiler` measures where time and memory go, for the benchmarks,
when `TrainConfig.profile` is set; it syncs the GPU every batch, so ordinary runs leave it off and their
run.json holds no such numbers.
"""

import json
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .distributed import DistContext, gather_objects

Logger = Callable[[dict], None]


def run_loggers(cfg: TrainConfig, run_dir: Path, config: dict[str, Any]) -> list[Logger]:
    """metrics.jsonl in run_dir, then wandb and TensorBoard if cfg asks (`config` is what wandb records)."""
    loggers = [jsonl_logger(run_dir / "metrics.jsonl")]
    if cfg.log_to_wandb:
        loggers += wandb_logger(run_dir.name, config)
    if cfg.log_to_tensorboard:
        loggers += tensorboard_logger(run_dir / "tensorboard")
    return loggers


def jsonl_logger(path: Path) -> Logger:
    """Appends each record as one JSON line (opened per record: a crash loses at most that line)."""

    def log(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    return log


def wandb_logger(name: str, config: dict[str, Any]) -> list[Logger]:
    """A Weights & Biases run named `name`: [its logger], or [] with a warning when wandb is not installed."""
    try:
        import wandb  # optional and heavy: only runs that log to wandb import it
    except ImportError:
        print("warning: --log_to_wandb given but wandb is not installed; logging to metrics.jsonl only")
        return []
    run = wandb.init(name=name, config=config)
    return [lambda record: run.log(record, step=record["step"])]


def tensorboard_logger(folder: Path) -> list[Logger]:
    """TensorBoard scalars in `folder`: [its logger], or [] with a warning when it is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports the optional tensorboard package
    except ImportError:
        print("warning: --log_to_tensorboard given but tensorboard is not installed")
        return []
    writer = SummaryWriter(str(folder))

    def log(record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key, value, record["step"])

    return [log]


class Progress:
    """The progress bar (FVU and tokens/s) and the metrics records of one `fit`, on the main rank."""

    def __init__(
        self,
        loggers: list[Logger],
        cfg: TrainConfig,
        total_steps: int,
        step: int,
        tokens: int,
        show_bar: bool,
    ) -> None:
        self.loggers, self.log_every, self.total_steps = loggers, cfg.log_every, total_steps
        self.bar = tqdm(total=total_steps, initial=step, desc="Training", unit="step", disable=not show_bar)
        self.started, self.tokens_at_start = time.perf_counter(), tokens

    def update(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        """After each optimizer step: `tokens` seen so far in the run, `metrics` of the step."""
        tokens_per_s = (tokens - self.tokens_at_start) / max(time.perf_counter() - self.started, 1e-9)
        fvus = [value for key, value in metrics.items() if key.startswith("fvu/")]
        self.bar.set_postfix(fvu=f"{sum(fvus) / len(fvus):.3f}", tok_s=f"{tokens_per_s:,.0f}")
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total_steps:
            record = {"step": step, "tokens": tokens, "tokens_per_s": tokens_per_s, **metrics}
            for log in self.loggers:
                log(record)

    def close(self) -> None:
        self.bar.close()


class Profiler:
    """Seconds spent in named parts of training and peak memory per rank; does nothing unless enabled."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds = {"lm_forward_s": 0.0, "sae_s": 0.0}

    @contextmanager
    def timed(self, part: str, sync: bool = False) -> Iterator[None]:
        """Adds the block's wall time to `part`; `sync` waits for the GPU first, so its queued work counts."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        yield
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[part] += time.perf_counter() - start

    def run_info(self, ctx: DistContext) -> dict[str, Any]:
        """run.json's profile entries (none when disabled). A collective when enabled: every rank calls it."""
        if not self.enabled:
            return {}
        return {
            "timings": {part: round(seconds, 3) for part, seconds in self.seconds.items()},
            "peak_memory_mb_per_rank": gather_objects(peak_memory_mb(self.device), ctx),
        }


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA allocation), in MiB."""
    peak = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak
