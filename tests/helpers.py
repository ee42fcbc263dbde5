"""Helpers shared by the reliability modules: raw calls, record files, and real `serve` processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import KEY, FakeUpstream, Messages

MSG: Messages = [{"role": "user", "content": "Say hello to the tests."}]
CHAT = "/v1/chat/completions"


# -- records files ---------------------------------------------------------------------------------


def parse_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a records file, parsed; fails on any line that is not a whole JSON object."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends mid-line: {data[-80:]!r}"
    return [orjson.loads(line) for line in data.splitlines()]


def record_files(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir() if p.name.endswith(".jsonl")) if runs.is_dir() else []


def split_records(path: Path) -> tuple[list[dict[str, Any]], bytes]:
    """(records of the whole lines, torn tail). Fails on any whole line that does not parse."""
    data = path.read_bytes()
    *whole, tail = data.split(b"\n")
    return [orjson.loads(line) for line in whole], tail


async def wait_lines(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Wait until a records file written by another process holds count whole lines."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            data = path.read_bytes()
            if data.count(b"\n") >= count and data.endswith(b"\n"):
                return parse_lines(path)
        assert time.monotonic() < deadline, f"{path.name}: fewer than {count} records"
        await asyncio.sleep(0.02)


# -- calls -----------------------------------------------------------------------------------------


async def post(
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    session: aiohttp.ClientSession | None = None,
) -> tuple[int, Any, bytes]:
    """POST a JSON body (or raw bytes) with aiohttp; return (status, headers, body)."""
    hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    hdrs.update(headers or {})
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    own = session is None
    s = session or aiohttp.ClientSession()
    try:
        async with s.post(url, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, r.headers, await r.read()
    finally:
        if own:
            await s.close()


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MSG, "stream": True, **extra}


# -- real `serve` processes ------------------------------------------------------------------------


#: What `serve` prints on stdout once its socket listens (tests/test_cli.py checks the rest of the line).
START_LINE = re.compile(r"metering-proxy listening on http://127\.0\.0\.1:(\d+)/v1\b")


def port_from_start_line(line: str) -> int:
    """The port a `serve --port 0` process was given by the kernel, read from its start line."""
    found = START_LINE.match(line)
    assert found, f"not a start line: {line!r}"
    return int(found[1])


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is pid (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Served:
    """A real `python -m proxy serve` process. Its output goes to files, not pipes: on Python 3.11 a
    process's wait() returns only once its pipes close, which a surviving worker would hold open."""

    proc: asyncio.subprocess.Process
    port: int
    runs: Path
    err: Path
    workers: list[int] = field(default_factory=list)
    signalled: bool = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def err_text(self) -> str:
        return self.err.read_text("utf-8", "replace") if self.err.exists() else ""

    def term(self) -> None:
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (unless one was sent already) and wait for the exit code."""
        if self.proc.returncode is None and not self.signalled:
            self.term()
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL whatever is left of it, workers included (they were started by this test)."""
        for pid in [*self.workers, self.proc.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 5)


async def serve(fake: FakeUpstream, runs: Path, *extra: str, **cfg: Any) -> Served:
    """Start `serve` against the fake upstream; cfg keys go to a YAML config (flush 50 ms by default)."""
    cfg.setdefault("flush_interval_ms", 50)
    cfg.setdefault("timeouts", {"connect_s": 2, "read_s": 5, "total_s": 30})
    n = len(list(runs.parent.glob("proxy-*.yaml")))
    conf, out, err = (runs.parent / f"proxy-{n}.{ext}" for ext in ("yaml", "out", "err"))
    conf.write_text("".join(f"{k}: {orjson.dumps(v).decode()}\n" for k, v in cfg.items()))
    # Port 0: the kernel picks a free port when the proxy binds, so no other process can take it in between.
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(conf), "--port", "0",
            "--upstream", fake.base_url, "--runs-dir", str(runs), *extra, stdout=out_f, stderr=err_f,
        )  # fmt: skip
    served = Served(proc, 0, runs, err)
    deadline = time.monotonic() + 20
    while b"\n" not in (printed := out.read_bytes()):
        assert proc.returncode is None and time.monotonic() < deadline, served.err_text()
        await asyncio.sleep(0.025)
    # No need to poll the port: the start line is printed once the socket listens.
    served.port = port_from_start_line(printed.decode().partition("\n")[0])
    if "--workers" in extra:
        want = int(extra[extra.index("--workers") + 1])
        while len(served.workers) < want:
            served.workers = child_pids(proc.pid)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    return served
