import os

import pytest

# Two cores: keep each test process (and each torchrun rank) from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# sparsify (the transcoder test's peer) decodes with its Triton kernel whenever triton is installed (the test
# extra has it), and that kernel has no CPU driver: its eager decoder is the one to compare with.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
# Step retries (sae_pipeline.retries) wait a second instead of a minute, here and in the Dagster processes the
# tests start (they inherit this environment).
os.environ.setdefault("SAE_PIPELINE_RETRY_DELAY_S", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (3 layers, d=32) with its tokenizer, loadable by path like a Hub model."""
    from tests.support.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    from tests.support.tiny import make_text, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", make_text(300))
