"""Code and data versions (sae_pipeline/versions.py): what makes the UI show a partition as stale.

A real instance, a real tokenization of the tiny model, and a real torchrun launch of one cheap fake rank
(tests/support/fake_rank.py) for the training. Staleness is read with Dagster's own resolver, the one behind
the UI's "stale" badges (CachingStaleStatusResolver, through Dagster's test helper that builds it).
"""

import dagster as dg
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._utils.test.data_versions import get_stale_status_resolver

from sae_pipeline.assets import ALL_ASSETS, sae_checkpoints, tokenized_dataset
from sae_pipeline.versions import TOKENIZED_CODE_VERSION, TRAINING_CODE_VERSION, checkpoint_data_version
from tests.support.pipeline import (
    MODEL,
    PARTITION,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)


def test_retokenizing_other_data_marks_the_trained_partitions_stale_and_the_same_data_does_not(
    tmp_path, tiny_model_dir, corpus_file
):
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    resources = resources_for(
        tmp_path / "artefacts",
        registry,
        entry_module="tests.support.fake_rank",
        nproc_per_node=1,
        extra_env={"FAKE_RANK_DIR": str(tmp_path / "ranks"), "FAKE_RANK_SLEEP_S": "0"},
    )

    def run(asset, partition: str) -> dg.AssetMaterialization:
        result = materialize([asset], partition, instance, resources)
        assert result.success, failure_text(result)
        [event] = result.get_asset_materialization_events()
        return event.materialization

    def status(partition: str = PARTITION):
        resolver = get_stale_status_resolver(instance, ALL_ASSETS)
        causes = resolver.get_stale_root_causes(sae_checkpoints.key, partition)
        return resolver.get_status(sae_checkpoints.key, partition), [(c.key, c.reason) for c in causes]

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("models", [MODEL])
        tokenized = run(tokenized_dataset, MODEL)
        trained = run(sae_checkpoints, PARTITION)
        assert tokenized.tags["dagster/code_version"] == TOKENIZED_CODE_VERSION
        assert trained.tags["dagster/code_version"] == TRAINING_CODE_VERSION
        # The checkpoints' version is their files' content, computed by the step (the fake rank wrote none).
        run_dir = tmp_path / "artefacts" / "runs" / MODEL / "stride-2"
        assert trained.tags["dagster/data_version"] == checkpoint_data_version(run_dir).value
        assert trained.tags["dagster/data_version_is_user_provided"] == "true"
        assert status() == (StaleStatus.FRESH, [])
        assert status(f"{MODEL}|4")[0] == StaleStatus.MISSING

        # A newer training code version (the asset's code_version bumped) would make the partition stale too.
        bumped = sae_checkpoints.map_asset_specs(lambda spec: spec.replace_attributes(code_version="bumped"))
        resolver = get_stale_status_resolver(
            instance, [bumped if a is sae_checkpoints else a for a in ALL_ASSETS]
        )
        assert resolver.get_status(sae_checkpoints.key, PARTITION) == StaleStatus.STALE
        assert [c.reason for c in resolver.get_stale_causes(sae_checkpoints.key, PARTITION)] == [
            "has a new code version"
        ]

        # Tokenized again from the same data and settings: the same version, nothing to retrain.
        again = run(tokenized_dataset, MODEL)
        assert again.tags["dagster/data_version"] == tokenized.tags["dagster/data_version"]
        assert status() == (StaleStatus.FRESH, [])

        # Other source data (fewer documents): a new version, and the trained stride says why it is stale.
        write_registry(registry, tiny_entry(tiny_model_dir, corpus_file, max_examples=200))
        other = run(tokenized_dataset, MODEL)
        assert other.tags["dagster/data_version"] != tokenized.tags["dagster/data_version"]
        key = dg.AssetKey("tokenized_dataset")
        assert status() == (
            StaleStatus.STALE,
            [(AssetKeyPartitionKey(key, MODEL), "has a new data version")],
        )


def test_a_sweeps_checkpoint_version_covers_its_variants_sae_files_and_nothing_else(tmp_path):
    empty = checkpoint_data_version(tmp_path).value
    sae = tmp_path / "k=16" / "layers.0"
    sae.mkdir(parents=True)
    (tmp_path / "k=16" / "run.json").write_text("{}")  # what makes a folder a sweep's variant
    (sae / "cfg.json").write_text("{}")
    (sae / "sae.safetensors").write_bytes(b"weights")
    version = checkpoint_data_version(tmp_path).value
    assert version != empty
    variant = tmp_path / "k=16"
    (variant / "trainer_state").mkdir()
    (variant / "trainer_state" / "rank0-step10.pt").write_bytes(b"optimizer state")
    for aside in (variant / "best" / "layers.0", variant / ".layers.0.tmp-x"):
        aside.mkdir(parents=True)
        (aside / "cfg.json").write_text("{}")
        (aside / "sae.safetensors").write_bytes(b"other")
    assert checkpoint_data_version(tmp_path).value == version
    (sae / "sae.safetensors").write_bytes(b"retrained")
    assert checkpoint_data_version(tmp_path).value != version
