"""make_app(cfg) -> web.Application: routes, the error renderer, and resource lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web

from proxy import access, budget_store, budgets, errors, routes, runs_api
from proxy.config import Config
from proxy.forward import Forwarder, Hooks, expect_continue
from proxy.metrics import Metrics
from proxy.records import JsonlSink
from proxy.shipper import Shipping, ShippingCollector
from proxy.shipper import from_config as shipping_from_config

if TYPE_CHECKING:
    from proxy.otel import OtelExporter
    from proxy.price_refresh import PriceRefresher
    from proxy.pricing import PriceBook

log = logging.getLogger("metering_proxy")

CONFIG = web.AppKey("config", Config)
SINK = web.AppKey("sink", JsonlSink)
FORWARDER = web.AppKey("forwarder", Forwarder)
METRICS = web.AppKey("metrics", Metrics)
SHIPPING = web.AppKey("shipping", Shipping)
OTEL: web.AppKey[OtelExporter] = web.AppKey("otel")
PRICE_REFRESH: web.AppKey[PriceRefresher] = web.AppKey("price_refresh")

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
    """200 while records can be written (status degraded while a shipper lags or fails), 503 when they cannot."""
    sink = request.app[SINK]
    body: dict[str, object] = {
        "status": "ok" if sink.healthy else "unhealthy",
        "runs_dir": str(sink.runs_dir),
        "records_written": sink.written,
        "records_dropped": sink.dropped,
        "error": sink.last_error,
    }
    shipping = request.app.get(SHIPPING)
    if shipping is not None:
        degraded, body["shipper"] = shipping.health()
        if degraded and sink.healthy:
            body["status"] = "degraded"  # still 200: calls are recorded; the copies elsewhere lag
    if (otel := request.app.get(OTEL)) is not None:
        body["otel"] = otel.health()  # a collector down never fails /healthz: calls and records are unaffected
    return web.Response(status=200 if sink.healthy else 503, body=orjson.dumps(body), content_type="application/json")


def route_middleware(forwarder: Forwarder) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Canonicalise every request path once, before access checks or handlers read it."""

    @web.middleware
    async def canonical(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            route = routes.resolve(request.raw_path.partition("?")[0], request.method)
        except routes.InvalidPath as exc:
            return forwarder.refuse(request, exc)  # an attack or a bug in a client: recorded
        request[routes.ROUTE] = route
        routed_to_api = request.match_info.route.handler == forwarder.api
        if route.is_api and not routed_to_api:
            # aiohttp's router took a spelling of an API path for one of the proxy's pages
            # (/runs/../v1/chat/completions): refuse it, with a record, rather than guess.
            return forwarder.refuse(request, routes.UnknownPath(
                f"Unknown path {request.path[:200]!r}: spell it {route.canonical[:200]!r}.", code="unknown_path"))
        if not route.is_api and route.canonical != request.path:
            # A spelling of one of the proxy's own pages (//healthz, /ui/../metrics): only the canonical
            # one is served, so the access check and the handler agree on what was asked for.
            raise web.HTTPNotFound()
        return await handler(request)

    return canonical


def make_app(
    cfg: Config, pricebook: PriceBook | None = None, *, multiprocess_dir: Path | None = None,
    shared_budgets: Path | None = None,
) -> web.Application:
    """Build the proxy application for a configuration.

    multiprocess_dir is given to each worker of ``serve --workers N``: /metrics and the live events then
    cover every worker of the host (metric files shared there; events read from the run files).
    shared_budgets is the SQLite file those workers keep run budgets in when no Redis is configured.
    """
    # Request bodies are decoded by proxy.body, in small steps between which other calls run: aiohttp's
    # decoder inflated a compression bomb up to the size limit in one go, stalling every call in flight.
    app = web.Application(middlewares=[error_middleware], client_max_size=cfg.max_body_bytes,
                          handler_args={"auto_decompress": False})  # fmt: skip
    app[CONFIG] = cfg
    app[SINK] = sink = JsonlSink(cfg.runs_dir, cfg.flush_interval_s, fsync=cfg.fsync == "batch")
    access.check_exposure(cfg)  # an open relay must not start
    app[METRICS] = metrics = Metrics(sink, multiprocess_dir=multiprocess_dir)
    store = budget_store.for_config(cfg.budgets, sink, shared_budgets)
    app[budgets.BUDGETS] = tracker = budgets.BudgetTracker(cfg.budgets, sink, pricebook, store)
    pg_cfg = cfg.ship.postgres
    db = None
    if pg_cfg is not None and pg_cfg.serve_reads:
        from proxy.runs_db import PostgresRuns  # the fleet extra: imported only when configured

        db = PostgresRuns(pg_cfg)
    runs = runs_api.RunsApi(cfg.runs_dir, follow_files=multiprocess_dir is not None, db=db)
    runs.pricebook = pricebook  # GET /runs/{id}?price_as= re-prices with the table calls are priced with
    if multiprocess_dir is not None:
        sink.on_flush.append(runs.hub.wake)  # this worker's records: followed as soon as they are written
    # Every feature on the request path, in the order it runs: checks before forwarding, observers after
    # each record is queued.
    otel = _otel_exporter(app, cfg, metrics)
    hooks = Hooks(
        checks=(tracker.check,),
        observers=(metrics.observe, tracker.observe, runs.hub.observe),
        consumed_headers=budgets.HEADERS | access.HEADERS,
        spans=(otel.observe,) if otel is not None else (),
    )
    # The client session needs a running loop: _resources plugs it in at start-up.
    app[FORWARDER] = forwarder = Forwarder(cfg, None, sink, pricebook, hooks)
    app.middlewares.append(route_middleware(forwarder))  # canonical paths first, before access reads one
    guard = access.middleware(cfg, forwarder)
    if guard is not None:
        app.middlewares.append(guard)
    app.cleanup_ctx.append(_resources)
    if cfg.prices_refresh_s is not None:
        from proxy.price_refresh import PriceRefresher

        def install_prices(book: PriceBook) -> None:
            # Every holder of the table, in one step on the loop: no call sees two tables.
            forwarder.pricebook = tracker.pricebook = runs.pricebook = book

        app[PRICE_REFRESH] = PriceRefresher(cfg.prices_refresh_s, install_prices, url=cfg.prices_refresh_url,
                                            custom=cfg.custom_prices)  # fmt: skip
        app.cleanup_ctx.append(_price_refresh)
    shipping = shipping_from_config(cfg.runs_dir, cfg.ship)
    if shipping is not None:
        app[SHIPPING] = shipping
        metrics.registry.register(ShippingCollector(shipping))
        app.cleanup_ctx.append(_shipping)
    app.on_shutdown.append(_on_shutdown)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics.handle)
    runs_api.install(app, runs)  # /runs..., /ui, live events
    # Everything else is the API, dispatched on the canonical path (whatever aiohttp's router made of
    # the spelling). expect_continue: aiohttp's own Expect handling answers 417 (or 500) before any
    # handler runs, so the call would get no record.
    app.router.add_route("*", "/{tail:.*}", app[FORWARDER].api, expect_handler=expect_continue)
    return app


async def _price_refresh(app: web.Application) -> AsyncIterator[None]:
    """prices.refresh: the background download, started after the socket is bound, stopped at shutdown."""
    task = asyncio.create_task(app[PRICE_REFRESH].run(), name="metering-proxy price refresh")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
    forwarder = app[FORWARDER]
    forwarder.session = session
    forwarder.read_watch.start()
    try:
        yield
    finally:
        await forwarder.read_watch.stop()
        await session.close()
        await app[budgets.BUDGETS].store.close()  # settlements still scheduled reach the store first
        await sink.close()


def _otel_exporter(app: web.Application, cfg: Config, metrics: Metrics) -> OtelExporter | None:
    """The OTLP exporter when otel.enabled (the SDK is imported only then), with its start and stop."""
    if not cfg.otel.enabled:
        return None
    try:
        from proxy.otel import OtelExporter
    except ImportError as exc:
        from proxy.config import ConfigError

        raise ConfigError(f"config: otel.enabled needs the otel extra: pip install 'metering-proxy[otel]' ({exc})"
                          ) from None  # fmt: skip
    app[OTEL] = otel = OtelExporter(cfg.otel)
    metrics.registry.register(otel)  # its export counters on /metrics
    app.cleanup_ctx.append(_otel)  # before _resources: stopped after the last record (and its span) is made
    return otel


async def _otel(app: web.Application) -> AsyncIterator[None]:
    otel = app[OTEL]
    otel.start()
    try:
        yield
    finally:
        await otel.close()


async def _shipping(app: web.Application) -> AsyncIterator[None]:
    """Ship records to the configured destinations while the app runs (after the sink's final flush, stop)."""
    shipping = app[SHIPPING]
    await shipping.start()
    try:
        yield
    finally:
        await shipping.close()


async def _on_shutdown(app: web.Application) -> None:
    app[FORWARDER].shutting_down = True
