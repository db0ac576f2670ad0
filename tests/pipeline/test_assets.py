"""Each asset materialises on the tiny model (training on 2 torchrun ranks), in an ephemeral instance;
failures (a quality check, a rank, missing inputs, a bad model) stop the right step with a message that says
why."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
from dagster._core.event_api import PartitionKeyFilter

from sae_core.errors import ConfigError
from sae_pipeline.assets import published_saes, sae_checkpoints, sae_evaluation, tokenized_dataset
from sae_pipeline.assets.common import fail_step_on_bad_input
from sae_pipeline.assets.training import prepare_run_dir
from sae_pipeline.rank_entry import PipesProgress
from sae_pipeline.versions import checkpoint_data_version
from tests.support.pipeline import (
    MODEL,
    PARTITION,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def step_messages(trained, step: str) -> list[str]:
    logs = trained.instance.all_logs(trained.train.run_id)
    return [r.user_message for r in logs if r.user_message and r.step_key == step]


def test_tokenized_dataset_is_saved_with_its_metadata(trained):
    meta = metadata_of(trained.tokenize, "tokenized_dataset")
    folder = trained.root / "tokenized" / MODEL
    assert meta["path"] == str(folder) and (folder / "dataset_info.json").is_file()
    assert meta["sequences"] > 100 and meta["tokens"] == meta["sequences"] * 32 and meta["ctx_len"] == 32
    assert meta["dataset_fingerprint"] not in ("", "None")
    assert json.loads((folder / "pipeline.json").read_text())["sequences"] == meta["sequences"]


def test_sae_checkpoints_trained_on_two_ranks_report_through_rank_zero(trained):
    meta = metadata_of(trained.train, "sae_checkpoints")
    run_dir = trained.root / "runs" / MODEL / "stride-2"
    assert meta["path"] == str(run_dir) and meta["world_size"] == 2 and meta["resumed"] is False
    assert meta["hookpoints"] == ["layers.0", "layers.2"]  # 3 layers, stride 2
    assert meta["steps"] > 0 and meta["tokens"] > 0
    for h in ("layers.0", "layers.2"):
        assert 0 <= meta[f"fvu/{h}"] < 1.5 and (run_dir / h / "sae.safetensors").is_file()
    # Progress streamed from rank 0 into the step's log, once (one Pipes session, not one per rank).
    logs = step_messages(trained, "sae_checkpoints")
    assert any(m.startswith("step ") and "FVU mean" in m for m in logs)
    assert sum("successfully opened dagster pipes" in m for m in logs) == 1
    # The tokenized folder every stride shares was only read.
    assert not list((trained.root / "tokenized" / MODEL).glob("cache-*.arrow"))
    # Its data version is the SAE files' content (two hookpoints: not the hash of nothing).
    [event] = [
        e for e in trained.train.get_asset_materialization_events() if e.asset_key == sae_checkpoints.key
    ]
    version = event.materialization.tags["dagster/data_version"]
    assert (
        version == checkpoint_data_version(run_dir).value != checkpoint_data_version(run_dir / "none").value
    )


def test_sae_evaluation_passes_its_checks_and_shows_metrics_and_plots(trained):
    meta = metadata_of(trained.train, "sae_evaluation")
    assert meta["tokens"] > 0 and 0 <= meta["fvu_worst"] < 1.5 and "delta_ce_worst" in meta
    # Per-hookpoint metrics as a table; the plots as paths to files (no base64 images in the event log).
    rows = {row.data["hookpoint"]: row.data for row in meta["metrics"].records}
    assert set(rows) == {"layers.0", "layers.2"} and all(0 <= r["fvu"] < 1.5 for r in rows.values())
    assert {c.name for c in meta["metrics"].schema.columns} >= {"hookpoint", "fvu", "l0", "delta_ce", "kl"}
    plots = {k: v for k, v in meta.items() if k.startswith("plot/")}
    assert len(plots) == 3 and all(Path(v).is_file() and v.endswith(".png") for v in plots.values())
    # Evaluated by `python -m sae_core.evaluate` in one rank of the launcher, which reported through Pipes.
    logs = step_messages(trained, "sae_evaluation")
    assert any("-m sae_pipeline.eval_entry" in m and "--nproc-per-node 1" in m for m in logs)
    assert any(m.startswith("evaluating ") and m.endswith(" (rank 0 of 1)") for m in logs)
    assert sum("successfully opened dagster pipes" in m for m in logs) == 1
    checks = {c.check_name: c.passed for c in trained.train.get_asset_check_evaluations()}
    assert checks == {
        "fvu_below_threshold": True,
        "dead_pct_below_threshold": True,
        "delta_ce_below_threshold": True,
        "kl_below_threshold": True,
    }
    # One result per partition: the UI's check page lists them by partition, and another partition has none.
    assert {c.partition for c in trained.train.get_asset_check_evaluations()} == {PARTITION}
    storage = trained.instance.event_log_storage
    keys = [dg.AssetCheckKey(sae_evaluation.key, name) for name in checks]
    for partition, expected in ((PARTITION, set(keys)), (f"{MODEL}|4", set())):
        latest = storage.get_latest_asset_check_execution_by_key(
            keys, partition_filter=PartitionKeyFilter(key=partition)
        )
        assert set(latest) == expected and all(r.partition == partition for r in latest.values())


def test_published_saes_land_in_the_partitions_folder_with_a_card(trained):
    meta = metadata_of(trained.train, "published_saes")
    folder = trained.root / "published" / MODEL / "stride-2"
    assert meta["path"] == str(folder) and meta["created_commit"] is True
    assert (folder / "README.md").is_file() and (folder / "eval" / "report.json").is_file()
    assert sorted(p.name for p in folder.iterdir() if (p / "cfg.json").is_file()) == ["layers.0", "layers.2"]


def test_publishing_again_is_idempotent_and_prunes_the_previous_runs_trainer_state(trained):
    # What a retraining leaves: the replaced run as stride-2.previous, with its optimizer state.
    previous = trained.root / "runs" / MODEL / "stride-2.previous"
    (previous / "trainer_state").mkdir(parents=True)
    (previous / "trainer_state" / "state.pt").write_bytes(b"optimizer moments")
    (previous / "layers.0").mkdir()
    (previous / "layers.0" / "sae.safetensors").write_bytes(b"the old SAE")
    try:
        result = materialize([published_saes], PARTITION, trained.instance, trained.resources)
        assert result.success, failure_text(result)
        meta = metadata_of(result, "published_saes")
        assert meta["created_commit"] is False
        # Published: the old run's trainer state goes, its SAEs stay.
        assert meta["pruned"] == str(previous / "trainer_state") and not (previous / "trainer_state").exists()
        assert (previous / "layers.0" / "sae.safetensors").read_bytes() == b"the old SAE"
    finally:
        shutil.rmtree(previous, ignore_errors=True)


def test_a_failed_quality_check_blocks_publishing(trained, tmp_path):
    strict = write_registry(tmp_path / "strict.yaml", {**trained.entry, "thresholds": {"max_fvu": 1e-6}})
    resources = {**trained.resources, "registry": resources_for(trained.root, strict)["registry"]}
    card = trained.root / "published" / MODEL / "stride-2" / "README.md"
    before = card.stat().st_mtime_ns

    result = materialize([sae_evaluation, published_saes], PARTITION, trained.instance, resources)
    assert not result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["fvu_below_threshold"].passed and checks["kl_below_threshold"].passed
    assert "published_saes" not in {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "published_saes" not in {e.step_key for e in result.all_events if e.step_key and e.is_step_start}

    # Selecting the publish step alone does not get around the bar either.
    alone = materialize([published_saes], PARTITION, trained.instance, resources)
    assert not alone.success
    assert "refusing to publish, quality checks failed: fvu_below_threshold" in failure_text(alone)
    assert card.stat().st_mtime_ns == before


def test_a_torchrun_failure_surfaces_the_failing_ranks_error(trained, tmp_path):
    failing = resources_for(trained.root, trained.registry, entry_module="tests.support.failing_rank")
    resources = {**trained.resources, "launcher": failing["launcher"]}
    result = materialize([sae_checkpoints], f"{MODEL}|1", trained.instance, resources)
    assert not result.success
    text = failure_text(result)
    assert "rank 1 raised" in text and "RuntimeError: injected fault on rank 1" in text
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.metadata["failed_rank"].value == 1


def test_training_without_a_tokenized_dataset_says_what_to_run_first(trained, tmp_path):
    resources = resources_for(tmp_path / "empty-root", trained.registry)
    result = materialize([sae_checkpoints], PARTITION, trained.instance, resources)
    assert "materialize tokenized_dataset for partition 'tiny' first" in failure_text(result)


def test_an_unknown_model_fails_its_tokenize_run_with_the_reason(trained, tmp_path):
    bad = tiny_entry(tmp_path / "no-such-model", trained.entry["dataset"], name="broken")
    registry = write_registry(tmp_path / "models.yaml", trained.entry, bad)
    trained.instance.add_dynamic_partitions("models", ["broken"])
    resources = resources_for(tmp_path / "r", registry)
    result = materialize([tokenized_dataset], "broken", trained.instance, resources)
    assert "cannot load the tokenizer of model" in failure_text(result)
    assert "no-such-model" in failure_text(result)
    # A key that is not a partition is refused before any step runs.
    with pytest.raises(Exception, match="Could not find a partition with key `absent`"):
        materialize([tokenized_dataset], "absent", trained.instance, resources)


@pytest.mark.parametrize(
    ("state", "restart", "resumes", "moved"),
    [
        ("none", False, False, False),
        ("unfinished", False, True, False),
        ("unfinished", True, False, True),
        ("finished", False, False, True),
    ],
)
def test_a_failed_run_resumes_and_a_finished_one_starts_over(tmp_path, state, restart, resumes, moved):
    run_dir = tmp_path / "stride-2"
    (run_dir / "trainer_state").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    if state != "none":
        (run_dir / "trainer_state" / "rank0-step000000005.pt").write_bytes(b"x")
        steps = 5 if state == "unfinished" else 10
        (run_dir / "run.json").write_text(json.dumps({"steps": steps, "total_steps": 10}))
    assert prepare_run_dir(run_dir, restart=restart, log=dg.get_dagster_logger()) is resumes
    assert (tmp_path / "stride-2.previous").exists() is moved
    assert run_dir.exists() is resumes
    shutil.rmtree(tmp_path)


def test_publishing_to_a_hub_repo_reads_the_token_from_the_environment_only(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sae_pipeline.resources import HubPublisher
    from tests.support.hub_server import HubServer

    token = "hf_pipeline_test_token_0123456789"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the test server speaks LFS only
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", token)
    server = HubServer(tmp_path / "hub", tokens={token: "alice"}).start()
    try:
        hub = HubPublisher(
            repo_template="alice/sae-{model}-s{stride}", endpoint=server.url, token=dg.EnvVar("HF_TOKEN")
        )
        result = materialize([published_saes], PARTITION, trained.instance, {**trained.resources, "hub": hub})
        assert result.success, failure_text(result)
        meta = metadata_of(result, "published_saes")
        assert meta["repo"] == "alice/sae-tiny-s2" and meta["created_commit"] is True
        assert (tmp_path / "hub" / "repos" / "alice" / "sae-tiny-s2").is_dir()
    finally:
        server.stop()
    run = trained.instance.get_run_by_id(result.run_id)
    logged = [str(r.dagster_event or r.user_message) for r in trained.instance.all_logs(result.run_id)]
    assert token not in str(run.run_config) and not any(token in line for line in logged)


def test_bad_input_fails_the_step_in_one_line_without_retries_and_a_bug_keeps_its_traceback():
    with pytest.raises(dg.Failure) as failure:
        with fail_step_on_bad_input("reading the run"):
            raise ConfigError("k must be a positive integer\n(details)")
    assert failure.value.description == "reading the run: k must be a positive integer"
    assert failure.value.allow_retries is False
    with pytest.raises(dg.Failure, match="^no such file$"):
        with fail_step_on_bad_input(also=(OSError,)):
            raise FileNotFoundError("no such file")
    with pytest.raises(KeyError):
        with fail_step_on_bad_input("reading the run"):
            raise KeyError("a bug")


def test_training_progress_reaches_the_log_at_most_once_per_interval_and_the_last_record_is_kept():
    lines: list[str] = []
    progress = PipesProgress(SimpleNamespace(log=SimpleNamespace(info=lines.append)), interval_s=3600)
    for step in (1, 2, 3):
        progress({"step": step, "tokens": 10 * step, "tokens_per_s": 5.0, "fvu/layers.0": 0.5})
    assert lines == []  # within the interval: held back
    progress.flush()  # the end of training
    assert len(lines) == 1 and lines[0].startswith("step 3: 30 tokens") and "layers.0 0.500" in lines[0]
    progress.flush()
    assert len(lines) == 1  # nothing new, nothing logged
    progress.interval_s = 0
    progress({"step": 4, "tokens": 40, "tokens_per_s": 5.0, "fvu/layers.0": 0.4})
    assert lines[-1].startswith("step 4: 40 tokens")


def test_an_evaluation_that_fails_in_its_rank_fails_the_step_quoting_the_error_without_retries(
    trained, tmp_path
):
    root = tmp_path / "artefacts"
    shutil.copytree(trained.root / "runs", root / "runs")
    (root / "runs" / MODEL / "stride-2" / "layers.2" / "sae.safetensors").write_bytes(b"not safetensors")
    resources = {**trained.resources, "artefacts": resources_for(root, trained.registry)["artefacts"]}
    result = materialize([sae_evaluation], PARTITION, trained.instance, resources)
    assert not result.success
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data.user_failure_data
    assert (
        data.description.startswith("rank 0 raised ") and "(not retried)" in data.description.splitlines()[0]
    )
    assert "evaluation failed: rank 0 raised" in data.description and "SaeLoadError" in data.description
    assert "layers.2" in data.description
    assert data.metadata["retryable"].value is False
    assert not (root / "evaluations" / MODEL / "stride-2").exists()  # nothing half-written in its place


def test_evaluation_on_two_ranks_shares_the_saes_and_reports_what_one_rank_does(trained, tmp_path):
    root = tmp_path / "artefacts"
    shutil.copytree(trained.root / "runs", root / "runs")
    resources = {
        **trained.resources,
        "artefacts": resources_for(root, trained.registry)["artefacts"],
        "launcher": resources_for(root, trained.registry, eval_nproc=2)["launcher"],
    }
    result = materialize([sae_evaluation], PARTITION, trained.instance, resources)
    assert result.success, failure_text(result)
    logs = [r.user_message for r in trained.instance.all_logs(result.run_id) if r.user_message]
    assert any("--nproc-per-node 2" in m and "-m sae_pipeline.eval_entry" in m for m in logs)
    assert any(m.startswith("evaluating ") and m.endswith(" (rank 0 of 2)") for m in logs)
    two, one = metadata_of(result, "sae_evaluation"), metadata_of(trained.train, "sae_evaluation")
    rows = {r.data["hookpoint"]: r.data for r in two["metrics"].records}
    expected = {r.data["hookpoint"]: r.data for r in one["metrics"].records}
    assert list(rows) == list(expected) == ["layers.0", "layers.2"]  # one SAE per rank, merged in order
    for h, metrics in expected.items():
        for name, value in metrics.items():
            if isinstance(value, float):
                assert rows[h][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (h, name)
    report = json.loads((root / "evaluations" / MODEL / "stride-2" / "report.json").read_text())
    assert report["settings"]["ranks"] == 2 and report["settings"]["tokens"] == two["tokens"]
    assert len([k for k in two if k.startswith("plot/")]) == 3
