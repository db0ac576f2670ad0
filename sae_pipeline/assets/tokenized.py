"""tokenized_dataset: a model's training text, tokenized with its tokenizer and cut into ctx_len sequences."""

import json
import os
import shutil

import dagster as dg

from ..partitions import model_partitions
from ..resources import ArtefactStore, ModelRegistry
from ..versions import TOKENIZED_CODE_VERSION, tokenized_data_version
from .common import fail_step_on_bad_input, registry_entry, staging_dir, swap_in

PIPELINE_INFO = "pipeline.json"  # written next to the dataset files: what it was made from


@dg.asset(
    partitions_def=model_partitions,
    group_name="sae",
    kinds={"python"},
    code_version=TOKENIZED_CODE_VERSION,
    description="The registry entry's dataset, tokenized with the model's tokenizer into ctx_len sequences "
    "(sae_core.data.prepare_dataset), saved with Dataset.save_to_disk under <root>/tokenized/<model>/.",
)
def tokenized_dataset(
    context: dg.AssetExecutionContext, registry: ModelRegistry, artefacts: ArtefactStore
) -> dg.MaterializeResult:
    from transformers import AutoTokenizer

    from sae_core.data import prepare_dataset
    from sae_core.embedded import embedded_corpus_fingerprint, embedded_model_path, is_embedded_model

    entry = registry_entry(registry, context.partition_key)
    target = artefacts.tokenized_dir(entry.name)
    token = os.environ.get("HF_TOKEN") or None
    embedded_data = entry.dataset in ("embedded", "python-docs")
    with fail_step_on_bad_input(
        f"cannot load the tokenizer of model {entry.model!r} (registry entry {entry.name!r})",
        also=(
            OSError,
            ValueError,
            ModuleNotFoundError,
        ),  # what transformers raises for a missing or odd model
    ):
        model_path = str(embedded_model_path()) if is_embedded_model(entry.model) else entry.model
        tokenizer = AutoTokenizer.from_pretrained(model_path, token=token)
    context.log.info(f"tokenizing dataset {entry.dataset!r} into rows of {entry.ctx_len} tokens")
    with fail_step_on_bad_input(f"dataset {entry.dataset!r} of registry entry {entry.name!r}"):
        prepared = prepare_dataset(
            None if embedded_data else entry.dataset,
            tokenizer,
            ctx_len=entry.ctx_len,
            split=entry.split,
            text_column=entry.text_column,
            data_args=entry.data_args,
            max_examples=entry.max_examples,
            shuffle_seed=entry.shuffle_seed,
            token=token,
        )
    sequences = prepared.sequences
    if len(sequences) == 0:
        raise dg.Failure(
            description=f"dataset {entry.dataset!r} yields no full {entry.ctx_len}-token sequence: use more "
            "documents (max_examples) or a smaller ctx_len",
            allow_retries=False,
        )

    fingerprint = embedded_corpus_fingerprint() if embedded_data else prepared.fingerprint
    info = {
        "registry_entry": entry.tokenization_settings(),
        "documents": prepared.documents,
        "sequences": len(sequences),
        "tokens": len(sequences) * entry.ctx_len,
        "dataset_fingerprint": fingerprint,
        "tokenizer": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "dagster_run_id": context.run.run_id,
    }
    # Written aside and renamed into place: a training run reading the previous version keeps a whole dataset.
    staging = staging_dir(target)
    try:
        sequences.save_to_disk(str(staging))
        (staging / PIPELINE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    context.log.info(f"saved {len(sequences):,} sequences ({info['tokens']:,} tokens) to {target}")
    return dg.MaterializeResult(
        # Retokenizing other data (or with other settings) marks the model's SAEs stale in the UI.
        data_version=tokenized_data_version(info),
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            "sequences": len(sequences),
            "tokens": info["tokens"],
            "ctx_len": entry.ctx_len,
            "documents": prepared.documents,
            "tokenizer": f"{entry.model} ({type(tokenizer).__name__}, vocab {len(tokenizer):,})",
            "dataset": entry.dataset,
            "dataset_fingerprint": str(fingerprint),
        },
    )
