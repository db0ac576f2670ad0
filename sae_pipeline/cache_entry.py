"""What the cache-writing ranks run: `python -m sae_pipeline.cache_entry <sae_core.cache arguments>`.

It is `python -m sae_core.cache` (the same flags, parsed by its own parser) inside
sae_pipeline.rank_entry.main: the parent-death signal, the error file of a failed rank, and the Pipes session
on rank 0, which logs one line when the cache is complete. Under torchrun each rank writes its own shards
(sae_core.cache); the step reads the manifest from the folder afterwards.
"""

import sys
from typing import Any

from sae_pipeline.rank_entry import main as rank_main


def write(argv: list[str], pipes: Any | None) -> None:
    """Write the cache as `python -m sae_core.cache argv` would; with `pipes`, say so in the run's log."""
    from sae_core.cache import main as cache_main  # heavy: torch and transformers

    cache_main(argv)
    if pipes is not None:
        pipes.log.info(f"activation cache written: {argv[argv.index('--out') + 1]}")


if __name__ == "__main__":
    rank_main(sys.argv[1:], train_fn=write)
