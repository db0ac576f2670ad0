"""Tie a process's life to its parent's: the kernel's parent-death signal (Linux prctl PR_SET_PDEATHSIG).

Its own module, free of torch, because the pipeline's launcher calls it in a forked child before exec, and
Dagster's processes import the launcher without needing torch (sae_core.distributed re-exports it).
"""

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


# Looked up once, at import: die_with_parent also runs in a forked child before exec, where loading a library
# could deadlock on a lock another thread of the parent held.
_PRCTL = _find_prctl()


def die_with_parent(parent: int | None = None, signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process `signum` when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG;
    a no-op on systems without prctl). Returns whether the parent is still alive.

    The signal only covers a death after this call, so a caller that may already be orphaned checks the
    result. `parent` is the pid the caller expects (recorded before a fork, or before slow imports); without
    it, having been re-parented to init (pid 1) means the parent is gone.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signum)
    ppid = os.getppid()
    return ppid == parent if parent is not None else ppid != 1
