"""The assets, in data-flow order: tokenized_dataset -> sae_checkpoints -> sae_evaluation ->
published_saes."""

import warnings

import dagster as dg

# The assets' explicit BackfillPolicy is a "beta" parameter in Dagster 1.13: without this, every command that
# loads the code location prints one warning per asset. (Hence the imports below come after it.)
warnings.filterwarnings(
    "ignore", message="Parameter `backfill_policy` of function `asset`", category=dg.BetaWarning
)

from .evaluation import sae_evaluation  # noqa: E402
from .publishing import published_saes  # noqa: E402
from .tokenized import tokenized_dataset  # noqa: E402
from .training import sae_checkpoints  # noqa: E402

ALL_ASSETS = [tokenized_dataset, sae_checkpoints, sae_evaluation, published_saes]

__all__ = ["ALL_ASSETS", "published_saes", "sae_checkpoints", "sae_evaluation", "tokenized_dataset"]
