"""sae_core: train, evaluate and publish TopK sparse autoencoders on Hugging Face language models."""

from .config import SaeConfig, TrainConfig
from .errors import ConfigError, SaeCoreError, SaeLoadError
from .version import __version__

# Imported when first asked for (`from sae_core import Sae` works as usual): torch takes seconds to import,
# the trainer pulls in transformers and datasets, and the pipeline's Dagster processes import sae_core.config
# and sae_core.errors without needing either.
_LAZY = {"Sae": ".sae", "ForwardOutput": ".sae", "SaeTrainer": ".trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
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
