"""The assets, in data-flow order: tokenized_dataset -> sae_checkpoints -> sae_evaluation ->
published_saes; latent_dashboards (after sae_evaluation) is materialised on request."""

from .dashboards import latent_dashboards
from .evaluation import sae_evaluation
from .publishing import published_saes
from .tokenized import tokenized_dataset
from .training import sae_checkpoints

ALL_ASSETS = [tokenized_dataset, sae_checkpoints, sae_evaluation, published_saes, latent_dashboards]

__all__ = [
    "ALL_ASSETS",
    "latent_dashboards",
    "published_saes",
    "sae_checkpoints",
    "sae_evaluation",
    "tokenized_dataset",
]
