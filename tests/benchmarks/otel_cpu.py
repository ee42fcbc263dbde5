"""Per-call CPU cost of OpenTelemetry: N buffered calls through an in-process app, OTel off vs on.

python tests/benchmarks/otel_cpu.py [N]. The collector is a real receiver in the same process (its decoding
counts too, so "on" is an upper bound); process CPU time covers the loop and the export threads.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import make_app
from proxy.config import Config, Otel, Upstream, resolve_env
from tests.conftest import FakeUpstream

BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


async def _collector() -> TestServer:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/{signal}", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def run(n: int, otel: Otel | None, runs: Path) -> float:
    fake = FakeUpstream()
    fake.server = TestServer(fake.app, host="127.0.0.1")
    await fake.server.start_server()
    cfg = resolve_env(Config(runs_dir=runs, upstreams=(Upstream(name="fake", base_url=fake.base_url),),
                             otel=otel or Otel()))  # fmt: skip
    proxy = TestServer(make_app(cfg), host="127.0.0.1")
    await proxy.start_server()
    url = str(proxy.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as s:
        for _ in range(50):  # warm-up
            async with s.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
        cpu = time.process_time()
        for _ in range(n):
            async with s.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
        cpu = time.process_time() - cpu
    await proxy.close()  # shutdown exports the rest: included only in neither measurement
    await fake.server.close()
    return cpu / n * 1e6


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    collector = await _collector()
    endpoint = str(collector.make_url("")).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        for label, otel in (("off", None), ("on", Otel(enabled=True, endpoint=endpoint, metrics_interval_s=1)),
                            ("off", None), ("on", Otel(enabled=True, endpoint=endpoint, metrics_interval_s=1)),
                            ("on+logs", Otel(enabled=True, endpoint=endpoint, metrics_interval_s=1, logs=True))):
            us = await run(n, otel, Path(tmp) / label)
            print(f"{label:8s} {us:8.1f} us CPU per call (whole process: client, fake upstream, proxy, collector)")
    await collector.close()


if __name__ == "__main__":
    asyncio.run(main())
