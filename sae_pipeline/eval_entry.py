"""What the evaluation ranks run: `python -m sae_pipeline.eval_entry <python -m sae_core.evaluate arguments>`.

It is `python -m sae_core.evaluate` on one run folder (the same flags, parsed by sae_core's own parser) inside
sae_pipeline.rank_entry.main: the parent-death signal, the error file of a failed rank, and the Pipes session
on rank 0. Rank 0 sends the whole report back as a Pipes custom message ({"report": report.json's content,
"markdown": report.md's}); the step turns it into the asset's metadata and check results. The report, the
plots and report.md are also written to --out, as `python -m sae_core.evaluate` writes them.

On several ranks the hookpoints are dealt out (rank r evaluates the r-th, (r+W)-th, ... of the run's SAEs, on
its own GPU when there are enough), every rank on the same held-out tokens; rank 0 gathers the per-hookpoint
metrics (gloo, objects only) and writes the one report. Each rank loads the whole LM: the time of the spliced
forward passes, which grows with the hookpoints, is what is divided.
"""

import contextlib
import io
import os
import sys
from typing import Any

from sae_pipeline.rank_entry import main as rank_main

REPORT_MESSAGE_KEYS = ("report", "markdown")


def evaluate(argv: list[str], pipes: Any | None) -> None:
    """Evaluate as `python -m sae_core.evaluate argv` would, on one run folder, sharing the hookpoints among
    the ranks; with `pipes`, send the report to Dagster."""
    from sae_core.evaluate import build_parser, evaluate_run, held_out_kwargs  # heavy: torch and transformers

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = build_parser().parse_args(argv)
    except SystemExit:
        raise ValueError(f"invalid evaluation arguments: {captured.getvalue().strip()}") from None
    device = args.device or _default_device()
    options = {**held_out_kwargs(args), "device": device, "splice": args.splice}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if pipes is not None:
        pipes.log.info(f"evaluating {args.sae} on {device} (rank 0 of {world})")
    if world == 1:
        report = evaluate_run(
            args.model,
            args.sae,
            args.dataset,
            out_dir=args.out,
            hookpoints=args.hookpoints,
            **options,
        )
    else:
        report = _evaluate_sharded(args, options, world)
        if report is None:  # not rank 0: its metrics went to rank 0
            return
    if pipes is not None:
        pipes.report_custom_message({"report": report.to_dict(), "markdown": report.to_markdown()})


def _default_device() -> str:
    """This rank's GPU (by LOCAL_RANK; ranks share GPUs when there are more ranks than GPUs), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def _evaluate_sharded(args: Any, options: dict[str, Any], world: int) -> Any:
    """This rank's share of the hookpoints, evaluated; on rank 0 the merged EvalReport (saved to --out), on
    the others None."""
    import torch.distributed as dist

    from sae_core.errors import EvalError
    from sae_core.evaluate import EvalReport, evaluate_run
    from sae_core.models import list_hookpoints, matches_hookpoint

    rank = int(os.environ["RANK"])
    names = [
        h
        for h in list_hookpoints(args.sae)
        if args.hookpoints is None or matches_hookpoint(h, args.hookpoints)
    ]
    if not names:
        raise EvalError(
            f"no SAE folders in {args.sae} (matching {args.hookpoints!r}) to share among {world} ranks"
        )
    mine = names[rank::world]
    dist.init_process_group("gloo")  # objects only: each rank's metrics travel to rank 0 once, at the end
    try:
        part = None
        if mine:
            part = evaluate_run(args.model, args.sae, args.dataset, hookpoints=mine, **options)
            part = part.to_dict()
        parts: list[Any] = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    done = [p for p in parts if p is not None]
    metrics = {h: m for p in done for h, m in p["hookpoints"].items()}
    settings = {**done[0]["settings"], "ranks": world}
    report = EvalReport(settings=settings, hookpoints={h: metrics[h] for h in names})
    if args.out:
        report.save(args.out)
    return report


if __name__ == "__main__":
    rank_main(sys.argv[1:], train_fn=evaluate)
