"""Shared by the benchmark scripts: machine description and appending a row to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


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
        RESULTS.write_text("# Benchmark results\n\nOne row per run, appended by the scripts in this folder.\n\n"
                           "| date (UTC) | benchmark | machine | result |\n| --- | --- | --- | --- |\n")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as f:
        f.write(f"| {now} | {benchmark} | {machine()} | {result} |\n")
