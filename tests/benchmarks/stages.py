"""CPU per call of each metering stage, in-process, without sockets: the attribution the end-to-end rows hide.

Each stage runs the proxy's own code on the bytes the fake upstream sends (fake_upstream.py's shapes) and
reports the best of several repeats in microseconds per call (or per streamed event). The best, not the
mean: on a shared machine other processes only ever add time. Run:

    python tests/benchmarks/stages.py [--repeat 7] [--n 20000]

What it leaves out is what this process cannot see without sockets: aiohttp's client and server work,
the event loop, the kernel. The end-to-end rows of bench.py measure those, against the bare pass-through.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import app as app_mod
from proxy import config, routes, upstreams
from proxy.call import Call, to_record
from proxy.forward import Forwarder
from proxy.meter import Meter
from proxy.pricing import PriceBook
from proxy.usage import settle

MODEL = "gpt-4.1-mini"
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
# What the openai SDK sends (1.x), less the ones that vary per call.
HEADERS = {
    "Host": "127.0.0.1:8080", "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive",
    "Accept": "application/json",
    "Content-Type": "application/json", "User-Agent": "OpenAI/Python 1.109.1", "X-Stainless-Lang": "python",
    "X-Stainless-Package-Version": "1.109.1", "X-Stainless-OS": "Linux", "X-Stainless-Arch": "x64",
    "X-Stainless-Runtime": "CPython", "X-Stainless-Runtime-Version": "3.11.7", "Authorization": "Bearer sk-client",
    "X-Stainless-Async": "false", "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
    "Content-Length": "80", "X-Run-Id": "bench",
}  # fmt: skip
UPSTREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Date": "x", "Server": "y",
                    "Transfer-Encoding": "chunked", "x-request-id": "abc"}  # fmt: skip


def _chunk(choices: list[Any], usage: Any = None) -> bytes:
    obj = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
           "system_fingerprint": "fp_bench", "choices": choices, "usage": usage}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_reads(chunks: int = 20) -> list[bytes]:
    """The reads of one injected-usage stream, one event per read as the fake upstream writes them."""
    role = _chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}])  # fmt: skip
    tok = _chunk([{"index": 0, "delta": {"content": "tok "}, "logprobs": None, "finish_reason": None}])
    fin = _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    usage = _chunk([], {"prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks})
    return [role, *[tok] * chunks, fin, usage, b"data: [DONE]\n\n"]


PLAIN_BODY = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
})  # fmt: skip


def best_us(fn: Callable[[], object], n: int, repeat: int) -> float:
    """Best of repeat runs of n calls, in microseconds per call (process CPU time)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    asyncio.run(_main(args.n, args.repeat))


async def _main(n: int, repeat: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="stages-"))
    cfg = config.from_mapping({"upstreams": [{"name": "fake", "base_url": "http://127.0.0.1:9/v1"}],
                               "runs_dir": str(tmp / "runs")})  # fmt: skip
    book = PriceBook.load()
    app = app_mod.make_app(cfg, book)
    fwd: Forwarder = app[app_mod.FORWARDER]
    endpoint = next(e for e in routes.ENDPOINTS if e.path == "/v1/chat/completions")
    req_headers = CIMultiDictProxy(CIMultiDict(HEADERS))
    up_headers = CIMultiDictProxy(CIMultiDict(UPSTREAM_HEADERS))
    upstream = cfg.upstreams[0]
    reads = stream_reads()
    body = orjson.dumps(REQUEST)

    def new_call(stream: bool) -> Call:
        call = Call(endpoint, "POST", endpoint.path, fwd.secrets, req_headers, fwd.traced)
        call.run_id, call.requested_model, call.stream, call.upstream = "bench", MODEL, stream, upstream
        call.request_obj, call.status, call.ttfb = REQUEST, 200, call.t0
        call.provider = fwd.upstreams.provider(upstream, None, None, None)
        call.meter.strip_usage = call.injected = stream
        return call

    def metered(stream: bool) -> Call:
        call = new_call(stream)
        if stream:
            for r in reads:
                call.meter.feed(r, 1.0)
            call.meter.finish(1.0)
        else:
            call.meter.read_body(PLAIN_BODY)
        return call

    plain, streamed = metered(False), metered(True)
    # Queued lines are never flushed here (no served app): a sink that only counts keeps the queue from
    # reaching its cap, past which dropping the oldest line would be timed too.
    fwd.sink.write = lambda run_id, line: None  # type: ignore[method-assign]

    def settled(call: Call) -> tuple[Any, str]:
        m = call.meter
        return settle(m.usage(), final=m.usage_final, output_chars=m.output_chars, request=call.request_obj,
                      billed=True, tool_counts=m.tool_counts)  # fmt: skip

    usage, source = settled(plain)

    def price() -> object:
        return book.price(usage, model=MODEL, requested_model=MODEL, upstream=upstream.name, provider="openai",
                          dialect="chat")  # fmt: skip

    cost = price()
    record = to_record(plain, time.perf_counter(), usage, source, "openai", cost)  # type: ignore[arg-type]
    raw = record.to_json()

    def feed_stream() -> None:
        m = Meter("chat", strip_usage=True)
        for r in reads:
            m.feed(r, 1.0)
        m.finish(1.0)

    def routine_events() -> None:
        m = Meter("chat", strip_usage=True)
        for r in reads[:2]:
            m.feed(r, 1.0)
        tok = reads[2]
        for _ in range(100):
            m.feed(tok, 1.0)

    rows: list[tuple[str, float]] = [
        ("Call() (ids, credentials, trace, Meter)", best_us(lambda: new_call(False), n, repeat)),
        ("upstream request headers", best_us(lambda: fwd.upstreams.request_headers(
            req_headers, upstream, fwd.consumed_headers, None), n, repeat)),  # fmt: skip
        ("client response headers", best_us(lambda: upstreams.client_headers(up_headers, fwd.secrets.mask, ()), n,
                                            repeat)),  # fmt: skip
        ("request JSON parse", best_us(lambda: orjson.loads(body), n, repeat)),
        ("meter: plain body", best_us(lambda: Meter("chat").read_body(PLAIN_BODY), n, repeat)),
        ("meter: 20-chunk stream, whole (24 reads)", best_us(feed_stream, n // 10, repeat)),
        ("meter: one routine content event", best_us(routine_events, n // 20, repeat) / 100),
        ("usage settle", best_us(lambda: settled(plain), n, repeat)),
        ("pricing", best_us(price, n, repeat)),
        ("to_record (Record built)", best_us(lambda: to_record(plain, 1.0, usage, source, "openai", cost), n,  # type: ignore[arg-type]
                                             repeat)),  # fmt: skip
        ("record JSON (to_json)", best_us(record.to_json, n, repeat)),
        ("mask secrets in the line", best_us(lambda: fwd.secrets.mask_bytes(raw, ()), n, repeat)),
    ]
    for observe in fwd.observers:
        name = getattr(observe, "__qualname__", repr(observe))
        rows.append((f"observer {name}", best_us(lambda o=observe: o(record), n, repeat)))  # type: ignore[misc]
    rows.append(("_record, whole (settle..observers), plain", best_us(lambda: fwd._record(plain), n, repeat)))
    rows.append(("_record, whole, 20-chunk stream", best_us(lambda: fwd._record(streamed), n, repeat)))
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:7.2f} us")


if __name__ == "__main__":
    main()
