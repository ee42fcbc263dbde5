"""The thin pass-through: the thinnest aiohttp proxy that does what any metering proxy must, and no more.

Run: python tests/benchmarks/passthrough.py --port P --upstream http://127.0.0.1:U/v1
It prints ``LOOP uvloop`` (or ``asyncio``), then ``READY <port>`` once it listens. It is the reference the
benchmark's headline ratios are taken against (issue 16: "proxy/thin"), so it runs on the proxy's own event
loop (uvloop when it imports, as ``serve`` does by default) and does the work no metering proxy can skip:

- reads the request body and parses its JSON once (``orjson.loads``);
- forwards it with one shared keep-alive ``ClientSession``;
- streams an SSE answer back chunk by chunk as it arrives (``iter_any()`` / ``write()``);
- reads a plain answer whole and parses its ``usage`` (``orjson.loads`` of the body).

No records, no metrics, no header rewriting beyond the hop-by-hop headers, no usage injection for streams.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aiohttp
import orjson
from aiohttp import web

_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "host",
        "content-length",
        "te",
        "upgrade",
        "proxy-connection",
        "trailer",
        "content-encoding",
    }
)


def use_uvloop() -> str:
    """Install uvloop's loop policy when uvloop imports (the proxy's default, event_loop: auto)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _usage(body: bytes) -> Any:
    answer = _json(body)
    return answer.get("usage") if isinstance(answer, dict) else None


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session: dict[str, aiohttp.ClientSession] = {}

    async def ctx(app: web.Application):  # type: ignore[no-untyped-def]
        session["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=60),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        yield
        await session["s"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if body:
            _json(body)  # parsed once, as any metering proxy must (model, stream, ...); the result is not used
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        url = f"{upstream}/{request.match_info['tail']}"
        if request.query_string:
            url += "?" + request.query_string
        async with session["s"].request(request.method, url, data=body or None, headers=headers) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in _DROP}
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers=out)
                try:
                    await resp.prepare(request)
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                except ConnectionError:  # the client went away (e.g. wrk stopping mid-stream)
                    pass
                return resp
            data = await up.read()
            _usage(data)  # what a metering proxy reads from a plain answer; not used here
            return web.Response(status=up.status, body=data, headers=out)

    app.cleanup_ctx.append(ctx)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    if not args.upstream.startswith("http://127.0.0.1"):
        sys.exit("passthrough: loopback upstreams only")
    loop = use_uvloop()

    async def ready(app: web.Application) -> None:
        print(f"LOOP {loop}\nREADY {args.port}", flush=True)

    app = make_app(args.upstream.rstrip("/"))
    app.on_startup.append(ready)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
