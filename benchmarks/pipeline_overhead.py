"""Wall time of training through the Dagster pipeline against the same training through the CLI.

    python benchmarks/pipeline_overhead.py [--max_tokens 4000] [--nproc 2]

On a tiny model (so that the overhead, not the training, dominates): the pipeline materialises
`sae_checkpoints` for one partition with `dagster asset materialize` (Dagster start-up, Pipes, torchrun);
the CLI runs `torchrun -m sae_core` with the same flags on the same tokenized dataset. Both timed end to end
as a user would see them (process start to exit).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, child_env  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max_tokens", type=int, default=4000)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from tests.tiny import make_text, save_tiny_model, write_jsonl

    from sae_pipeline.registry import parse_entry
    from tests.pipeline.conftest import tiny_entry, write_registry

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = save_tiny_model(tmp / "model")
        data = write_jsonl(tmp / "docs.jsonl", make_text(400))
        entry = tiny_entry(model, data, name="bench", train={"max_tokens": args.max_tokens})
        registry = write_registry(tmp / "models.yaml", entry)
        home, root = tmp / "home", tmp / "artefacts"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        config = tmp / "run.yaml"
        config.write_text(json.dumps({"resources": {"launcher": {"config": {"nproc_per_node": args.nproc}}}}))
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "SAE_PIPELINE_REGISTRY": str(registry),
            "SAE_PIPELINE_ROOT": str(root),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": child_env()["PYTHONPATH"],
        }
        dagster = [sys.executable, "-m", "dagster"]
        timed([sys.executable, "-m", "sae_pipeline", "register"], env)
        timed(
            [
                *dagster,
                "job",
                "execute",
                "-m",
                "sae_pipeline.definitions",
                "-j",
                "tokenize_job",
                "--tags",
                json.dumps({"dagster/partition": "bench"}),
            ],
            env,
        )

        t_pipe = timed(
            [
                *dagster,
                "asset",
                "materialize",
                "-m",
                "sae_pipeline.definitions",
                "--select",
                "sae_checkpoints",
                "--partition",
                "bench|1",
                "-c",
                str(config),
            ],
            env,
        )

        flags = parse_entry(entry).train_args()
        cli = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(args.nproc),
            "--master-port",
            "29533",
            "-m",
            "sae_core",
            str(model),
            str(root / "tokenized" / "bench"),
            "--ctx_len",
            str(entry["ctx_len"]),
            "--layer_stride",
            "1",
            "--shuffle_seed",
            "none",
            *flags,
            "--save_dir",
            str(tmp / "cli"),
            "--run_name",
            "r",
        ]
        t_cli = timed(cli, env)
        steps = json.loads((tmp / "cli" / "r" / "run.json").read_text())["steps"]

    overhead = t_pipe - t_cli
    print(f"pipeline_overhead: {steps} steps on {args.nproc} ranks, tiny model")
    print(f"dagster asset materialize {t_pipe:.1f} s, torchrun CLI {t_cli:.1f} s, overhead {overhead:.1f} s")
    if not args.no_record:
        append_row(
            "pipeline_overhead",
            f"pipeline {t_pipe:.1f} s vs CLI {t_cli:.1f} s: overhead {overhead:.1f} s "
            f"per run [tiny model, {steps} steps, {args.nproc} ranks]",
        )


if __name__ == "__main__":
    main()
