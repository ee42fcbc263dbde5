"""One host, many workers: real `serve --workers 2` processes, driven by the openai SDK against the fake upstream.

/metrics answered by either worker gives the host's totals (those of the run file), and an events stream
held by one worker carries every worker's records, once each, in file order. That both workers served
calls is proven by the per-pid sink series of /metrics (records each worker wrote).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import KEY, FakeUpstream, Messages
from tests.helpers import Served, alive, parse_lines, serve, wait_lines
from tests.test_runs_api import read_event

pytestmark = pytest.mark.slow

MSGS: Messages = [{"role": "user", "content": "hi"}]
RUN = "host-run"
ROUNDS, PER_ROUND = 4, 16


@pytest.fixture
async def served(fake_upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Served]:
    proc = await serve(fake_upstream, tmp_path / "runs", "--workers", "2")
    try:
        yield proc
    finally:
        try:
            await proc.stop()
        finally:
            await proc.kill()


def client(served: Served) -> openai.AsyncOpenAI:
    """A new SDK client (its own connections, so the calls spread over the workers), never retrying."""
    return openai.AsyncOpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0,
                              default_headers={"X-Run-Id": RUN})  # fmt: skip


async def one_call(c: openai.AsyncOpenAI, i: int) -> None:
    if i % 2:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
        return
    stream = await c.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True,
                                             extra_headers={"X-Fake-Delay": "0.02"})  # fmt: skip
    async for _ in stream:
        pass


async def load(served: Served) -> int:
    """Rounds of concurrent calls, each round on fresh connections; return how many calls were made."""
    for _ in range(ROUNDS):
        async with client(served) as c:
            await asyncio.gather(*(one_call(c, i) for i in range(PER_ROUND)))
    return ROUNDS * PER_ROUND


async def scrape(served: Served) -> list[Sample]:
    """GET /metrics on a new connection (so any worker may answer); every parsed sample."""
    async with aiohttp.ClientSession() as s, s.get(served.base + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return [sample for fam in text_string_to_metric_families(text) for sample in fam.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def per_pid(samples: list[Sample], name: str) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value for s in samples if s.name == name}


async def settled(served: Served, written: int, timeout: float = 10.0) -> list[Sample]:
    """Scrape until the host's records_written reaches written (each worker mirrors its sink at its flushes)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(served)
        if total(samples, "metering_proxy_records_written_total") >= written:
            return samples
        assert time.monotonic() < deadline, per_pid(samples, "metering_proxy_records_written_total")
        await asyncio.sleep(0.05)


def assert_both_workers_wrote(served: Served, samples: list[Sample]) -> None:
    written = per_pid(samples, "metering_proxy_records_written_total")
    assert set(written) == set(served.workers), (written, served.workers)
    assert all(n > 0 for n in written.values()), written  # each worker served (and recorded) some calls


async def test_metrics_from_any_worker_are_the_hosts(served: Served) -> None:
    n = await load(served)
    recs = await wait_lines(served.runs / f"{RUN}.jsonl", n, timeout=10)
    assert len(recs) == n
    await settled(served, n)
    expect = {
        "calls": n,
        "input": sum(r["input_tokens"] for r in recs),
        "output": sum(r["output_tokens"] for r in recs),
        "streams": sum(1 for r in recs if r["stream"]),
    }
    assert expect["input"] > 0 and expect["streams"] == n // 2
    for _ in range(8):  # new connections each time: both workers answer some of these scrapes
        samples = await scrape(served)
        assert_both_workers_wrote(served, samples)
        assert total(samples, "metering_proxy_requests_total") == expect["calls"]
        assert total(samples, "metering_proxy_requests_total", status="200", error_type="") == expect["calls"]
        assert total(samples, "gen_ai_client_tokens_total", gen_ai_token_type="input") == expect["input"]
        assert total(samples, "gen_ai_client_tokens_total", gen_ai_token_type="output") == expect["output"]
        assert total(samples, "gen_ai_client_operation_duration_seconds_count") == expect["calls"]
        assert total(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == expect["calls"]
        assert total(samples, "gen_ai_server_time_to_first_token_seconds_count") == expect["streams"]
        assert total(samples, "metering_proxy_records_written_total") == n
        assert per_pid(samples, "metering_proxy_sink_healthy") == {pid: 1 for pid in served.workers}
        assert not any(s.name.startswith(("process_", "python_gc_")) for s in samples)  # per process: left out
        # /runs and /runs/<id> read the shared file: the same totals from whichever worker answers.
        async with aiohttp.ClientSession() as s:
            async with s.get(served.base + "/runs") as r:
                [run] = orjson.loads(await r.read())["runs"]
            async with s.get(served.base + f"/runs/{RUN}") as r:
                summary = orjson.loads(await r.read())["runs"][0]
        assert run["calls"]["total"] == n and run["tokens"]["input"] == expect["input"]
        assert summary["calls"]["total"] == n


async def test_a_dead_workers_gauges_go_its_counts_stay(served: Served) -> None:
    n = await load(served)
    await wait_lines(served.runs / f"{RUN}.jsonl", n, timeout=10)
    samples = await settled(served, n)
    assert_both_workers_wrote(served, samples)
    dead, survivor = served.workers
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(dead) or dead in per_pid(samples := await scrape(served), "metering_proxy_sink_healthy"):
        assert time.monotonic() < deadline, "the supervisor kept a dead worker's live gauges"
        await asyncio.sleep(0.05)
    assert per_pid(samples, "metering_proxy_sink_healthy") == {survivor: 1}
    assert set(per_pid(samples, "metering_proxy_records_pending")) == {survivor}
    assert total(samples, "metering_proxy_requests_total") == n  # what the dead one counted is still counted
    assert per_pid(samples, "metering_proxy_records_written_total").keys() == {dead, survivor}


async def test_an_events_stream_on_one_worker_gets_every_workers_records(served: Served) -> None:
    path = served.runs / f"{RUN}.jsonl"
    async with client(served) as c:
        await one_call(c, 1)  # the run must exist before it can be watched
    await wait_lines(path, 1)
    async with aiohttp.ClientSession() as s, s.get(served.base + f"/runs/{RUN}/events") as resp:
        assert resp.status == 200
        assert (await asyncio.wait_for(resp.content.readline(), 5)).startswith(b": subscribed")
        n = await load(served)
        on_disk = await wait_lines(path, n + 1, timeout=10)
        got: list[dict[str, Any]] = []
        for _ in range(n):
            event, data = await asyncio.wait_for(read_event(resp), 10)
            assert event == "record"
            got.append(orjson.loads(data))
        # One more call: the next event is that call, so nothing was sent twice in between.
        async with client(served) as c:
            raw = await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
        event, data = await asyncio.wait_for(read_event(resp), 10)
    assert [r["request_id"] for r in got] == [r["request_id"] for r in on_disk[1:]]  # every one, in file order
    assert got == on_disk[1:]  # field for field
    assert orjson.loads(data)["request_id"] == raw.headers["x-meter-request-id"]
    assert_both_workers_wrote(served, await settled(served, n + 2))
    assert len(parse_lines(path)) == n + 2
