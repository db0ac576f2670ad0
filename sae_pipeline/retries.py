"""Which failures are worth retrying, and the retry policies of the steps that use them.

A training launch fails in one of two ways that call for opposite responses:

- the machine or the job was disturbed: a rank died by a signal (the OOM killer's SIGKILL, a preemption's
  SIGTERM), torchrun itself was killed, a collective timed out or lost its peer. Running again may well work,
  and training resumes from its last checkpoint, so little is lost: retryable.
- a rank raised a Python exception (a bug, bad settings, CUDA out of memory on a batch that will be just as
  big next time): running again fails the same way after burning GPU time, so it is not retried.

Dagster retries a step under its RetryPolicy unless the step raised dg.Failure(allow_retries=False).
"""

import os
import re
import signal
from collections.abc import Sequence
from typing import NamedTuple

import dagster as dg

RETRY_DELAY_ENV = "SAE_PIPELINE_RETRY_DELAY_S"
_DEFAULT_RETRY_DELAY_S = 60.0

# The last line of a rank's traceback, for a collective that timed out or lost a peer: gloo raises a plain
# RuntimeError ("Timed out waiting 3000ms for recv operation", "Connection closed by peer"), NCCL's watchdog a
# DistBackendError ("Watchdog caught collective operation timeout"), the rendezvous store DistStoreError.
_COLLECTIVE_FAILURE = re.compile(
    r"Dist(Backend|Network|Store)Error|timed out|Watchdog caught collective operation timeout"
    r"|Connection (closed|reset) by peer|NCCL communicator was aborted",
    re.IGNORECASE,
)
# torchrun's summary names the rank that failed first: "Root Cause (first observed failure): ... rank : 1
# (local_rank: 1) ... exitcode : -9 (pid: 11151)".
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL | re.IGNORECASE)


class Diagnosis(NamedTuple):
    """Why a launch failed, in a few words, and whether trying again may help."""

    retryable: bool
    reason: str


def diagnose_launch_failure(
    returncode: int, rank_errors: Sequence[tuple[int, str]], stderr_tail: Sequence[str]
) -> Diagnosis:
    """Classify a failed torchrun launch from its exit code, the tracebacks its ranks recorded (earliest
    first) and the end of its stderr."""
    if returncode < 0:
        return Diagnosis(True, f"torchrun was killed by {_signal_name(-returncode)}")
    root = _ROOT_CAUSE.search("\n".join(stderr_tail))
    if root and int(root.group(2)) < 0:
        rank, signum = int(root.group(1)), -int(root.group(2))
        return Diagnosis(True, f"rank {rank} vanished: killed by {_signal_name(signum)}")
    if rank_errors:
        rank, text = rank_errors[0]
        last = (text.strip().splitlines() or [""])[-1]
        if _COLLECTIVE_FAILURE.search(last):
            return Diagnosis(True, f"rank {rank}: a collective timed out or lost its peer ({last[:200]})")
        return Diagnosis(False, f"rank {rank} raised {last[:200]}")
    return Diagnosis(False, "torchrun failed before any rank started or recorded an error")


def _signal_name(signum: int) -> str:
    try:
        return f"signal {signum} ({signal.Signals(signum).name})"
    except ValueError:
        return f"signal {signum}"


def _retry_delay_s() -> float:
    raw = os.environ.get(RETRY_DELAY_ENV)
    try:
        return float(raw) if raw else _DEFAULT_RETRY_DELAY_S
    except ValueError:
        raise ValueError(f"{RETRY_DELAY_ENV}={raw!r}: expected a number of seconds, e.g. 60") from None


# Training: twice, a minute apart, then two (a node recovering from an OOM kill, a flaky interconnect).
# Each retry resumes the run folder's checkpoint. Step failures the retry cannot fix say allow_retries=False.
TRAINING_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=_retry_delay_s(), backoff=dg.Backoff.EXPONENTIAL)
# Publishing: the Hub may be down or rate-limiting for a while; the upload is one commit, so a retry never
# publishes half a run.
PUBLISHING_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=_retry_delay_s(), backoff=dg.Backoff.EXPONENTIAL
)
