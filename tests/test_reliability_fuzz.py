"""Random requests (hypothesis) against one live proxy: no handler crashes, /healthz stays 200."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.app import make_app
from proxy.config import Config, Timeouts, Upstream
from tests.conftest import FakeUpstream, settle, track_handlers
from tests.helpers import MSG, parse_lines, record_files


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
