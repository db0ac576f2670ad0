"""TorchrunLauncher: the launcher resource (a Dagster PipesClient, sae_pipeline.launcher) that runs the ranks
as torchrun processes on this machine, through Dagster Pipes, without ever leaving a process behind.

The stock `PipesSubprocessClient` is not enough for torchrun: on cancel it sends SIGINT to its direct child
only and never escalates, and if the step process itself is killed, torchrun and its ranks (which torch starts
in sessions of their own) are orphaned and keep the GPUs busy. So here:

- torchrun starts in its own session (process group), with a parent-death signal: if the step process dies,
  even by SIGKILL, the kernel sends torchrun SIGTERM, and torchrun stops its ranks. Each rank also asks for a
  parent-death signal (sae_pipeline.rank_entry), in case torchrun itself is killed outright.
- on cancel (Dagster raises DagsterExecutionInterruptedError in the step) the whole group gets SIGTERM, then
  SIGKILL after `termination_timeout_s`, longer than the 30 s torchrun itself gives its ranks; anything of the
  process tree still alive after that is killed by pid.
- the same happens when the step process finds itself orphaned: under Dagster's multiprocess executor the step
  runs in a child of the run worker, and when the run worker is killed Dagster marks the run failed, but the
  step process (and so torchrun) would go on training for nobody. The step checks its parent every second.
- every rank inherits the Pipes environment, but only global rank 0 opens the Pipes session; ranks write their
  traceback to a per-launch folder when they fail, and the step failure quotes the rank that failed first and
  says whether a retry may help (sae_pipeline.retries).
"""

import collections
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import dagster as dg
import psutil
from pydantic import Field

from sae_core.parent_death import die_with_parent

from .launcher import PipesLauncher
from .retries import Diagnosis, diagnose_launch_failure

RANK_ERRORS_ENV = "SAE_PIPELINE_RANK_ERRORS"
_STDERR_TAIL_LINES = 40
_PARENT_POLL_S = 1.0


class TorchrunLauncher(PipesLauncher):
    """The ranks as `torchrun` processes on this machine, children of the step (the default launcher).

    Only this node is launched by Dagster. For several nodes, start the same command on the other nodes (with
    your cluster's tooling) against the same rendezvous endpoint; global rank 0 must run on this node, because
    it is the rank that reports to Dagster. So several nodes need the static rendezvous with this node as node
    0 (`rdzv_backend: static`, `node_rank: 0`); with c10d, torch assigns ranks itself and rank 0 may land on
    another node, so it is refused.
    """

    python_executable: str = Field(default_factory=lambda: sys.executable, description="Python for torchrun.")
    node_rank: int | None = Field(default=None, ge=0, description="This node's rank (static rendezvous).")
    rdzv_backend: str = Field(default="c10d", description="torchrun --rdzv-backend (multi-node).")
    rdzv_endpoint: str | None = Field(default=None, description="host:port of the rendezvous (multi-node).")
    rdzv_id: str | None = Field(default=None, description="Rendezvous id (default: the Dagster run id).")
    master_port: int | None = Field(
        default=None, description="Port of a single-node run (default: a free one, so runs never clash)."
    )
    omp_num_threads: int | None = Field(
        default=None,
        description="OMP_NUM_THREADS per training rank (default, and for evaluation: cores / ranks).",
    )
    termination_timeout_s: float = Field(
        default=45.0, gt=30, description="On cancel: SIGTERM, then SIGKILL after this many seconds (> 30)."
    )

    def check(self) -> None:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (a host:port every node can reach)")
        if self.nnodes > 1 and (self.rdzv_backend != "static" or self.node_rank != 0):
            raise ValueError(
                f"nnodes={self.nnodes} with rdzv_backend={self.rdzv_backend!r}, node_rank={self.node_rank}: "
                "global rank 0, the rank that reports to Dagster, must run on this node; use "
                "rdzv_backend: static with node_rank: 0 here (the other nodes take node_rank 1, 2, ...)"
            )

    def command(
        self, train_args: Sequence[str], run_id: str, *, module: str | None = None, nproc: int | None = None
    ) -> list[str]:
        """The torchrun command line running `module` (default: entry_module) on `nproc` ranks per node
        (default: nproc_per_node). Only training joins a multi-node rendezvous; other modules (evaluation)
        run on this node alone."""
        self.check()
        if module in (None, self.entry_module) and (self.nnodes > 1 or self.rdzv_endpoint):
            rendezvous = [
                "--nnodes",
                str(self.nnodes),
                "--rdzv-backend",
                self.rdzv_backend,
                "--rdzv-id",
                self.rdzv_id or run_id,
            ]
            if self.rdzv_endpoint:
                rendezvous += ["--rdzv-endpoint", self.rdzv_endpoint]
            if self.node_rank is not None:
                rendezvous += ["--node-rank", str(self.node_rank)]
        else:
            # --standalone would pick a port too, but through a c10d store that prints a warning per rank;
            # a free port chosen here keeps two runs on one machine apart just as well.
            rendezvous = single_node_rendezvous(self.master_port or _free_port())
        return torchrun_command(
            self.python_executable,
            nproc or self.nproc_per_node,
            module or self.entry_module,
            train_args,
            rendezvous,
        )

    def env(self, nproc: int | None = None, *, training: bool = True) -> dict[str, str]:
        # omp_num_threads is sized for the training ranks; an evaluation on fewer ranks takes the cores they
        # leave (one rank on a 2-core machine: 2 threads, not the 1 each of 2 training ranks gets).
        fair = max(1, (os.cpu_count() or 1) // (nproc or self.nproc_per_node))
        return rank_env((self.omp_num_threads if training else None) or fair, self.extra_env)

    def run(  # type: ignore[override]
        self,
        *,
        context: dg.AssetExecutionContext,
        extras: Mapping[str, Any] | None = None,
        module: str,
        args: Sequence[str],
        nproc: int | None = None,
        what: str = "training",
        metadata: Mapping[str, Any] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        command = self.command(args, run_id=context.run.run_id, module=module, nproc=nproc)
        session = _run_in_pipes_session(
            context,
            command,
            env=self.env(nproc, training=module == self.entry_module),
            termination_timeout_s=self.termination_timeout_s,
            extras=extras,
            what=what,
        )
        added = {k: _metadata_value(v) for k, v in (metadata or {}).items()}
        return dg.PipesClientCompletedInvocation(session, metadata=added)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    python_executable: str, nproc: int, module: str, args: Sequence[str], rendezvous: Sequence[str]
) -> list[str]:
    """`python -m torch.distributed.run --nproc-per-node <nproc> <rendezvous> -m <module> <args>`: torchrun
    with a given Python, the command line of every launcher backend."""
    torchrun = [python_executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [*torchrun, *rendezvous, "-m", module, *args]


def single_node_rendezvous(master_port: int) -> list[str]:
    """The torchrun options of a launch on one node, its rendezvous on `master_port`."""
    return ["--nnodes", "1", "--master-port", str(master_port)]


def rank_env(omp_num_threads: int | None, extra_env: Mapping[str, str]) -> dict[str, str]:
    """The environment every rank gets on top of its machine's: OMP threads (left to torchrun when None: it
    sets 1 per rank), no tokenizer threads (a rank forks data workers), then the user's extra_env."""
    env = {"OMP_NUM_THREADS": str(omp_num_threads)} if omp_num_threads else {}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **extra_env}


def _run_in_pipes_session(
    context: dg.AssetExecutionContext,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    termination_timeout_s: float,
    extras: Mapping[str, Any] | None,
    what: str,
    cwd: str | None = None,
) -> dg.PipesSession:
    """Run `command` (a torchrun command line) inside a Pipes session and return the closed session.

    Raises dg.Failure naming the failing rank and quoting its traceback when torchrun exits non-zero.
    """

    def die_with_step(parent: int) -> None:
        """In the child, before exec: SIGTERM when the step process dies; exit at once if it already has."""
        if not die_with_parent(parent):
            os._exit(1)

    error_dir = Path(tempfile.mkdtemp(prefix="sae-pipeline-ranks-"))
    try:
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesTempFileContextInjector(),
            message_reader=dg.PipesTempFileMessageReader(),
            extras=dict(extras or {}),
        ) as session:
            full_env = {
                **os.environ,
                **env,
                **session.get_bootstrap_env_vars(),
                RANK_ERRORS_ENV: str(error_dir),
            }
            context.log.info(f"launching {shlex.join(command)}")
            parent = os.getpid()
            process = subprocess.Popen(
                list(command),
                env=full_env,
                cwd=cwd,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=lambda: die_with_step(parent),
            )
            stderr_tail = _StderrTail(process.stderr)
            try:
                returncode = _wait_while_parent_lives(process, os.getppid(), _parent_is_a_dagster_worker())
            except BaseException as error:  # DagsterExecutionInterruptedError on cancel; anything else alike
                why = str(error) if isinstance(error, StepOrphanedError) else "interrupted"
                context.log.warning(
                    f"{why}: stopping torchrun (pid {process.pid}) and its ranks: SIGTERM, then "
                    f"SIGKILL after {termination_timeout_s:.0f} s"
                )
                stop_process_tree(process, termination_timeout_s)
                raise
            finally:
                stderr_tail.join(timeout=10)
            if returncode != 0:
                raise launch_failure(returncode, command, rank_errors(error_dir), stderr_tail.lines(), what)
        return session
    finally:
        shutil.rmtree(error_dir, ignore_errors=True)


class StepOrphanedError(RuntimeError):
    """The process that started this step (Dagster's run worker) is gone."""


def _parent_is_a_dagster_worker() -> bool:
    """Whether this step runs in a process started by Dagster (a run worker spawned by multiprocessing, or a
    dagster command). A step run in-process from a user's own script or shell must not stop when that shell
    goes away (e.g. under nohup): only a dead Dagster worker means nobody is waiting for the result."""
    try:
        cmdline = " ".join(psutil.Process(os.getppid()).cmdline())
    except (psutil.Error, OSError):
        return False
    return "multiprocessing" in cmdline or "dagster" in cmdline


def _wait_while_parent_lives(
    process: subprocess.Popen, parent: int, enforce: bool = True, poll_s: float = _PARENT_POLL_S
) -> int:
    """Wait for `process` to end; with `enforce`, raise StepOrphanedError as soon as our parent `parent` is
    gone."""
    while True:
        try:
            return process.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if enforce and os.getppid() != parent:  # re-parented: the run worker died
                raise StepOrphanedError(
                    "the parent of the step process "
                    f"(pid {parent}, the run worker under the multiprocess executor) is gone"
                ) from None


def _metadata_value(value: Any) -> dg.MetadataValue:
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    return dg.MetadataValue.text(str(value))


def stop_process_tree(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the process group of `process`, SIGKILL it after `timeout_s`, then kill any descendant left.

    torch starts each rank in a session of its own, so ranks are outside the group: they are found by walking
    the process tree (before torchrun exits and they are re-parented) and killed by pid if they outlive
    torchrun.
    """
    known = _descendants(process.pid)
    try:
        _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            known.update(_descendants(process.pid))
            time.sleep(0.2)
    finally:
        # However we got here (timeout, a second interrupt, an error): nothing survives this block.
        _signal_group(process, signal.SIGKILL)
        process.wait()
        alive = [p for p in known if p.is_running()]
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is not None:  # reaped: its group id may belong to someone else by now
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> set[psutil.Process]:
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


class _StderrTail:
    """Forward a child's stderr to ours (Dagster captures it) and keep its last lines for the failure
    message."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, name="torchrun-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        if self._stream is None:
            return
        out = getattr(sys.stderr, "buffer", None)
        for raw in iter(self._stream.readline, b""):
            if out is not None:
                out.write(raw)
                out.flush()
            else:
                sys.stderr.write(raw.decode(errors="replace"))
            # tqdm redraws with carriage returns: keep only what the terminal would show last.
            line = raw.decode(errors="replace").rstrip("\n").split("\r")[-1].rstrip()
            if line:
                self._lines.append(line)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def lines(self) -> list[str]:
        return list(self._lines)


def rank_errors(error_dir: Path) -> list[tuple[int, str]]:
    """(rank, traceback text) of every rank that reported a failure, the earliest first (the likely cause)."""
    found = []
    for path in error_dir.glob("rank*.txt"):
        try:
            found.append((path.stat().st_mtime, int(path.stem[4:]), path.read_text(errors="replace")))
        except (OSError, ValueError):
            continue
    return [(rank, text) for _, rank, text in sorted(found)]


def launch_failure(
    returncode: int | None,
    command: Sequence[str],
    errors: Sequence[tuple[int, str]],
    stderr_tail: Sequence[str],
    what: str = "training",
    *,
    ended: str | None = None,
    diagnosis: Diagnosis | None = None,
) -> dg.Failure:
    """The step failure of a launch whose torchrun ended with `returncode` (negative: killed by that signal),
    given the ranks' recorded `errors` (earliest first) and the end of its output. A backend that knows more
    (a pod's OOMKilled, an eviction) passes its own `diagnosis` and says how the launch `ended`; it may not
    know the returncode (None: the pod was evicted before its container ended)."""
    if returncode is None and (diagnosis is None or ended is None):
        raise ValueError("launch_failure: without a returncode, pass the diagnosis and how it ended")
    if ended is None:
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        ended = f"torchrun ended with {how}"
    if diagnosis is None:
        diagnosis = diagnose_launch_failure(returncode, errors, stderr_tail)
    if errors:
        rank, text = errors[0]
        others = [r for r, _ in errors[1:]]
        also = f" (ranks {others} failed after it)" if others else ""
        description = f"{what} failed: rank {rank} raised{also}; {ended}.\n\n"
        description += text.rstrip()
    else:
        rank, text = None, "\n".join(stderr_tail)
        description = f"{ended} before any rank reported an error; its last output:\n\n"
        description += text
    retry = "retryable" if diagnosis.retryable else "not retried"
    description = f"{diagnosis.reason} ({retry}).\n{description}"
    metadata: dict[str, Any] = {
        "exit_code": returncode if returncode is not None else "unknown",
        "failed_rank": rank if rank is not None else "unknown",
        "retryable": diagnosis.retryable,
        "diagnosis": diagnosis.reason,
        "error": dg.MetadataValue.md(f"```\n{text.rstrip()}\n```"),
        "command": shlex.join(command),
    }
    # A rank's own exception (a bug, bad settings) fails the same way again: retrying it only burns GPU time.
    # A dead rank, a killed torchrun or a collective timeout may pass: the step's retry policy says how often.
    return dg.Failure(description=description, metadata=metadata, allow_retries=diagnosis.retryable)
