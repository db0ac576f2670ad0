"""Small helpers shared by the library: atomic file and folder writes, one-line errors, natural sorting."""

import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from .errors import SaeCoreError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file for writing so that a crash leaves either the old file or the new one, never a torn
    one.

    What is written goes to a temporary file in the same folder, streamed (no copy of the content is held in
    memory: a trainer state can be GBs), is fsync'ed, then renamed over the target (rename is atomic within a
    filesystem). On error (e.g. disk full) the temporary file is removed and the previous file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from the rest of a team
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def missing_local_path(name: str) -> str | None:
    """When `name` can only mean a local path (./x, ../x, /x, ~/x, a/b/c, a file name with an extension) and
    nothing is there: a clause saying so, else None. A Hub id is `name` or `owner/name`, without those."""
    if os.path.exists(os.path.expanduser(name)):
        return None
    local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name in (".", "..")
    if not local and not re.fullmatch(r"[^/]+\.(txt|jsonl|json|parquet|csv|arrow|safetensors)", name):
        return None
    return f"there is no file or folder at {os.path.abspath(os.path.expanduser(name))}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def staging_folder(target: str | os.PathLike) -> Path:
    """An empty hidden folder beside `target` (same file system, so `replace_folder` is a rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # the mode mkdir gives, not mkdtemp's private 0700
    return staging


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `staging` in the place of `target`, by renames: a reader sees the old folder or
    the new one, never a mix, and the old one is deleted only once the new one is in place.

    The old folder is first renamed into a hidden folder beside it (a rename cannot replace a non-empty
    folder); if the second rename fails, it is moved back.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old / target.name, target)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(target.parent)  # make the rename itself durable
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error it replaces `target` (see
    `replace_folder`). On an error the staging folder is deleted and `target` is untouched."""
    staging = staging_folder(target)
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once renamed


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name): for one-line user-facing errors."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders 'layers.2' before 'layers.10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def release_free_memory() -> None:
    """Give memory freed by Python and the C allocator back to the OS (glibc's malloc_trim).

    Tokenizing leaves ~50 MB of freed but still resident heap behind; trimming it before training lowers the
    run's peak RSS by as much. A no-op where there is no glibc.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fail(message: str) -> NoReturn:
    """End a command line with `error: <message>` on stderr and exit status 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """In a CLI's main: bad input, refusals and unreachable files or servers (SaeCoreError, OSError) end the
    command with one line; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (SaeCoreError, OSError) as error:
        fail(str(error))
