"""make_app(cfg) -> web.Application: routes, the error renderer, and resource lifetimes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy import access, budgets, errors, runs_api
from proxy.config import Config
from proxy.forward import Forwarder, expect_continue, metered_endpoint
from proxy.meter import ENDPOINTS
from proxy.metrics import Metrics
from proxy.records import JsonlSink

log = logging.getLogger("metering_proxy")

CONFIG = web.AppKey("config", Config)
SINK = web.AppKey("sink", JsonlSink)
FORWARDER = web.AppKey("forwarder", Forwarder)
METRICS = web.AppKey("metrics", Metrics)

_METERED = "|".join(ENDPOINTS)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error the proxy answers itself in OpenAI's shape."""
    try:
        return await handler(request)
    except errors.ProxyError as exc:
        error_id = errors.new_error_id()
        log.warning("request failed: error_id=%s status=%s %s", error_id, exc.status, exc.message)
        return errors.render(exc, error_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_id = errors.new_error_id()
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        message = exc.reason if exc.status != 404 else f"Unknown path {request.path}"
        code = exc.reason.lower().replace(" ", "_") if exc.status != 404 else "unknown_path"
        return errors.render(errors.ProxyError(message, status=exc.status, type=kind, code=code), error_id)


async def healthz(request: web.Request) -> web.Response:
    """200 while records can be written, 503 when they cannot."""
    sink = request.app[SINK]
    body = {
        "status": "ok" if sink.healthy else "unhealthy",
        "runs_dir": str(sink.runs_dir),
        "records_written": sink.written,
        "records_dropped": sink.dropped,
        "error": sink.last_error,
    }
    return web.Response(status=200 if sink.healthy else 503, body=orjson.dumps(body), content_type="application/json")


def make_app(cfg: Config, pricebook: Any = None) -> web.Application:
    """Build the proxy application for a configuration."""
    app = web.Application(middlewares=[error_middleware], client_max_size=cfg.max_body_bytes)
    app[CONFIG] = cfg
    app[SINK] = sink = JsonlSink(cfg.runs_dir, cfg.flush_interval_s, fsync=cfg.fsync == "batch")
    # The client session needs a running loop: _resources plugs it in at start-up.
    app[FORWARDER] = Forwarder(cfg, None, sink, pricebook)
    app[METRICS] = Metrics(sink)
    app[FORWARDER].observers.append(app[METRICS].observe)
    budgets.install(app, app[FORWARDER])
    access.install(app, cfg, app[FORWARDER])
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_on_shutdown)

    async def metered(request: web.Request) -> web.StreamResponse:
        return await request.app[FORWARDER].metered(request)

    async def passthrough(request: web.Request) -> web.StreamResponse:
        # A metered path spelt with a trailing or doubled slash is still an LLM call to record.
        endpoint = metered_endpoint(request.method, request.match_info["tail"])
        if endpoint is not None:
            return await request.app[FORWARDER].metered(request, endpoint)
        return await request.app[FORWARDER].passthrough(request)

    async def native(request: web.Request) -> web.StreamResponse:
        return await request.app[FORWARDER].metered(request, "api/" + request.match_info["tail"])

    for prefix in ("", "/run/{run_id}"):
        app.router.add_post(prefix + "/api/{tail:chat|generate|embed|embeddings}", native,
                            expect_handler=expect_continue)  # fmt: skip
        # expect_continue: aiohttp's own Expect handling answers 417 (or 500) before any handler runs.
        app.router.add_post(prefix + "/v1/{tail:" + _METERED + "}", metered, expect_handler=expect_continue)
        app.router.add_route("*", prefix + "/v1/{tail:.*}", passthrough, expect_handler=expect_continue)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", app[METRICS].handle)
    runs_api.install(app, cfg.runs_dir, app[FORWARDER].observers)  # /runs..., /ui, live events
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open the upstream connection pool and the record sink; flush and close them at shutdown."""
    cfg = app[CONFIG]
    sink = app[SINK]
    await sink.start()
    t = cfg.timeouts
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=cfg.max_connections, keepalive_timeout=60, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=t.total_s, connect=t.connect_s, sock_read=t.read_s),
        auto_decompress=True,
        skip_auto_headers=("User-Agent", "Accept", "Content-Type"),
        trust_env=False,
    )
    app[FORWARDER].session = session
    try:
        yield
    finally:
        await session.close()
        await sink.close()


async def _on_shutdown(app: web.Application) -> None:
    app[FORWARDER].shutting_down = True
