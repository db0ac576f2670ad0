"""The pipeline's code location with cheap ranks: sae_pipeline's assets, jobs and resources as they are, but
the launcher runs tests.support.fake_rank in each torchrun rank instead of training (no sensor, no schedule:
the tests launch what they need). For the service tests, where runs must come and go in seconds."""

import dagster as dg

from sae_pipeline.assets import ALL_ASSETS
from sae_pipeline.definitions import default_resources
from sae_pipeline.jobs import tokenize_job, train_job
from sae_pipeline.resources import TorchrunLauncher

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[tokenize_job, train_job],
    resources={
        **default_resources(),
        "launcher": TorchrunLauncher(entry_module="tests.support.fake_rank", omp_num_threads=1),
    },
)
