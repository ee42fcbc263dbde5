"""The thinnest aiohttp pass-through (no metering): the benchmark's reference point.

Run: python tests/benchmarks/passthrough.py --port P --upstream http://127.0.0.1:U/v1
It prints ``READY <port>`` once it listens. It forwards POST/GET /v1/... to the upstream with one
shared keep-alive ClientSession and streams the answer back chunk by chunk; no body parsing, no
records. The issue's reference figures ("about 40% of direct for small calls, about 90% for 20-chunk
streams, about 400 us of CPU per call") describe this kind of proxy.
"""

from __future__ import annotations

import argparse
import sys

import aiohttp
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
                    while chunk := await up.content.readany():
                        await resp.write(chunk)
                    await resp.write_eof()
                except ConnectionError:  # the client went away (e.g. wrk stopping mid-stream)
                    pass
                return resp
            return web.Response(status=up.status, body=await up.read(), headers=out)

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

    async def ready(app: web.Application) -> None:
        print(f"READY {args.port}", flush=True)

    app = make_app(args.upstream.rstrip("/"))
    app.on_startup.append(ready)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
