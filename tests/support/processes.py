"""Finding and waiting for the processes a test started: `dagster dev` and training ranks."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    """POST a query to the Dagster webserver at `url`; its `data`, asserting no GraphQL errors (an HTTP error
    is raised with the body the server sent)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{error}: {error.read().decode(errors='replace')[:3000]}") from None
    assert "errors" not in answer, answer
    return answer["data"]


CODE_LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries {
  name locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def wait_for_code_location(url: str, logs: list[Path], timeout_s: float = 120) -> None:
    """Wait until the webserver at `url` has loaded its one code location (it may serve before the location
    loads, e.g. before a separate code server is up); on a timeout, show the end of each of `logs`."""
    deadline = time.monotonic() + timeout_s
    entry: dict = {}
    while (entry.get("locationOrLoadError") or {}).get("__typename") != "RepositoryLocation":
        assert time.monotonic() < deadline, (entry, [log.read_text()[-5000:] for log in logs if log.exists()])
        time.sleep(0.5)
        with contextlib.suppress(urllib.error.URLError, OSError):
            [entry] = graphql(url, CODE_LOCATION)["workspaceOrError"]["locationEntries"]


def start_dagster_dev(
    port: int,
    env: dict[str, str],
    cwd: Path,
    log: Path,
    target: tuple[str, ...] = ("-m", "sae_pipeline.definitions"),
) -> subprocess.Popen:
    """`dagster dev` (webserver + daemon + code server) in a process group of its own; `target` names the
    code location (`-m MODULE` or `-w WORKSPACE_FILE`)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                *target,
            ],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_serving(server: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster dev exited with {server.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"dagster dev did not serve {url} in {timeout} s:\n{log.read_text()[-5000:]}")


def training_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or ()) and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until_gone(marker: str, timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := training_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
