"""One SAE training step (forward, backward, optimizer, decoder constraints) against the matmul roofline.

    python benchmarks/sae_step.py [--n 4096] [--d 576] [--expansion 32] [--k 32 64] [--repeat 5]
                                  [--device cuda]
                                  [--grad_w csr|index_add|embedding_bag] [--kernels torch|triton]
                                  [--dead 0 0.05 0.3] [--tf32] [--profile]
                                  [--optimizer adam|schedule_free_adam]

--kernels triton times the Triton kernels (sae_core/triton_kernels.py): the fused encode/decode backward and,
as the trainer runs it, the decoder's one-pass optimizer step (sae_core/fused_optim.py). The script
benchmarks/sparsify_step.py times sparsify's step at the same shapes. --dead marks that fraction of the
latents dead: AuxK runs as in training. "update ms" is the optimizer step with the decoder constraints alone
(fused with --kernels triton, three torch passes otherwise); the rest of the step is forward and backward.

Roofline ratio = time of the single dense N x d x M product (same dtype, same process) / time of the step.
The step cannot be faster than that product, which it must compute once.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_row  # noqa: E402
from sae_core import Sae, SaeConfig, kernels  # noqa: E402
from sae_core.fused_optim import fused_decoder_kernels, step_with_fused_decoder  # noqa: E402
from sae_core.optim import SaeOptimizer  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int, inner: int = 1) -> float:
    """Best over `repeat` of the mean time of `inner` back-to-back calls (inner > 1 on GPUs, whose calls
    are short)."""
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def print_profile(step, dev: str, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    key = "self_device_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
    print(f"--- profile of one {name} step ---")
    print(prof.key_averages().table(sort_by=key, row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--k", type=int, nargs="+", default=[32], help="one row per k")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument(
        "--grad_w",
        choices=["csr", "index_add", "embedding_bag"],
        default=None,
        help="how the encoder weight gradient is computed (default: the kernel's choice for the device)",
    )
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--kernels", choices=["torch", "triton"], default="torch", help="SaeConfig.kernels")
    ap.add_argument(
        "--dead", type=float, nargs="+", default=[0.0], help="fractions of latents marked dead (AuxK)"
    )
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls in fp32 mode (CUDA)")
    ap.add_argument("--optimizer", choices=["adam", "schedule_free_adam"], default="adam")
    ap.add_argument(
        "--profile", action="store_true", help="also print the top operators of one step per dtype"
    )
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.grad_w:
        kernels.GRAD_W_METHOD[torch.device(dev).type] = args.grad_w
    grad_w = kernels.GRAD_W_METHOD.get(torch.device(dev).type, "index_add")
    if args.kernels == "triton":
        grad_w = "triton"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    for k in args.k:
        for dead_fraction in args.dead:
            measure(args, dev, grad_w, k, dead_fraction)


def measure(args, dev: str, grad_w: str, k: int, dead_fraction: float) -> None:
    """Time the step at one k and dead fraction, in each dtype; print and record one row."""
    torch.manual_seed(0)
    n, d, m = args.n, args.d, args.d * args.expansion
    x = torch.randn(n, d, device=dev)
    rows = []
    for name, compute in (("fp32", None), ("bf16", torch.bfloat16)):
        if name not in args.dtypes:
            continue
        sae = Sae(d, SaeConfig(expansion_factor=args.expansion, k=k, kernels=args.kernels), device=dev)
        opt = SaeOptimizer(args.optimizer, sae, 1e-4)
        fused = fused_decoder_kernels(sae, opt)  # what the trainer runs with --kernels triton
        dead = torch.zeros(m, dtype=torch.bool, device=dev)
        dead[torch.randperm(m, device=dev)[: round(dead_fraction * m)]] = True

        def forward_backward(sae=sae, dead=dead, compute=compute):
            out = sae(x, dead, compute_dtype=compute)
            (out.fvu + out.auxk_loss / 32).backward()

        def update(sae=sae, opt=opt, fused=fused, keep_grads=False):
            if fused is not None:
                step_with_fused_decoder(opt, sae.W_dec, fused)
            else:
                sae.remove_gradient_parallel_to_decoder_directions()
                opt.step()
            if not keep_grads:
                opt.zero_grad()
            if fused is None:
                sae.set_decoder_norm_to_unit_norm()

        def step(forward_backward=forward_backward, update=update):
            forward_backward()
            update()

        dt = compute or torch.float32
        xa, wa = x.to(dt), sae.encoder.weight.detach().to(dt)
        inner = 10 if dev.startswith("cuda") else 1
        t_mm = timed(lambda xa=xa, wa=wa: xa @ wa.T, args.repeat, inner)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t_step = timed(step, args.repeat, inner)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else float("nan")
        forward_backward()  # then the update alone, on those gradients
        t_update = timed(lambda update=update: update(keep_grads=True), args.repeat, inner)
        opt.zero_grad()
        gflops = 2 * n * d * m / t_mm / 1e9
        if args.profile:
            print_profile(step, dev, name)
        rows.append((name, n / t_step, t_mm, t_step, t_mm / t_step, gflops, peak, t_update))
    setting = f"N={n}, d={d}, M={m}, k={k}, dead {dead_fraction:g}, {dev}, grad_w {grad_w}, {args.optimizer}"
    setting += ", TF32" if args.tf32 else ""
    print(f"SAE step, {setting}")
    print(
        f"{'dtype':6} {'tokens/s':>10} {'matmul ms':>10} {'step ms':>9} {'roofline':>9} {'GFLOP/s':>8} "
        f"{'peak GiB':>8} {'update ms':>9}"
    )
    for r in rows:
        print(
            f"{r[0]:6} {r[1]:10,.0f} {r[2] * 1e3:10.4g} {r[3] * 1e3:9.4g} {r[4]:9.2f} {r[5]:8.0f} "
            f"{r[6]:8.3g} {r[7] * 1e3:9.4g}"
        )
    if not args.no_record:
        append_row(
            "sae_step",
            "; ".join(
                f"{r[0]}: {r[1]:,.0f} tok/s, roofline {r[4]:.2f} "
                f"(matmul {r[2] * 1e3:.4g} ms, step {r[3] * 1e3:.4g} ms, update {r[7] * 1e3:.4g} ms, "
                f"peak {r[6]:.3g} GiB)"
                for r in rows
            )
            + f" [{setting}]",
        )


if __name__ == "__main__":
    main()
