"""The command line as a user runs it: a real `python -m proxy` process, signals, exit codes."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.cli import main
from tests.conftest import FakeUpstream
from tests.helpers import port_from_start_line


async def _start(fake: FakeUpstream, runs: Path, *extra: str) -> tuple[asyncio.subprocess.Process, int, str]:
    """`serve --port 0` (the kernel picks a port no other process holds); return it with the port it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", "0", "--upstream", fake.base_url,
        "--runs-dir", str(runs), *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    port = port_from_start_line(line)
    # No retry: the socket is bound and listening before the start line is printed.
    _, w = await asyncio.open_connection("127.0.0.1", port)
    w.close()
    return proc, port, line


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` to completion; the timeout turns a wrongly started server into a failure."""
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30)


def _children(pid: int) -> list[int]:
    """pid's child processes (Linux /proc): the workers of a supervisor."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


async def _healthz(port: int) -> int:
    """GET /healthz on a new connection, so that whichever worker is accepting answers it."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status


@pytest.mark.slow

async def _term(proc: asyncio.subprocess.Process) -> int:
    """SIGTERM a serve process and return its exit code (the drain must end within 20 s)."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 20)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill a serve process a failed test left running."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()

async def test_serve_prints_one_line_and_drains_on_sigterm(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc, port, line = await _start(fake_upstream, runs)
    try:
        assert f"127.0.0.1:{port}" in line and fake_upstream.base_url in line and str(runs) in line
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                              headers={"X-Run-Id": "term", "X-Fake-Delay": "0.2"}) as resp:  # fmt: skip
                first = await resp.content.readany()
                proc.send_signal(signal.SIGTERM)  # mid-stream: the call must still finish
                rest = await resp.read()
        assert b"[DONE]" in first + rest
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await _reap(proc)
    [rec] = [orjson.loads(x) for x in (runs / "term.jsonl").read_bytes().splitlines()]
    assert rec["success"] is True and rec["output_tokens"] == 3 and rec["error"] is None


async def test_workers_share_port_and_files(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc, port, line = await _start(fake_upstream, runs, "--workers", "2")
    try:
        assert "(2 workers)" in line
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> int:
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                  headers={"X-Run-Id": f"w{i % 3}"}) as resp:  # fmt: skip
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(i) for i in range(120)))
        assert set(statuses) == {200}
        assert await _term(proc) == 0
    finally:
        await _reap(proc)
    lines = [x for i in range(3) for x in (runs / f"w{i}.jsonl").read_bytes().splitlines()]
    assert len(lines) == 120 and all(orjson.loads(x)["success"] for x in lines)


def test_taken_port_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _run("serve", "--port", str(port), "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"metering-proxy: cannot listen on 127.0.0.1:{port}: address already in use"
        " (is another proxy running? use --port)"
    ]
    assert "listening on" not in done.stdout


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--port", "99999"], "--port"),
        (["--port", "-1"], "--port"),
        (["--config", "{port_70000}"], "port"),
        (["--upstream", "nosuch"], "--upstream"),
        (["--upstream", "http://:80/v1"], "--upstream"),
        (["--upstream", "http://127.0.0.1:99999/v1"], "--upstream"),
    ],
)
def test_bad_port_or_upstream_exits_2_naming_the_key(tmp_path: Path, args: list[str], key: str) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("port: 70000\n")
    done = _run("serve", *[a.format(port_70000=conf) for a in args], "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("metering-proxy: config: ") and f" {key}: " in line
    assert "listening on" not in done.stdout


def test_version() -> None:
    done = _run("--version")
    want = f"metering-proxy {metadata.version('metering-proxy')}\n"
    assert (done.returncode, done.stdout, done.stderr) == (0, want, "")


async def test_port_0_start_line_names_the_bound_port_dashboard_and_base_url(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    # A password in the upstream URL's userinfo must never reach the start line (logs, CI output).
    upstream = fake_upstream.base_url.replace("http://", "http://user:SECRET-PASS@")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", "0", "--upstream", upstream,
        "--runs-dir", str(tmp_path / "runs"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        found = re.match(r"metering-proxy listening on http://127\.0\.0\.1:(\d+)/v1 -> forwarding to default=", line)
        assert found, line
        port = int(found[1])
        assert port != 0
        base = f"http://127.0.0.1:{port}"
        assert f"; dashboard {base}/ui;" in line and line.endswith(f"; use it with OPENAI_BASE_URL={base}/v1\n")
        assert "SECRET-PASS" not in line and "default=http://***@127.0.0.1:" in line
        assert await _healthz(port) == 200
        async with aiohttp.ClientSession() as s, s.get(f"{base}/ui") as resp:
            assert resp.status == 200  # the dashboard really is where the line says
        assert await _term(proc) == 0
    finally:
        await _reap(proc)


async def test_workers_own_the_port_no_one_else_can_join(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    proc, port, line = await _start(fake_upstream, tmp_path / "runs", "--workers", "2")
    workers: list[int] = []
    try:
        assert f"listening on http://127.0.0.1:{port}/v1 (2 workers)" in line
        # What a second proxy bound with SO_REUSEPORT (as the workers once were) would try.
        with socket.socket() as intruder:
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                intruder.bind(("127.0.0.1", port))
            except OSError as exc:
                assert exc.errno == errno.EADDRINUSE
            else:
                raise AssertionError(f"a second socket could bind port {port}")
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", fake_upstream.base_url,
            "--runs-dir", str(tmp_path / "runs2"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 2 and b"address already in use" in err and b"listening on" not in out

        for _ in range(200):
            workers = _children(proc.pid)
            if len(workers) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(workers) == 2
        # Stop one worker, then the other: the running one must answer every call on its own, so each
        # of the two really serves the inherited socket.
        for stopped in workers:
            os.kill(stopped, signal.SIGSTOP)
            try:
                assert [await _healthz(port) for _ in range(3)] == [200, 200, 200]
            finally:
                os.kill(stopped, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_prices_lookup(capsys: object) -> None:
    assert main(["prices", "lookup", "gpt-4o-2024-08-06"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "gpt-4o" in out and "2.5" in out


def test_prices_lookup_of_an_unpriced_model_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "lookup", "house-model-without-a-price-7"]) == 1
    assert "no price" in capsys.readouterr().out


async def test_start_up_heap_is_frozen_out_of_full_collections() -> None:
    """The price table must not be walked by every full collection (the p99 of issue 16)."""
    import gc

    from proxy.cli import GC_YOUNG_THRESHOLD, _freeze_startup_heap
    from proxy.pricing import PriceBook

    book = PriceBook.load()
    before = gc.get_threshold()
    try:
        await _freeze_startup_heap(object())
        assert gc.get_freeze_count() > 2000
        assert not any(gc.is_tracked(o) and o is book for o in gc.get_objects())  # frozen: not in any generation
        # Young collections every few calls cost ~13 us a call under load: the threshold is raised, the older
        # generations' left as they were.
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]) and GC_YOUNG_THRESHOLD > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
