"""EleutherAI sparsify's SAE training step, timed like benchmarks/sae_step.py times ours (issue 17).

    python benchmarks/sparsify_step.py [--n 4096] [--d 576] [--expansion 32] [--k 32 64] [--dead 0 0.05 0.3]
                                       [--dtypes fp32 bf16] [--tf32] [--repeat 5] [--device cuda]

One step = sparsify's SparseCoder forward (FVU, and AuxK over the dead latents), backward of
fvu + auxk / 32, its radial-gradient removal, one Adam step (ours, `make_adam`: the same optimizer cost as
sae_step.py) and the decoder renormalisation, as its trainer does them. bf16 is the autocast its forward is
wrapped in on CUDA (here also on CPU, so the tiny CPU check runs the same code); fp32 calls the forward
without that wrapper. With triton installed and a GPU, sparsify decodes with its Triton kernel (set
SPARSIFY_DISABLE_TRITON=1 for its eager one; on CPU the eager one is used). Peak memory is CUDA's max
allocated during the timed steps.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_row  # noqa: E402
from benchmarks.sae_step import timed  # noqa: E402
from sae_core.optim import make_adam  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--k", type=int, nargs="+", default=[32], help="one row per k")
    ap.add_argument(
        "--dead", type=float, nargs="+", default=[0.0], help="fractions of latents marked dead (AuxK)"
    )
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls in fp32 mode (CUDA)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = torch.device(dev).type
    if device_type != "cuda":  # its Triton decoder has no CPU driver
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    for k in args.k:
        for dead_fraction in args.dead:
            measure(args, dev, k, dead_fraction)


def measure(args, dev: str, k: int, dead_fraction: float) -> None:
    """Time sparsify's step at one k and dead fraction, in each dtype; print and record one row."""
    import sparsify  # the test extra has it; on a GPU machine its wheels are carried (benchmarks/gpu.sh)
    from sparsify import SparseCoder, SparseCoderConfig

    device_type = torch.device(dev).type
    torch.manual_seed(0)
    n, d, m = args.n, args.d, args.d * args.expansion
    x = torch.randn(n, d, device=dev)
    forward = SparseCoder.forward.__wrapped__  # without its bf16 autocast decorator
    rows = []
    for name in args.dtypes:
        sae = SparseCoder(d, SparseCoderConfig(expansion_factor=args.expansion, k=k), device=dev)
        opt = make_adam(list(sae.parameters()), 1e-4)
        dead = torch.zeros(m, dtype=torch.bool, device=dev)
        dead[torch.randperm(m, device=dev)[: round(dead_fraction * m)]] = True

        def step(sae=sae, opt=opt, dead=dead, bf16=name == "bf16"):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(sae, x, dead_mask=dead)
            (out.fvu + out.auxk_loss / 32).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.set_decoder_norm_to_unit_norm()

        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_step = timed(step, args.repeat, 10 if device_type == "cuda" else 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else float("nan")
        rows.append((name, n / t_step, t_step, peak))
    decoder = sparsify.utils.decoder_impl.__name__
    setting = f"N={n}, d={d}, M={m}, k={k}, dead {dead_fraction:g}, {dev}, sparsify {decoder}"
    setting += ", TF32" if args.tf32 else ""
    print(f"sparsify {getattr(sparsify, '__version__', '')} step, {setting}")
    print(f"{'dtype':6} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>8}")
    for r in rows:
        print(f"{r[0]:6} {r[1]:10,.0f} {r[2] * 1e3:9.4g} {r[3]:8.3g}")
    if not args.no_record:
        append_row(
            "sparsify_step",
            "; ".join(
                f"{r[0]}: {r[1]:,.0f} tok/s (step {r[2] * 1e3:.4g} ms, peak {r[3]:.3g} GiB)" for r in rows
            )
            + f" [{setting}]",
        )


if __name__ == "__main__":
    main()
