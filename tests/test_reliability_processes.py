"""Hard stops of real `python -m proxy serve` processes: SIGTERM drains, SIGKILL loses at most the last flush,
workers never outlive their supervisor.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import FakeUpstream
from tests.helpers import CHAT, MSG, alive, parse_lines, post, record_files, serve, split_records, stream_body


async def stream_call(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    started: asyncio.Event | None = None,
    timeout: float = 20,
) -> tuple[int, str, bytes]:
    """One streaming chat call read to the end; return (status, request id, body)."""
    async with session.post(
        url, json=stream_body(), headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        first = await r.content.readany()
        if started is not None:
            started.set()
        return r.status, r.headers.get("X-Meter-Request-Id", ""), first + await r.read()


# -- SIGTERM ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def streams_in_flight(
    session: aiohttp.ClientSession, url: str, headers: list[dict[str, str]]
) -> list[asyncio.Task[tuple[int, str, bytes]]]:
    """Start one streaming call per headers dict; return once every one of them is mid-stream."""
    flags = [asyncio.Event() for _ in headers]
    calls = [asyncio.create_task(stream_call(session, url, h, flag)) for h, flag in zip(headers, flags, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 10)
    return calls


async def test_sigterm_under_load_drains_every_call(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """50 streams in flight at SIGTERM: all finish whole within the grace period, 50 records, exit 0."""
    served = await serve(fake_upstream, tmp_path / "runs", shutdown_grace_s=10)
    n = 50
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as s:
            calls = await streams_in_flight(  # all 50 are mid-stream
                s, served.base + CHAT,
                [{"X-Run-Id": "term", "X-Fake-Delay": "0.15", "X-Meter-Tag-N": str(i)} for i in range(n)],
            )  # fmt: skip
            t_term = time.monotonic()
            served.term()
            results = await asyncio.wait_for(asyncio.gather(*calls), 15)
            code = await served.stop()
            t_exit = time.monotonic()
    finally:
        await served.kill()
    assert code == 0, served.err_text()
    assert t_exit - t_term < 10  # within the grace period
    assert all(status == 200 and body.rstrip().endswith(b"data: [DONE]") for status, _, body in results)
    recs = parse_lines(served.runs / "term.jsonl")
    assert len(recs) == n
    assert sorted(r["request_id"] for r in recs) == sorted(rid for _, rid, _ in results)
    assert sorted(int(r["tags"]["n"]) for r in recs) == list(range(n))
    assert all(r["success"] and r["error"] is None and r["output_tokens"] == 3 for r in recs)


async def test_sigterm_grace_period_runs_out(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """Streams still running when the grace period ends are cut, and recorded as proxy_shutdown."""
    served = await serve(fake_upstream, tmp_path / "runs", shutdown_grace_s=0.5)
    n = 10
    try:
        async with aiohttp.ClientSession() as s:
            calls = await streams_in_flight(s, served.base + CHAT, [{"X-Run-Id": "cut", "X-Fake-Delay": "1"}] * n)
            t_term = time.monotonic()
            served.term()
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 15)
            code = await served.stop()
            t_exit = time.monotonic()
    finally:
        await served.kill()
    assert code == 0, served.err_text()
    assert t_exit - t_term < 4  # the streams would have needed ~6 s more
    assert not any(isinstance(r, tuple) and r[2].rstrip().endswith(b"[DONE]") for r in results)
    recs = parse_lines(served.runs / "cut.jsonl")
    assert len(recs) == n
    assert all(r["error"]["category"] == "proxy_shutdown" and r["status"] == 200 for r in recs), recs[0]
    # Billed work was cut short: estimated from the request and what was streamed before the cut.
    assert all(r["usage_source"] == "estimated" and r["input_tokens"] > 0 for r in recs), recs


async def test_second_sigterm_does_not_cut_the_drain(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """A second SIGTERM (or ^C twice) while draining is logged, not obeyed: calls finish, all flushed."""
    served = await serve(fake_upstream, tmp_path / "runs", shutdown_grace_s=10, flush_interval_ms=5000)
    n = 5
    try:
        async with aiohttp.ClientSession() as s:
            calls = await streams_in_flight(
                s, served.base + CHAT, [{"X-Run-Id": "twice", "X-Fake-Delay": "0.12"}] * n
            )
            served.term()
            # A real interval: the second signal must come once the drain has begun (the proxy then holds
            # further signals), which nothing outside the process can see.
            await asyncio.sleep(0.2)
            served.proc.send_signal(signal.SIGTERM)
            served.proc.send_signal(signal.SIGINT)
            results = await asyncio.wait_for(asyncio.gather(*calls), 15)
            code = await served.stop()
    finally:
        await served.kill()
    assert code == 0, served.err_text()
    assert "already shutting down" in served.err_text()
    assert all(status == 200 and body.rstrip().endswith(b"data: [DONE]") for status, _, body in results)
    # Flushed at exit: with a 5 s flush interval, none of them could have been written before.
    assert len(parse_lines(served.runs / "twice.jsonl")) == n


# -- SIGKILL ---------------------------------------------------------------------------------------


async def test_sigkill_under_load_loses_at_most_the_last_flush(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SIGKILL with 30 streams in flight: every call that ended more than a flush interval before the kill
    is on disk, every line parses, nothing is torn except possibly the very end of a file."""
    flush = 0.1
    served = await serve(fake_upstream, tmp_path / "runs", flush_interval_ms=flush * 1000)
    done: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def client(i: int, s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                status, rid, body = await stream_call(
                    s, served.base + CHAT, {"X-Run-Id": f"kill{i % 3}", "X-Fake-Delay": "0.01"}, timeout=5
                )
            except (aiohttp.ClientError, TimeoutError):
                return
            if status == 200 and body.rstrip().endswith(b"data: [DONE]"):
                done.append((time.monotonic(), rid))

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=30)) as s:
            tasks = [asyncio.create_task(client(i, s)) for i in range(30)]
            # Several flush intervals of load, and enough finished calls, however busy the machine is.
            started = time.monotonic()
            while time.monotonic() - started < 0.8 or len(done) < 150:
                assert time.monotonic() - started < 20, f"{len(done)} calls done in 20 s"
                await asyncio.sleep(0.05)
            t_kill = time.monotonic()
            served.proc.kill()
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert await asyncio.wait_for(served.proc.wait(), 5) == -signal.SIGKILL
    finally:
        await served.kill()
    on_disk: list[str] = []
    for name in record_files(served.runs):
        recs, tail = split_records(served.runs / name)  # a torn line is only ever the file's last
        assert all(r["run_id"] == name.removesuffix(".jsonl") and r["success"] for r in recs)
        on_disk += [r["request_id"] for r in recs]
    assert len(on_disk) == len(set(on_disk))
    assert set(on_disk) <= {rid for _, rid in done}  # only calls that really ended
    # Written by a background flush every flush interval; the slack covers one write and a busy loop.
    settled = {rid for t, rid in done if t < t_kill - flush - 0.05}
    assert len(settled) > 100, len(settled)
    assert settled <= set(on_disk), f"{len(settled - set(on_disk))} settled records lost"


async def test_workers_exit_when_the_supervisor_is_killed(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SIGKILL of the supervisor leaves no orphan holding the port: the workers drain, flush and exit."""
    served = await serve(fake_upstream, tmp_path / "runs", "--workers", "2", flush_interval_ms=5000)
    try:
        assert len(served.workers) == 2
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                status, _, _ = await post(served.base + CHAT, {"model": "m", "messages": MSG},
                                          {"X-Run-Id": "orphan"}, session=s)  # fmt: skip
                assert status == 200
        served.proc.kill()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in served.workers):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            await asyncio.sleep(0.05)
    finally:
        await served.kill()
    # Flushed on the way out: with a 5 s flush interval none could have been written before.
    assert len(parse_lines(served.runs / "orphan.jsonl")) == 20
