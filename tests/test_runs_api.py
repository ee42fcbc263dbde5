"""GET /runs, /runs/{id}, /runs/{id}/records, /runs/{id}/events through a real proxy, driven by the SDK."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from yarl import URL

from proxy import config, report, runs_api
from proxy.records import JsonlSink
from proxy.runs_api import RUNS_API, EventHub, FollowingHub
from tests.conftest import Messages, ProxyUnderTest, make_client, make_record

MSG: Messages = [{"role": "user", "content": "hi"}]


async def three_calls(proxy: ProxyUnderTest, run_id: str = "r1") -> list[dict[str, Any]]:
    c = make_client(proxy, run_id=run_id, headers={"X-Task-Name": "summarise"})
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    stream = await c.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                             extra_headers={"X-Task-Name": "classify"})  # fmt: skip
    async for _ in stream:
        pass
    with pytest.raises(openai.RateLimitError):
        await c.chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"X-Fake": "status:429"})
    return await proxy.wait_records(run_id, 3)


async def get(proxy: ProxyUnderTest, path: str | URL) -> tuple[int, dict[str, str], bytes]:
    url = path if isinstance(path, URL) else URL(proxy.url(path))
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, dict(r.headers), await r.read()


async def test_runs_list_with_totals(proxy: ProxyUnderTest) -> None:
    await three_calls(proxy, "r1")
    await make_client(proxy, run_id="r2").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("r2", 1)
    with pytest.raises(openai.BadRequestError):  # goes to .rejected.jsonl, which is no run
        await make_client(proxy, run_id=".hidden").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.settle(5)
    assert (proxy.runs_dir / ".rejected.jsonl").exists()
    status, headers, body = await get(proxy, "/runs")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    runs = {r["run_id"]: r for r in orjson.loads(body)["runs"]}
    assert set(runs) == {"r1", "r2"}
    r1 = runs["r1"]
    assert r1["records"] == 3 and r1["calls"] == {"total": 3, "ok": 2, "failed": 1}
    assert r1["tokens"]["input"] == 22 and r1["tokens"]["output"] == 6  # the fake answers 11 in, 3 out
    assert (
        r1["errors"] == {"rate_limit": 1} and r1["size_bytes"] == (proxy.runs_dir / "r1.jsonl").stat().st_size
    )
    assert runs["r2"]["calls"]["total"] == 1
    # a new call shows up in the totals (read incrementally)
    await make_client(proxy, run_id="r2").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("r2", 2)
    _, _, body = await get(proxy, "/runs")
    runs = {r["run_id"]: r for r in orjson.loads(body)["runs"]}
    assert runs["r2"]["calls"]["total"] == 2 and list(runs)[0] == "r2"  # most recently written first


async def test_run_summary_is_the_report_json(proxy: ProxyUnderTest) -> None:
    await three_calls(proxy)
    status, _, body = await get(proxy, "/runs/r1")
    assert status == 200
    doc = orjson.loads(body)
    path = proxy.runs_dir / "r1.jsonl"
    assert doc == report.report_json([report.summarize(path, "r1", ["model"])])
    run = doc["runs"][0]
    assert run["calls"] == {"total": 3, "ok": 2, "failed": 1}
    assert {g["key"]: g["calls"]["total"] for g in run["breakdown"]["model"]} == {
        "gpt-4o-mini": 1,
        "gpt-4o": 2,
    }
    assert run["ttft_ms"]["count"] == 1 and len(run["slowest"]) == 3
    _, _, body = await get(proxy, "/runs/r1?by=task&by=tag:none")
    run = orjson.loads(body)["runs"][0]
    assert set(run["breakdown"]) == {"task", "tag:none"}
    assert {g["key"]: g["calls"]["total"] for g in run["breakdown"]["task"]} == {
        "summarise": 2,
        "classify": 1,
    }
    status, _, body = await get(proxy, "/runs/r1?by=colour")
    assert status == 400 and orjson.loads(body)["error"]["param"] == "by"


async def test_records_since(proxy: ProxyUnderTest) -> None:
    await three_calls(proxy)
    lines = (proxy.runs_dir / "r1.jsonl").read_bytes().splitlines(keepends=True)
    status, headers, body = await get(proxy, "/runs/r1/records")
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert body == b"".join(lines)
    assert (await get(proxy, "/runs/r1/records?since=2"))[2] == lines[2]
    assert (await get(proxy, "/runs/r1/records?since=1&limit=1"))[2] == lines[1]
    assert (await get(proxy, "/runs/r1/records?since=3"))[:1] == (200,)
    assert (await get(proxy, "/runs/r1/records?since=3"))[2] == b""
    for bad in ("since=-1", "since=x", "limit=1.5"):
        status, _, body = await get(proxy, f"/runs/r1/records?{bad}")
        assert status == 400 and orjson.loads(body)["error"]["type"] == "invalid_request_error"


async def read_event(resp: aiohttp.ClientResponse) -> tuple[str, bytes]:
    """Read SSE frames until one with an event name; return (event, data)."""
    while True:
        frame = b""
        while not frame.endswith(b"\n\n"):
            line = await resp.content.readline()
            if not line:
                raise EOFError("stream ended")
            frame += line
        fields = dict(
            line.split(b": ", 1) for line in frame.strip().split(b"\n") if not line.startswith(b":")
        )
        if b"event" in fields:
            return fields[b"event"].decode(), fields.get(b"data", b"")


async def test_events_deliver_records_written_after_subscribing(proxy: ProxyUnderTest) -> None:
    c = make_client(proxy, run_id="r1")
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    [old] = await proxy.wait_records("r1", 1)
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/runs/r1/events")) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        assert (await asyncio.wait_for(resp.content.readline(), 5)).startswith(b": subscribed")
        raw = await c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
        async for _ in stream:
            pass
        got = [await asyncio.wait_for(read_event(resp), 5) for _ in range(2)]
    assert [e for e, _ in got] == ["record", "record"]
    recs = [orjson.loads(data) for _, data in got]
    assert recs[0]["request_id"] == raw.headers["x-meter-request-id"] and recs[0]["request_id"] != old["request_id"]
    assert recs[0]["model"] == "gpt-4o" and recs[1]["stream"] is True
    on_disk = await proxy.wait_records("r1", 3)
    assert recs == on_disk[1:]  # the same records as the file's, field for field
    api = proxy.server.app[RUNS_API]
    for _ in range(100):  # the client left: its subscription goes away
        if api.hub.count == 0:
            break
        await asyncio.sleep(0.02)
    assert api.hub.count == 0


async def test_events_carry_the_masked_record_the_file_holds(proxy: ProxyUnderTest) -> None:
    """A client's key quoted in a tag is masked in the run file: the live stream must not send it either."""
    key = "sk-client-key-4f1d9a7c2e"
    c = make_client(proxy, run_id="r-mask", api_key=key)
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # the run exists
    await proxy.wait_records("r-mask", 1)
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/runs/r-mask/events")) as resp:
        assert (await asyncio.wait_for(resp.content.readline(), 5)).startswith(b": subscribed")
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                        extra_headers={"X-Meter-Tag-Note": f"key {key}"})  # fmt: skip
        event, data = await asyncio.wait_for(read_event(resp), 5)
    on_disk = (await proxy.wait_records("r-mask", 2))[1]
    assert event == "record" and key not in data.decode() and "[redacted]" in on_disk["tags"]["note"]
    assert orjson.loads(data) == on_disk


async def test_events_only_for_their_run_and_keep_alive(proxy: ProxyUnderTest) -> None:
    await make_client(proxy, run_id="r1").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("r1", 1)
    proxy.server.app[RUNS_API].keepalive_s = 0.1
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/runs/r1/events")) as resp:
        await asyncio.wait_for(resp.content.readline(), 5)
        await make_client(proxy, run_id="other").chat.completions.create(model="gpt-4o-mini", messages=MSG)
        seen = b""
        while b": keep-alive" not in seen:
            seen += await asyncio.wait_for(resp.content.readline(), 5)
        assert b"event: record" not in seen  # the other run's call is not in this stream


async def test_shutdown_ends_event_streams(proxy: ProxyUnderTest) -> None:
    await make_client(proxy, run_id="r1").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("r1", 1)
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/runs/r1/events")) as resp:
        await asyncio.wait_for(resp.content.readline(), 5)
        closing = asyncio.create_task(proxy.server.close())
        event, data = await asyncio.wait_for(read_event(resp), 5)
        await asyncio.wait_for(closing, 5)  # shutdown does not wait for the stream's grace period
    assert event == "end" and orjson.loads(data) == {"reason": "shutdown"}


async def test_a_subscriber_that_falls_behind_is_dropped() -> None:
    hub = EventHub()
    slow, fast = hub.subscribe("r"), hub.subscribe("r")
    hub.observe(make_record(run_id="elsewhere", request_id="req_0"))  # nobody watches that run: nothing queued
    assert slow.queue.qsize() == 0
    for n in range(runs_api.QUEUE_SIZE):
        hub.observe(make_record(run_id="r", request_id=f"req_{n}"))
        fast.queue.get_nowait()
    assert slow.queue.full() and hub.count == 2
    hub.observe(make_record(run_id="r", request_id=f"req_{runs_api.QUEUE_SIZE}"))
    # the slow one is cut loose with its backlog freed; the fast one still gets the record
    assert slow.end_reason == "too_slow" and slow.queue.qsize() == 1 and slow.queue.get_nowait() is None
    assert hub.count == 1 and hub.dropped == 1
    frame = fast.queue.get_nowait()
    assert frame is not None and frame.startswith(b"event: record\ndata: {") and frame.endswith(b"}\n\n")
    assert orjson.loads(frame.split(b"data: ", 1)[1])["request_id"] == f"req_{runs_api.QUEUE_SIZE}"


@pytest.mark.parametrize("suffix", ["", "/records", "/events"])
async def test_unknown_run_is_404(proxy: ProxyUnderTest, suffix: str) -> None:
    status, headers, body = await get(proxy, f"/runs/nope{suffix}")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body) == {"error": {
        "message": "No run 'nope': there is no nope.jsonl in the runs dir.", "type": "invalid_request_error",
        "param": "run_id", "code": "run_not_found"}}  # fmt: skip


@pytest.mark.parametrize(
    "raw_path",
    [
        "/runs/..%2Fsecret", "/runs/..%2Fsecret/records", "/runs/%2E%2E%2Fsecret/events", "/runs/.rejected",
        "/runs/.rejected/records", "/runs/..", "/runs/../secret", "/runs/%2e%2e/secret",
        "/runs/a%2F..%2F..%2Fsecret", "/runs/%00/records",
    ],
)  # fmt: skip
async def test_no_path_traversal(proxy: ProxyUnderTest, tmp_path: Path, raw_path: str) -> None:
    secret = orjson.dumps({"ts": "2026-01-01T00:00:00.000Z", "request_id": "req_SECRET"}) + b"\n"
    (tmp_path / "secret.jsonl").write_bytes(secret)
    await make_client(proxy, run_id="ok").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        await make_client(proxy, run_id=".rejected").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.settle(2)
    assert (proxy.runs_dir / ".rejected.jsonl").exists()
    status, _, body = await get(proxy, URL(proxy.url("/")).with_path(raw_path, encoded=True))
    assert status in (400, 404), (raw_path, status)
    assert b"SECRET" not in body and b"req_" not in body
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}


# -- links in the runs dir are never followed --------------------------------------------------------


def _jsonl(*request_ids: str) -> bytes:
    return b"".join(orjson.dumps({"ts": "2026-01-01T00:00:00.000Z", "request_id": r}) + b"\n" for r in request_ids)


@pytest.fixture
def planted(tmp_path: Path) -> dict[str, bytes]:
    """runs/passwd.jsonl -> a passwd file, runs/peek.jsonl -> another directory's JSONL, a FIFO and a
    directory named like run files; return the outside files' bytes by path."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    passwd = outside / "passwd"
    passwd.write_bytes(b"root:x:0:0:root:/root:/bin/bash\nSECRET:x:1:1::/:/bin/sh\n")
    peek = outside / "other.jsonl"
    peek.write_bytes(_jsonl("req_SECRET_1", "req_SECRET_2"))
    (runs / "passwd.jsonl").symlink_to(passwd)
    (runs / "peek.jsonl").symlink_to(peek)
    (runs / "dangling.jsonl").symlink_to(outside / "nothing.jsonl")
    os.mkfifo(runs / "fifo.jsonl")
    (runs / "dir.jsonl").mkdir()
    return {str(passwd): passwd.read_bytes(), str(peek): peek.read_bytes()}


LINKED = ("passwd", "peek", "dangling", "fifo", "dir")


@pytest.mark.parametrize("suffix", ["", "/records", "/records?since=0&limit=5", "/events"])
@pytest.mark.parametrize("run_id", LINKED)
async def test_a_linked_run_is_404_like_a_missing_one(
    planted: dict[str, bytes], proxy: ProxyUnderTest, run_id: str, suffix: str
) -> None:
    status, _, body = await asyncio.wait_for(get(proxy, f"/runs/{run_id}{suffix}"), 10)
    assert status == 404, (run_id, suffix, body[:200])
    assert orjson.loads(body)["error"]["message"] == f"No run {run_id!r}: there is no {run_id}.jsonl in the runs dir."
    assert b"SECRET" not in body and b"root" not in body


async def test_runs_list_and_ui_skip_links(planted: dict[str, bytes], proxy: ProxyUnderTest) -> None:
    await make_client(proxy, run_id="real").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("real", 1)
    status, _, body = await asyncio.wait_for(get(proxy, "/runs"), 10)
    assert status == 200 and [r["run_id"] for r in orjson.loads(body)["runs"]] == ["real"]
    assert b"SECRET" not in body
    status, _, page = await get(proxy, "/ui?run=passwd")
    assert status == 200 and b"SECRET" not in page and b"root:x" not in page
    for path, data in planted.items():  # nothing outside the runs dir was touched
        assert Path(path).read_bytes() == data
    assert not (proxy.runs_dir.parent / "outside" / "nothing.jsonl").exists()


async def test_a_file_swapped_for_a_link_after_listing_is_not_read(tmp_path: Path, proxy: ProxyUnderTest) -> None:
    """A regular file seen by /runs once, then replaced by a link: the next read refuses it."""
    await make_client(proxy, run_id="swap").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("swap", 1)
    assert [r["run_id"] for r in orjson.loads((await get(proxy, "/runs"))[2])["runs"]] == ["swap"]
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(_jsonl("req_SECRET_1", "req_SECRET_2", "req_SECRET_3"))
    (proxy.runs_dir / "swap.jsonl").unlink()
    (proxy.runs_dir / "swap.jsonl").symlink_to(secret)
    status, _, body = await get(proxy, "/runs")
    assert status == 200 and orjson.loads(body)["runs"] == [] and b"SECRET" not in body
    for suffix in ("", "/records"):
        status, _, body = await get(proxy, f"/runs/swap{suffix}")
        assert status == 404 and b"SECRET" not in body


@pytest.mark.parametrize(
    "raw_path",
    ["/runs/..%2Fetc", "/runs/..%2Fetc/records", "/runs/..%2F..%2Fetc%2Fpasswd", "/runs/%2Fetc%2Fpasswd/records",
     "/runs/outside%2Fpasswd", "/runs/..%2Foutside%2Fpasswd/events", "/runs/.%2E%2Foutside%2Fother"],
)  # fmt: skip
async def test_run_ids_from_urls_never_reach_the_filesystem(
    planted: dict[str, bytes], proxy: ProxyUnderTest, raw_path: str
) -> None:
    status, _, body = await get(proxy, URL(proxy.url("/")).with_path(raw_path, encoded=True))
    assert status in (400, 404), (raw_path, status)
    assert b"SECRET" not in body and b"root:x" not in body


def test_runs_api_uses_the_proxys_run_id_rule() -> None:
    assert runs_api.RUN_ID_RE is config.RUN_ID_RE and report.RUN_ID_RE is config.RUN_ID_RE


# -- serve --workers N: streams follow the shared run file ------------------------------------------


async def test_following_hub_sends_every_writers_records_once_in_file_order(tmp_path: Path) -> None:
    """Two sinks on one runs dir (two workers): a followed run's stream gets both sinks' records, each once,
    in file order, from the subscription on; a torn fragment is skipped; stop() ends the follower."""
    worker_a, worker_b = JsonlSink(tmp_path, 60), JsonlSink(tmp_path, 60)
    hub = FollowingHub(poll_s=0.02)
    worker_a.on_flush.append(hub.wake)
    worker_a.write("r", make_record(run_id="r", request_id="req_before").to_json())
    await worker_a.flush()
    sub = await hub.join("r", tmp_path / "r.jsonl")
    hub.observe(make_record(run_id="r", request_id="req_observed"))  # the file brings it, not the observer
    with (tmp_path / "r.jsonl").open("ab") as f:
        f.write(b'{"request_id": "req_torn')  # a worker killed mid-line
    for n in range(6):
        sink = worker_a if n % 2 else worker_b
        sink.write("r", make_record(run_id="r", request_id=f"req_{n}").to_json())
        await sink.flush()
    frames = [await asyncio.wait_for(sub.queue.get(), 5) for _ in range(6)]
    got = [orjson.loads(f.split(b"data: ", 1)[1])["request_id"] for f in frames if f is not None]
    on_file = [orjson.loads(x)["request_id"] for x in report.records_since(tmp_path / "r.jsonl", 0)]
    assert got == on_file[1:] == [f"req_{n}" for n in range(6)]
    late = await hub.join("r", tmp_path / "r.jsonl")  # joins at the end of the file: none of the above
    worker_b.write("r", make_record(run_id="r", request_id="req_last").to_json())
    await worker_b.flush()
    for s in (sub, late):
        frame = await asyncio.wait_for(s.queue.get(), 5)
        assert frame is not None and b'"req_last"' in frame and s.queue.empty()
    hub.close_all("shutdown")
    await asyncio.wait_for(hub.stop(), 5)
    assert hub.count == 0 and not hub._tails
    await worker_a.close()
    await worker_b.close()


async def test_following_hub_drops_a_subscriber_that_falls_behind(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, 60)
    sink.write("r", make_record(run_id="r", request_id="req_0").to_json())
    await sink.flush()
    hub = FollowingHub(poll_s=0.02)
    slow = await hub.join("r", tmp_path / "r.jsonl")
    for n in range(runs_api.QUEUE_SIZE + 1):
        sink.write("r", make_record(run_id="r", request_id=f"req_{n + 1}").to_json())
    await sink.flush()
    hub.wake()
    for _ in range(500):  # the follower reads the backlog in slices; nobody drains this queue
        if slow.end_reason is not None:
            break
        await asyncio.sleep(0.01)
    assert slow.end_reason == "too_slow" and hub.dropped == 1 and hub.count == 0
    await asyncio.wait_for(hub.stop(), 5)
    await sink.close()
