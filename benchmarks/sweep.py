"""A one-pass sweep against the same variants trained one after the other, on the embedded SmolLM2-135M.

    python benchmarks/sweep.py [--tokens 8192] [--layers 3 9 15] [--sweep k=16,32,64] [--expansion 8]

Both train the same SAEs on the same tokens (one model load, in one process): the separate runs each run the
LM; the sweep runs it once per batch for all variants. Reports the wall time of each (`fit`, start-up
excluded) and their ratio (target: the sweep takes >= 2x less time for 3 variants). The ratio is bounded by
the LM's share of a run: with SAE time S and LM time L per run, V runs take V(L + S) and the sweep L + V·S.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, load_embedded  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15])
    ap.add_argument("--sweep", nargs="+", default=["k=16,32,64"])
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ctx_len", type=int, default=256)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from sae_core import SaeConfig, SaeTrainer, TrainConfig
    from sae_core.sweep import SweepTrainer, parse_sweep, variant_config

    load_before = os.getloadavg()[0]
    ctx, model, tokenizer, data = load_embedded(args.ctx_len, args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        cfg = TrainConfig(
            SaeConfig(expansion_factor=args.expansion),
            layers=args.layers,
            batch_size=args.batch_size,
            max_tokens=args.tokens,
            lr_warmup_steps=1,
            save_every=100_000,
            save_dir=str(tmp),
            run_name="sweep",
        )
        kwargs = {"tokenizer": tokenizer, "dist_ctx": ctx, "progress": False}
        # Warm-up (allocator, kernels): one step of one variant, not timed.
        warm = variant_config(cfg, parse_sweep(args.sweep)[0], tmp / "warm")
        SaeTrainer(replace(warm, max_tokens=1), data, model, **kwargs).fit()

        t0 = time.perf_counter()
        sweep = SweepTrainer(cfg, data, model, sweep=args.sweep, **kwargs)
        sweep.fit()
        sweep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for settings in parse_sweep(args.sweep):
            SaeTrainer(variant_config(cfg, settings, tmp / "separate"), data, model, **kwargs).fit()
        separate_s = time.perf_counter() - t0
        tokens = sweep.trainers[0].tokens_seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = max(load_before, os.getloadavg()[0])
    under_load = f"; measured under load (load average {load:.1f})" if load > 1 else f"; load {load:.1f}"
    row = (
        f"{len(sweep.variants)}-variant sweep in one pass {sweep_s:.1f} s vs separate runs "
        f"{separate_s:.1f} s = "
        f"{separate_s / sweep_s:.2f}x less time (target >= 2x) [{' '.join(args.sweep)}, expansion "
        f"{args.expansion}, layers {args.layers}, {tokens:,} tokens per variant, smollm2-135m, batch "
        f"{args.batch_size}x{args.ctx_len}{under_load}]"
    )
    print(row)
    if not args.no_record:
        append_row("sweep", row)


if __name__ == "__main__":
    main()
