"""Just enough of headless Chromium for the UI test, over the DevTools protocol (no Playwright, no driver).

`Chromium` starts Debian's `chromium` in a process group of its own with a fresh profile, connects to its page
over a websocket (the `websockets` package, which dagster-webserver installs through `uvicorn[standard]`), and
offers navigate / wait for text / click / screenshot. `stop_process_group` ends a process group (this browser,
or a `dagster dev`) and reports any process of it that is still alive.
"""

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import connect

# Headless, quiet and off the network (shared/DESIGN.md section 4); and shared memory in /tmp, since a
# container's /dev/shm can be too small for the renderer.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    """Debian's `chromium` (installed by scripts/install.sh), or $CHROMIUM if set."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def group_members(pid: int) -> list[psutil.Process]:
    """The processes of the group that `pid` leads, and all descendants of `pid` (even in other groups)."""
    members: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        members.update((p.pid, p) for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pid:
                members.setdefault(p.pid, p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return list(members.values())


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> list[str]:
    """Stop `proc` (started with start_new_session=True) and every process of its group and tree.

    SIGTERM to `proc` first, so that it shuts its children down itself (as on Ctrl-C); after `timeout` seconds
    SIGKILL to the whole group and to any descendant that left it. Returns a line for each process still
    running afterwards: the expected answer is none.
    """
    members = group_members(proc.pid)
    if proc.poll() is None:
        proc.terminate()
    if _wait_gone(members, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _wait_gone(members, 10)
    proc.wait(timeout=10)
    # Anything still in the group, even if it was started after the first look.
    known = {p.pid for p in members}
    members += [p for p in group_members(proc.pid) if p.pid not in known]
    return [_describe(p) for p in members if _running(p)]


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until none of `processes` runs (a zombie counts as gone); return those still running."""
    deadline = time.monotonic() + timeout
    while (running := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return str(p.pid)


class Chromium:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, workdir: Path, width: int = 1600, height: int = 1000):
        self.profile = workdir / "chromium-profile"
        self.profile.mkdir(parents=True)
        self.log = workdir / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    executable,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={self.profile}",
                    "--remote-debugging-port=0",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._ids = itertools.count(1)
        self._connection = contextlib.ExitStack()
        try:
            self._ws = self._connection.enter_context(
                connect(self._page_websocket(), max_size=None, open_timeout=30)
            )
            # The page exactly this size, whatever room the headless window keeps for itself.
            self.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.close()
            raise

    def _page_websocket(self, timeout: float = 60) -> str:
        """The page's DevTools websocket: the port is in the profile's DevToolsActivePort once it listens."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"chromium exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if lines:
                with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list", timeout=10) as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.2)
        raise TimeoutError(
            f"chromium did not open its DevTools port in {timeout} s:\n{self.log.read_text()[-3000:]}"
        )

    def send(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events that arrive meanwhile are dropped)."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {result['errorText']}")

    def text(self) -> str:
        """What the page shows as text (document.body.innerText)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """Wait until every needle is in the page text; return that text."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.text()
            except RuntimeError:  # the page is between documents: no context to evaluate in yet
                text = ""
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{missing} not on {self.evaluate('location.href')} after {timeout} s; "
                    f"the page shows:\n{text[:3000]}"
                )
            time.sleep(0.5)

    def click_button(self, label: str) -> bool:
        """Click the first visible button whose text is `label`; False when there is none."""
        return bool(
            self.evaluate(
                "(() => { const b = [...document.querySelectorAll('button')].find("
                f"e => e.innerText.trim() === {json.dumps(label)} && e.offsetParent !== null);"
                " if (b) { b.click(); return true; } return false; })()"
            )
        )

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> list[str]:
        """Stop the browser; return the processes of it left alive (expected: none)."""
        with contextlib.suppress(Exception):
            self._connection.close()
        return stop_process_group(self.proc, timeout=10)
