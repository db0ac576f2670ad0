"""End-to-end training through the CLI on the embedded SmolLM2-135M, 3 layers, a fixed token budget.

    python benchmarks/train_e2e.py [--tokens 32768] [--layers 3 9 15] [--expansion 32] [--device cuda]
                                   [--model PATH]

--model runs another model folder (e.g. the SmolLM2-135M architecture with random weights, on a machine the
embedded weights cannot reach); its throughput is the same, its FVU is not meaningful.

Reports tokens/s and where the wall time goes (LM forward, SAE steps, everything else: data, hooks,
logging, checkpoints, start-up excluded), and the peak RSS against the sum of its parts: model weights +
SAE parameters, gradients and two Adam moments + one batch of activations for every layer.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import append_row, child_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15])
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--ctx_len", type=int, default=256)
    ap.add_argument(
        "--model", default="smollm2-135m", help="model name or folder (default: the embedded one)"
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="further CLI flags, passed as they are"
    )
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "sae_core",
            args.model,
            "embedded",
            "--layers",
            *map(str, args.layers),
            "--expansion_factor",
            str(args.expansion),
            "--ctx_len",
            str(args.ctx_len),
            "--batch_size",
            str(args.batch_size),
            "--max_tokens",
            str(args.tokens),
            "--save_dir",
            tmp,
            "--run_name",
            "bench",
            "--save_every",
            "100000",
            "--lr_warmup_steps",
            "1",
            "--profile",
            *args.extra,
        ]  # --profile: run.json records the time split and the CUDA peak
        if args.device:
            cmd += ["--device", args.device]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if proc.returncode != 0:
            sys.exit(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        total = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        run = json.loads((Path(tmp) / "bench" / "run.json").read_text())

    train_s = run["wall_time_s"]
    lm, sae = run["timings"]["lm_forward_s"], run["timings"]["sae_s"]
    other = max(train_s - lm - sae, 0.0)
    tok_s = run["tokens"] / train_s

    from sae_core.embedded import embedded_model_path, is_embedded_model

    folder = embedded_model_path() if is_embedded_model(args.model) else Path(args.model)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    d = json.loads((folder / "config.json").read_text())["hidden_size"]
    m = d * args.expansion
    n_layers = len(args.layers)
    sae_params = n_layers * (2 * m * d + m + d) * 4
    sae_total = 4 * sae_params  # parameters, gradients, Adam m and v
    acts = n_layers * args.batch_size * args.ctx_len * d * 4
    parts = weights + sae_total + acts
    ratio = peak_rss / parts

    print(f"train_e2e: {run['tokens']:,} tokens, {n_layers} layers {args.layers}, M={m}")
    print(f"{'tokens/s':>9} {'train s':>8} {'LM fwd':>7} {'SAE':>6} {'other':>6} {'process s':>9}")
    print(
        f"{tok_s:9,.0f} {train_s:8.1f} {lm / train_s:7.0%} "
        f"{sae / train_s:6.0%} {other / train_s:6.0%} {total:9.1f}"
    )
    cuda_peak = (run.get("peak_memory_mb_per_rank") or [{}])[0].get("cuda")  # MiB, on GPU runs only
    where = f"{run['tokens']:,} tokens, layers {args.layers}, M={m}, {args.model}"
    if cuda_peak:
        print(
            f"GPU memory: peak allocated {cuda_peak / 1024:.2f} GiB vs parts {parts / 2**30:.2f} GiB "
            f"-> {cuda_peak * 2**20 / parts:.2f}x"
        )
    print(
        f"memory: peak RSS {peak_rss / 2**30:.2f} GiB vs parts {parts / 2**30:.2f} GiB "
        f"(weights {weights / 2**30:.2f}, SAE+grads+Adam {sae_total / 2**30:.2f}, acts {acts / 2**30:.3f}) "
        f"-> {ratio:.2f}x"
    )
    if not args.no_record:
        append_row(
            "train_e2e",
            f"{tok_s:,.0f} tok/s; LM forward {lm / train_s:.0%}, SAE {sae / train_s:.0%}, "
            f"other {other / train_s:.0%} of {train_s:.1f} s training ({total:.1f} s with start-up) "
            f"[{where}]",
        )
        if cuda_peak:
            append_row(
                "memory",
                f"GPU peak allocated {cuda_peak / 1024:.2f} GiB = {cuda_peak * 2**20 / parts:.2f} x "
                f"parts ({parts / 2**30:.2f} GiB) [{where}]",
            )
        else:  # on a GPU the parts live in GPU memory and host RSS is mostly the CUDA runtime
            append_row(
                "memory",
                f"peak RSS {peak_rss / 2**30:.2f} GiB = {ratio:.2f} x parts ({parts / 2**30:.2f} GiB: "
                f"weights {weights / 2**30:.2f}, SAE+grads+Adam {sae_total / 2**30:.2f}, "
                f"acts {acts / 2**30:.3f})",
            )


if __name__ == "__main__":
    main()
