"""The activation cache on the embedded SmolLM2-135M and corpus: writing it against the LM forward alone,
training from it against live training, and its size on disk.

    python benchmarks/cache.py [--tokens 16384] [--layers 3 9 15] [--expansion 32] [--device cpu]

1. LM forward alone: the cached sequences run through the LM (stopping after the deepest layer, hooks on,
   special tokens dropped: `LiveActivations`, what the cache writer calls) and thrown away, before and after
   the same sequences are written as a bfloat16 cache (the mean of the two is the reference). Target:
   writing runs at >= 0.9 of the forward's tokens/s.
2. Training the same SAEs (M = expansion x 576) on the same tokens, live and from that cache (trainer wall
   time, start-up excluded). Target on CPU: >= 2x.
3. Bytes on disk per token per hookpoint, for each storage dtype (shard headers and manifest included).

One process, one model load. The machine's load average is put in the row: this machine's 2 cores are
shared, so rows measured under load (load average above 1) say so.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, load_embedded  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15])
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ctx_len", type=int, default=256)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    from sae_core import SaeConfig, SaeTrainer, TrainConfig
    from sae_core.activations import LiveActivations, excluded_token_ids
    from sae_core.cache import ActivationCache, write_cache
    from sae_core.loggers import Profiler
    from sae_core.models import hidden_size

    load_before = os.getloadavg()[0]
    ctx, model, tokenizer, data = load_embedded(args.ctx_len, args.device)
    n_seq = -(-args.tokens // args.ctx_len)
    hookpoints = [f"layers.{i}" for i in args.layers]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        # 1. the LM forward alone, then the same forward written to a cache
        live = LiveActivations(
            model,
            data,
            hookpoints=hookpoints,
            owners={h: 0 for h in hookpoints},
            ctx=ctx,
            batch_size=args.batch_size,
            d_in=hidden_size(model),
            excluded=excluded_token_ids(None, tokenizer, warn=False),
            gather=False,
            profiler=Profiler(ctx.device, enabled=False),
            order=torch.arange(n_seq),
            keep_nonfinite=True,
        )

        def forward_alone() -> float:
            t0 = time.perf_counter()
            for i in range(-(-n_seq // args.batch_size)):
                live.batch(i)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        live.batch(0)  # warm-up (allocator, kernels), not timed
        # Forward, write, forward: on a shared machine the load drifts; the mean of the two forwards
        # brackets the write.
        forward_before = forward_alone()
        t0 = time.perf_counter()
        manifest = write_cache(
            model,
            tokenizer,
            data,
            tmp / "bfloat16",
            layers=args.layers,
            max_tokens=args.tokens,
            batch_size=args.batch_size,
            dtype="bfloat16",
            source={"model": "smollm2-135m", "dataset": "embedded", "ctx_len": args.ctx_len},
            progress=False,
        )
        write_s = time.perf_counter() - t0
        forward_s = (forward_before + forward_alone()) / 2
        seq_tokens = n_seq * args.ctx_len  # what the LM ran on
        forward_rate, write_rate = seq_tokens / forward_s, seq_tokens / write_s

        # 2. training live and from the cache
        def train(name: str, dataset, lm, max_tokens: int = args.tokens) -> tuple[float, int]:
            cfg = TrainConfig(
                SaeConfig(expansion_factor=args.expansion),
                layers=args.layers,
                batch_size=args.batch_size,
                max_tokens=max_tokens,
                lr_warmup_steps=1,
                save_every=100_000,
                save_dir=str(tmp / "runs"),
                run_name=name,
            )
            trainer = SaeTrainer(cfg, dataset, lm, tokenizer=tokenizer, dist_ctx=ctx, progress=False)
            trainer.fit()
            return trainer.tokens_seen / trainer.wall_time, trainer.tokens_seen

        train("warm-up", data, model, max_tokens=1)  # one step: the first SAE step's one-off costs
        live_rate, live_tokens = train("live", data, model)
        cached_rate, cached_tokens = train("cached", ActivationCache(tmp / "bfloat16"), None)

        # 3. bytes per token per hookpoint; the other dtypes from a small one-layer cache
        per_token = {"bfloat16": folder_bytes(tmp / "bfloat16") / manifest["tokens"] / len(hookpoints)}
        for dtype in ("float16", "float32"):
            small = write_cache(
                model,
                tokenizer,
                data,
                tmp / dtype,
                layers=args.layers[:1],
                max_tokens=4096,
                batch_size=args.batch_size,
                dtype=dtype,
                progress=False,
            )
            per_token[dtype] = folder_bytes(tmp / dtype) / small["tokens"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = max(load_before, os.getloadavg()[0])
    under_load = f"; measured under load (load average {load:.1f})" if load > 1 else f"; load {load:.1f}"
    d = hidden_size(model)
    row_write = (
        f"writing {write_rate:,.0f} tok/s vs LM forward alone {forward_rate:,.0f} tok/s = "
        f"{write_rate / forward_rate:.2f} (target >= 0.9); training from cache {cached_rate:,.0f} tok/s vs "
        f"live {live_rate:,.0f} tok/s = {cached_rate / live_rate:.2f}x (target >= 2x on CPU) "
        f"[{seq_tokens:,} tokens, layers {args.layers}, M={args.expansion * d}, smollm2-135m, "
        f"embedded corpus, bf16 cache, batch {args.batch_size}x{args.ctx_len}{under_load}]"
    )
    row_disk = (
        ", ".join(f"{dtype} {b:,.1f}" for dtype, b in per_token.items())
        + f" bytes per token per hookpoint (d={d}: {2 * d} / {2 * d} / {4 * d} of data) "
        f"[shards of 32,768 rows; {manifest['tokens']:,} tokens]"
    )
    print(row_write)
    print(row_disk)
    assert live_tokens == cached_tokens, (live_tokens, cached_tokens)
    if not args.no_record:
        append_row("cache", row_write)
        append_row("cache_disk", row_disk)


if __name__ == "__main__":
    main()
