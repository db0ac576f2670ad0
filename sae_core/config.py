"""Configuration dataclasses: what an SAE is (`SaeConfig`) and how it is trained (`TrainConfig`).

Every field carries a one-line `help` in its metadata: the CLI builds its flags and `--help` from them.
Validation happens here, at construction, so a typo fails before a model is loaded.
"""

from __future__ import annotations

import functools
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError


def opt(default: Any = MISSING, help: str = "", default_factory: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field with its help text (read by the CLI)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if default_factory is not MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return field(**kwargs)


def _keyword_only_after(n_positional: int, example: str):
    """Make a dataclass reject more than `n_positional` positional arguments with a helpful message.

    EleutherAI's README once showed `SaeConfig(gpt.config.hidden_size)`, which silently set
    expansion_factor to the hidden size (a 576x SAE). We refuse positional values instead.
    """

    def wrap(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            if len(args) > n_positional:
                raise ConfigError(
                    f"{cls.__name__} takes keyword arguments only (got positional {args[n_positional:]!r}); "
                    f"write e.g. {example}. The input width d_in is read from the model, not passed here."
                )
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap


@_keyword_only_after(0, "SaeConfig(expansion_factor=32, k=32)")
@dataclass
class SaeConfig:
    """Shape and sparsity of one TopK sparse autoencoder."""

    expansion_factor: int = opt(32, "Number of latents as a multiple of the input width d_in.")
    normalize_decoder: bool = opt(True, "Keep decoder rows at unit norm during training.")
    num_latents: int = opt(0, "Number of latents; when non-zero it wins over expansion_factor.")
    k: int = opt(32, "Number of latents kept active per token (the TopK).")

    def __post_init__(self) -> None:
        if self.num_latents < 0:
            raise ConfigError(f"num_latents must be >= 0 (0 means expansion_factor * d_in), got {self.num_latents}")
        if self.num_latents == 0 and self.expansion_factor <= 0:
            raise ConfigError(f"expansion_factor must be a positive integer, got {self.expansion_factor}")
        if self.k <= 0:
            raise ConfigError(f"k must be a positive integer (latents active per token), got {self.k}")
        if self.num_latents and self.k > self.num_latents:
            raise ConfigError(f"k={self.k} exceeds num_latents={self.num_latents}; choose k <= num_latents")

    def latents_for(self, d_in: int) -> int:
        """Number of latents for an input of width `d_in`, checking that k fits."""
        m = self.num_latents or self.expansion_factor * d_in
        if self.k > m:
            raise ConfigError(f"k={self.k} exceeds the {m} latents of an SAE on d_in={d_in}; lower k")
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SaeConfig:
        """Build from a cfg.json dict, ignoring keys that are not SaeConfig fields (d_in, hookpoint, ...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@_keyword_only_after(1, "TrainConfig(SaeConfig(k=32), batch_size=8)")
@dataclass
class TrainConfig:
    """How SAEs are trained on one model: which layers, how many tokens per step, when to save."""

    sae: SaeConfig = opt(default_factory=SaeConfig, help="The SAE configuration (its fields are flags too).")
    batch_size: int = opt(8, "Sequences per batch on each rank (the global batch is batch_size x world size).")
    grad_acc_steps: int = opt(1, "Batches whose gradients are accumulated into one optimizer step.")
    micro_acc_steps: int = opt(1, "Chunks each batch's tokens are split into before the SAE, to save memory.")
    lr: float | None = opt(None, "Adam learning rate; default 2e-4 / sqrt(num_latents / 2**14).")
    lr_warmup_steps: int = opt(1000, "Optimizer steps of linear warm-up; the LR then decays linearly to 0.")
    auxk_alpha: float = opt(1 / 32, "Weight of the AuxK loss that revives dead latents (0 turns it off).")
    dead_feature_threshold: int = opt(10_000_000, "A latent is dead after this many tokens without firing.")
    hookpoints: list[str] = opt(default_factory=list, help="Hookpoint names or glob patterns, e.g. 'layers.*'.")
    layers: list[int] = opt(default_factory=list, help="Layer indices to train SAEs on (default: all).")
    layer_stride: int = opt(1, "Train on every layer_stride-th layer (ignored when layers is given).")
    distribute_layers: bool = opt(False, "Under torchrun, place each layer's SAE on one rank instead of all.")
    exclude_tokens: list[int] | None = opt(
        None, "Token ids never fed to the SAEs; default: the tokenizer's BOS and pad ids (outlier norms)."
    )
    max_tokens: int | None = opt(None, "Stop after this many tokens (default: one pass over the dataset).")
    save_every: int = opt(1000, "Save a checkpoint every this many optimizer steps (and at the end).")
    save_dir: str = opt("checkpoints", "Folder under which the run folder is created.")
    run_name: str | None = opt(None, "Name of the run folder (default: a name derived from model and time).")
    log_every: int = opt(10, "Write a metrics line every this many optimizer steps.")
    log_to_wandb: bool = opt(False, "Also log metrics to Weights & Biases (when installed).")
    log_to_tensorboard: bool = opt(False, "Also log metrics to TensorBoard (when installed).")
    seed: int = opt(42, "Random seed for SAE initialisation.")
    sae_dtype: str = opt("float32", "Parameter dtype of the SAEs (float32 is recommended; optimizer works in it).")
    autocast: str | None = opt(None, "Compute dtype for the SAE encoder matmul: 'bfloat16' or None (exact).")
    profile: bool = opt(False, "Record where time and memory go in run.json (syncs the GPU every batch; for benchmarks).")

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            self.sae = SaeConfig.from_dict(self.sae)
        for name in ("batch_size", "grad_acc_steps", "micro_acc_steps", "layer_stride", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.auxk_alpha < 0:
            raise ConfigError(f"auxk_alpha must be >= 0, got {self.auxk_alpha}")
        if self.dead_feature_threshold <= 0:
            raise ConfigError(f"dead_feature_threshold must be positive, got {self.dead_feature_threshold}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be positive, got {self.max_tokens}")
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative layer indices, got {self.layers}")
        if self.sae_dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ConfigError(f"sae_dtype must be one of float32, float64, bfloat16, float16; got {self.sae_dtype!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast must be 'bfloat16', 'float16' or unset, got {self.autocast!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_lr(num_latents: int) -> float:
    """Gao et al.'s scaling: 2e-4 at 2**14 latents, falling with the square root of the width."""
    return 2e-4 / math.sqrt(num_latents / 2**14)
