"""Shared by the benchmark scripts: machine description and appending a row to RESULTS.md."""

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        dev = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{dev}; torch {torch.__version__}; python {platform.python_version()}"


def append_row(benchmark: str, result: str) -> None:
    """Append `| date | benchmark | machine | result |` to benchmarks/RESULTS.md."""
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nOne row per run, appended by the scripts in this folder.\n\n"
            "| date (UTC) | benchmark | machine | result |\n| --- | --- | --- | --- |\n"
        )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    row = f"| {now} | {benchmark} | {machine()} | {result} |"
    # Into the table, after its last row: prose may follow the table.
    lines = RESULTS.read_text().splitlines()
    last = max(
        (i for i, line in enumerate(lines) if line.startswith("| ") and not line.startswith("| date")),
        default=len(lines) - 1,
    )
    lines.insert(last + 1, row)
    RESULTS.write_text("\n".join(lines) + "\n")


def child_env(**overrides: str) -> dict[str, str]:
    """os.environ for a child Python that imports this checkout: the repo goes first on PYTHONPATH and
    whatever PYTHONPATH already held (e.g. packages installed with --target) is kept."""
    keep = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(ROOT)] + ([keep] if keep else []))
    return {**os.environ, "PYTHONPATH": path, **overrides}


def load_embedded(ctx_len: int, device: str | None):
    """(distributed context, model, tokenizer, token sequences) of the embedded SmolLM2 and corpus, loaded
    as a training run loads them."""
    from sae_core.config import RunConfig
    from sae_core.distributed import init_distributed
    from sae_core.run import load_source

    ctx = init_distributed(device)
    source = RunConfig(model="smollm2-135m", dataset="embedded", ctx_len=ctx_len, device=device)
    model, tokenizer, data, _ = load_source(source, ctx)
    return ctx, model, tokenizer, data
