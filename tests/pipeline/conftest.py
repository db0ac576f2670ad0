"""Fixtures for the pipeline tests: a tiny model and corpus, registries written on the fly, and one trained
partition (tokenize -> train with 2 torchrun ranks -> evaluate -> publish) shared by the tests of a module."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from sae_pipeline.assets import published_saes, sae_checkpoints, sae_evaluation, tokenized_dataset
from tests.support.pipeline import (
    MODEL,
    PARTITION,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    from tests.support.tiny import make_text, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", make_text(300))


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL 15 server on 127.0.0.1 for the whole session (tests/support/postgres.py); each test makes
    its own database on it. Skips the tests that need it where PostgreSQL is not installed."""
    from tests.support.postgres import missing_reason, start_server, stop_server
    from tests.support.processes import free_port

    if reason := missing_reason():
        pytest.skip(reason)
    server = start_server(free_port())
    try:
        yield server
    finally:
        stop_server(server)


@dataclass
class Trained:
    root: Path
    registry: Path
    instance: dg.DagsterInstance
    resources: dict[str, Any]
    entry: dict[str, Any]
    tokenize: dg.ExecuteInProcessResult
    train: dg.ExecuteInProcessResult


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model_dir, corpus_file) -> Trained:
    """The tiny model tokenized, trained at stride 2 on 2 ranks, evaluated and published, in an ephemeral
    instance."""
    base = tmp_path_factory.mktemp("pipeline")
    entry = tiny_entry(tiny_model_dir, corpus_file)
    registry = write_registry(base / "models.yaml", entry)
    root = base / "artefacts"
    resources = resources_for(root, registry)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    tokenize = materialize([tokenized_dataset], MODEL, instance, resources)
    assert tokenize.success, failure_text(tokenize)
    train = materialize([sae_checkpoints, sae_evaluation, published_saes], PARTITION, instance, resources)
    assert train.success, failure_text(train)
    return Trained(root, registry, instance, resources, entry, tokenize, train)
