"""`python -m sae_pipeline register`: add the registry's models as partitions of the Dagster instance.

`dagster job execute` has no way to add a dynamic partition, and on a fresh $DAGSTER_HOME no daemon has run
the sensor yet; this does what the sensor does to partitions (without requesting runs), so the CLI path works:

    export DAGSTER_HOME=$PWD/.dagster_home
    python -m sae_pipeline register                 # prints the partition keys, e.g. smollm2-135m|1 ...
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sae_pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    register = sub.add_parser("register", help="add the registry's models as partitions of $DAGSTER_HOME")
    register.add_argument(
        "--registry", default=None, help="registry file (default: $SAE_PIPELINE_REGISTRY or the packaged one)"
    )
    args = parser.parse_args(argv)

    import dagster as dg

    from .partitions import ModelStride, model_partitions, stride_partitions
    from .registry import RegistryError, load_registry

    try:
        registry = load_registry(args.registry)
    except RegistryError as e:
        sys.exit(f"error: {e}")
    with dg.DagsterInstance.get() as instance:
        known = set(instance.get_dynamic_partitions(model_partitions.name))
        new = [e.name for e in registry if e.name not in known]
        if new:
            instance.add_dynamic_partitions(model_partitions.name, new)
    strides = [int(s) for s in stride_partitions.get_partition_keys()]
    print(f"registry {registry.path}: {len(registry)} model(s); added {len(new)} partition(s)")
    for entry in registry:
        trained = [s for s in strides if entry.strides is None or s in entry.strides]
        keys = [str(ModelStride(entry.name, s).partition_key) for s in trained]
        print(f"  {entry.name}: tokenize_job partition {entry.name!r}; train_evaluate_publish_job {keys}")


if __name__ == "__main__":
    main()
