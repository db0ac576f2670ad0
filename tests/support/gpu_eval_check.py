"""On a GPU machine: the pipeline's evaluation runs in launched ranks on the GPU, never in the step process.

    python -m tests.support.gpu_eval_check [FOLDER]

Tokenizes, trains (1 rank) and evaluates (1 rank, then 2 ranks sharing the GPUs) the tiny model in an
ephemeral instance with the in-process executor, so the step runs in this very process; then checks that the
ranks said they evaluated on cuda, that both reports agree, and that this process never initialised CUDA.
Prints one line per check; exits non-zero on the first that fails.
"""

import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.assets import sae_checkpoints, sae_evaluation, tokenized_dataset
from tests.support.pipeline import (
    MODEL,
    PARTITION,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)
from tests.support.tiny import make_text, save_tiny_model, write_jsonl


def main() -> None:
    base = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gpu-eval-check-"))
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, {torch.cuda.device_count()} GPUs")
    model = save_tiny_model(base / "tiny")
    corpus = write_jsonl(base / "docs.jsonl", make_text(300))
    registry = write_registry(base / "models.yaml", tiny_entry(model, corpus))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [MODEL])
    reports = {}
    for eval_nproc in (1, 2):
        root = base / f"artefacts-{eval_nproc}"
        resources = resources_for(root, registry, nproc_per_node=1, eval_nproc=eval_nproc)
        for selection, key in (([tokenized_dataset], MODEL), ([sae_checkpoints, sae_evaluation], PARTITION)):
            start = time.monotonic()
            result = materialize(selection, key, instance, resources)
            took = time.monotonic() - start
            assert result.success, failure_text(result)
            print(f"eval_nproc={eval_nproc}: {[a.key.path[-1] for a in selection]} ok in {took:.1f} s")
        logs = [r.user_message for r in instance.all_logs(result.run_id) if r.user_message]
        said = [m for m in logs if m.startswith("evaluating ")]
        print(f"eval_nproc={eval_nproc}: {said}")
        assert said and all(" on cuda:" in m for m in said), said
        [event] = [
            e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "sae_evaluation"
        ]
        reports[eval_nproc] = {
            r.data["hookpoint"]: r.data for r in event.materialization.metadata["metrics"].value.records
        }
    for h, row in reports[1].items():
        for name, value in row.items():
            if isinstance(value, float):
                assert abs(reports[2][h][name] - value) <= 1e-4 * max(1.0, abs(value)), (
                    h,
                    name,
                    value,
                    reports[2][h][name],
                )
    print(f"1-rank and 2-rank reports agree on {sorted(reports[1])}")
    assert not torch.cuda.is_initialized(), "the step process initialised CUDA"
    print("the step process never initialised CUDA: OK")


if __name__ == "__main__":
    main()
