"""The streams' read timeout kept by ReadWatch: it fires on a quiet stream, never on a slow but steady one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import FORWARDER
from proxy.config import Timeouts, Upstream
from proxy.read_watch import ReadWatch
from tests.conftest import Messages, ProxyFactory, ProxyUnderTest, make_client

MSG: Messages = [{"role": "user", "content": "hi"}]


def _chunk(content: str) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


_END = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":8,"total_tokens":11}}\n\ndata: [DONE]\n\n'
)


@pytest.fixture
async def paced() -> AsyncIterator[str]:
    """An upstream streaming 8 chunks X-Gap seconds apart; X-Stall-After: N goes quiet after N of them."""

    async def handler(request: web.Request) -> web.StreamResponse:
        gap = float(request.headers.get("X-Gap", "0"))
        stall_after = int(request.headers.get("X-Stall-After", "-1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(8):
            if i == stall_after:
                await asyncio.sleep(30)
            await resp.write(_chunk(f"t{i} "))
            await asyncio.sleep(gap)
        await resp.write(_END)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/v1"
    await server.close()


async def _proxy(make_proxy: ProxyFactory, base: str, read_s: float | None) -> ProxyUnderTest:
    return await make_proxy(
        upstreams=(Upstream(name="paced", base_url=base),), timeouts=Timeouts(connect_s=2, read_s=read_s, total_s=20)
    )


async def test_a_quiet_stream_times_out_once_the_watch_sees_it(make_proxy: ProxyFactory, paced: str) -> None:
    proxy = await _proxy(make_proxy, paced, 0.4)
    watch: ReadWatch = proxy.server.app[FORWARDER].read_watch
    c = make_client(proxy, run_id="quiet", headers={"X-Stall-After": "2"})
    t0 = time.monotonic()
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    with pytest.raises(openai.APIError):
        await asyncio.wait_for(_drain(stream), 10)
    took = time.monotonic() - t0
    await proxy.settle(1, 5)
    (rec,) = await proxy.records("quiet")
    assert rec["error"]["category"] == "timeout" and rec["status"] == 200
    assert "read timeout" in rec["error"]["detail"]
    assert watch.fired == 1  # the watch's check, not a timer of aiohttp's, gave up on it
    assert 0.4 <= took < 0.4 + watch.tick + 1.5  # fires between timeout and timeout + tick (plus slack)
    assert watch.last_read == {}  # the stream left the watch


async def test_a_slow_but_steady_stream_never_times_out(make_proxy: ProxyFactory, paced: str) -> None:
    # 8 chunks 0.15 s apart: 1.2 s in all, three times the read timeout; each read resets it.
    proxy = await _proxy(make_proxy, paced, 0.4)
    c = make_client(proxy, run_id="steady", headers={"X-Gap": "0.15"})
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    chunks = await asyncio.wait_for(_drain(stream), 10)
    await proxy.settle(1, 5)
    (rec,) = await proxy.records("steady")
    assert rec["error"] is None and rec["output_tokens"] == 8 and len(chunks) >= 9
    assert proxy.server.app[FORWARDER].read_watch.fired == 0


async def test_without_a_read_timeout_nothing_is_watched(make_proxy: ProxyFactory, paced: str) -> None:
    proxy = await _proxy(make_proxy, paced, None)
    watch: ReadWatch = proxy.server.app[FORWARDER].read_watch
    c = make_client(proxy, run_id="unwatched", headers={"X-Gap": "0.01"})
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    await asyncio.wait_for(_drain(stream), 10)
    await proxy.settle(1, 5)
    (rec,) = await proxy.records("unwatched")
    assert rec["error"] is None and watch.timeout is None and watch.last_read == {}


def test_the_tick_is_a_quarter_of_the_timeout_at_most_a_second() -> None:
    assert ReadWatch(0.4).tick == 0.1 and ReadWatch(300).tick == 1.0 and ReadWatch(None).timeout is None
    assert ReadWatch(0).timeout is None  # 0 means none, as aiohttp reads sock_read=0


async def _drain(stream: openai.AsyncStream) -> list[object]:  # type: ignore[type-arg]
    return [chunk async for chunk in stream]
