"""Reliability: slow, broken and huge upstreams, hostile clients, hard stops, full disks, heavy concurrency.

Each test runs real parts on loopback: the FakeUpstream of conftest, the proxy in-process (make_proxy) or
as a real `python -m proxy serve` process, real files. Complements test_forward_failures (one record per
failure mode) with what needs load, signals, or a filesystem that fails.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.app import FORWARDER, make_app
from proxy.config import Config, Timeouts, Upstream
from tests.conftest import (
    GARBAGE_EVENTS,
    FakeUpstream,
    ProxyFactory,
    ProxyUnderTest,
    health,
    settle,
    track_handlers,
    wait_health,
)

MSG: Any = [{"role": "user", "content": "Say hello to the tests."}]
KEY = "sk-test-secret-key-123456"
CHAT = "/v1/chat/completions"


# -- helpers ---------------------------------------------------------------------------------


def parse_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a records file, parsed; fails on any line that is not a whole JSON object."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends mid-line: {data[-80:]!r}"
    return [orjson.loads(line) for line in data.splitlines()]


def record_files(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir() if p.name.endswith(".jsonl")) if runs.is_dir() else []


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = free_port()
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(conf), "--port", str(port),
            "--upstream", fake.base_url, "--runs-dir", str(runs), *extra, stdout=out_f, stderr=err_f,
        )  # fmt: skip
    served = Served(proc, port, runs, err)
    deadline = time.monotonic() + 20
    while b"listening" not in out.read_bytes():
        assert proc.returncode is None and time.monotonic() < deadline, served.err_text()
        await asyncio.sleep(0.025)
    while True:  # the start line comes just before the socket is bound
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            assert time.monotonic() < deadline, served.err_text()
            await asyncio.sleep(0.025)
    if "--workers" in extra:
        want = int(extra[extra.index("--workers") + 1])
        while len(served.workers) < want:
            served.workers = child_pids(proc.pid)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    return served


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MSG, "stream": True, **extra}


# -- upstream faults -------------------------------------------------------------------------


async def test_upstream_sends_byte_by_byte_slowly(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    """One byte per write with a pause between: the client gets the same stream, the record is right."""
    c = openai.AsyncOpenAI(
        base_url=proxy.base_url,
        api_key=KEY,
        max_retries=0,
        default_headers={"X-Run-Id": "slow", "X-Fake-Split": "1", "X-Fake-Delay": "0.0002"},
    )
    t0 = time.monotonic()
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    elapsed = time.monotonic() - t0
    assert text == "Hello there!"
    [sent] = fake_upstream.sent
    assert len(sent) > 1000  # really sent as 1000+ separate one-byte writes
    [rec] = await proxy.wait_records("slow", 1)
    assert rec["success"] is True and rec["error"] is None and rec["finish_reason"] == "stop"
    assert (rec["input_tokens"], rec["output_tokens"], rec["usage_source"]) == (11, 3, "upstream")
    assert rec["stream_usage_injected"] is True  # the injected usage chunk was still found and hidden
    assert 0 < rec["ttfb_ms"] <= rec["ttft_ms"] < rec["duration_ms"] <= elapsed * 1000


async def test_upstream_sends_garbage_between_events(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream
) -> None:
    """Lines without a field, invalid JSON in data:, wrong types: passed on as they came, metered past."""
    body = stream_body(stream_options={"include_usage": True})
    for split in ("0", "7"):
        status, _, raw = await post(
            proxy.url(CHAT), body, {"X-Run-Id": "garbage", "X-Fake": "garbage", "X-Fake-Split": split}
        )
        assert status == 200
        assert raw == fake_upstream.sent[-1]  # byte for byte, garbage included
        assert all(g in raw for g in GARBAGE_EVENTS)
    recs = await proxy.wait_records("garbage", 2)
    assert len(recs) == 2
    for rec in recs:
        assert rec["success"] is True and rec["error"] is None and rec["finish_reason"] == "stop"
        assert (rec["input_tokens"], rec["output_tokens"], rec["usage_source"]) == (11, 3, "upstream")
        assert rec["model"] == "gpt-4o-mini" and rec["ttft_ms"] is not None
    assert (await health(proxy.url("")))[0] == 200


async def test_upstream_sends_only_garbage(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    """A 200 stream with no readable event: passed on, one failed record, estimated usage, proxy healthy."""
    status, headers, raw = await post(
        proxy.url(CHAT), stream_body(), {"X-Run-Id": "garbage-only", "X-Fake": "garbage-only"}
    )
    assert status == 200
    # Passed on unchanged, then ended with the proxy's own error event naming the record's error.
    assert raw.startswith(fake_upstream.sent[-1])
    [rec] = await proxy.wait_records("garbage-only", 1)
    # The meter cannot tell a garbled stream from one cut before its final event.
    assert rec["success"] is False and rec["error"]["category"] == "stream_interrupted"
    assert rec["error"]["id"].encode() in raw[len(fake_upstream.sent[-1]) :]
    assert rec["status"] == 200 and rec["finish_reason"] is None and rec["output_tokens"] == 0
    assert rec["usage_source"] == "estimated" and rec["input_tokens"] > 0  # billed, so estimated
    assert (await health(proxy.url("")))[0] == 200
    ok, _, _ = await post(proxy.url(CHAT), stream_body(), {"X-Run-Id": "garbage-only"})
    assert ok == 200


async def test_huge_buffered_response(proxy: ProxyUnderTest) -> None:
    """A 20 MB JSON answer passes through whole; the record is right."""
    size = 20 * 1024 * 1024
    body = {"model": "gpt-4o-mini", "messages": MSG}
    status, _, raw = await post(
        proxy.url(CHAT), body, {"X-Run-Id": "huge", "X-Fake": f"big:{size}"}, timeout=30
    )
    assert status == 200 and len(raw) > size
    answer = orjson.loads(raw)
    assert answer["choices"][0]["message"]["content"] == "x" * size
    [rec] = await proxy.wait_records("huge", 1)
    assert rec["success"] is True and rec["error"] is None and rec["finish_reason"] == "stop"
    assert (rec["input_tokens"], rec["output_tokens"], rec["usage_source"]) == (11, size // 4096, "upstream")


async def test_huge_stream(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    """A 10 MB stream passes through whole (minus only the usage chunk the proxy asked for)."""
    size = 10 * 1024 * 1024
    status, _, raw = await post(
        proxy.url(CHAT), stream_body(), {"X-Run-Id": "huge-stream", "X-Fake": f"big:{size}"}, timeout=30
    )
    assert status == 200
    [sent] = fake_upstream.sent
    usage_chunk = sent[
        sent.rindex(b"data: {", 0, sent.rindex(b"data: [DONE]")) : sent.rindex(b"data: [DONE]")
    ]
    assert b'"usage":{"prompt_tokens"' in usage_chunk
    assert raw == sent.replace(usage_chunk, b"")
    [rec] = await proxy.wait_records("huge-stream", 1)
    assert rec["success"] is True and rec["error"] is None and rec["finish_reason"] == "stop"
    assert (rec["input_tokens"], rec["output_tokens"], rec["usage_source"]) == (11, size // 4096, "upstream")
    assert rec["stream_usage_injected"] is True


# -- client faults ---------------------------------------------------------------------------


async def test_gzip_request_body_is_forwarded_decoded(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream
) -> None:
    """A compressed request is decoded by the proxy; the upstream must not be told it is still gzip."""
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG})
    status, _, raw = await post(
        proxy.url(CHAT), gzip.compress(body), {"X-Run-Id": "gz", "Content-Encoding": "gzip"}
    )
    assert status == 200, raw
    sent = {k.lower(): v for k, v in fake_upstream.requests[-1]["headers"].items()}
    assert "content-encoding" not in sent and fake_upstream.requests[-1]["body"] == orjson.loads(body)
    [rec] = await proxy.wait_records("gz", 1)
    assert rec["success"] is True and rec["output_tokens"] == 3


@pytest.mark.parametrize("path", [CHAT, "/v1/files"])
async def test_undecodable_request_body_gives_400(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream, path: str
) -> None:
    """A body that does not decode as its Content-Encoding says: a 400 in OpenAI's shape, not a 500."""
    proxy = await make_proxy(passthrough=("POST /v1/files",))
    status, headers, raw = await post(
        proxy.url(path), b'{"model": "gpt-4o-mini"}', {"X-Run-Id": "undecodable", "Content-Encoding": "gzip"}
    )
    assert status == 400, raw
    err = orjson.loads(raw)["error"]
    assert (
        err["type"] == "invalid_request_error"
        and "gzip" in err["message"]
        and err["param"] == "Content-Encoding"
    )
    assert fake_upstream.requests == []
    await proxy.settle(1 if path == CHAT else 0)
    recs = await proxy.records("undecodable")
    if path == CHAT:  # metered endpoint, valid run id: recorded, like every other refusal
        [rec] = recs
        assert rec["status"] == 400 and rec["error"]["category"] == "bad_request"
        assert rec["error"]["id"] == headers["X-Meter-Error-Id"]
    else:
        assert recs == []
    assert (await health(proxy.url("")))[0] == 200


async def test_a_bug_in_a_check_still_leaves_a_record(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream
) -> None:
    """A check that raises something other than a ProxyError: a 500, a record that says so, still healthy."""

    async def buggy(call: Any, request: Any, obj: Any) -> None:
        raise RuntimeError("boom")

    proxy.server.app[FORWARDER].checks.append(buggy)
    status, _, _ = await post(proxy.url(CHAT), {"model": "gpt-4o-mini", "messages": MSG}, {"X-Run-Id": "bug"})
    assert status == 500
    [rec] = await proxy.wait_records("bug", 1)
    assert rec["status"] == 500 and rec["success"] is False
    assert rec["error"]["category"] == "unknown" and "RuntimeError: boom" in rec["error"]["detail"]
    assert fake_upstream.requests == []
    assert (await health(proxy.url("")))[0] == 200


async def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send one hand-written request (it must say Connection: close) and read the answer to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the server may answer and close before it has read everything
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def request_head(path: str, *headers: str, length: int = 0) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_huge_headers_get_a_4xx_and_the_proxy_stays_healthy(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Over max_header_bytes (one header, the request line) or too many headers: a 4xx from the HTTP parser
    before any handler runs, so no record; the proxy keeps serving."""
    served = await serve(fake_upstream, tmp_path / "runs", max_header_bytes=4096)
    try:
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG})
        cases = [
            request_head(CHAT, "X-Run-Id: hdr", "X-Big: " + "a" * 5000, length=len(body)),
            request_head(CHAT, "X-Run-Id: hdr", "X-Meter-Tag-" + "n" * 5000 + ": 1", length=len(body)),
            request_head(CHAT + "?" + "q" * 5000, "X-Run-Id: hdr", length=len(body)),
            request_head(
                CHAT, "X-Run-Id: hdr", *(f"X-H{i}: {'v' * 30}" for i in range(300)), length=len(body)
            ),
        ]
        for head in cases:
            raw = await raw_request(served.port, head, body)
            status = int(raw.split(b" ", 2)[1])
            assert 400 <= status < 500, raw[:300]
            assert (await health(served.base))[0] == 200
        # Just under the limit is fine: the tag is recorded, cut to 256 characters.
        head = request_head(CHAT, "X-Run-Id: hdr", "X-Meter-Tag-Big: " + "b" * 3900, length=len(body))
        raw = await raw_request(served.port, head, body)
        assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
        [rec] = await wait_lines(served.runs / "hdr.jsonl", 1)
        assert rec["success"] is True and rec["tags"] == {"big": "b" * 256}
        assert len(fake_upstream.requests) == 1
        assert await served.stop() == 0
    finally:
        await served.kill()
    assert record_files(served.runs) == ["hdr.jsonl"] and len(parse_lines(served.runs / "hdr.jsonl")) == 1


async def test_which_rejections_are_recorded_and_where(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    """The documented rule: a POST to a metered endpoint with a valid run id always leaves one record in
    that run's file, refusals included; an invalid run id, or a path under /v1, /api or /run that the
    proxy does not serve, leaves one in .rejected.jsonl; allow-listed pass-through paths leave none."""
    proxy = await make_proxy(
        max_body_bytes=2000,
        upstreams=(Upstream(name="fake", base_url=fake_upstream.base_url, models=("gpt-*",)),),
    )
    url = proxy.url(CHAT)
    ok = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG})
    run = {"X-Run-Id": "rule"}
    metered = [  # (body, extra headers, status, category)
        (ok, {}, 200, None),
        (b'{"model": "gpt-4o-mini", "messages": [', {}, 400, "invalid_json"),
        (ok, {"Content-Type": "text/plain"}, 415, "bad_request"),
        (
            orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 3000}]}),
            {},
            413,
            "payload_too_large",
        ),
        (orjson.dumps({"model": "llama-3", "messages": MSG}), {}, 404, "model_not_found"),
        (orjson.dumps({"messages": MSG}), {}, 400, "bad_request"),
        (b"not gzip", {"Content-Encoding": "gzip"}, 400, "bad_request"),
        (gzip.compress(ok), {"Content-Encoding": "gzip"}, 200, None),
        (ok, {"X-Fake": "status:429"}, 429, "rate_limit"),
    ]
    seen: list[tuple[str, int, str | None]] = []
    for data, extra, status, category in metered:
        got, headers, raw = await post(url, data, {**run, **extra})
        assert got == status, raw
        seen.append((headers["X-Meter-Request-Id"], status, category))
    rejected = []
    for hdrs, target in [
        ({"X-Run-Id": "../etc/passwd"}, url),
        ({}, proxy.url("/run/.hidden" + CHAT)),
        ({"X-Run-Id": "x" * 129}, url),
    ]:
        got, headers, raw = await post(target, ok, hdrs)
        assert got == 400 and orjson.loads(raw)["error"]["code"] == "invalid_run_id"
        rejected.append(headers["X-Meter-Request-Id"])
    requests_before = len(fake_upstream.requests)
    async with aiohttp.ClientSession(headers=run) as s:
        for method, path in [("POST", "/v2/chat/completions"), ("GET", "/nothing")]:
            async with s.request(method, proxy.url(path), data=ok) as r:  # not the API: a plain 404
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "unknown_path"
        for method, path, status in [
            ("POST", "/run/rule/v2/x", 404),
            ("POST", "/run/rule", 404),
            ("POST", "/v1/files", 404),
            ("GET", CHAT, 405),
            ("POST", CHAT + "/extra", 404),
        ]:
            async with s.request(method, proxy.url(path), data=ok) as r:  # under the API: refused, recorded
                assert r.status == status, path
                assert (await r.json())["error"]["code"] in ("unknown_path", "method_not_allowed")
                rejected.append(r.headers["X-Meter-Request-Id"])
        for method, path in [("GET", "/v1/models"), ("GET", "/run/rule/v1/models")]:
            async with s.request(method, proxy.url(path)) as r:  # the allow-list: forwarded, not recorded
                assert r.status == 200
    forwarded = [r["path"] for r in fake_upstream.requests[requests_before:]]
    assert forwarded == ["/v1/models", "/v1/models"]
    await proxy.settle(len(seen) + len(rejected))
    assert record_files(proxy.runs_dir) == [".rejected.jsonl", "rule.jsonl"]
    recs = parse_lines(proxy.runs_dir / "rule.jsonl")
    got_recs = [(r["request_id"], r["status"], r["error"]["category"] if r["error"] else None) for r in recs]
    assert got_recs == seen
    assert all(r["run_id"] == "rule" for r in recs)
    rej = parse_lines(proxy.runs_dir / ".rejected.jsonl")
    assert [r["request_id"] for r in rej] == rejected
    assert all(r["run_id"] is None for r in rej)
    assert [(r["status"], r["error"]["category"]) for r in rej] == [(400, "invalid_run_id")] * 3 + [
        (404, "unknown_path")] * 3 + [(405, "unknown_path"), (404, "unknown_path")]  # fmt: skip


async def test_header_values_that_are_not_utf8_are_recorded(proxy: ProxyUnderTest) -> None:
    """Bytes that are not UTF-8 in the headers the record keeps: replaced by U+FFFD, never a lost record."""
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG})
    head = request_head(CHAT, "X-Run-Id: latin", length=len(body)).replace(
        b"\r\n\r\n", b"\r\nX-Task-Name: caf\xe9\r\nX-Meter-Tag-Who: \x80\xff ok\r\n\r\n"
    )
    assert proxy.server.port is not None
    raw = await raw_request(proxy.server.port, head, body)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    [rec] = await proxy.wait_records("latin", 1)
    assert rec["success"] is True and rec["task"] == "caf\ufffd" and rec["tags"] == {"who": "\ufffd\ufffd ok"}


@pytest.mark.parametrize("expect", [b"100-continue", b"something-else", b"\x80"])
async def test_any_expect_header_still_reaches_the_handler(proxy: ProxyUnderTest, expect: bytes) -> None:
    """Expect: 100-continue is honoured; any other is ignored (aiohttp's 417 would leave no record)."""
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG})
    head = request_head(CHAT, "X-Run-Id: expect", length=len(body)).replace(
        b"\r\n\r\n", b"\r\nExpect: " + expect + b"\r\n\r\n"
    )
    assert proxy.server.port is not None
    raw = await raw_request(proxy.server.port, head, body)
    if expect == b"100-continue":
        assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), raw[:300]
    else:
        assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    [rec] = await proxy.wait_records("expect", 1)
    assert rec["success"] is True


# -- fuzzing the handlers --------------------------------------------------------------------


@dataclass
class ThreadedProxy:
    """The proxy and the fake upstream on their own event loop in a thread, for synchronous fuzzing."""

    port: int
    runs: Path
    fake: FakeUpstream
    app: web.Application
    loop: asyncio.AbstractEventLoop

    def settle(self) -> None:
        """settle() on the proxy's own loop: every call has ended and its record is written."""
        asyncio.run_coroutine_threadsafe(settle(self.app), self.loop).result(10)


@pytest.fixture
def threaded_proxy(tmp_path: Path) -> Iterator[ThreadedProxy]:
    """Start the proxy once per test (examples share it), with the CLI's header limits."""
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def start() -> None:
        fake = FakeUpstream()
        fake.server = TestServer(fake.app, host="127.0.0.1")
        await fake.server.start_server()
        cfg = Config(
            runs_dir=tmp_path / "runs",
            upstreams=(Upstream(name="fake", base_url=fake.base_url),),
            timeouts=Timeouts(connect_s=2, read_s=5, total_s=10),
            flush_interval_s=0.05,
            max_body_bytes=64 * 1024,
        )
        server = TestServer(track_handlers(make_app(cfg)), host="127.0.0.1")
        await server.start_server(max_field_size=cfg.max_header_bytes, max_line_size=cfg.max_header_bytes)
        box.update(fake=fake, server=server, runs=cfg.runs_dir)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fuzz-proxy", daemon=True)
    thread.start()
    assert ready.wait(10) and "server" in box, "the proxy did not start"
    yield ThreadedProxy(port=box["server"].port, runs=box["runs"], fake=box["fake"], app=box["server"].app, loop=loop)

    async def stop() -> None:
        await box["server"].close()
        await box["fake"].server.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def http(
    port: int, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    """One raw HTTP/1.1 exchange over a socket; return (final status, response bytes)."""
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: %d\r\n" % (
        method,
        path,
        len(body),
    )
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(head + body)
        except OSError:
            pass  # answered and closed before reading it all
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except ConnectionResetError:
            pass
    raw = b"".join(chunks)
    while raw.startswith(b"HTTP/1.1 1"):  # 100 Continue before the real answer
        raw = raw.split(b"\r\n\r\n", 1)[1]
    assert raw.startswith(b"HTTP/1."), (raw[:200], head[:300])
    return int(raw.split(b" ", 2)[1]), raw


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_BODY_FIELDS = {
    "model": st.sampled_from(["gpt-4o-mini", "", "m" * 300]) | _JSON,
    "stream": st.booleans() | _JSON,
    "stream_options": st.just({"include_usage": True}) | _JSON,
    "messages": st.just(MSG) | _JSON,
    "max_tokens": _JSON,
}
_BODIES = st.one_of(
    st.binary(max_size=300),
    st.fixed_dictionaries({}, optional=_BODY_FIELDS).map(orjson.dumps),
    st.fixed_dictionaries(
        {"model": st.just("gpt-4o-mini")}, optional={k: v for k, v in _BODY_FIELDS.items() if k != "model"}
    ).map(orjson.dumps),
    _JSON.map(orjson.dumps),
)
_NAMES = st.sampled_from(
    [
        b"Content-Type",
        b"X-Run-Id",
        b"X-Task-Name",
        b"X-Meter-Tag-a",
        b"X-Meter-Tag-",
        b"Content-Encoding",
        b"Accept-Encoding",
        b"Expect",
        b"Authorization",
        b"Connection",
        b"Keep-Alive",
        b"TE",
        b"Upgrade",
        b"Proxy-Connection",
        b"X-Request-Id",
        b"Accept",
        b"Trailer",
        b"Cookie",
    ]
) | st.from_regex(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}", fullmatch=True).filter(
    lambda n: (
        n.lower() not in (b"content-length", b"transfer-encoding", b"host")
        and not n.lower().startswith(b"x-fake")
    )
)
_VALUES = st.sampled_from(
    [
        b"application/json",
        b"text/plain",
        b"application/json; charset=latin-1",
        b"gzip",
        b"deflate",
        b"br",
        b"identity",
        b"run-1",
        b".hidden",
        b"../up",
        b"100-continue",
        b"close",
        b"x-run-id",
        b"",
        b"a" * 3000,
    ]
) | st.binary(max_size=40).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))
_PATHS = st.sampled_from(
    [
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/responses",
        b"/v1/messages",
        b"/run/fuzz/v1/chat/completions",
        b"/run/..%2f/v1/messages",
        b"/v1/models",
        b"/v1/files",
        b"/nope",
        b"/v1/chat/completions?x=%ff&y",
        b"/healthz",
    ]
)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_random_requests_never_crash_a_handler(threaded_proxy: ThreadedProxy) -> None:
    """Random bodies and headers on every route: never a 5xx of the proxy's own, /healthz stays 200.

    FUZZ_N=5000 runs a longer search locally (the suite's 100 examples take about a second).
    """
    tp = threaded_proxy
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=int(os.environ.get("FUZZ_N", "100")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        method=st.sampled_from([b"POST"] * 6 + [b"GET", b"PUT"]),
        path=_PATHS,
        body=_BODIES,
        headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=6),
    )
    # What this fuzz found before (each was a 500 and, for the first two, a lost record):
    @example(b"POST", b"/v1/chat/completions", b"", [(b"X-Task-Name", b"\x80")])
    @example(b"POST", b"/v1/chat/completions", b"{}", [(b"Expect", b"\x80")])
    @example(b"POST", b"/v1/chat/completions", b'{"model": "m"}', [(b"Content-Encoding", b"gzip")])
    @example(b"POST", b"/v1/models", b'{"stream": true, "stream_options": true}', [])  # the fake's own 500
    # Coverage the outcome check below relies on is pinned here, not left to what a hypothesis version
    # draws (its derandomized CI profile once reached the upstream only once in 100 examples).
    @example(b"POST", b"/v1/chat/completions", b'{"model": "m"}', [])
    @example(b"POST", b"/v1/completions", b'{"model": "m", "prompt": "x"}', [(b"Content-Type", b"application/json")])
    @example(b"POST", b"/v1/embeddings", b'{"model": "m", "input": "x"}', [(b"X-Run-Id", b"run-1")])
    @example(b"POST", b"/run/fuzz/v1/chat/completions", b'{"model": "m", "stream": true}', [])
    @example(b"GET", b"/v1/models", b"", [])
    @example(b"POST", b"/v1/chat/completions", b"[1]", [])
    @example(b"POST", b"/v1/chat/completions", b"{", [])
    @example(b"POST", b"/v1/chat/completions", b'{"model": "m"}', [(b"X-Run-Id", b".hidden")])
    @example(b"POST", b"/v1/chat/completions", b'{"model": "m"}', [(b"Content-Type", b"text/plain")])
    @example(b"POST", b"/v1/messages", b'{"model": 1}', [])
    def one(method: bytes, path: bytes, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        before = len(tp.fake.requests)
        status, raw = http(tp.port, method, path, headers, body)
        upstream_answered = len(tp.fake.requests) > before
        # A 5xx must be the upstream's answer, relayed (the fake has its own bugs), never the proxy's own;
        # except aiohttp's own 500 for an Expect value that is not UTF-8 on a route outside /v1 (it
        # answers Expect before any middleware or handler; the /v1 routes have their own expect handler).
        aiohttp_expect_bug = not path.startswith((b"/v1/", b"/run/")) and any(
            k.lower() == b"expect" and not _utf8(v) for k, v in headers
        )
        assert status < 500 or b"X-Fake-Upstream: 1" in raw.split(b"\r\n\r\n")[0] or aiohttp_expect_bug, raw[
            :600
        ]
        outcomes["upstream" if upstream_answered else f"{status // 100}xx"] += 1
        assert http(tp.port, b"GET", b"/healthz", [], b"")[0] == 200

    one()
    # The fuzz reached both the upstream and the proxy's own refusals.
    assert outcomes["upstream"] >= 5 and outcomes["4xx"] >= 5, outcomes
    tp.settle()
    for name in record_files(tp.runs):
        for rec in parse_lines(tp.runs / name):
            assert rec["error"] is None or rec["error"]["category"] != "unknown", rec


# -- process faults: real `serve` processes ----------------------------------------------------


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


async def test_sigterm_under_load_drains_every_call(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """50 streams in flight at SIGTERM: all finish whole within the grace period, 50 records, exit 0."""
    served = await serve(fake_upstream, tmp_path / "runs", shutdown_grace_s=10)
    n = 50
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as s:
            flags = [asyncio.Event() for _ in range(n)]
            calls = [
                asyncio.create_task(
                    stream_call(
                        s,
                        served.base + CHAT,
                        {"X-Run-Id": "term", "X-Fake-Delay": "0.15", "X-Meter-Tag-N": str(i)},
                        flags[i],
                    )
                )
                for i in range(n)
            ]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 10)  # all 50 are mid-stream
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
            flags = [asyncio.Event() for _ in range(n)]
            calls = [
                asyncio.create_task(
                    stream_call(s, served.base + CHAT, {"X-Run-Id": "cut", "X-Fake-Delay": "1"}, flags[i])
                )
                for i in range(n)
            ]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 10)
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
            flags = [asyncio.Event() for _ in range(n)]
            calls = [
                asyncio.create_task(
                    stream_call(
                        s, served.base + CHAT, {"X-Run-Id": "twice", "X-Fake-Delay": "0.12"}, flags[i]
                    )
                )
                for i in range(n)
            ]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 10)
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


def split_records(path: Path) -> tuple[list[dict[str, Any]], bytes]:
    """(records of the whole lines, torn tail). Fails on any whole line that does not parse."""
    data = path.read_bytes()
    *whole, tail = data.split(b"\n")
    return [orjson.loads(line) for line in whole], tail


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
            await asyncio.sleep(0.8)  # a real interval: the load runs for several flush intervals
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


async def test_restart_after_a_torn_tail_starts_on_a_fresh_line(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A file left ending mid-line (writer killed mid-write): the next writer starts on a fresh line, so the
    torn fragment stays one bad line and every other line parses."""
    runs = tmp_path / "runs"
    body = {"model": "gpt-4o-mini", "messages": MSG}
    served = await serve(fake_upstream, runs)
    try:
        for _ in range(3):
            assert (await post(served.base + CHAT, body, {"X-Run-Id": "torn"}))[0] == 200
        await wait_lines(runs / "torn.jsonl", 3)
        served.proc.kill()
        await served.proc.wait()
    finally:
        await served.kill()
    path = runs / "torn.jsonl"
    first = path.read_bytes().split(b"\n")[0]
    torn = first[: len(first) // 2]
    with path.open("ab") as f:
        f.write(torn)  # what a SIGKILL in the middle of a write leaves
    served = await serve(fake_upstream, runs)
    try:
        status, headers, _ = await post(served.base + CHAT, body, {"X-Run-Id": "torn"})
        assert status == 200
        assert await served.stop() == 0
    finally:
        await served.kill()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[3] == torn and len(lines) == 6
    recs = [orjson.loads(line) for i, line in enumerate(lines[:-1]) if i != 3]
    assert len(recs) == 4 and recs[-1]["request_id"] == headers["X-Meter-Request-Id"] and recs[-1]["success"]


async def test_runs_dir_replaced_by_a_file_mid_run(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """The runs dir goes away (a file in its place): a loud error, /healthz 503, calls refused with 503,
    and once it can be written again the held records land, each once."""
    runs = tmp_path / "runs"
    body = {"model": "gpt-4o-mini", "messages": MSG}
    served = await serve(fake_upstream, runs)
    try:
        assert (await post(served.base + CHAT, body, {"X-Run-Id": "gone"}))[0] == 200
        await wait_lines(runs / "gone.jsonl", 1)
        shutil.rmtree(runs)
        runs.write_bytes(b"not a directory\n")  # mkdir and open fail even for root
        status, h2, _ = await post(served.base + CHAT, body, {"X-Run-Id": "gone"})
        assert status == 200  # nothing could know yet; its record is held
        unhealthy = await wait_health(served.base, 503)
        assert unhealthy["status"] == "unhealthy" and str(runs) in unhealthy["error"]
        status, h3, raw = await post(served.base + CHAT, body, {"X-Run-Id": "gone"})
        assert status == 503 and orjson.loads(raw)["error"]["code"] == "recording_unavailable"
        assert len(fake_upstream.requests) == 2  # refused before forwarding
        assert "CANNOT WRITE RECORDS" in served.err_text() and str(runs) in served.err_text()
        runs.unlink()
        await wait_health(served.base, 200)
        recs = await wait_lines(runs / "gone.jsonl", 2)
        assert [r["request_id"] for r in recs] == [h2["X-Meter-Request-Id"], h3["X-Meter-Request-Id"]]
        assert recs[0]["success"] is True and recs[1]["error"]["category"] == "recording_unavailable"
        assert "recording resumed" in served.err_text()
        assert (await post(served.base + CHAT, body, {"X-Run-Id": "gone"}))[0] == 200
        assert await served.stop() == 0
    finally:
        await served.kill()
    assert len(parse_lines(runs / "gone.jsonl")) == 3


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test, or a skip saying why it cannot be."""
    where = tmp_path / "runs"
    where.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root in a sandbox): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


async def test_disk_full_then_space_again(fake_upstream: FakeUpstream, tiny_fs: Path) -> None:
    """The disk fills: a loud error, /healthz 503, calls refused; space comes back: every held record is
    written exactly once, no line torn or doubled."""
    runs = tiny_fs
    filler = runs / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill it up, then leave three pages free
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size // 4096 - 3) * 4096)
    served = await serve(fake_upstream, runs)
    body = {"model": "gpt-4o-mini", "messages": MSG}
    ids: list[str] = []
    statuses: list[int] = []
    try:
        for i in range(100):
            status, headers, raw = await post(
                served.base + CHAT, body, {"X-Run-Id": "full", "X-Meter-Tag-I": str(i)}
            )
            ids.append(headers["X-Meter-Request-Id"])
            statuses.append(status)
            if status == 503:
                assert orjson.loads(raw)["error"]["code"] == "recording_unavailable"
                break
            await asyncio.sleep(0.07)  # a real interval: over one flush (50 ms), so each record is its own batch
        assert statuses[-1] == 503 and statuses.count(200) >= 3, statuses
        assert (await health(served.base))[0] == 503
        assert "CANNOT WRITE RECORDS" in served.err_text() and "No space left on device" in served.err_text()
        filler.unlink()
        await wait_health(served.base, 200)
        recs = await wait_lines(runs / "full.jsonl", len(ids))
        assert [r["request_id"] for r in recs] == ids  # each once, in order
        assert [r["status"] for r in recs] == statuses
        assert await served.stop() == 0
    finally:
        await served.kill()
    assert len(parse_lines(runs / "full.jsonl")) == len(ids)


async def test_torn_tail_left_by_another_writer_mid_run(proxy: ProxyUnderTest) -> None:
    """Another worker killed mid-write tears the end of a file this process already writes: the next
    batch still starts on a fresh line."""
    c = openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key=KEY, max_retries=0, default_headers={"X-Run-Id": "shared"}
    )
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("shared", 1)
    path = proxy.runs_dir / "shared.jsonl"
    with path.open("ab") as f:
        f.write(b'{"ts":"2026-01-01T00:00:00.000Z","run_id":"shar')
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.settle(2)
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[1].endswith(b'"run_id":"shar') and lines[3] == b""
    assert [orjson.loads(lines[i])["success"] for i in (0, 2)] == [True, True]


# -- concurrency -----------------------------------------------------------------------------

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


async def test_1000_concurrent_streams_across_50_runs(make_proxy: ProxyFactory) -> None:
    # As in the two-worker variant: 1,000 upstream connects at once can overflow the fake upstream's
    # accept backlog on a busy 2-core box (a SYN retry takes 1-3 s); this test checks the files.
    proxy = await make_proxy(timeouts=Timeouts(connect_s=15, read_s=15, total_s=60))
    await many_streams(proxy.url(""))
    await proxy.settle(CALLS)
    check_run_files(proxy.runs_dir)


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
