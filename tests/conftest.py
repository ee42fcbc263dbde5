"""Shared fixtures: a fake upstream (a real aiohttp server on loopback) and the proxy in front of it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler
from openai.types.chat import ChatCompletionMessageParam

from proxy.app import SINK, make_app
from proxy.config import Config, Timeouts, Upstream, resolve_env
from proxy.records import Record

PAYLOADS = Path(__file__).parent / "payloads"

#: The API key test clients send unless a test says otherwise: shaped like a real one, so the checks that a
#: key never reaches a record, a log line or an error detail have something to find.
KEY = "sk-test-secret-key-123456"

#: A chat call's messages, as the openai SDK types them (a bare list of dicts is not one for mypy).
Messages = list[ChatCompletionMessageParam]


def payload_cases() -> list[tuple[str, str]]:
    """Every (provider, case) fixture pair under tests/payloads."""
    cases = []
    for expected in sorted(PAYLOADS.glob("*/*.expected.json")):
        cases.append((expected.parent.name, expected.name.removesuffix(".expected.json")))
    return cases


def load_case(provider: str, case: str) -> tuple[bytes, str, dict[str, Any]]:
    """Return (body bytes, kind 'sse'|'json', expectations) for a fixture."""
    base = PAYLOADS / provider
    expected = orjson.loads((base / f"{case}.expected.json").read_bytes())
    sse = base / f"{case}.sse"
    if sse.exists():
        return sse.read_bytes(), "sse", expected
    return (base / f"{case}.json").read_bytes(), "json", expected


def _chat_chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1735689600, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], "usage": None,
    }  # fmt: skip
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


#: Malformed SSE a broken upstream may send: lines without a field, invalid JSON in data:, non-object
#: JSON, wrong-typed fields, stray bytes. Mode 'garbage' interleaves them with a good stream.
GARBAGE_EVENTS = (
    b"this line has no colon at all\n\n",
    b"data: {not json at all\n\n",
    b": a comment, then an unknown field\nfoo: bar\n\n",
    b"event: \xff\xfe binary\ndata: [1, 2, 3]\n\n",
    b'data: "just a string"\n\n',
    b"retry: soon\nid: 7\ndata: {\"choices\": \"not a list\", \"usage\": [1]}\n\n",
    b"data: {\"choices\": [{\"delta\": {\"content\": 5}}], \"usage\": null\n\n",
)


# Ollama's native final object (docs.ollama.com/api/usage): counts, and durations in nanoseconds.
OLLAMA_FINAL: dict[str, Any] = {
    "created_at": "2025-10-17T23:14:07.414671Z", "done": True, "done_reason": "stop", "total_duration": 4883583458,
    "load_duration": 1334875, "prompt_eval_count": 26, "prompt_eval_duration": 342546000, "eval_count": 282,
    "eval_duration": 4535599000,
}  # fmt: skip


# Mistral's answer to a field its schema does not know (a FastAPI/pydantic validation error).
MISTRAL_EXTRA_FORBIDDEN: dict[str, Any] = {
    "object": "error", "message": {"detail": [{"type": "extra_forbidden", "loc": ["body", "stream_options"],
                                               "msg": "Extra inputs are not permitted",
                                               "input": {"include_usage": True}}]},
    "type": "invalid_request_message_error", "param": None, "code": None,
}  # fmt: skip


class FakeUpstream:
    """A scriptable OpenAI-compatible server. Behaviour is chosen per request by the X-Fake header.

    X-Fake values: absent (an OpenAI-like answer), 'fixture:<provider>/<case>' (replay a payload file),
    'status:<code>[:json|html|empty|long]', 'hang', 'cut' (close mid-stream), 'think:<seconds>'.
    X-Fake-Split: replay streams in pieces of this many bytes; X-Fake-Delay: seconds between pieces.
    X-Fake-Linger: seconds a complete stream stays open after its final event before it ends (real
    servers flush the last event before they finish the body; a client may hang up in between).
    'long' is a JSON error whose message is 5000+ characters and contains a key-shaped secret.
    'cutbody': a 200 JSON answer whose connection closes after a few bytes of its announced length.
    X-Fake-Cut: <n> with a stream fixture: replay its first n bytes, then drop the connection.
    'garbage': the normal answer with GARBAGE_EVENTS interleaved; 'garbage-only': a stream of just those.
    'big:<n>': an answer with about n bytes of content (a JSON body, or 4 KiB deltas when streaming).
    X-Fake-Header: name=value adds that header to the answer (repeatable).
    X-Fake-Usage: <JSON> replaces the usage block of the normal answer (buffered or streamed) with that
    object; X-Fake-Usage-Pad: <n> adds a string of n characters to it (hostile usage, issue 11).
    'mistral': like Mistral's API, a 422 extra_forbidden for any stream_options, else usage on the last
    chunk unasked (the mistral/chat_stream fixture); 'strict': the 422 too, else the normal answer.
    ``sent`` keeps the bytes of every stream sent, in order. Every answer carries X-Fake-Upstream: 1.
    Like real LLM servers it stops work when its client goes away (handler cancellation): ``cancelled``
    counts handlers cancelled that way, ``aborted`` handlers whose write found the connection gone.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled = 0
        self.aborted = 0
        self.sent: list[bytes] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/{tail:.*}", self.handle)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/api/{tail:.*}", self.native)
        self.app.on_response_prepare.append(self._mark)
        self.server: TestServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1"))

    @staticmethod
    async def _mark(request: web.Request, response: web.StreamResponse) -> None:
        """Sign every answer, errors included, so a test can tell the upstream's 5xx from the proxy's."""
        response.headers["X-Fake-Upstream"] = "1"
        for item in request.headers.getall("X-Fake-Header", ()):  # name=value: a header to answer with
            name, _, value = item.partition("=")
            response.headers[name] = value
        if "x-request-id" not in response.headers:  # like OpenAI's, on every answer, errors included
            response.headers["x-request-id"] = "req_up_" + request.headers.get("X-Fake-Request-Id", "1")

    async def native(self, request: web.Request) -> web.StreamResponse:
        """Ollama's native API: /api/chat, /api/generate (NDJSON streams by default), /api/embed."""
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        tail, model = request.match_info["tail"], body.get("model", "llama3.2")
        final = dict(OLLAMA_FINAL, model=model)
        if tail == "embed":
            return web.json_response({"model": model, "embeddings": [[0.1, -0.2]], "total_duration": 14143917,
                                      "load_duration": 1019500, "prompt_eval_count": 8})  # fmt: skip
        words = ["Hello", " there", "!"]
        if tail == "chat":
            lines = [{"model": model, "created_at": "2025-10-17T23:14:07Z", "done": False,
                      "message": {"role": "assistant", "content": w}} for w in words]  # fmt: skip
            final["message"] = {"role": "assistant", "content": "" if body.get("stream", True) else "".join(words)}
        else:
            lines = [{"model": model, "created_at": "2025-10-17T23:14:07Z", "response": w, "done": False}
                     for w in words]  # fmt: skip
            final["response"] = "" if body.get("stream", True) else "".join(words)
        if not body.get("stream", True):
            return web.json_response(final)
        data = [orjson.dumps(x) + b"\n" for x in [*lines, final]]
        split = int(request.headers.get("X-Fake-Split", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        joined = b"".join(data)
        for chunk in [joined[i : i + split] for i in range(0, len(joined), split)] if split else data:
            await resp.write(chunk)
        await _linger(request)
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": None})
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = None  # pass-through paths may carry anything: log it, then answer as for {}
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if not isinstance(body, dict):
            body = {}
        mode = request.headers.get("X-Fake", "")
        split = int(request.headers.get("X-Fake-Split", "0"))
        delay = float(request.headers.get("X-Fake-Delay", "0"))
        try:
            if mode in ("mistral", "strict"):
                if "stream_options" in body:
                    return web.json_response(MISTRAL_EXTRA_FORBIDDEN, status=422)
                if mode == "mistral" and body.get("stream"):
                    return await self._stream(request, [load_case("mistral", "chat_stream")[0]], split, delay)
            if mode.startswith("fixture:"):
                provider, case = mode.removeprefix("fixture:").split("/")
                data, kind, _ = load_case(provider, case)
                if kind == "json":
                    return web.Response(body=data, content_type="application/json")
                cut_at = int(request.headers.get("X-Fake-Cut", "0"))
                if cut_at:
                    return await self._stream(request, [data[:cut_at]], split, delay, cut=True)
                return await self._stream(request, [data], split, delay)
            if mode.startswith("status:"):
                parts = mode.split(":")
                status, shape = int(parts[1]), parts[2] if len(parts) > 2 else "json"
                if shape == "html":
                    return web.Response(status=status, text="<html><body><h1>Bad Gateway</h1></body></html>",
                                        content_type="text/html")  # fmt: skip
                if shape == "empty":
                    return web.Response(status=status)
                if shape == "long":
                    message = "Incorrect API key provided: sk-proj-FAKE0123456789abcdef. " + "x" * 5000
                    err = {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}
                    return web.json_response(err, status=status)
                err = {"error": {"message": f"fake error {status}", "type": "fake_error", "param": None, "code": None}}
                return web.json_response(err, status=status)
            if mode == "cutbody":
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                resp.content_length = 1000
                await resp.prepare(request)
                await resp.write(b'{"id": "chatcmpl-fake", "choices": [')
                assert request.transport is not None
                request.transport.close()
                return resp
            if mode.startswith("big:"):
                return await self._big(request, body, int(mode[4:]))
            if mode == "hang":
                await asyncio.sleep(3600)
            if mode.startswith("think:"):
                await asyncio.sleep(float(mode.split(":")[1]))
            return await self._openai(request, body, split, delay, cut=mode == "cut", mode=mode)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except ConnectionResetError:
            self.aborted += 1
            raise

    async def _openai(self, request: web.Request, body: dict[str, Any], split: int, delay: float,
                      cut: bool, mode: str = "") -> web.StreamResponse:  # fmt: skip
        model = body.get("model", "gpt-4o-mini")
        words = ["Hello", " there", "!"]
        tail = request.match_info["tail"]
        if tail == "embeddings":
            return web.json_response({"object": "list", "model": model,
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
                                      "usage": {"prompt_tokens": 8, "total_tokens": 8}})  # fmt: skip
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                 "prompt_tokens_details": {"cached_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        if "X-Fake-Usage" in request.headers:
            usage = orjson.loads(request.headers["X-Fake-Usage"])
            if pad := int(request.headers.get("X-Fake-Usage-Pad", "0")):
                usage["pad"] = "x" * pad
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1735689600, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            })  # fmt: skip
        pieces = [_chat_chunk(model, {"role": "assistant", "content": ""})]
        pieces += [_chat_chunk(model, {"content": w}) for w in words]
        if cut:
            return await self._stream(request, pieces[:2], split, delay, cut=True)
        pieces.append(_chat_chunk(model, {}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1735689600,
                     "model": model, "choices": [], "usage": usage}  # fmt: skip
            pieces.append(b"data: " + orjson.dumps(final) + b"\n\n")
        pieces.append(b"data: [DONE]\n\n")
        if mode == "garbage":
            mixed = [p for pair in zip(GARBAGE_EVENTS, pieces, strict=False) for p in pair]
            pieces = mixed + pieces[len(GARBAGE_EVENTS) :]
        elif mode == "garbage-only":
            pieces = list(GARBAGE_EVENTS)
        return await self._stream(request, pieces, split, delay)

    async def _big(self, request: web.Request, body: dict[str, Any], size: int) -> web.StreamResponse:
        model = body.get("model", "gpt-4o-mini")
        n = max(1, size // 4096)
        usage = {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1735689600, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * size},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            })  # fmt: skip
        piece = _chat_chunk(model, {"content": "x" * 4096})
        pieces = [_chat_chunk(model, {"role": "assistant", "content": ""}), *([piece] * n),
                  _chat_chunk(model, {}, "stop")]  # fmt: skip
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1735689600,
                     "model": model, "choices": [], "usage": usage}  # fmt: skip
            pieces.append(b"data: " + orjson.dumps(final) + b"\n\n")
        pieces.append(b"data: [DONE]\n\n")
        return await self._stream(request, pieces, 0, 0)

    async def _stream(self, request: web.Request, pieces: list[bytes], split: int, delay: float,
                      cut: bool = False) -> web.StreamResponse:  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "up-req-1"})
        await resp.prepare(request)
        data = b"".join(pieces)
        self.sent.append(data)
        step = split or None
        chunks = [data[i : i + step] for i in range(0, len(data), step)] if step else pieces
        for chunk in chunks:
            await resp.write(chunk)
            if delay:
                await asyncio.sleep(delay)
        if cut:
            assert request.transport is not None
            request.transport.close()
            return resp
        await _linger(request)
        await resp.write_eof()
        return resp


async def _linger(request: web.Request) -> None:
    linger = float(request.headers.get("X-Fake-Linger", "0"))
    if linger:
        await asyncio.sleep(linger)


@pytest.fixture
async def fake_upstream() -> Any:
    fake = FakeUpstream()
    fake.server = TestServer(fake.app, host="127.0.0.1", handler_cancellation=True)
    await fake.server.start_server()
    yield fake
    await fake.server.close()


class RunningHandlers:
    """How many of an app's request handlers are running now (counted by track_handlers)."""

    def __init__(self) -> None:
        self.count = 0


HANDLERS = web.AppKey("tests_running_handlers", RunningHandlers)


def track_handlers(app: web.Application) -> web.Application:
    """Count app's running handlers in app[HANDLERS], from a middleware put outside all of the proxy's own.

    Outermost, so a record written by any handler or middleware of the proxy is queued before the count
    drops. A test-only wrapper: it passes every request, answer and exception through untouched.
    """
    running = app[HANDLERS] = RunningHandlers()

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        running.count += 1
        try:
            return await handler(request)
        finally:
            running.count -= 1

    app.middlewares.insert(0, count)
    return app


async def settle(app: web.Application, expected: int | None = None, timeout: float = 5.0) -> int:
    """Wait until none of app's handlers runs (and, given expected, that many records were made), then flush
    the sink; return the number of records made since start (written, queued or dropped), asserting it is
    expected.

    The deterministic way to check that a record is absent: a call's record is queued when its handler ends,
    which may be just after the client has read the whole answer, so once no handler runs no call that has
    ended can add one; and flush() is a barrier (everything queued before it is written when it returns).
    Call it once every call of the test has ended on the client's side.
    """
    sink, running = app[SINK], app[HANDLERS]

    def made() -> int:
        # Dips while the background flusher writes a batch it took (pending is 0, written not yet
        # counted): that only makes the loop wait longer. After flush() it is exact.
        return sink.written + sink.pending + sink.dropped

    deadline = time.monotonic() + timeout
    while running.count or (expected is not None and made() < expected):
        assert time.monotonic() < deadline, (
            f"not settled after {timeout} s: {running.count} handler(s) running, {made()} record(s) made, "
            f"{expected} expected"
        )
        await asyncio.sleep(0.005)
    await sink.flush()
    total = made()
    assert expected is None or total == expected, f"{total} record(s) made, {expected} expected"
    return total


class ProxyUnderTest:
    """The proxy app on a real loopback port, with helpers to read its records."""

    def __init__(self, server: TestServer, runs_dir: Path) -> None:
        self.server = server
        self.runs_dir = runs_dir

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def flush(self) -> None:
        await self.server.app[SINK].flush()

    async def settle(self, expected: int, timeout: float = 5.0) -> None:
        """Wait until every call has ended and made its record, flush; assert the proxy made expected records
        in all (every run, .rejected.jsonl included). See settle()."""
        await settle(self.server.app, expected, timeout)

    async def records(self, run_id: str = "default") -> list[dict[str, Any]]:
        """Flush the sink and return the run's records."""
        await self.flush()
        path = self.runs_dir / f"{run_id}.jsonl"
        if not path.exists():
            return []
        data = path.read_bytes()
        # The background flusher may be mid-write: only lines that already end are records yet.
        complete = data[: data.rfind(b"\n") + 1]
        return [orjson.loads(line) for line in complete.splitlines() if line]

    async def wait_records(self, run_id: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until a run has count records (calls finish after the client sees the end)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = await self.records(run_id)
            if len(recs) >= count or time.monotonic() > deadline:
                return recs
            await asyncio.sleep(0.02)


ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]


@pytest.fixture
async def make_proxy(tmp_path: Path, fake_upstream: FakeUpstream) -> Any:
    """Start a proxy in front of the fake upstream; keyword args override Config fields."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> ProxyUnderTest:
        cfg = Config(
            runs_dir=tmp_path / "runs",
            upstreams=(Upstream(name="fake", base_url=fake_upstream.base_url),),
            timeouts=Timeouts(connect_s=2, read_s=5, total_s=10),
            flush_interval_s=0.05,
        )
        pricebook = overrides.pop("pricebook", None)
        cfg = resolve_env(replace(cfg, **overrides))
        server = TestServer(track_handlers(make_app(cfg, pricebook)), host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return ProxyUnderTest(server, cfg.runs_dir)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> ProxyUnderTest:
    return await make_proxy()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound here but never listening, so no
    other process can take it meanwhile (a port found free and let go at once may be anyone's when used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def make_client(proxy: ProxyUnderTest, *, run_id: str | None = None, api_key: str = KEY,
                headers: Mapping[str, str] | None = None, base_url: str | None = None) -> openai.AsyncOpenAI:
    """The openai SDK's async client for a proxy under test, never retrying (a test sees each answer as sent).

    run_id: sent as X-Run-Id (None: none, so the run comes from base_url's /run/<id>/ or is "default");
    headers: sent on every call; base_url: instead of the proxy's /v1.
    """
    default_headers = {"X-Run-Id": run_id} if run_id is not None else {}
    default_headers.update(headers or {})
    return openai.AsyncOpenAI(base_url=base_url or proxy.base_url, api_key=api_key, max_retries=0,
                              default_headers=default_headers)  # fmt: skip


#: Every field a Record needs, as for a plain successful non-streamed chat call with upstream usage.
RECORD_DEFAULTS: dict[str, Any] = {
    "ts": "2026-01-01T00:00:00.000Z", "run_id": "r", "request_id": "req_1", "trace_id": None, "task": None, "tags": {},
    "endpoint": "/v1/chat/completions", "method": "POST", "upstream": "u", "provider": None,
    "requested_model": "m", "model": "m", "stream": False, "status": 200, "success": True, "finish_reason": "stop",
    "input_tokens": 1, "cached_input_tokens": 0, "cache_write_tokens": 0, "cache_write_5m_tokens": None,
    "cache_write_1h_tokens": None, "output_tokens": 2, "reasoning_tokens": 0, "total_tokens": 3,
    "usage_source": "upstream", "usage_raw": None, "stream_usage_injected": False, "ttfb_ms": 1.0, "ttft_ms": None,
    "duration_ms": 2.0, "tokens_per_second": None, "server_timing": None, "upstream_request_id": None, "error": None,
}  # fmt: skip


def make_record(**overrides: Any) -> Record:
    """A Record built from RECORD_DEFAULTS with the given fields changed (an unknown field is a TypeError)."""
    return Record(**{**RECORD_DEFAULTS, **overrides})


async def health(base: str) -> tuple[int, dict[str, Any]]:
    """GET /healthz of a proxy at base (scheme://host:port): its status and JSON body."""
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status, await r.json()


async def wait_health(base: str, status: int, timeout: float = 5.0) -> dict[str, Any]:
    """Poll /healthz until it answers status; return its body (fails after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        got, body = await health(base)
        if got == status:
            return body
        assert time.monotonic() < deadline, (got, body)
        await asyncio.sleep(0.02)
