"""1 rank vs 2 ranks (data parallel, and --distribute_layers) on the embedded model: tokens/s and per-rank
memory.

    python benchmarks/distributed.py [--tokens 8192] [--layers 3 9 15 21] [--expansion 16]

Same global batch in every mode (batch_size x ranks is constant). On a 2-core CPU the two ranks share the
cores, so tokens/s cannot double here: the numbers show the per-rank memory split and the communication cost.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, child_env  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 21])
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--global_batch", type=int, default=8)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    rows = []
    for name, ranks, extra in (
        ("1 rank", 1, []),
        ("2 ranks DDP", 2, []),
        ("2 ranks --distribute_layers", 2, ["--distribute_layers"]),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            # --profile: run.json records each rank's peak RSS.
            train = [
                "smollm2-135m",
                "embedded",
                "--layers",
                *map(str, args.layers),
                "--expansion_factor",
                str(args.expansion),
                "--ctx_len",
                "256",
                "--batch_size",
                str(args.global_batch // ranks),
                "--max_tokens",
                str(args.tokens),
                "--save_dir",
                tmp,
                "--run_name",
                "b",
                "--save_every",
                "100000",
                "--lr_warmup_steps",
                "1",
                "--profile",
                *extra,
            ]
            if ranks == 1:
                cmd = [sys.executable, "-m", "sae_core", *train]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    str(ranks),
                    "--master-port",
                    str(free_port()),
                    "-m",
                    "sae_core",
                    *train,
                ]
            env = child_env(OMP_NUM_THREADS=str(max(cores // ranks, 1)))
            subprocess.run(
                cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            run = json.loads((Path(tmp) / "b" / "run.json").read_text())
        peaks = [p["rss"] for p in run["peak_memory_mb_per_rank"]]
        rows.append((name, run["tokens"] / run["wall_time_s"], peaks))
    print(
        f"distributed: embedded model, layers {args.layers}, {args.expansion}x, "
        f"global batch {args.global_batch}"
    )
    print(f"{'mode':30} {'tokens/s':>9}  peak RSS per rank (MiB)")
    for name, rate, peaks in rows:
        print(f"{name:30} {rate:9,.0f}  {', '.join(f'{p:,.0f}' for p in peaks)}")
    if not args.no_record:
        append_row(
            "distributed",
            "; ".join(
                f"{n}: {r:,.0f} tok/s, peak RSS/rank {'/'.join(f'{p:,.0f}' for p in pk)} MiB"
                for n, r, pk in rows
            )
            + f" [layers {args.layers}, {args.expansion}x, {args.tokens} tokens]",
        )


if __name__ == "__main__":
    main()
