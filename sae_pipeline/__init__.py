"""sae_pipeline: the Dagster code location that keeps SAEs trained, evaluated and published for a set of
models.

`sae_pipeline.definitions.defs` holds every definition. It is also reachable as `sae_pipeline.defs`, so that
`dagster ... -m sae_pipeline` works, but lazily: torchrun ranks run `python -m sae_pipeline.rank_entry`, which
imports this package and must not pay for importing Dagster.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "defs":
        from .definitions import defs

        return defs
    raise AttributeError(f"module 'sae_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Dagster finds Definitions by scanning dir(module).
    return ["defs"]
