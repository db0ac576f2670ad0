"""--shard_latents: per-rank memory, step time and bytes communicated for 1 and 2 (or more) latent shards.

    python benchmarks/latent_shards.py [--shards 1 2] [--d 576] [--latents 32768] [--n 2048] [--k 32]
                                       [--dead 0.1] [--steps 3] [--threads_per_rank 1] [--no-record]

Each shard count runs as its own torchrun (gloo, CPU; --threads_per_rank threads per rank). Every rank
trains one SAE shard with Adam on the same random batch of N tokens; a fraction --dead of the latents is
marked dead so that AuxK's collectives run too. Measured per rank:

- SAE state: bytes of parameters + gradients + Adam moments (the figure the README's formulas give);
- peak RSS growth during the steps (VmHWM reset after the shard is built, minus RSS before the steps);
- step time (forward, backward, Adam), mean of --steps after one warm-up step;
- bytes handed to collectives per step (counted by wrapping torch.distributed), against the formula
  4 N d + 12 N k + 4 d without AuxK, plus 4 N d + 12 N min(k_aux, M/S) with it, which does not depend on M.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, child_env  # noqa: E402


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _count_collectives(counter: dict) -> None:
    """Wrap the collectives latent_shards.py and the trainer use: count the bytes each rank hands over."""
    import torch.distributed as dist

    for name in ("all_reduce", "all_gather", "gather"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            tensor = args[1] if len(args) > 1 and hasattr(args[1], "numel") else args[0]
            counter["bytes"] += tensor.numel() * tensor.element_size()
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def worker(args) -> None:
    import torch

    from sae_core import Sae, SaeConfig
    from sae_core.distributed import init_distributed
    from sae_core.latent_shards import ShardedSae, all_shards_agree, make_layout
    from sae_core.optim import SaeOptimizer

    ctx = init_distributed("cpu", "gloo")
    cfg = SaeConfig(num_latents=args.latents, k=args.k)
    torch.manual_seed(0)
    if ctx.world_size > 1:
        layout = make_layout(ctx, ctx.world_size)
        sae = ShardedSae.create(args.d, cfg, layout)
    else:
        layout, sae = None, Sae(args.d, cfg)
    optimizer = SaeOptimizer("adam", sae, 1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.n, args.d, generator=g)
    dead = torch.rand(args.latents, generator=g) < args.dead
    counter = {"bytes": 0}
    if layout is not None:
        _count_collectives(counter)

    def step() -> None:
        out = sae(x, dead if dead.any() else None, total_variance=1.0, residual_variance=1.0)
        (out.fvu + out.auxk_loss / 32).backward()
        if layout is not None:
            all_shards_agree(True, layout)  # the trainer's finite-gradients agreement
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: count the steps' growth only
    rss_before = _rss_kib("VmRSS")
    step()  # warm-up; Adam allocates its moments here
    counter["bytes"] = 0
    times = []
    for _ in range(args.steps):
        if layout is not None:
            torch.distributed.barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    params = list(sae.parameters())
    state = sum(p.numel() * p.element_size() for p in params)
    grads_bytes = state  # one gradient per parameter during the step
    moments = sum(
        v.numel() * v.element_size()
        for part in optimizer.parts.values()
        for s in part.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    result = {
        "rank": ctx.rank,
        "sae_state_bytes": state + grads_bytes + moments,
        "peak_rss_growth_mib": (_rss_kib("VmHWM") - rss_before) / 1024,
        "step_s": sum(times) / len(times),
        "comm_bytes_per_step": counter["bytes"] / args.steps,
        "n_dead": int(dead.sum()),
    }
    Path(args.out, f"rank{ctx.rank}.json").write_text(json.dumps(result))
    if layout is not None:
        torch.distributed.destroy_process_group()


def formula_bytes(n: int, d: int, k: int, k_aux: int, latents: int, shards: int, auxk: bool) -> int:
    per_shard = latents // shards
    total = 4 * n * d + 12 * n * min(k, per_shard) + 4 * d + 8  # + the finite-gradients flag
    if auxk:
        total += 4 * n * d + 12 * n * min(k_aux, per_shard)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--latents", type=int, default=32768)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dead", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3)
    # One thread per rank by default: on a shared, loaded CPU, OpenMP threads that wait for each other
    # made one rank with 2 threads 3-8x slower than with 1 (measured here at M=4096).
    ap.add_argument("--threads_per_rank", type=int, default=1)
    ap.add_argument("--no-record", action="store_true")
    if "LATENT_SHARDS_WORKER" in os.environ:
        return worker(argparse.Namespace(**json.loads(os.environ["LATENT_SHARDS_WORKER"])))
    args = ap.parse_args()

    parts, base = [], None
    for shards in args.shards:
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(shards),
                __file__,
            ]
            # The settings travel in the environment: torchrun would take --d for one of its own options.
            settings = {**vars(args), "out": out}
            threads = str(args.threads_per_rank)
            env = child_env(OMP_NUM_THREADS=threads, LATENT_SHARDS_WORKER=json.dumps(settings))
            subprocess.run(cmd, env=env, check=True)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
        state_mib = max(r["sae_state_bytes"] for r in ranks) / 2**20
        base = state_mib if shards == 1 else base
        rss = "/".join(f"{r['peak_rss_growth_mib']:,.0f}" for r in ranks)
        step_s = max(r["step_s"] for r in ranks)
        text = f"{shards} shard(s): SAE state {state_mib:,.0f} MiB/rank"
        if base is not None:  # against 1/S of the unsharded SAE measured in this run
            text += f" ({state_mib / (base / shards):.2f} x 1/{shards} of 1 shard)"
        text += f", peak RSS growth {rss} MiB/rank, step {step_s:.2f} s"
        if shards > 1:
            measured = ranks[0]["comm_bytes_per_step"]
            expected = formula_bytes(
                args.n, args.d, args.k, max(args.d // 2, 1), args.latents, shards, ranks[0]["n_dead"] > 0
            )
            text += f", sent {measured / 2**20:.2f} MiB/step/rank (formula {expected / 2**20:.2f})"
        print(text, flush=True)
        parts.append(text)
    result = "; ".join(parts)
    result += (
        f" [d={args.d}, M={args.latents}, N={args.n}, k={args.k}, {args.dead:.0%} dead (AuxK on), gloo, "
        f"{args.threads_per_rank} thread(s) per rank]"
    )
    print(result)
    if not args.no_record:
        append_row("latent_shards", result)


if __name__ == "__main__":
    main()
