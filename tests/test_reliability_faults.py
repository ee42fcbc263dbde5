"""Reliability under faults: slow, broken and huge upstreams; hostile and odd clients.

The FakeUpstream of conftest and the proxy in-process (make_proxy), or a real `serve` process where the
CLI's own HTTP limits are the subject. Complements test_forward_failures (one record per failure mode).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.app import FORWARDER
from proxy.config import Upstream
from tests.conftest import GARBAGE_EVENTS, FakeUpstream, ProxyFactory, ProxyUnderTest, health, make_client
from tests.helpers import CHAT, MSG, parse_lines, post, record_files, serve, stream_body, wait_lines

# -- upstream faults -------------------------------------------------------------------------------


async def test_upstream_sends_byte_by_byte_slowly(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    """One byte per write with a pause between: the client gets the same stream, the record is right."""
    c = make_client(proxy, run_id="slow", headers={"X-Fake-Split": "1", "X-Fake-Delay": "0.0002"})
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


# -- client faults ---------------------------------------------------------------------------------


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
