"""A cheap stand-in for a training rank: `python -m tests.support.fake_rank <training arguments>`.

It runs inside sae_pipeline.rank_entry.main (parent-death signal, failure records, Pipes on rank 0) but
trains nothing: it logs when it starts and ends, sleeps, and rank 0 reports a materialization. What it does
comes from the environment, so a test can set it per launch through the launcher's `extra_env`:

    FAKE_RANK_DIR      folder for its records: events.jsonl (start/end of every rank, with the model and
                       stride it trains), launches-<stride> (the torchrun of every launch at that stride)
    FAKE_RANK_SLEEP_S  seconds to "train" (default 1)
    FAKE_RANK_FIRST_SLEEP_S  seconds on the partition's first launch instead (default FAKE_RANK_SLEEP_S)
    FAKE_RANK_MODE     ok | python-error (rank 1 raises) | killed-once (rank 1 SIGKILLs itself on the
                       first attempt) | timeout-once (on the first attempt rank 0 waits in a gloo barrier
                       that rank 1 never joins, and times out: a real collective timeout)
"""

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sae_pipeline.rank_entry import main


def fake_train(argv: list[str], pipes: Any | None) -> None:
    folder = Path(os.environ["FAKE_RANK_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("FAKE_RANK_MODE", "ok")
    rank = int(os.environ.get("RANK", "0"))
    stride = argv[argv.index("--layer_stride") + 1] if "--layer_stride" in argv else "?"
    # The training step saves into <root>/runs/<model>/stride-<s>: --save_dir names the model.
    model = Path(argv[argv.index("--save_dir") + 1]).name if "--save_dir" in argv else "?"
    attempt = _attempt(folder / f"launches-{stride}")
    _record(folder, {"event": "start", "rank": rank, "model": model, "stride": stride, "attempt": attempt})
    first = attempt == 1
    if mode == "python-error" and rank == 1:
        raise RuntimeError("a bug in the training code")
    if mode == "killed-once" and first and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
    if mode == "timeout-once" and first:
        _collective_timeout(rank)
    sleep_s = os.environ.get("FAKE_RANK_SLEEP_S", "1")
    time.sleep(float(os.environ.get("FAKE_RANK_FIRST_SLEEP_S", sleep_s) if first else sleep_s))
    _record(folder, {"event": "end", "rank": rank, "model": model, "stride": stride, "attempt": attempt})
    if pipes is not None:
        pipes.report_asset_materialization(metadata={"fake": True, "attempt": attempt})


def _collective_timeout(rank: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
    if rank == 0:
        dist.barrier()  # rank 1 never joins: gloo raises after 3 s
    else:
        time.sleep(30)  # torchrun stops this rank when rank 0 fails


def _attempt(launches: Path) -> int:
    """Which launch of this partition this rank belongs to (1, 2, ...): the ranks of one launch share a
    parent, torchrun, whose pid is listed once per launch."""
    import fcntl

    torchrun = str(os.getppid())
    with open(launches, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        seen = file.read().split()
        if torchrun not in seen:
            file.write(torchrun + "\n")
            seen.append(torchrun)
        return seen.index(torchrun) + 1


def _record(folder: Path, event: dict[str, Any]) -> None:
    with open(folder / "events.jsonl", "a") as out:
        out.write(json.dumps({**event, "time": time.time(), "pid": os.getpid()}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:], train_fn=fake_train)
