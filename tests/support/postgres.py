"""A real PostgreSQL server for the tests: Debian's PostgreSQL 15, started on 127.0.0.1 in a temporary folder.

One server per test session (the `postgres` fixture in tests/conftest.py), one fresh database per test. As
root, `initdb` refuses to run, so the server runs as the `postgres` user (`runuser`); as anyone else it runs
as that user. Authentication is `trust` on 127.0.0.1 only: nothing else can reach it.
"""

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("SAE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"


def missing_reason() -> str | None:
    """Why no test server can be started here, or None when one can."""
    if not (PG_BIN / "initdb").is_file():
        return (
            f"PostgreSQL 15 is not installed ({PG_BIN}/initdb is missing): scripts/install.sh installs it "
            "(apt-get, as root)"
        )
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without `runuser`: initdb refuses root and cannot run as the postgres user"
    return None


@dataclass
class Postgres:
    """A running test server: 127.0.0.1:`port`, data and socket under `folder`."""

    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SUPERUSER, "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(self._as_owner(*args), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def initdb(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, SUPERUSER, SUPERUSER)
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> None:
        """Stop the server (fast: disconnect every client), keep it down `down_s` seconds, start it."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def psql(self, sql: str, db: str = "postgres") -> str:
        return self._run(
            str(PG_BIN / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        )

    def create_database(self, prefix: str = "dagster") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def dump(self, db: str) -> str:
        """The whole database as SQL text (pg_dump)."""
        return self._run(
            str(PG_BIN / "pg_dump"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            db,
            timeout=120,
        )

    def dagster_env(self, db: str) -> dict[str, str]:
        """The environment deploy/dagster.yaml reads its storage settings from."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": SUPERUSER,
            # trust authentication ignores it; the instance config requires one.
            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
            "DAGSTER_PG_DB": db,
        }


def start_server(port: int) -> Postgres:
    # Not under pytest's tmp_path: its folders are private to root, and the server runs as `postgres`.
    server = Postgres(Path(tempfile.mkdtemp(prefix="sae-test-pg-")), port)
    os.chmod(server.folder, 0o755)
    try:
        server.initdb()
        server.start()
    except BaseException:
        shutil.rmtree(server.folder, ignore_errors=True)
        raise
    return server


def stop_server(server: Postgres) -> None:
    try:
        server.stop(mode="immediate")
    finally:
        shutil.rmtree(server.folder, ignore_errors=True)
