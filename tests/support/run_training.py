"""Materialize sae_checkpoints in this process (in-process executor), for the termination tests to interrupt.

python -m tests.support.run_training ROOT REGISTRY PARTITION
"""

import sys
from pathlib import Path

import dagster as dg

from tests.support.pipeline import materialize, resources_for


def main() -> None:
    root, registry, partition = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    from sae_pipeline.assets import sae_checkpoints

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [partition.split("|")[0]])
    result = materialize([sae_checkpoints], partition, instance, resources_for(root, registry))
    print("RESULT", "success" if result.success else "failure", flush=True)


if __name__ == "__main__":
    main()
