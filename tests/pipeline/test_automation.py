"""Definitions load; the sensor turns registry entries into partitions and tokenize runs; the schedule
requests one training run per registered model x stride."""

import subprocess
import sys
from datetime import datetime, timezone

import dagster as dg
import pytest

from sae_pipeline.registry import RegistryError
from sae_pipeline.resources import ModelRegistry
from sae_pipeline.schedules import retrain_schedule
from sae_pipeline.sensors import model_registry_sensor
from tests.support.pipeline import write_registry


def test_definitions_load_with_both_jobs_the_schedule_and_the_sensor():
    import sae_pipeline
    from sae_pipeline.definitions import defs

    assert sae_pipeline.defs is defs  # `dagster ... -m sae_pipeline` finds it too
    repo = defs.get_repository_def()
    assert {"tokenize_job", "train_evaluate_publish_job"} <= set(repo.job_names)
    assert repo.get_schedule_def("retrain_schedule").job_name == "train_evaluate_publish_job"
    assert repo.get_sensor_def("model_registry_sensor").job_name == "tokenize_job"
    checks = {key.name for key in repo.asset_graph.asset_check_keys}
    assert checks == {
        "fvu_below_threshold",
        "dead_pct_below_threshold",
        "delta_ce_below_threshold",
        "kl_below_threshold",
    }


def test_rank_entry_does_not_import_dagster():
    # Every torchrun rank imports it: it must not pay for Dagster (nor need it on remote nodes).
    code = "import sys, sae_pipeline.rank_entry; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sensor_adds_registered_models_as_partitions_and_requests_tokenization(tmp_path):
    b = {"model": "org/b", "ctx_len": 64}  # its name is derived: org--b
    path = write_registry(tmp_path / "models.yaml", {"name": "a", "model": "org/a"}, b)
    registry = ModelRegistry(path=str(path))
    with dg.DagsterInstance.ephemeral() as instance:
        with dg.build_sensor_context(instance=instance, resources={"registry": registry}) as context:
            result = model_registry_sensor(context)
        [add] = result.dynamic_partitions_requests
        assert add.partitions_def_name == "models" and list(add.partition_keys) == ["a", "org--b"]
        assert [r.partition_key for r in result.run_requests] == ["a", "org--b"]
        first_keys = [r.run_key for r in result.run_requests]

        # The daemon applies the request; the next tick adds nothing and repeats the same run keys
        # (deduplicated).
        instance.add_dynamic_partitions("models", ["a", "org--b"])
        with dg.build_sensor_context(instance=instance, resources={"registry": registry}) as context:
            again = model_registry_sensor(context)
        assert again.dynamic_partitions_requests == []
        assert [r.run_key for r in again.run_requests] == first_keys

        # Changing how a model is tokenized requests a new tokenize run for that model only.
        write_registry(path, {"name": "a", "model": "org/a", "ctx_len": 512}, b)
        with dg.build_sensor_context(instance=instance, resources={"registry": registry}) as context:
            changed = model_registry_sensor(context)
        new_keys = [r.run_key for r in changed.run_requests]
        assert new_keys[0] != first_keys[0] and new_keys[1] == first_keys[1]


def test_sensor_fails_the_tick_on_a_malformed_registry(tmp_path):
    path = write_registry(tmp_path / "models.yaml", {"name": "a|b", "model": "x"})
    with dg.DagsterInstance.ephemeral() as instance:
        resources = {"registry": ModelRegistry(path=str(path))}
        with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
            with pytest.raises(RegistryError, match="invalid model key 'a|b'"):
                model_registry_sensor(ctx)


def test_schedule_requests_one_run_per_registered_model_and_stride(tmp_path):
    path = write_registry(
        tmp_path / "models.yaml",
        {"name": "a", "model": "org/a"},
        {"name": "b", "model": "org/b", "strides": [2]},
        {"name": "not-yet", "model": "org/c"},  # in the registry, but the sensor has not added it yet
    )
    resources = {"registry": ModelRegistry(path=str(path))}
    when = datetime(2026, 11, 29, 3, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:  # a schedule context needs a persistent instance
        with dg.build_schedule_context(instance, scheduled_execution_time=when, resources=resources) as ctx:
            assert isinstance(retrain_schedule(ctx), dg.SkipReason)
        instance.add_dynamic_partitions("models", ["a", "b"])
        with dg.build_schedule_context(instance, scheduled_execution_time=when, resources=resources) as ctx:
            requests = retrain_schedule(ctx)
    keys = sorted(str(r.partition_key) for r in requests)
    assert keys == ["a|1", "a|2", "a|4", "b|2"]
    assert len({r.run_key for r in requests}) == len(requests)
    assert all(r.partition_key.keys_by_dimension["model"] in ("a", "b") for r in requests)


def requested(result, asset) -> list[str]:
    return sorted(str(k) for k in result.get_requested_partitions(dg.AssetKey(asset)))


def test_a_new_model_is_trained_evaluated_and_published_once_after_tokenization():
    # The conditions of the train_new_models sensor, evaluated tick by tick as the daemon does.
    from sae_pipeline.definitions import defs

    def materialized(asset: str, partition: str) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))

    with dg.instance_for_test() as instance:
        # A model already there when automation starts is left to the schedule, tokenized or not.
        instance.add_dynamic_partitions("models", ["old"])
        materialized("tokenized_dataset", "old")
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert tick.total_requested == 0
        # A new model: nothing until its tokenized dataset exists, then each stride once.
        instance.add_dynamic_partitions("models", ["new"])
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert tick.total_requested == 0
        materialized("tokenized_dataset", "new")
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        # Training, evaluation and publishing are asked for together (one run per partition, in order).
        for asset in ("sae_checkpoints", "sae_evaluation", "published_saes"):
            assert requested(tick, asset) == ["new|1", "new|2", "new|4"], asset
        # Once done, nothing is asked for again.
        for asset in ("sae_checkpoints", "sae_evaluation", "published_saes"):
            materialized(asset, "new|2")
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert tick.total_requested == 0
        # Retokenizing does not retrain (the weekly schedule does).
        materialized("tokenized_dataset", "new")
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert tick.total_requested == 0


def test_training_a_stride_the_entry_leaves_out_ends_without_a_materialization(tmp_path):
    from sae_pipeline.assets import sae_checkpoints
    from tests.support.pipeline import failure_text, materialize, resources_for

    path = write_registry(tmp_path / "models.yaml", {"name": "b", "model": "org/b", "strides": [2]})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("models", ["b"])
        result = materialize([sae_checkpoints], "b|4", instance, resources_for(tmp_path / "artefacts", path))
        assert result.success, failure_text(result)
        assert not result.get_asset_materialization_events()
        logs = [r.user_message for r in instance.all_logs(result.run_id) if r.user_message]
    assert any("stride 4 is not trained for b: its registry entry lists strides [2]" in m for m in logs)
