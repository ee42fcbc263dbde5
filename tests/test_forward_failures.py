"""Every way a call can fail, end to end: one record each, the right category, the right answer.

The client is the real openai SDK where it can send the request, else aiohttp or a raw socket (for
bodies and headers the SDK never sends, and for hanging up at a precise moment). The upstream is the
FakeUpstream of conftest, a real aiohttp server on loopback.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.config import Timeouts, Upstream
from tests.conftest import (
    KEY,
    PAYLOADS,
    FakeUpstream,
    Messages,
    ProxyFactory,
    ProxyUnderTest,
    health,
    make_client,
    wait_health,
)

MSG: Messages = [{"role": "user", "content": "Say hello to the tests."}]
HEX12 = re.compile(r"[0-9a-f]{12}")
CHAT_BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG})


# -- helpers ---------------------------------------------------------------------------------


def jsonl_files(proxy: ProxyUnderTest) -> list[str]:
    if not proxy.runs_dir.is_dir():
        return []
    return sorted(p.name for p in proxy.runs_dir.iterdir() if p.name.endswith(".jsonl"))


async def only_record(proxy: ProxyUnderTest, run_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """Wait until the call has ended, then check it made one record, the only one, in the only file."""
    await proxy.settle(1, timeout)
    recs = await proxy.records(run_id)
    assert len(recs) == 1, recs
    assert jsonl_files(proxy) == [f"{run_id}.jsonl"]
    return recs[0]


def check_error(rec: dict[str, Any], category: str, error_id: str | None = None) -> dict[str, Any]:
    """Assert the record failed with category (and error_id, when the client was told one)."""
    err = rec["error"]
    assert err is not None, rec
    assert err["category"] == category, err
    assert HEX12.fullmatch(err["id"]), err
    assert isinstance(err["detail"], str) and 0 < len(err["detail"]) <= 200, err
    assert KEY not in err["detail"]
    assert rec["success"] is False
    if error_id is not None:
        assert err["id"] == error_id
    return err


def check_openai_error(body: Any) -> dict[str, Any]:
    """Assert body is OpenAI's error shape and return its inner object."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


async def post(url: str, data: bytes, headers: dict[str, str] | None = None,
               timeout: float = 5.0) -> tuple[int, Any, bytes]:  # fmt: skip
    """POST raw bytes with aiohttp; return (status, headers, body)."""
    hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    hdrs.update(headers or {})
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            return r.status, r.headers, await r.read()


async def raw_http(proxy: ProxyUnderTest, head: str, body: bytes, timeout: float = 5.0) -> bytes:
    """Send one hand-written HTTP/1.1 request (it must say Connection: close) and read to EOF."""
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


async def until(predicate: Any, timeout: float) -> bool:
    """Poll predicate() until it is true or timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- upstream answers with an error ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "category", "exc_type"),
    [
        (400, "bad_request", openai.BadRequestError),
        (401, "auth_error", openai.AuthenticationError),
        (403, "auth_error", openai.PermissionDeniedError),
        (404, "model_not_found", openai.NotFoundError),
        (429, "rate_limit", openai.RateLimitError),
        (500, "server_error", openai.InternalServerError),
        (503, "server_error", openai.InternalServerError),
        (504, "timeout", openai.InternalServerError),
    ],
)
async def test_upstream_error_json_reaches_client_unchanged(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, status: int, category: str,
    exc_type: type[openai.APIStatusError],
) -> None:
    c = make_client(proxy, run_id="up-err", headers={"X-Fake": f"status:{status}"})
    with pytest.raises(exc_type) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == status
    expected = {
        "error": {"message": f"fake error {status}", "type": "fake_error", "param": None, "code": None}
    }
    assert info.value.response.json() == expected  # the upstream's body, not one of the proxy's
    error_id = info.value.response.headers["x-meter-error-id"]
    assert len(fake_upstream.requests) == 1
    rec = await only_record(proxy, "up-err")
    check_error(rec, category, error_id)
    assert f"fake error {status}" in rec["error"]["detail"]
    assert rec["status"] == status and rec["upstream"] == "fake" and rec["requested_model"] == "gpt-4o-mini"
    assert rec["usage_source"] == "none" and rec["output_tokens"] == 0
    assert rec["request_id"] == info.value.response.headers["x-meter-request-id"]


async def test_upstream_error_on_a_stream_request(proxy: ProxyUnderTest) -> None:
    c = make_client(proxy, run_id="up-err-stream", headers={"X-Fake": "status:429"})
    with pytest.raises(openai.RateLimitError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    assert info.value.body == {"message": "fake error 429", "type": "fake_error", "param": None, "code": None}
    rec = await only_record(proxy, "up-err-stream")
    check_error(rec, "rate_limit", info.value.response.headers["x-meter-error-id"])
    assert rec["stream"] is True and rec["status"] == 429 and rec["usage_source"] == "none"


async def test_upstream_502_html_page(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    status, headers, body = await post(proxy.url("/v1/chat/completions"), CHAT_BODY,
                                       {"X-Run-Id": "html", "X-Fake": "status:502:html"})  # fmt: skip
    assert status == 502
    assert headers["Content-Type"].startswith("text/html")
    assert body == b"<html><body><h1>Bad Gateway</h1></body></html>"
    rec = await only_record(proxy, "html")
    err = check_error(rec, "server_error", headers["X-Meter-Error-Id"])
    assert "Bad Gateway" in err["detail"] and "<h1>" not in err["detail"]
    assert rec["status"] == 502


async def test_upstream_503_without_body(proxy: ProxyUnderTest) -> None:
    status, headers, body = await post(proxy.url("/v1/chat/completions"), CHAT_BODY,
                                       {"X-Run-Id": "empty", "X-Fake": "status:503:empty"})  # fmt: skip
    assert status == 503 and body == b""
    rec = await only_record(proxy, "empty")
    err = check_error(rec, "server_error", headers["X-Meter-Error-Id"])
    assert "503" in err["detail"]
    assert rec["status"] == 503


async def test_long_upstream_error_detail_is_cut_and_scrubbed(proxy: ProxyUnderTest) -> None:
    c = make_client(proxy, run_id="long", headers={"X-Fake": "status:401:long"})
    with pytest.raises(openai.AuthenticationError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    # The client still gets the whole upstream body ...
    assert len(info.value.response.json()["error"]["message"]) > 5000
    rec = await only_record(proxy, "long")
    err = check_error(rec, "auth_error", info.value.response.headers["x-meter-error-id"])
    # ... the record only 200 characters of it, without the key.
    assert len(err["detail"]) == 200
    assert "sk-proj-FAKE" not in err["detail"] and "0123456789abcdef" not in err["detail"]


@pytest.mark.parametrize(
    ("mode", "category"), [("status:200:empty", "empty_response"), ("status:200:html", "invalid_response")]
)
async def test_upstream_200_without_usable_body(proxy: ProxyUnderTest, mode: str, category: str) -> None:
    status, headers, _ = await post(proxy.url("/v1/chat/completions"), CHAT_BODY,
                                    {"X-Run-Id": "bad200", "X-Fake": mode})  # fmt: skip
    assert status == 200  # the upstream's answer, passed on
    rec = await only_record(proxy, "bad200")
    check_error(rec, category, headers["X-Meter-Error-Id"])
    assert rec["status"] == 200


async def test_upstream_drops_mid_body(proxy: ProxyUnderTest) -> None:
    c = make_client(proxy, run_id="cutbody", headers={"X-Fake": "cutbody"})
    with pytest.raises(openai.InternalServerError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 502
    assert check_openai_error(info.value.response.json())["code"] == "connection_error"
    rec = await only_record(proxy, "cutbody")
    check_error(rec, "connection_error", info.value.response.headers["x-meter-error-id"])
    assert rec["status"] == 502 and rec["ttfb_ms"] is not None


# -- upstream unreachable, or too slow -------------------------------------------------------


async def test_upstream_unreachable_gives_502(make_proxy: ProxyFactory, refused_port: int) -> None:
    port = refused_port
    proxy = await make_proxy(upstreams=(Upstream(name="dead", base_url=f"http://127.0.0.1:{port}/v1"),))
    c = make_client(proxy, run_id="dead")
    with pytest.raises(openai.InternalServerError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 502
    err_body = check_openai_error(info.value.response.json())
    assert err_body["code"] == "connection_error" and f"127.0.0.1:{port}" in err_body["message"]
    rec = await only_record(proxy, "dead")
    check_error(rec, "connection_error", info.value.response.headers["x-meter-error-id"])
    assert rec["status"] == 502 and rec["upstream"] == "dead"
    assert rec["ttfb_ms"] is None and rec["usage_source"] == "none"


async def test_upstream_hangs_gives_504(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(timeouts=Timeouts(connect_s=1, read_s=0.3, total_s=5))
    c = make_client(proxy, run_id="hang", headers={"X-Fake": "hang"})
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        await asyncio.wait_for(c.chat.completions.create(model="gpt-4o-mini", messages=MSG), 5)
    assert time.monotonic() - t0 < 2.0
    assert info.value.status_code == 504
    assert check_openai_error(info.value.response.json())["code"] == "timeout"
    rec = await only_record(proxy, "hang")
    check_error(rec, "timeout", info.value.response.headers["x-meter-error-id"])
    assert rec["status"] == 504 and rec["ttfb_ms"] is None
    # The proxy gave up on the upstream request, so the upstream stops working on it.
    assert await until(lambda: fake_upstream.cancelled == 1, 1.0)


async def test_upstream_stalls_mid_stream(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(timeouts=Timeouts(connect_s=1, read_s=0.3, total_s=5))
    c = make_client(proxy, run_id="stall", headers={"X-Fake-Delay": "0.6"})
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    with pytest.raises(openai.APIError) as info:
        await asyncio.wait_for(_drain(stream), 5)
    rec = await only_record(proxy, "stall")
    err = check_error(rec, "timeout")
    assert err["id"] in info.value.message  # the in-band error event names the record's error id
    assert rec["status"] == 200 and rec["stream"] is True and rec["usage_source"] == "estimated"


async def _drain(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


# -- requests the proxy refuses itself (nothing reaches the upstream) ------------------------


@pytest.mark.parametrize(
    ("body", "ctype", "status", "category", "code", "param"),
    [
        pytest.param(
            b'{"model": "gpt-4o-mini", "messages": [',
            "application/json",
            400,
            "invalid_json",
            "invalid_json",
            None,
            id="malformed",
        ),  # fmt: skip
        pytest.param(
            b'[{"model": "gpt-4o-mini"}]',
            "application/json",
            400,
            "invalid_json",
            "invalid_json",
            None,
            id="array",
        ),  # fmt: skip
        pytest.param(b"", "application/json", 400, "invalid_json", "invalid_json", None, id="empty"),
        pytest.param(
            b'{"messages": []}', "application/json", 400, "bad_request", None, "model", id="no-model"
        ),
        pytest.param(
            b'{"model": 7, "messages": []}',
            "application/json",
            400,
            "bad_request",
            None,
            "model",
            id="model-not-string",
        ),  # fmt: skip
        pytest.param(
            b'{"model": "gpt-4o-mini", "stream": "yes"}',
            "application/json",
            400,
            "bad_request",
            None,
            "stream",
            id="stream-yes",
        ),  # fmt: skip
        pytest.param(CHAT_BODY, "text/plain", 415, "bad_request", None, "Content-Type", id="text-plain"),
    ],
)
async def test_bad_request_is_refused_and_recorded(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, body: bytes, ctype: str, status: int, category: str,
    code: str | None, param: str | None,
) -> None:  # fmt: skip
    got, headers, raw = await post(proxy.url("/v1/chat/completions"), body,
                                   {"Content-Type": ctype, "X-Run-Id": "refused"})  # fmt: skip
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    err_body = check_openai_error(orjson.loads(raw))
    assert err_body["type"] == "invalid_request_error"
    if code is not None:
        assert err_body["code"] == code
    assert err_body["param"] == param
    rec = await only_record(proxy, "refused")
    check_error(rec, category, headers["X-Meter-Error-Id"])
    assert rec["status"] == status and rec["request_id"] == headers["X-Meter-Request-Id"]
    assert rec["upstream"] is None and rec["usage_source"] == "none" and rec["ttfb_ms"] is None
    assert fake_upstream.requests == []


async def test_body_over_limit_gives_413(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(max_body_bytes=1000)
    c = make_client(proxy, run_id="big")
    with pytest.raises(openai.APIStatusError) as info:
        await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 2000}]
        )
    assert info.value.status_code == 413
    err_body = check_openai_error(info.value.response.json())
    assert err_body["code"] == "payload_too_large" and "1000" in err_body["message"]
    rec = await only_record(proxy, "big")
    check_error(rec, "payload_too_large", info.value.response.headers["x-meter-error-id"])
    assert rec["status"] == 413
    assert fake_upstream.requests == []
    # A body under the limit still goes through.
    ok = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ok.choices[0].message.content == "Hello there!"


async def test_model_without_route_gives_404(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(
        upstreams=(Upstream(name="x", base_url=fake_upstream.base_url, models=("llama*", "qwen2.5-*")),)
    )
    c = make_client(proxy, run_id="noroute")
    with pytest.raises(openai.NotFoundError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    err_body = check_openai_error(info.value.response.json())
    assert err_body["code"] == "model_not_found" and err_body["param"] == "model"
    assert "gpt-4o-mini" in err_body["message"]
    assert "x: llama*, qwen2.5-*" in err_body["message"]
    rec = await only_record(proxy, "noroute")
    check_error(rec, "model_not_found", info.value.response.headers["x-meter-error-id"])
    assert rec["status"] == 404 and rec["requested_model"] == "gpt-4o-mini" and rec["upstream"] is None
    assert fake_upstream.requests == []


# -- streams that break ----------------------------------------------------------------------


async def test_upstream_drops_mid_stream(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    c = make_client(proxy, run_id="cut", headers={"X-Fake": "cut"})
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:  # the proxy ends the stream with an error event
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "Hello"
    rec = await only_record(proxy, "cut")
    err = check_error(rec, "stream_interrupted")
    assert err["id"] in info.value.message
    assert info.value.body is not None and info.value.body["code"] == "stream_interrupted"  # type: ignore[index]
    assert rec["status"] == 200 and rec["stream"] is True and rec["finish_reason"] is None
    assert rec["usage_source"] == "estimated" and rec["output_tokens"] > 0 and rec["input_tokens"] > 0
    assert rec["total_tokens"] == rec["input_tokens"] + rec["output_tokens"]
    assert rec["ttfb_ms"] is not None and rec["ttft_ms"] is not None


async def test_upstream_drops_mid_stream_wire(proxy: ProxyUnderTest) -> None:
    """On the wire: what the upstream sent, then one chat error event, then a clean end of stream."""
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    status, _, raw = await post(
        proxy.url("/v1/chat/completions"), body, {"X-Run-Id": "cutw", "X-Fake": "cut"}
    )
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert b'"Hello"' in events[-2]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    err_body = check_openai_error(last)
    rec = await only_record(proxy, "cutw")
    assert err_body["code"] == "stream_interrupted" and rec["error"]["id"] in err_body["message"]


@pytest.mark.parametrize(
    ("provider", "case", "path", "cut_before"),
    [
        ("anthropic", "messages_stream", "messages", b"event: message_delta"),
        ("openai", "responses_stream", "responses", b"event: response.completed"),
        ("openai", "completions_stream_usage", "completions", b"data: [DONE]"),
    ],
)
async def test_upstream_drops_mid_stream_other_dialects(
    proxy: ProxyUnderTest, provider: str, case: str, path: str, cut_before: bytes
) -> None:
    """Each protocol's stream ends with its own error event when the upstream drops."""
    sse = PAYLOADS / provider / f"{case}.sse"
    if not sse.exists():
        pytest.skip(f"no fixture {sse.relative_to(PAYLOADS)}")
    data = sse.read_bytes()
    cut_at = data.index(cut_before)
    if path == "completions":  # cut inside the last text chunk, before its finish_reason and usage
        cut_at = data.rindex(b"data: ", 0, data.index(b'"finish_reason":"', data.index(b"data: ")) + 1) + 20
    expected = orjson.loads((PAYLOADS / provider / f"{case}.expected.json").read_bytes())
    req: dict[str, Any] = {"model": expected["model"], "stream": True, "max_tokens": 64}
    req.update({"input": "hi"} if path == "responses" else {"prompt": "hi"} if path == "completions"
               else {"messages": MSG})  # fmt: skip
    status, _, raw = await post(proxy.url(f"/v1/{path}"), orjson.dumps(req),
                                {"X-Run-Id": "cut-other", "X-Fake": f"fixture:{provider}/{case}",
                                 "X-Fake-Cut": str(cut_at)})  # fmt: skip
    assert status == 200
    rec = await only_record(proxy, "cut-other")
    err = check_error(rec, "stream_interrupted")
    assert rec["status"] == 200 and rec["finish_reason"] in (None, "in_progress")
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    last = events[-1]
    if path == "completions":
        assert last.startswith(b"data: ")
        err_body = check_openai_error(orjson.loads(last.removeprefix(b"data: ")))
        assert err_body["code"] == "stream_interrupted" and err["id"] in err_body["message"]
    else:
        assert last.startswith(b"event: error\ndata: "), last
        obj = orjson.loads(last.split(b"data: ", 1)[1])
        assert obj["type"] == "error"
        message = obj["error"]["message"] if path == "messages" else obj["message"]
        assert err["id"] in message
    # Whatever the upstream had sent before the drop reached the client.
    assert raw.startswith(data[: data.rindex(b"\n\n", 0, cut_at)])
    # The record keeps what was measured.
    assert rec["ttft_ms"] is not None and rec["total_tokens"] == rec["input_tokens"] + rec["output_tokens"]
    if path == "messages":
        # message_start's input side is kept (the output side: test_anthropic_stream_cut_output_tokens).
        assert rec["input_tokens"] == expected["usage"]["input_tokens"]
        assert rec["cached_input_tokens"] == expected["usage"]["cached_input_tokens"]
    else:
        # No usage came: estimated from the request and the text seen.
        assert rec["usage_source"] == "estimated" and rec["output_tokens"] > 1




async def test_anthropic_stream_cut_output_tokens(proxy: ProxyUnderTest) -> None:
    sse = PAYLOADS / "anthropic" / "messages_stream.sse"
    if not sse.exists():
        pytest.skip("no fixture anthropic/messages_stream")
    data = sse.read_bytes()
    req = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 64, "stream": True, "messages": MSG}
    status, _, _ = await post(proxy.url("/v1/messages"), orjson.dumps(req),
                              {"X-Run-Id": "cut-anthropic", "X-Fake": "fixture:anthropic/messages_stream",
                               "X-Fake-Cut": str(data.index(b"event: message_delta"))})  # fmt: skip
    assert status == 200
    rec = await only_record(proxy, "cut-anthropic")
    check_error(rec, "stream_interrupted")
    # All the thinking and text deltas reached the client before the drop: far more than 1 token.
    assert rec["output_tokens"] > 1
    assert rec["usage_source"] == "estimated"


_IN_BAND = [
    ("openai", "chat_stream_error", "chat/completions", "server_error"),
    ("anthropic", "messages_stream_error", "messages", "server_error"),
    ("openai", "responses_stream_error", "responses", "rate_limit"),
    ("openai", "responses_stream_error_flat", "responses", "server_error"),
]


@pytest.mark.parametrize(("provider", "case", "path", "category"), _IN_BAND)
async def test_in_band_stream_error(
    proxy: ProxyUnderTest, provider: str, case: str, path: str, category: str
) -> None:
    sse = PAYLOADS / provider / f"{case}.sse"
    if not sse.exists():
        pytest.skip(f"no fixture {sse.relative_to(PAYLOADS)}")
    expected = orjson.loads((PAYLOADS / provider / f"{case}.expected.json").read_bytes())
    req: dict[str, Any] = {"model": expected["model"], "stream": True}
    if path == "responses":
        req["input"] = "hi"
    else:
        req["messages"] = MSG
        req["max_tokens"] = 64
    status, _, raw = await post(proxy.url(f"/v1/{path}"), orjson.dumps(req),
                                {"X-Run-Id": "inband", "X-Fake": f"fixture:{provider}/{case}"})  # fmt: skip
    assert status == 200
    assert raw == sse.read_bytes()  # the upstream's error event reaches the client as it was sent
    rec = await only_record(proxy, "inband")
    check_error(rec, category)
    assert rec["status"] == 200 and rec["stream"] is True and rec["model"] == expected["model"]
    assert rec["finish_reason"] is None
    if expected["usage"] is not None and path == "messages":
        # Only message_start's placeholder output came before the error: output is estimated.
        assert rec["usage_source"] == "estimated"
        assert rec["input_tokens"] == expected["usage"]["input_tokens"]
        assert rec["output_tokens"] >= expected["usage"]["output_tokens"]
    elif expected["usage"] is not None:
        assert rec["usage_source"] == "upstream"
        assert rec["input_tokens"] == expected["usage"]["input_tokens"]
        assert rec["output_tokens"] == expected["usage"]["output_tokens"]
    else:
        assert rec["usage_source"] == "estimated"


async def test_in_band_chat_error_with_sdk(proxy: ProxyUnderTest) -> None:
    if not (PAYLOADS / "openai" / "chat_stream_error.sse").exists():
        pytest.skip("no fixture openai/chat_stream_error")
    c = make_client(proxy, run_id="inband-sdk", headers={"X-Fake": "fixture:openai/chat_stream_error"})
    stream = await c.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "The answer"
    assert "The server had an error" in info.value.message
    rec = await only_record(proxy, "inband-sdk")
    err = check_error(rec, "server_error")
    assert "The server had an error" in err["detail"]
    assert rec["usage_source"] == "estimated" and rec["output_tokens"] > 0


# -- the client goes away --------------------------------------------------------------------


async def test_client_disconnects_mid_stream(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    headers = {"Content-Type": "application/json", "X-Run-Id": "gone", "X-Fake-Delay": "0.2"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url("/v1/chat/completions"), data=body, headers=headers)
        assert resp.status == 200
        seen = b""
        while b'"Hello"' not in seen:
            chunk = await asyncio.wait_for(resp.content.readany(), 2)
            assert chunk, "the stream ended before any output"
            seen += chunk
        resp.close()  # drops the connection
        t_close = time.monotonic()
    recs = await proxy.wait_records("gone", 1, timeout=2)
    assert recs, "no record after the client went away"
    assert time.monotonic() - t_close < 1.0
    # The upstream request is dropped at once, long before the upstream would have finished (~1.2 s).
    assert await until(lambda: fake_upstream.cancelled + fake_upstream.aborted >= 1, 1.0)
    assert time.monotonic() - t_close < 1.0
    rec = await only_record(proxy, "gone")
    check_error(rec, "client_aborted")
    assert rec["status"] == 200 and rec["stream"] is True and rec["finish_reason"] is None
    assert rec["usage_source"] == "estimated" and rec["output_tokens"] > 0
    assert rec["ttft_ms"] is not None and rec["duration_ms"] < 1000


async def test_client_disconnects_while_upstream_thinks(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream
) -> None:
    assert proxy.server.port is not None
    head = (
        f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1:{proxy.server.port}\n"
        f"Content-Type: application/json\nContent-Length: {len(CHAT_BODY)}\nX-Run-Id: think\n"
        "X-Fake: think:5\n"
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + CHAT_BODY)
    await writer.drain()
    assert await until(lambda: len(fake_upstream.requests) == 1, 1.0)  # the upstream is thinking now
    writer.close()
    await writer.wait_closed()
    t_close = time.monotonic()
    recs = await proxy.wait_records("think", 1, timeout=2)
    assert recs and time.monotonic() - t_close < 1.0
    assert await until(lambda: fake_upstream.cancelled == 1, 1.0), "the upstream kept thinking"
    rec = await only_record(proxy, "think")
    check_error(rec, "client_aborted")
    assert rec["ttfb_ms"] is None and rec["usage_source"] == "none" and rec["duration_ms"] < 1500


#: A stream per dialect, and the bytes of its final event: a client that has read those has it all.
_FINAL_EVENTS = [
    ("/v1/chat/completions", {"stream": True}, "", b"data: [DONE]"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}, "", b"data: [DONE]"),
    ("/v1/messages", {"stream": True}, "fixture:anthropic/messages_stream", b"event: message_stop"),
    ("/v1/responses", {"stream": True}, "fixture:openai/responses_stream", b"response.completed"),
    ("/api/chat", {"stream": True}, "", b'"done":true'),
]


@pytest.mark.parametrize("linger", [0.0, 0.05])
@pytest.mark.parametrize(("path", "extra", "fake", "final"), _FINAL_EVENTS, ids=lambda v: str(v)[:24])
async def test_hang_up_after_the_final_event_is_a_success(
    proxy: ProxyUnderTest, path: str, extra: dict[str, Any], fake: str, final: bytes, linger: float
) -> None:
    """A client that closes once it has the final event got the whole answer: success, upstream usage.

    The sync openai SDK stops reading at [DONE] and closes; with linger the upstream keeps the body open
    after its final event, so the close always lands while the proxy still waits for the end.
    """
    assert proxy.server.port is not None
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "input": "hi", "max_tokens": 5, **extra})
    n = 8
    for _ in range(n):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Run-Id: final\r\nX-Fake: {fake}\r\nX-Fake-Linger: {linger}\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
        writer.write(head.encode() + body)
        seen = b""
        while final not in seen:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, seen[-300:]
            seen += chunk
        writer.close()  # at once: the rest of the body (its terminating chunk) is never read
        await writer.wait_closed()
    recs = await proxy.wait_records("final", n)
    assert len(recs) == n
    for rec in recs:
        assert rec["error"] is None and rec["success"] is True, rec["error"]
        assert rec["status"] == 200 and rec["usage_source"] == "upstream", rec


async def test_hang_up_before_the_final_event_stays_client_aborted(proxy: ProxyUnderTest) -> None:
    assert proxy.server.port is not None
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Run-Id: early\r\nX-Fake-Delay: 0.1\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(head.encode() + body)
    seen = b""
    while b'"finish_reason":"stop"' not in seen:  # the last content chunk, but not [DONE] yet
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk
        seen += chunk
    writer.close()
    await writer.wait_closed()
    rec = await only_record(proxy, "early")
    check_error(rec, "client_aborted")


async def test_sync_sdk_streams_are_successes(proxy: ProxyUnderTest) -> None:
    """The sync SDK closes at [DONE]: every call is a success with the upstream's usage."""
    n = 100
    c = openai.OpenAI(base_url=proxy.base_url, api_key=KEY, max_retries=0,
                      default_headers={"X-Run-Id": "sync", "X-Fake-Linger": "0.01"})  # fmt: skip

    def calls() -> None:
        for _ in range(n):
            stream = c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)  # type: ignore
            assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "Hello there!"
        c.close()

    await asyncio.to_thread(calls)
    recs = await proxy.wait_records("sync", n)
    assert len(recs) == n
    assert all(r["success"] is True and r["usage_source"] == "upstream" for r in recs), [
        r["error"] for r in recs if not r["success"]
    ]


# -- run id from the path, unmetered paths, headers ------------------------------------------


async def test_run_id_from_path_prefix(proxy: ProxyUnderTest) -> None:
    c = make_client(proxy, base_url=proxy.url("/run/path-run.1/v1"))
    resp = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert resp.choices[0].message.content == "Hello there!"
    rec = await only_record(proxy, "path-run.1")
    assert (
        rec["run_id"] == "path-run.1" and rec["success"] is True and rec["endpoint"] == "/v1/chat/completions"
    )


async def test_run_id_header_beats_path(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    c = make_client(proxy, run_id="from-header", base_url=proxy.url("/run/from-path/v1"))
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    rec = await only_record(proxy, "from-header")
    assert rec["run_id"] == "from-header"
    assert fake_upstream.requests[-1]["path"] == "/v1/chat/completions"


async def test_invalid_run_id_in_path(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    c = make_client(proxy, base_url=proxy.url("/run/.hidden/v1"))
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert check_openai_error(info.value.response.json())["code"] == "invalid_run_id"
    await proxy.settle(1)
    assert jsonl_files(proxy) == [".rejected.jsonl"]
    assert fake_upstream.requests == []


async def test_models_pass_through_unmetered(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    for c in (make_client(proxy, run_id="models"), make_client(proxy, base_url=proxy.url("/run/models2/v1"))):
        page = await c.models.list()
        assert [m.id for m in page.data] == ["gpt-4o-mini"]
    assert [r["path"] for r in fake_upstream.requests] == ["/v1/models", "/v1/models"]
    assert "X-Run-Id" not in fake_upstream.requests[0]["headers"]
    await proxy.settle(0)
    assert jsonl_files(proxy) == []


async def test_hop_by_hop_and_consumed_headers_stay_behind(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream
) -> None:
    assert proxy.server.port is not None
    head = (
        f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1:{proxy.server.port}\n"
        f"Content-Type: application/json\nContent-Length: {len(CHAT_BODY)}\n"
        "Connection: close, X-Hop-Named\nKeep-Alive: timeout=5\nProxy-Authorization: Basic dXNlcjpwYXNz\n"
        "Proxy-Connection: keep-alive\nTE: trailers\nX-Hop-Named: only-for-this-hop\n"
        "X-Run-Id: hdrs\nX-Task-Name: t1\nX-Meter-Tag-Team: blue\n"
        f"Authorization: Bearer {KEY}\nOpenAI-Organization: org-abc\nX-Custom-Thing: keep-me\n"
        "User-Agent: failure-tests/1.0\n"
    )  # fmt: skip
    raw = await raw_http(proxy, head, CHAT_BODY)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    sent = {k.lower(): v for k, v in fake_upstream.requests[-1]["headers"].items()}
    for name in ("keep-alive", "proxy-authorization", "proxy-connection", "te", "x-hop-named",
                 "x-run-id", "x-task-name", "x-meter-tag-team"):  # fmt: skip
        assert name not in sent, (name, sent)
    assert "close" not in sent.get("connection", "").lower()
    assert sent["host"] == fake_upstream.base_url.split("/")[2]
    assert sent["authorization"] == f"Bearer {KEY}"
    assert sent["openai-organization"] == "org-abc"
    assert sent["x-custom-thing"] == "keep-me"
    assert sent["user-agent"] == "failure-tests/1.0"
    assert sent["content-length"] == str(len(CHAT_BODY))
    rec = await only_record(proxy, "hdrs")
    assert rec["task"] == "t1" and rec["tags"] == {"team": "blue"} and rec["success"] is True


# -- the runs dir cannot be written ----------------------------------------------------------


def _block_runs_dir(path: Path) -> None:
    """Put a regular file where the runs dir should be: mkdir and open fail, even as root."""
    if path.is_dir():
        shutil.rmtree(path)
    path.write_bytes(b"not a directory\n")


async def test_unwritable_runs_dir_refuses_calls(
    tmp_path: Path, make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    runs = tmp_path / "runs"
    _block_runs_dir(runs)
    proxy = await make_proxy()
    body = await wait_health(proxy.url(""), 503, timeout=2.0)
    assert body["status"] == "unhealthy" and body["error"]
    c = make_client(proxy, run_id="blocked")
    with pytest.raises(openai.InternalServerError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 503
    assert check_openai_error(info.value.response.json())["code"] == "recording_unavailable"
    error_id = info.value.response.headers["x-meter-error-id"]
    assert fake_upstream.requests == []
    # The runs dir comes back: health recovers, the refused call's record is written, calls flow again.
    runs.unlink()
    await wait_health(proxy.url(""), 200, timeout=2.0)
    rec = await only_record(proxy, "blocked")
    check_error(rec, "recording_unavailable", error_id)
    assert rec["status"] == 503
    resp = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert resp.choices[0].message.content == "Hello there!"
    recs = await proxy.wait_records("blocked", 2)
    assert len(recs) == 2 and recs[1]["success"] is True


async def test_unwritable_runs_dir_pass_mode(tmp_path: Path, make_proxy: ProxyFactory) -> None:
    runs = tmp_path / "runs"
    _block_runs_dir(runs)
    proxy = await make_proxy(on_record_failure="pass")
    await wait_health(proxy.url(""), 503, timeout=2.0)
    c = make_client(proxy, run_id="passed")
    resp = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert resp.choices[0].message.content == "Hello there!"
    await proxy.settle(1)  # a flush was tried with the record queued: it could not be written
    assert (await health(proxy.url("")))[0] == 503  # still loud while the record is held
    runs.unlink()
    await wait_health(proxy.url(""), 200, timeout=2.0)
    rec = await only_record(proxy, "passed")
    assert rec["success"] is True and rec["output_tokens"] == 3


async def test_runs_dir_lost_after_start(
    tmp_path: Path, make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    runs = tmp_path / "runs"
    proxy = await make_proxy()
    c = make_client(proxy, run_id="lost")
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert len(await proxy.wait_records("lost", 1)) == 1
    _block_runs_dir(runs)
    # This call goes through (the proxy cannot know yet); its record cannot be written.
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await wait_health(proxy.url(""), 503, timeout=2.0)
    with pytest.raises(openai.InternalServerError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.status_code == 503
    assert check_openai_error(info.value.response.json())["code"] == "recording_unavailable"
    assert len(fake_upstream.requests) == 2
    runs.unlink()
    await wait_health(proxy.url(""), 200, timeout=2.0)
    await proxy.settle(3)
    recs = await proxy.records("lost")
    # The first record went with the old directory; the held two are written, once each.
    assert sorted(r["success"] for r in recs) == [False, True]
    [refused] = [r for r in recs if not r["success"]]
    check_error(refused, "recording_unavailable", info.value.response.headers["x-meter-error-id"])


# -- the operator's log ------------------------------------------------------------------------


async def test_every_failed_call_has_one_log_line(
    proxy: ProxyUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator handed an X-Meter-Error-Id (or a record's error.id) finds it in the log, once."""
    import logging

    caplog.set_level(logging.WARNING, logger="metering_proxy")
    assert proxy.server.port is not None
    async with aiohttp.ClientSession() as s:
        for fake in ("status:429", "status:500:html", "cut", "cutbody", ""):
            body = {"model": "gpt-4o-mini", "messages": MSG, "stream": fake == "cut"}
            async with s.post(proxy.url("/v1/chat/completions"), json=body,
                              headers={"X-Run-Id": "logged", "X-Fake": fake}) as r:  # fmt: skip
                await r.read()
        async with s.post(proxy.url("/v1/chat/completions"), data=b"{",
                          headers={"X-Run-Id": "logged", "Content-Type": "application/json"}) as r:  # fmt: skip
            assert r.status == 400
    # A client that leaves mid-stream.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    raw = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-Run-Id: logged\r\nX-Fake-Delay: 0.2\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))
    await reader.read(100)
    writer.close()
    await proxy.settle(7)
    recs = await proxy.records("logged")
    failed = [r for r in recs if r["error"] is not None]
    categories = {r["error"]["category"] for r in failed}
    assert categories == {"rate_limit", "server_error", "stream_interrupted", "connection_error", "invalid_json",
                          "client_aborted"}, categories
    assert len(failed) == 6 and len(recs) == 7
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for rec in failed:
        err = rec["error"]
        mine = [line for line in lines if err["id"] in line]
        assert len(mine) == 1, (err, lines)
        assert f"category={err['category']}" in mine[0] and "run_id=logged" in mine[0]
        assert f"status={rec['status']}" in mine[0] and f"upstream={rec['upstream']}" in mine[0]
        assert KEY not in mine[0] and "Say hello" not in mine[0]
