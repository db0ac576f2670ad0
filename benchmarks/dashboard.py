"""The latent-dashboard pass against the evaluation pass, on the embedded SmolLM2-135M, and the site's size.

    python benchmarks/dashboard.py [--tokens 2048] [--layers 8 16] [--expansion 16] [--latents 200]

Both read the same token sequences (the last ones of the embedded corpus) with the same SAEs (randomly
initialised: the passes' cost does not depend on the weights' values) in one process. Reports tokens/s of
`evaluate` (x̄ pass, clean forward, 3 spliced variants per hookpoint), of `collect_latent_stats` for the
first `--latents` latents, and for every latent (what --top_firing collects), and the bytes on disk per latent
of the written site (HTML + JSON, `write_dashboards`).
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


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--latents", type=int, default=200, help="latents of the selected-latents pass")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ctx_len", type=int, default=256)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    from sae_core import Sae, SaeConfig
    from sae_core.dashboard import (
        DashboardConfig,
        collect_latent_stats,
        latent_records,
        logit_lens,
        write_dashboards,
    )
    from sae_core.evaluate import evaluate
    from sae_core.models import special_token_ids

    load_before = os.getloadavg()[0]
    ctx, model, tokenizer, data = load_embedded(args.ctx_len, args.device)
    n_seq = -(-args.tokens // args.ctx_len)
    ids = torch.stack([torch.as_tensor(r) for r in data[len(data) - n_seq :]["input_ids"]]).long()
    torch.manual_seed(0)
    saes = {
        f"layers.{i}": Sae(576, SaeConfig(expansion_factor=args.expansion, k=args.k), device=ctx.device)
        for i in args.layers
    }
    exclude = special_token_ids(tokenizer)
    cfg = DashboardConfig()

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # Warm-up (allocator, first-call costs): one short batch of each, not timed.
    evaluate(model, saes, ids[:1], exclude_tokens=exclude, batch_size=1)
    collect_latent_stats(model, saes, ids[:1], dict.fromkeys(saes), cfg=cfg, exclude_tokens=exclude)

    report, eval_s = timed(
        lambda: evaluate(model, saes, ids, exclude_tokens=exclude, batch_size=args.batch_size)
    )
    tokens = report.settings["tokens"]
    chosen = {h: torch.arange(args.latents) for h in saes}
    stats, dash_s = timed(
        lambda: collect_latent_stats(
            model, saes, ids, chosen, cfg=cfg, exclude_tokens=exclude, batch_size=args.batch_size
        )
    )
    _, all_s = timed(
        lambda: collect_latent_stats(
            model, saes, ids, dict.fromkeys(saes), cfg=cfg, exclude_tokens=exclude, batch_size=args.batch_size
        )
    )

    def write():
        records = {
            h: latent_records(s, h, tokenizer, logit_lens(model, saes[h], h, s.latents, cfg.logit_k))
            for h, s in stats.items()
        }
        write_dashboards(tmp / "site", records, {"model": "smollm2-135m", "dataset": "embedded"})

    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    try:
        _, write_s = timed(write)
        per_latent = folder_bytes(tmp / "site") / (args.latents * len(saes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = max(load_before, os.getloadavg()[0])
    under_load = f"; measured under load (load average {load:.1f})" if load > 1 else f"; load {load:.1f}"
    m = saes[next(iter(saes))].num_latents
    row = (
        f"evaluation pass {tokens / eval_s:,.0f} tok/s; dashboard pass, {args.latents} latents per SAE "
        f"{tokens / dash_s:,.0f} tok/s ({eval_s / dash_s:.2f}x the evaluation's speed), all {m} latents "
        f"{tokens / all_s:,.0f} tok/s; logit lens + records + writing the site {write_s:.1f} s, "
        f"{per_latent / 1024:.1f} KiB per latent on disk (HTML + JSON, {cfg.n_top} top contexts, "
        f"{cfg.n_quantiles}x{cfg.per_quantile} quantile samples, window {cfg.window}) [{len(saes)} SAEs "
        f"{args.layers}, expansion {args.expansion}, k {args.k}, {tokens:,} tokens, smollm2-135m, batch "
        f"{args.batch_size}x{args.ctx_len}{under_load}]"
    )
    print(row)
    if not args.no_record:
        append_row("dashboard", row)


if __name__ == "__main__":
    main()
