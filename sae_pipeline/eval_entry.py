"""What the evaluation rank runs: `python -m sae_pipeline.eval_entry <python -m sae_core.evaluate arguments>`.

It is `python -m sae_core.evaluate` on one run folder (the same flags, parsed by sae_core's own parser) inside
sae_pipeline.rank_entry.main: the parent-death signal, the error file of a failed rank, and the Pipes session
on rank 0. Rank 0 sends the whole report back as a Pipes custom message ({"report": report.json's content,
"markdown": report.md's}); the step turns it into the asset's metadata and check results. The report, the
plots and report.md are also written to --out, as `python -m sae_core.evaluate` writes them.

One rank evaluates: a launch with more ranks is refused (the hookpoints are not split across ranks yet).
"""

import contextlib
import io
import os
import sys
from typing import Any

from sae_pipeline.rank_entry import main as rank_main

REPORT_MESSAGE_KEYS = ("report", "markdown")


def evaluate(argv: list[str], pipes: Any | None) -> None:
    """Evaluate as `python -m sae_core.evaluate argv` would, on one run folder; with `pipes`, send the report
    to Dagster."""
    from sae_core.evaluate import build_parser, evaluate_run  # heavy: torch and transformers

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ValueError(f"evaluation runs on one rank, got WORLD_SIZE={world}: launch it with nproc 1")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = build_parser().parse_args(argv)
    except SystemExit:
        raise ValueError(f"invalid evaluation arguments: {captured.getvalue().strip()}") from None
    report = evaluate_run(
        args.model,
        args.sae,
        args.dataset,
        max_tokens=args.max_tokens,
        ctx_len=args.ctx_len,
        split=args.split,
        offset=args.offset,
        out_dir=args.out,
        include_special_tokens=args.include_special_tokens,
        batch_size=args.batch_size,
        hookpoints=args.hookpoints,
        device=args.device,
        dtype=args.dtype,
        splice=args.splice,
    )
    if pipes is not None:
        pipes.report_custom_message({"report": report.to_dict(), "markdown": report.to_markdown()})


if __name__ == "__main__":
    rank_main(sys.argv[1:], train_fn=evaluate)
