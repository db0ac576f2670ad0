"""Jobs. Tokenizing is per model and training per model x stride: Dagster cannot put assets of two partition
schemes in one job, so there are two (the sensor starts the first; the schedule, the UI or the CLI the
second). Each job's partitions come from the assets it selects."""

import dagster as dg

from .assets import published_saes, sae_checkpoints, sae_evaluation, tokenized_dataset

tokenize_job = dg.define_asset_job(
    "tokenize_job",
    selection=dg.AssetSelection.assets(tokenized_dataset),
    description="Tokenize a model's dataset (partition: the model key, e.g. smollm2-135m).",
)

train_job = dg.define_asset_job(
    "train_evaluate_publish_job",
    selection=dg.AssetSelection.assets(sae_checkpoints, sae_evaluation, published_saes),
    description="Train SAEs with torchrun, evaluate them against the registry's thresholds (blocking "
    "checks), publish them (partition: 'MODEL|STRIDE', e.g. smollm2-135m|2).",
)
