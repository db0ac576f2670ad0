"""One-pass sweeps: several SAE configurations per hookpoint trained on the same activations, which are
computed (or read from the cache) once per batch.

`--sweep k=16,32 expansion_factor=8,16` and `--init_seeds 0 1 2` (sparsify's name) give every combination a
variant, named from its settings (`k16_expansion_factor8_seed0`), saved as a run of its own under
`<save_dir>/<run_name>/<variant>/` (its SAE folders, run.json, metrics.jsonl, trainer state): evaluate or
publish a variant by its folder. Each variant is an ordinary `SaeTrainer`; they take their optimizer steps
in turn, and every batch of activations is computed once and handed to all of them (`SharedBatches`).
Memory: each variant holds its SAEs, gradients and optimizer state, so the SAE part of a run's memory is
multiplied by the number of variants (the LM and one step's batches of activations are shared).

Only settings that leave the token stream alone can be swept (SWEEPABLE); the data order is the first
variant's (its seed).
"""

import itertools
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SaeConfig, TrainConfig
from .errors import ConfigError

if TYPE_CHECKING:  # activations pulls in datasets and torch; the pipeline imports this module without them
    from .activations import Batch

# Field -> how its text value is read. SaeConfig fields and the training settings that do not change which
# tokens a step sees.
SWEEPABLE: dict[str, Any] = {
    "k": int,
    "expansion_factor": int,
    "num_latents": int,
    "normalize_decoder": lambda v: {"true": True, "false": False}[v.lower()],
    "lr": float,
    "auxk_alpha": float,
    "dead_feature_threshold": int,
    "lr_warmup_steps": int,
    "optimizer": str,
    "normalize_inputs": lambda v: {"true": True, "false": False}[v.lower()],
}
SAE_FIELDS = ("k", "expansion_factor", "num_latents", "normalize_decoder")


def sweep_variants(folder: Path) -> list[Path]:
    """The variant run folders of a sweep's folder (subfolders with a run.json); [] for any other folder."""
    if not folder.is_dir() or (folder / "run.json").exists():
        return []
    return sorted(p for p in folder.iterdir() if (p / "run.json").is_file())


def parse_sweep(sweep: Sequence[str], init_seeds: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Every combination of `field=v1,v2` settings (and seeds) as a list of {field: value} dicts."""
    axes: list[tuple[str, list[Any]]] = []
    for item in sweep:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--sweep expects field=value,value (e.g. k=16,32), got {item!r}")
        if name not in SWEEPABLE:
            raise ConfigError(f"--sweep: {name!r} cannot be swept; choose from {', '.join(SWEEPABLE)}")
        if any(name == seen for seen, _ in axes):
            raise ConfigError(f"--sweep names {name!r} twice; give all its values in one item")
        try:
            parsed = [SWEEPABLE[name](v.strip()) for v in values.split(",")]
        except (ValueError, KeyError):
            raise ConfigError(f"--sweep {item!r}: a value is not a valid {name}") from None
        axes.append((name, parsed))
    if init_seeds:
        axes.append(("seed", list(init_seeds)))
    for name, values in axes:
        if len(set(values)) != len(values):  # two variants would share one folder
            raise ConfigError(
                f"--{'init_seeds' if name == 'seed' else 'sweep ' + name} repeats a value: {values}"
            )
    return [dict(zip([n for n, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def variant_name(settings: dict[str, Any]) -> str:
    return "_".join(f"{name}{value}" for name, value in settings.items())


def variant_config(cfg: TrainConfig, settings: dict[str, Any], save_dir: Path) -> TrainConfig:
    """`cfg` with a variant's settings, saving to save_dir/<variant>; a one-line error names the variant."""
    name = variant_name(settings)
    sae = {k: v for k, v in settings.items() if k in SAE_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in SAE_FIELDS}
    try:
        return replace(
            cfg,
            sae=SaeConfig(**{**cfg.sae.to_dict(), **sae}),
            save_dir=str(save_dir),
            run_name=name,
            **rest,
        )
    except ConfigError as e:
        raise ConfigError(f"sweep variant {name}: {e}") from None


def check_sweep(cfg: TrainConfig, sweep: Sequence[str], init_seeds: Sequence[int]) -> None:
    """Every variant's settings are valid (those that need the model's width are checked with it)."""
    for settings in parse_sweep(sweep, init_seeds):
        variant_config(cfg, settings, Path(cfg.save_dir))


class SharedBatches:
    """A source whose batch(i) is computed once for all the variants that ask for it in turn: it keeps the
    batches of the current step (grad_acc_steps of them)."""

    def __init__(self, source: Any, keep: int):
        self.source, self.keep = source, keep
        self.batches: dict[int, "Batch"] = {}

    def batch(self, index: int) -> "Batch":
        if index not in self.batches:
            while len(self.batches) >= self.keep:
                del self.batches[min(self.batches)]  # the oldest first, before computing the new one
            self.batches[index] = self.source.batch(index)
        return self.batches[index]


class SweepTrainer:
    """Trains every variant of a sweep in one pass over the activations (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        dataset: Any,
        model: Any,
        *,
        sweep: Sequence[str] = (),
        init_seeds: Sequence[int] = (),
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
        **trainer_kwargs: Any,
    ):
        from .trainer import SaeTrainer

        if cfg.loss_fn != "fvu":  # each variant would need a spliced forward of its own
            raise ConfigError(f"--loss_fn {cfg.loss_fn} cannot be swept; train each configuration alone")
        variants = parse_sweep(sweep, init_seeds)
        self.run_dir = Path(cfg.save_dir) / (cfg.run_name or "run")
        self.configs = [variant_config(cfg, settings, self.run_dir) for settings in variants]
        self.trainers: list[SaeTrainer] = []
        loggers = list(trainer_kwargs.pop("loggers", ()))
        for i, variant_cfg in enumerate(self.configs):
            name = variant_cfg.run_name
            info = {**(run_info or {}), "config": variant_cfg.to_dict(), "sweep_variant": name}
            # The caller's loggers hear every variant: each record says which.
            trainer_kwargs["loggers"] = [
                lambda record, log=log, name=name: log({**record, "variant": name}) for log in loggers
            ]
            try:
                trainer = SaeTrainer(
                    variant_cfg, dataset, model, run_info=info, progress=progress and i == 0, **trainer_kwargs
                )
            except ConfigError as e:  # e.g. a k that exceeds this variant's latents at the model's d_in
                raise ConfigError(f"sweep variant {variant_cfg.run_name}: {e}") from None
            self.trainers.append(trainer)
        steps = {t.run_dir.name: t.step for t in self.trainers}
        if len(set(steps.values())) > 1:
            raise ConfigError(
                f"{self.run_dir}: the sweep's variants were saved at different steps {steps}; resume needs "
                "them at one step (resume each variant alone, or start the sweep again)"
            )
        first = self.trainers[0]
        shared = SharedBatches(first.activations, keep=cfg.grad_acc_steps)
        for trainer in self.trainers:
            trainer.activations = shared
        self.hookpoints, self.total_steps = first.hookpoints, first.total_steps
        self.num_latents = first.num_latents
        self.variants = [t.run_dir.name for t in self.trainers]

    def fit(self, max_steps: int | None = None) -> dict[str, dict[str, float]]:
        """Train every variant to the end (or max_steps), in lockstep; returns each variant's last metrics."""
        stop_at = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        progress = [t._progress() for t in self.trainers]
        started = time.perf_counter()
        wall_at_start = [t.wall_time for t in self.trainers]
        metrics: dict[str, dict[str, float]] = {name: {} for name in self.variants}
        while self.trainers[0].step < stop_at:
            for trainer, bar, wall, name in zip(self.trainers, progress, wall_at_start, self.variants):
                done = trainer._train_step()
                metrics[name] = done.metrics
                trainer.step += 1
                trainer.tokens_seen += done.tokens
                trainer.wall_time = wall + time.perf_counter() - started  # the sweep's time so far
                if trainer.ctx.is_main:
                    bar.update(trainer.step, trainer.tokens_seen, done.metrics)
                if trainer.step % trainer.cfg.save_every == 0 or trainer.step == stop_at:
                    trainer.save()
        for bar in progress:
            bar.close()
        for trainer in self.trainers:
            trainer.finish()
        return metrics
