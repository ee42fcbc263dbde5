"""A real PostgreSQL for tests: initdb + pg_ctl in a temp dir on a free loopback port, run as the postgres user.

PostgreSQL refuses to run as root, so when the tests run as root its binaries run through
``runuser -u postgres`` on a directory chowned to that user. Without the binaries (or that user) the
fixtures skip, saying why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))


def _bin_dir() -> Path | None:
    for d in BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


def skip_reason() -> str | None:
    """Why a real PostgreSQL cannot be started here, or None when it can."""
    if _bin_dir() is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to run PostgreSQL as the postgres user"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[fleet]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster in a temp dir; start(), stop() and start() again keep its data and port."""

    def __init__(self) -> None:
        bindir = _bin_dir()
        assert bindir is not None
        self.bin = bindir
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="mp-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=self.root)
        assert done.returncode == 0, f"{tool} failed: {done.stderr.decode(errors='replace')[-2000:]}"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self.root}' -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "30",
                  "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except AssertionError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_module() -> Iterator[PgServer]:
    """One PostgreSQL for a test module (each test makes its own database with new_database)."""
    yield from _server()


@pytest.fixture
def pg_own() -> Iterator[PgServer]:
    """A PostgreSQL of the test's own, for tests that stop and restart it."""
    yield from _server()


_dbs = 0


async def new_database(server: PgServer) -> str:
    """Create an empty database on server; return its URL."""
    import asyncpg

    global _dbs
    _dbs += 1
    name = f"t{os.getpid()}_{_dbs}"
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return server.url_for(name)


def _server() -> Iterator[PgServer]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
