"""One-pass sweeps in the pipeline (registry `sweep:` / `init_seeds:`): training trains every variant in one
torchrun launch, evaluation evaluates each and the checks judge them all, publishing publishes each to its own
folder (or repo) with its card."""

import json
import shutil

import dagster as dg
import pytest

from sae_pipeline.assets import latent_dashboards, published_saes, sae_checkpoints, sae_evaluation
from sae_pipeline.assets.training import prepare_run_dir
from sae_pipeline.registry import RegistryError, parse_entry
from tests.support.pipeline import MODEL, PARTITION, failure_text, materialize, resources_for, write_registry


def metadata_of(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_a_sweep_is_trained_in_one_pass_evaluated_and_published_variant_by_variant(trained, tmp_path):
    root = tmp_path / "artefacts"
    shutil.copytree(trained.root / "tokenized", root / "tokenized")
    registry = write_registry(tmp_path / "models.yaml", {**trained.entry, "sweep": ["k=4,8"]})
    resources = resources_for(root, registry)
    result = materialize(
        [sae_checkpoints, sae_evaluation, published_saes, latent_dashboards],
        PARTITION,
        trained.instance,
        resources,
        run_config={"ops": {"latent_dashboards": {"config": {"top_firing": 3, "max_tokens": 256}}}},
    )
    assert result.success, failure_text(result)

    run_dir = root / "runs" / MODEL / "stride-2"
    train = metadata_of(result, "sae_checkpoints")
    assert train["variants"] == ["k4", "k8"] and train["world_size"] == 2 and train["path"] == str(run_dir)
    for variant, k in (("k4", 4), ("k8", 8)):
        for h in ("layers.0", "layers.2"):
            assert json.loads((run_dir / variant / h / "cfg.json").read_text())["k"] == k
            assert 0 <= train[f"fvu/{variant}/{h}"] < 1.5
    logs = [r.user_message for r in trained.instance.all_logs(result.run_id) if r.user_message]
    assert sum("-m sae_pipeline.rank_entry" in m and "--sweep k=4,8" in m for m in logs) == 1  # one pass

    evaluation = metadata_of(result, "sae_evaluation")
    rows = [r.data["hookpoint"] for r in evaluation["metrics"].records]
    assert rows == ["k4/layers.0", "k4/layers.2", "k8/layers.0", "k8/layers.2"]
    eval_dir = root / "evaluations" / MODEL / "stride-2"
    assert (eval_dir / "k4" / "report.json").is_file() and (eval_dir / "k8" / "report.json").is_file()
    assert json.loads((eval_dir / "report.json").read_text())["settings"]["variants"] == ["k4", "k8"]
    assert all(c.passed for c in result.get_asset_check_evaluations())

    published = metadata_of(result, "published_saes")
    folder = root / "published" / MODEL / "stride-2"
    assert [row["variant"] for row in published["variants"]] == ["k4", "k8"]
    for variant, k in (("k4", 4), ("k8", 8)):
        assert json.loads((folder / variant / "layers.2" / "cfg.json").read_text())["k"] == k
        card = (folder / variant / "README.md").read_text()
        assert "layers.0" in card and (folder / variant / "eval" / "report.json").is_file()
        assert "## The sweep" in card and f"{folder / variant} (this one)" in card
        assert str(folder / ("k8" if variant == "k4" else "k4")) in card  # and where the other one is

    dashboards = metadata_of(result, "latent_dashboards")
    site = root / "dashboards" / MODEL / "stride-2"
    assert dashboards["latents"] == 2 * 2 * 3  # variants x hookpoints x top_firing
    assert {r.data["hookpoint"] for r in dashboards["preview"].records} == set(rows)
    assert 'href="k8/index.html"' in (site / "index.html").read_text()
    assert (site / "k4" / "index.html").is_file() and (site / "k8" / "dashboard.json").is_file()


@pytest.mark.parametrize(("finished", "resumes"), [(False, True), (True, False)])
def test_a_sweep_folder_resumes_when_a_variant_is_unfinished_and_starts_over_when_all_are_done(
    tmp_path, finished, resumes
):
    run_dir = tmp_path / "stride-2"
    for variant, steps in (("k4", 10), ("k8", 10 if finished else 5)):
        (run_dir / variant / "trainer_state").mkdir(parents=True)
        (run_dir / variant / "trainer_state" / f"rank0-step{steps:09d}.pt").write_bytes(b"x")
        (run_dir / variant / "run.json").write_text(json.dumps({"steps": steps, "total_steps": 10}))
    assert prepare_run_dir(run_dir, restart=False, log=dg.get_dagster_logger()) is resumes
    assert (tmp_path / "stride-2.previous").exists() is not resumes


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sweep": "k=4,8"}, "`sweep` must be a list, got 'k=4,8'"),
        ({"sweep": ["q=1"]}, "sweep: --sweep: 'q' cannot be swept; choose from k, "),
        ({"sweep": ["k=16", "32"]}, "sweep item '32' is not field=value,value: quote each item in YAML"),
        ({"init_seeds": [0, "a"]}, "`init_seeds` must be a list of integers, got [0, 'a']"),
        ({"init_seeds": [1, 1]}, "sweep: --init_seeds repeats a value: [1, 1]"),
        ({"train": {"sweep": ["k=4"]}}, "train.sweep is set by the entry's `sweep`"),
    ],
)
def test_a_bad_sweep_fails_the_registry_in_one_line(fields, message):
    with pytest.raises(RegistryError) as error:
        parse_entry({"model": "m", **fields}, "models[0]")
    assert str(error.value).startswith(f"models[0] ('m'): {message}") and "\n" not in str(error.value)


def test_a_sweep_becomes_the_training_flags():
    entry = parse_entry({"model": "m", "sweep": ["k=16,32", "lr=1e-3,2e-3"], "init_seeds": [0, 1]})
    assert entry.sweep_args() == ["--sweep", "k=16,32", "lr=1e-3,2e-3", "--init_seeds", "0", "1"]
    assert parse_entry({"model": "m"}).sweep_args() == []
