"""CI path: the command line for real, as a user runs it, on the tiny model with 2 ranks.

A fresh DAGSTER_HOME, `python -m sae_pipeline register`, then the tokenize job and the train -> evaluate ->
publish job, exactly as README documents; the published folder is checked at the end. Twice: `dg launch
--partition` with the default SQLite storage, and `dagster job execute` (partitions given as tags) with the
production instance (deploy/dagster.yaml) on a real PostgreSQL 15. (`dg launch --job` runs the same
`job_execute_command_impl` in Dagster 1.13.27, so each CLI is run once, not once per storage.)
A fake HF_TOKEN is in the environment throughout: it must show up in no file the runs
wrote (artefacts, the published folder, DAGSTER_HOME with its storage and compute logs), in no row of the
database (pg_dump) nor in what the commands printed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.pipeline import tiny_entry, write_registry

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "hf_CliPipelineFakeToken0123456789abcdef"


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.parametrize(("storage", "cli"), [("sqlite", "dg launch"), ("postgres", "dagster job execute")])
def test_the_cli_tokenizes_trains_evaluates_and_publishes(
    storage, cli, request, tmp_path, tiny_model_dir, corpus_file
):
    home, root = tmp_path / "dagster_home", tmp_path / "artefacts"
    home.mkdir()
    instance_env: dict[str, str] = {}
    if storage == "postgres":
        postgres = request.getfixturevalue("postgres")
        database = postgres.create_database()
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        instance_env = {**postgres.dagster_env(database), "DAGSTER_COMPUTE_LOGS_DIR": str(home / "logs")}
    else:
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    entry = tiny_entry(tiny_model_dir, corpus_file, name="cli-tiny")
    registry = write_registry(tmp_path / "models.yaml", entry)
    config = tmp_path / "run_config.yaml"
    config.write_text(yaml.safe_dump({"resources": {"launcher": {"config": {"nproc_per_node": 2}}}}))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SAE_PIPELINE_REGISTRY": str(registry),
        "SAE_PIPELINE_ROOT": str(root),
        "OMP_NUM_THREADS": "1",
        "HF_TOKEN": FAKE_TOKEN,
        **instance_env,
    }

    registered = run([sys.executable, "-m", "sae_pipeline", "register"], env)
    assert "cli-tiny|2" in registered.stdout
    if cli == "dg launch":
        # The project's [tool.dg] finds the code location; the partition is a flag.
        dg = [str(Path(sys.executable).with_name("dg")), "launch"]
        tokenized = run([*dg, "--job", "tokenize_job", "--partition", "cli-tiny"], env)
        trained = run(
            [*dg, "--job", "train_evaluate_publish_job", "--partition", "cli-tiny|2", "-c", str(config)], env
        )
    else:
        dagster = [sys.executable, "-m", "dagster", "job", "execute", "-m", "sae_pipeline.definitions"]
        tokenized = run(
            [*dagster, "-j", "tokenize_job", "--tags", json.dumps({"dagster/partition": "cli-tiny"})], env
        )
        tags = {
            "dagster/partition": "cli-tiny|2",
            "dagster/partition/model": "cli-tiny",
            "dagster/partition/stride": "2",
        }
        trained = run(
            [*dagster, "-j", "train_evaluate_publish_job", "-c", str(config), "--tags", json.dumps(tags)], env
        )

    published = root / "published" / "cli-tiny" / "stride-2"
    assert (published / "README.md").read_text().startswith("---")
    for hookpoint in ("layers.0", "layers.2"):
        assert (published / hookpoint / "sae.safetensors").is_file()
        assert json.loads((published / hookpoint / "cfg.json").read_text())["k"] == 8
    report = json.loads((published / "eval" / "report.json").read_text())
    assert set(report["hookpoints"]) == {"layers.0", "layers.2"}
    assert json.loads((root / "runs" / "cli-tiny" / "stride-2" / "run.json").read_text())["world_size"] == 2

    # The token was in every step's environment, and was written nowhere.
    printed = [done.stdout + done.stderr for done in (registered, tokenized, trained)]
    assert not any(FAKE_TOKEN in text for text in printed)
    if storage == "postgres":
        # The runs' records are in PostgreSQL (no SQLite files), the step logs in DAGSTER_COMPUTE_LOGS_DIR.
        dump = postgres.dump(database)
        assert dump.count("train_evaluate_publish_job") > 10 and "ASSET_MATERIALIZATION" in dump
        assert FAKE_TOKEN not in dump
        assert not (home / "history").exists() and any((home / "logs").rglob("*.err"))
    else:
        assert (home / "history" / "runs").is_dir() and (home / "storage").is_dir()  # SQLite, compute logs
    written = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not written, written
