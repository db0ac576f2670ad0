"""A torchrun entry module for tests: sae_pipeline.rank_entry, but rank 1 raises at once and rank 0 blocks.

Rank 0 waits as a rank stuck in a collective would, until torchrun stops it after rank 1's failure; the step
failure must then quote rank 1's error, not rank 0's termination.
"""

import os
import time

from sae_pipeline import rank_entry


def _train(argv, pipes):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected fault on rank 1")
    time.sleep(120)


rank_entry.train = _train

if __name__ == "__main__":
    rank_entry.main()
