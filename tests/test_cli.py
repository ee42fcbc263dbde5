"""The command line as a user runs it: a real `python -m proxy` process, signals, exit codes."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import orjson

from proxy.cli import main
from tests.conftest import FakeUpstream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start(fake: FakeUpstream, runs: Path, *extra: str) -> tuple[asyncio.subprocess.Process, int, str]:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", fake.base_url,
        "--runs-dir", str(runs), *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    for _ in range(100):  # the start line comes just before the socket is bound
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    return proc, port, line


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
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
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
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [x for i in range(3) for x in (runs / f"w{i}.jsonl").read_bytes().splitlines()]
    assert len(lines) == 120 and all(orjson.loads(x)["success"] for x in lines)


def test_prices_lookup(capsys: object) -> None:
    assert main(["prices", "lookup", "gpt-4o-2024-08-06"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "gpt-4o" in out and "2.5" in out
