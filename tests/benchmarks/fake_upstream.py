"""A fast fake OpenAI Chat Completions upstream for the benchmark (raw asyncio, HTTP/1.1 keep-alive).

Run: python tests/benchmarks/fake_upstream.py [--host 127.0.0.1] [--port 0] [--cpu N]
It prints one line ``READY <port>`` on stdout once it listens.

Routes:
  POST /v1/chat/completions  non-streaming JSON with usage, or (body "stream": true) an SSE stream
                              shaped exactly like OpenAI's: role chunk, content chunks, finish chunk,
                              the usage chunk (choices: []) only when stream_options.include_usage is
                              true (and then "usage": null on every other chunk), then "data: [DONE]".
  GET  /healthz              200 "ok"
  GET  /_bench/stats         {"calls", "streams", "ttft": {seq: ms}}: for each stream that carried an
                              X-Fake-Seq header, the time from the request to the first content chunk's
                              write, as this server saw it (the truth a recorded ttft_ms is judged by)
  anything else              404

Controls, as query parameters or request headers (the header wins):
  chunks        X-Fake-Chunks           content chunks per stream (default 20)
  delay_ms      X-Fake-Delay-Ms         pause before each content chunk after the first (default 0)
  ttft_ms       X-Fake-Ttft-Ms          pause between the role chunk and the first content chunk (default 0)
  usage         X-Fake-Usage            auto (default: only when include_usage), always, never

Written on raw asyncio protocols, with every response byte string cached, so that one core of it
serves several times what an aiohttp proxy can: the proxy, not the upstream, must be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson

MODEL_OUT = "gpt-4o-mini-2024-07-18"
CREATED = 1764254148
PROMPT_TOKENS = 19
TOKEN = "tok "  # one content chunk = one token

NONSTREAM_HEADERS = {"Content-Type": "application/json", "x-request-id": "req_bench"}
_NOT_FOUND_BODY = b'{"error":{"message":"not found","type":"invalid_request_error","code":null}}'
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_NOT_FOUND_BODY),
    _NOT_FOUND_BODY,
)
_HEALTH = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_BAD = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)


def _usage(completion: int) -> dict:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _nonstream_body(completion: int) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL_OUT,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": TOKEN * completion,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(completion),
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
        }
    )


def _chunk(choices: list, usage_field: bool, usage: dict | None = None) -> dict:
    obj = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL_OUT,
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
        "choices": choices,
    }
    if usage_field:
        obj["usage"] = usage
    return obj


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying payload."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "x-request-id": "req_bench",
}
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in STREAM_HEADERS.items())
    + b"\r\n"
)


class Stream:
    """The cached byte strings of one stream shape.

    Raw protocol: head (status, headers and the role chunk), one content chunk, tail (finish chunk,
    usage chunk when asked, [DONE], end of body), each already framed for chunked encoding.
    aiohttp: the same SSE events unframed (role, content, tail).
    """

    __slots__ = ("head", "content", "tail", "sse_role", "sse_content", "sse_tail")

    def __init__(self, n: int, usage: bool) -> None:
        role = _chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            usage,
        )
        tok = _chunk(
            [{"index": 0, "delta": {"content": TOKEN}, "logprobs": None, "finish_reason": None}], usage
        )
        fin = _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], usage)
        self.sse_role = _sse(role)
        self.sse_content = _sse(tok)
        tail = [_sse(fin)]
        if usage:
            tail.append(_sse(_chunk([], True, _usage(n))))
        tail.append(b"data: [DONE]\n\n")
        self.sse_tail = b"".join(tail)
        self.head = STREAM_HEAD + _frame(self.sse_role)
        self.content = _frame(self.sse_content)
        self.tail = b"".join(_frame(t) for t in tail) + b"0\r\n\r\n"


_STREAMS: dict[tuple[int, bool], Stream] = {}
_BODIES: dict[int, bytes] = {}


def _stream(n: int, usage: bool) -> Stream:
    s = _STREAMS.get((n, usage))
    if s is None:
        s = _STREAMS[(n, usage)] = Stream(n, usage)
    return s


def _nonstream_body_cached(completion: int) -> bytes:
    body = _BODIES.get(completion)
    if body is None:
        body = _BODIES[completion] = _nonstream_body(completion)
    return body


_RESPONSES: dict[int, bytes] = {}


def _nonstream_response(completion: int) -> bytes:
    r = _RESPONSES.get(completion)
    if r is None:
        body = _nonstream_body_cached(completion)
        head = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in NONSTREAM_HEADERS.items())
        r = _RESPONSES[completion] = b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (
            head,
            len(body),
            body,
        )
    return r


class Plan:
    """What to answer to one chat completions request."""

    __slots__ = ("stream", "n", "shape", "delay", "ttft", "seq", "t0")

    def __init__(
        self, query: str, headers: dict[str, str] | None, body: bytes, stats: dict[str, Any]
    ) -> None:
        """headers: lower-case names (or None). Raises ValueError on a body that is not JSON."""
        params = dict(parse_qsl(query)) if query else {}

        def ctl(name: str, header: str, default: str) -> str:
            return (headers.get(header) if headers else None) or params.get(name) or default

        self.t0 = time.perf_counter()
        self.seq = headers.get("x-fake-seq") if headers else None
        req = orjson.loads(body)  # orjson.JSONDecodeError is a ValueError
        self.n = int(ctl("chunks", "x-fake-chunks", "20"))
        self.stream = bool(isinstance(req, dict) and req.get("stream"))
        stats["calls"] += 1
        self.shape: Stream | None = None
        self.delay = self.ttft = 0.0
        if self.stream:
            stats["streams"] += 1
            mode = ctl("usage", "x-fake-usage", "auto")
            opts = req.get("stream_options")
            include = isinstance(opts, dict) and opts.get("include_usage") is True
            self.shape = _stream(self.n, mode == "always" or (mode == "auto" and include))
            self.delay = float(ctl("delay_ms", "x-fake-delay-ms", "0")) / 1000
            self.ttft = float(ctl("ttft_ms", "x-fake-ttft-ms", "0")) / 1000

    def first_content_sent(self, stats: dict[str, Any]) -> None:
        """Note when the first content chunk went out, for a stream that carried X-Fake-Seq."""
        if self.seq is not None and len(stats["ttft"]) < 100_000:
            stats["ttft"][self.seq] = round((time.perf_counter() - self.t0) * 1000, 4)
            self.seq = None


def _stats_response(stats: dict[str, Any]) -> bytes:
    body = orjson.dumps(stats)
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


# -- raw asyncio implementation (default) ------------------------------------------------------


class Conn(asyncio.Protocol):
    """One client connection: parse requests in order, answer each from cached bytes."""

    __slots__ = ("transport", "buf", "busy", "closed", "loop", "stats")

    def __init__(self, stats: dict[str, Any]) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while not self.busy and not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._bad()
                return
            lines = buf[:end].decode("latin-1").split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                self._bad()
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._bad()  # no client of the benchmark sends chunked bodies
                return
            length = int(headers.get("content-length") or 0)
            start = end + 4
            if len(buf) < start + length:
                return
            body = buf[start : start + length]
            self.buf = buf[start + length :]
            self._answer(method, target, headers, body)
            if headers.get("connection", "").lower() == "close" and not self.busy:
                self.transport.close()  # type: ignore[union-attr]
                return

    def _bad(self) -> None:
        self.transport.write(_BAD)  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]
        self.closed = True

    def _answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        path, _, query = target.partition("?")
        tr = self.transport
        assert tr is not None
        if method == "GET" and path == "/healthz":
            tr.write(_HEALTH)
            return
        if method == "GET" and path == "/_bench/stats":
            tr.write(_stats_response(self.stats))
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            tr.write(_NOT_FOUND)
            return
        try:
            plan = Plan(query, headers, body, self.stats)
        except ValueError:
            self._bad()
            return
        if not plan.stream:
            tr.write(_nonstream_response(plan.n))
            return
        s = plan.shape
        assert s is not None
        tr.write(s.head)
        if plan.delay <= 0 and plan.ttft <= 0:
            content = s.content
            for _ in range(plan.n):
                if tr.is_closing():
                    return
                tr.write(content)  # one write per chunk, as a token-by-token server does
                plan.first_content_sent(self.stats)
            tr.write(s.tail)
            return
        self.busy = True
        if plan.ttft > 0:
            self.loop.call_later(plan.ttft, self._next, s, plan.n, plan)
        else:
            self._next(s, plan.n, plan)

    def _next(self, s: Stream, left: int, plan: Plan) -> None:
        tr = self.transport
        if self.closed or tr is None or tr.is_closing():
            return
        delay = plan.delay
        while left > 0:
            tr.write(s.content)
            plan.first_content_sent(self.stats)
            left -= 1
            if left > 0 and delay > 0:
                self.loop.call_later(delay, self._next, s, left, plan)
                return
        tr.write(s.tail)
        self.busy = False
        if self.buf:
            self._process()


async def serve_raw(host: str, port: int, stats: dict[str, Any]) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Conn(stats), host, port, backlog=4096, reuse_address=True)


# -- aiohttp low-level server implementation (--impl aiohttp) ----------------------------------


async def serve_aiohttp(host: str, port: int, stats: dict[str, Any]) -> asyncio.Server:
    from aiohttp import web, web_server

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/healthz":
            return web.Response(text="ok")
        if request.method == "GET" and request.path == "/_bench/stats":
            return web.Response(body=orjson.dumps(stats), content_type="application/json")
        if request.method != "POST" or not request.path.endswith("/chat/completions"):
            return web.Response(status=404, body=_NOT_FOUND_BODY, content_type="application/json")
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items() if k[:2] in ("X-", "x-")}
        # Plan.t0 is taken here, after the body is in: the same point as in the raw implementation.
        try:
            plan = Plan(request.query_string, headers, body, stats)
        except ValueError:
            return web.Response(status=400, body=b"{}", content_type="application/json")
        if not plan.stream:
            return web.Response(body=_nonstream_body_cached(plan.n), headers=NONSTREAM_HEADERS)
        s = plan.shape
        assert s is not None
        resp = web.StreamResponse(headers=STREAM_HEADERS)
        try:
            await resp.prepare(request)
            await resp.write(s.sse_role)
            if plan.ttft > 0:
                await asyncio.sleep(plan.ttft)
            for i in range(plan.n):
                if i and plan.delay > 0:
                    await asyncio.sleep(plan.delay)
                await resp.write(s.sse_content)
                plan.first_content_sent(stats)
            await resp.write(s.sse_tail)
            await resp.write_eof()
        except ConnectionError:  # the client went away (e.g. wrk stopping mid-stream)
            pass
        return resp

    loop = asyncio.get_running_loop()
    server = web_server.Server(handler, access_log=None)
    return await loop.create_server(server, host, port, backlog=4096, reuse_address=True)


async def serve(host: str, port: int, impl: str) -> None:
    stats: dict[str, Any] = {"calls": 0, "streams": 0, "ttft": {}}
    server = await (serve_raw if impl == "raw" else serve_aiohttp)(host, port, stats)
    actual = server.sockets[0].getsockname()[1]
    print(f"READY {actual}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--impl", choices=("raw", "aiohttp"), default="raw")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (os.sched_setaffinity)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("fake upstream: loopback only")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        asyncio.run(serve(args.host, args.port, args.impl))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
