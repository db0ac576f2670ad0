"""sae_core: train, evaluate and publish TopK sparse autoencoders on Hugging Face language models."""

__version__ = "0.1.0"

from .config import ConfigError, SaeConfig, TrainConfig
from .sae import ForwardOutput, Sae, SaeLoadError


def __getattr__(name: str):
    # The trainer pulls in transformers/datasets: import it only when asked for.
    if name == "SaeTrainer":
        from .trainer import SaeTrainer

        return SaeTrainer
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")


__all__ = ["ConfigError", "ForwardOutput", "Sae", "SaeConfig", "SaeLoadError", "SaeTrainer", "TrainConfig", "__version__"]
