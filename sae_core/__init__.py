"""sae_core: train, evaluate and publish TopK sparse autoencoders on Hugging Face language models."""

from .config import SaeConfig, TrainConfig
from .errors import ConfigError, SaeCoreError, SaeLoadError
from .sae import ForwardOutput, Sae
from .version import __version__


def __getattr__(name: str):
    # The trainer pulls in transformers/datasets: import it only when asked for.
    if name == "SaeTrainer":
        from .trainer import SaeTrainer

        return SaeTrainer
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "ForwardOutput",
    "Sae",
    "SaeConfig",
    "SaeCoreError",
    "SaeLoadError",
    "SaeTrainer",
    "TrainConfig",
    "__version__",
]
