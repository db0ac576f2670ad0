"""The assets, in data-flow order: tokenized_dataset -> (cached_activations) -> sae_checkpoints ->
sae_evaluation -> published_saes; latent_dashboards (after sae_evaluation) is materialised on request, and
cached_activations only exists for registry entries with `cache: true`."""

from .activations import cached_activations
from .dashboards import latent_dashboards
from .evaluation import sae_evaluation
from .publishing import published_saes
from .tokenized import tokenized_dataset
from .training import sae_checkpoints

ALL_ASSETS = [
    tokenized_dataset,
    cached_activations,
    sae_checkpoints,
    sae_evaluation,
    published_saes,
    latent_dashboards,
]

__all__ = [
    "ALL_ASSETS",
    "cached_activations",
    "latent_dashboards",
    "published_saes",
    "sae_checkpoints",
    "sae_evaluation",
    "tokenized_dataset",
]
