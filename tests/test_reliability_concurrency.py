"""Heavy concurrency: 1,000 streams at once over 50 runs, in one process and across two workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Timeouts
from tests.conftest import FakeUpstream, ProxyFactory
from tests.helpers import CHAT, parse_lines, record_files, serve, stream_body

CALLS, RUNS = 1000, 50
async def many_streams(base: str, calls: int = CALLS, runs: int = RUNS) -> None:
    """calls concurrent streaming calls spread over runs runs, each tagged with its number; all must pass."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=calls)) as s:

        async def one(n: int) -> None:
            headers = {"X-Run-Id": f"c{n % runs}", "X-Meter-Tag-N": str(n), "X-Fake-Delay": "0.02"}
            async with s.post(
                base + CHAT, json=stream_body(), headers=headers, timeout=aiohttp.ClientTimeout(total=30)
            ) as r:
                body = await r.read()
                assert r.status == 200 and body.rstrip().endswith(b"data: [DONE]"), (n, r.status, body[-200:])

        await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(calls))), 30)


def check_run_files(runs_dir: Path, calls: int = CALLS, runs: int = RUNS) -> None:
    """Each run file holds exactly its own calls, once each; every line parses; no other file exists."""
    assert record_files(runs_dir) == sorted(f"c{r}.jsonl" for r in range(runs))
    for r in range(runs):
        recs = parse_lines(runs_dir / f"c{r}.jsonl")
        assert all(rec["run_id"] == f"c{r}" and rec["success"] and rec["output_tokens"] == 3 for rec in recs)
        assert sorted(int(rec["tags"]["n"]) for rec in recs) == list(range(r, calls, runs)), f"c{r}"


@pytest.mark.slow
async def test_1000_concurrent_streams_across_50_runs(make_proxy: ProxyFactory) -> None:
    # As in the two-worker variant: 1,000 upstream connects at once can overflow the fake upstream's
    # accept backlog on a busy 2-core box (a SYN retry takes 1-3 s); this test checks the files.
    proxy = await make_proxy(timeouts=Timeouts(connect_s=15, read_s=15, total_s=60))
    await many_streams(proxy.url(""))
    await proxy.settle(CALLS)
    check_run_files(proxy.runs_dir)


@pytest.mark.slow
async def test_1000_concurrent_streams_across_50_runs_two_workers(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    # 1,000 upstream connects at once from two processes overflow the fake upstream's accept
    # backlog on a busy 2-core box; a SYN retry takes 1-3 s, so the 2 s test connect timeout is
    # too tight here. What this test checks is the files, not connect latency.
    served = await serve(fake_upstream, tmp_path / "runs", "--workers", "2",
                         timeouts={"connect_s": 15, "read_s": 15, "total_s": 60})  # fmt: skip
    try:
        await many_streams(served.base)
        assert await served.stop() == 0, served.err_text()
    finally:
        await served.kill()
    check_run_files(served.runs)
