"""The assets, in data-flow order: tokenized_dataset -> sae_checkpoints -> sae_evaluation ->
published_saes."""

from .evaluation import sae_evaluation
from .publishing import published_saes
from .tokenized import tokenized_dataset
from .training import sae_checkpoints

ALL_ASSETS = [tokenized_dataset, sae_checkpoints, sae_evaluation, published_saes]

__all__ = ["ALL_ASSETS", "published_saes", "sae_checkpoints", "sae_evaluation", "tokenized_dataset"]
