"""The proxy handler: request -> upstream -> usage -> price -> record, streaming or buffered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy import errors, records, redact, routes, upstreams
from proxy.body import read_body
from proxy.call import Call, to_record
from proxy.config import RUN_ID_RE, Config, Upstream
from proxy.errors import Category, ProxyError
from proxy.read_watch import ReadWatch
from proxy.records import JsonlSink, Record
from proxy.tracecontext import CallFacts
from proxy.usage import settle

if TYPE_CHECKING:
    from proxy.pricing import PriceBook

log = logging.getLogger("metering_proxy")

_CONSUMED = frozenset({"x-run-id", "x-task-name"})
_TAG_PREFIX = upstreams.TAG_PREFIX
_MAX_TAGS = 32
_MAX_TAG_LEN = 256


Check = Callable[["Call", web.Request, dict[str, Any]], Awaitable[None]]


Observer = Callable[[Record], None]


SpanObserver = Callable[[Record, CallFacts], None]


@dataclass(frozen=True, slots=True)
class Hooks:
    """What other features plug into the request path; make_app builds it, in the order it runs."""

    checks: tuple[Check, ...] = ()
    """Run before a call is forwarded, in order; raise a ProxyError to refuse it (budgets)."""
    observers: tuple[Observer, ...] = ()
    """Called with every record once it is queued, in order (metrics, budgets, live events)."""
    consumed_headers: frozenset[str] = frozenset()
    """Lower-cased request headers a feature reads itself (never sent upstream)."""
    spans: tuple[SpanObserver, ...] = ()
    """Called with every record of a call to a known endpoint and its span facts (OTel); any makes calls traced."""


class Forwarder:
    """Holds the shared client session, router and sink; its methods are the route handlers."""

    def __init__(
        self, cfg: Config, session: aiohttp.ClientSession | None, sink: JsonlSink, pricebook: PriceBook | None = None,
        hooks: Hooks = Hooks(),
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.sink = sink
        self.pricebook = pricebook
        self.upstreams = upstreams.Upstreams(cfg)
        self.router = self.upstreams.router
        self.shutting_down = False
        self.passthrough_rules = routes.Passthrough(cfg.passthrough)
        self.secrets = redact.from_config(cfg)
        self.checks = list(hooks.checks)
        self.observers = list(hooks.observers)
        self.spans = list(hooks.spans)
        self.traced = bool(self.spans)
        """Whether each call gets a span of the proxy's (its traceparent sent upstream)."""
        self.consumed_headers = _CONSUMED | hooks.consumed_headers
        """Lower-cased request headers the proxy reads itself and never sends upstream."""
        self.read_watch = ReadWatch(cfg.timeouts.read_s)
        """The read timeout of streams being relayed (started with the client session)."""

    # -- request side ----------------------------------------------------------------------

    def _run_id(self, request: web.Request) -> str:
        run_id = request.headers.get("X-Run-Id")
        if run_id is None:
            run_id = request[routes.ROUTE].run_id or self.cfg.default_run_id
        if not RUN_ID_RE.fullmatch(run_id):
            shown = run_id if len(run_id) <= 40 else run_id[:40] + "..."
            raise errors.InvalidRunId(
                f"Invalid run id {shown!r}: use 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-',"
                " not starting with '.' (set by the X-Run-Id header or a /run/<id>/v1 base URL).",
                param="X-Run-Id",
            )
        return run_id

    def _upstream_headers(self, request: web.Request, upstream: Upstream,
                          call: Call | None = None) -> CIMultiDict[str]:  # fmt: skip
        trace = call.trace if call is not None and self.traced else None
        return self.upstreams.request_headers(request.headers, upstream, self.consumed_headers, trace)

    def _client_headers(self, up: aiohttp.ClientResponse, call: Call | None,
                        credentials: tuple[str, ...]) -> CIMultiDict[str]:  # fmt: skip
        out = upstreams.client_headers(up.headers, self.secrets.mask, credentials)
        if call is not None:
            # The upstream's x-request-id / request-id pass untouched: the SDK reports them as the id to
            # quote to the provider. The proxy's own id goes beside them.
            call.upstream_request_id = up.headers.get("x-request-id") or up.headers.get("request-id")
            out["X-Meter-Request-Id"] = call.request_id
            out.update(call.extra_headers)
        return out

    def _stream_options(self, call: Call, upstream: Upstream, obj: dict[str, Any], body: bytes) -> bytes:
        """The body of a chat/completions stream: usage asked for, or stream_options left out."""
        options = obj.get("stream_options")
        call.injected = call.meter.strip_usage = False
        if self.upstreams.refuses_stream_options(upstream):
            # The server refuses the field, even when the client sent it; such servers (Mistral) put
            # usage on their last chunk unasked, so the client still gets it.
            if options is None:
                return body
            return orjson.dumps({k: v for k, v in obj.items() if k != "stream_options"})
        if not upstream.inject_stream_usage or (isinstance(options, dict) and options.get("include_usage") is True):
            return body
        # Ask for usage upstream; the meter hides the extra chunk from this client.
        merged = dict(options) if isinstance(options, dict) else {}
        merged["include_usage"] = True
        call.injected = call.meter.strip_usage = True
        return orjson.dumps({**obj, "stream_options": merged})

    async def _send(self, method: str, url: URL, body: bytes, headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        """Send the request upstream and return once its status and headers are in.

        Redirects are never followed: the next host would get the injected key, the configured headers
        and (on 307/308) the prompt. A 3xx goes back to the client as it is.
        """
        assert self.session is not None, "the app's cleanup_ctx opens the session"
        where = upstreams.shown_url(url)
        try:
            return await self.session.request(method, url, data=body or None, headers=headers,
                                              allow_redirects=False)  # fmt: skip
        except TimeoutError:
            raise errors.UpstreamTimeout(f"The upstream did not answer in time ({where}).") from None
        except aiohttp.ClientError as exc:
            raise errors.UpstreamUnreachable(
                f"Could not reach the upstream at {where}: {type(exc).__name__}: {exc}"
            ) from None

    # -- metered endpoints -----------------------------------------------------------------

    async def api(self, request: web.Request) -> web.StreamResponse:
        """Every API path: metered endpoints, the pass-through allow-list, and refusals (recorded)."""
        route = request[routes.ROUTE]
        if route.endpoint is not None:
            return await self.metered(request, route.endpoint)
        if not route.is_api:
            if not route.lacks_v1:
                raise web.HTTPNotFound()
            # POST /chat/completions: a base URL without /v1. Refused with the hint, and recorded.
            return self.refuse(request, routes.unknown(route, request.method))
        if self.passthrough_rules.allows(request.method, route.path):
            return await self.passthrough(request, route)
        return self.refuse(request, routes.unknown(route, request.method))

    def refuse(self, request: web.Request, exc: ProxyError) -> web.Response:
        """Answer a call refused before it is read (bad path, no proxy key): one record, run_id null."""
        route = request.get(routes.ROUTE)
        if route is not None:
            call = Call(route.endpoint, request.method, route.path, self.secrets, request.headers, self.traced)
        else:  # the path itself was refused: record what was asked for, bounded
            call = Call(None, request.method, request.raw_path.partition("?")[0][:200], self.secrets,
                        request.headers, self.traced)  # fmt: skip
        call.status = exc.status
        err = call.fail(exc.category, exc.message)
        self._record(call)
        return errors.render(exc, err.id, call.request_id)

    async def metered(self, request: web.Request, endpoint: routes.Endpoint) -> web.StreamResponse:
        """Forward one LLM call and record exactly one line for it, whatever happens."""
        call = Call(endpoint, request.method, endpoint.path, self.secrets, request.headers, self.traced)
        try:
            return await self._metered(request, call)
        except ProxyError as exc:
            call.status = exc.status
            err = call.fail(exc.category, exc.message)
            resp = errors.render(exc, err.id, call.request_id)
            resp.headers.update(call.extra_headers)
            return resp
        except asyncio.CancelledError:
            if call.delivered:
                raise  # the client had the whole answer and hung up before the body's end: a success
            if call.status == 0:
                call.status = 499  # nginx's "client closed request": no status was ever sent
            call.fail(Category.PROXY_SHUTDOWN if self.shutting_down else Category.CLIENT_ABORTED,
                      "the proxy stopped before the call finished" if self.shutting_down
                      else "the client disconnected before the response was complete")  # fmt: skip
            raise
        except Exception as exc:
            # A bug (ours or a check's) must still leave a record saying so; aiohttp answers the 500.
            call.status = call.status or (exc.status if isinstance(exc, web.HTTPException) else 500)
            call.fail(Category.UNKNOWN, f"internal error: {type(exc).__name__}: {exc}")
            raise
        finally:
            if call.up is not None:
                # Closing (not releasing) an unfinished response drops the connection, which is
                # how an upstream learns to stop generating.
                if call.error is not None and call.error.category in (Category.CLIENT_ABORTED, Category.PROXY_SHUTDOWN):
                    call.up.close()
                else:
                    call.up.release()
            self._record(call)

    async def _metered(self, request: web.Request, call: Call) -> web.StreamResponse:
        """The request path, top to bottom: admit, read, route, check, send, relay."""
        self._admit(request, call)
        body = await read_body(request, self.cfg.max_body_bytes, self.cfg.client_body_timeout_s)
        obj = self._parse(call, body)
        upstream = self.router.pick(call.requested_model or "")
        if upstream is None:
            raise errors.NoRoute(
                f"No upstream serves model {call.requested_model!r}. Routes (upstream: model patterns):"
                f" {self.router.patterns()}",
                param="model", code="model_not_found",
            )  # fmt: skip
        call.upstream = upstream
        call.provider = self.upstreams.provider(upstream, None, None, None)  # configured or learned so far
        for check in self.checks:
            await check(call, request, obj)
        up = call.up = await self._send_call(request, call, upstream, obj, body)
        call.ttfb = perf_counter()
        call.status = up.status
        ctype = up.headers.get("Content-Type", "")
        if up.status < 300 and (ctype.startswith("text/event-stream") or ctype.startswith("application/x-ndjson")):
            return await self._stream(request, call, up)
        return await self._buffered(request, call, up)

    def _admit(self, request: web.Request, call: Call) -> None:
        """Read the run id, task and tags; refuse what cannot be recorded or is not JSON."""
        call.run_id = self._run_id(request)
        headers = request.headers
        call.task = headers.get("X-Task-Name")
        for key, value in headers.items():
            if len(call.tags) < _MAX_TAGS and key.lower().startswith(_TAG_PREFIX) and len(key) > len(_TAG_PREFIX):
                call.tags[key[len(_TAG_PREFIX) :].lower()] = value[:_MAX_TAG_LEN]
        if self.cfg.on_record_failure == "refuse":
            if not self.sink.healthy:
                raise errors.RecordingUnavailable(
                    "metering-proxy cannot write its records (runs dir unwritable); refusing calls until it can."
                )
            if self.sink.run_blocked(call.run_id):
                raise errors.RecordingUnavailable(f"metering-proxy cannot write the records of run {call.run_id!r}"
                                                  " (its run file is a symlink or not a regular file); refusing"
                                                  " its calls.")  # fmt: skip
        ctype = headers.get("Content-Type")
        if ctype is not None and "json" not in ctype.lower():
            raise errors.UnsupportedMediaType(
                f"Content-Type must be application/json (got {ctype[:60]!r}); with curl, add"
                " -H 'Content-Type: application/json'.",
                param="Content-Type",
            )

    @staticmethod
    def _parse(call: Call, body: bytes) -> dict[str, Any]:
        """The request body as a JSON object naming a model; its model and stream flag go on the call."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidJSON(f"The request body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise errors.InvalidJSON("The request body must be a JSON object.")
        call.request_obj = obj
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            raise errors.BadRequest("The request must name a model: 'model' must be a non-empty string.",
                                    param="model", code="missing_model")  # fmt: skip
        call.requested_model = model
        # Ollama's native chat and generate stream unless told not to; every other API only when asked.
        assert call.endpoint is not None
        stream = obj.get("stream", call.endpoint.streams_by_default)
        if not isinstance(stream, bool) and stream is not None:
            raise errors.BadRequest("'stream' must be true or false.", param="stream")
        call.stream = bool(stream)
        return obj

    async def _send_call(self, request: web.Request, call: Call, upstream: Upstream, obj: dict[str, Any],
                         original: bytes) -> aiohttp.ClientResponse:  # fmt: skip
        """Send the call upstream (asking for stream usage where it can) and return once headers are in."""
        body = original
        usage_stream = call.stream and call.meter.dialect in ("chat", "completions")
        if usage_stream:
            body = self._stream_options(call, upstream, obj, original)
        url = self.upstreams.url(upstream, request[routes.ROUTE], request.rel_url.raw_query_string)
        up_headers = self._upstream_headers(request, upstream, call)
        up = await self._send(request.method, url, body, up_headers)
        asked = body is not original or "stream_options" in obj
        if usage_stream and asked and await upstreams.rejects_stream_options(up):
            # Some servers refuse the field outright (Mistral: 422 extra_forbidden); the call must not fail
            # over it. Once per upstream: from now on its streams go without it.
            up.release()
            self.upstreams.learn_refuses_stream_options(upstream, up.status)
            body = self._stream_options(call, upstream, obj, original)
            up = await self._send(request.method, url, body, up_headers)
        return up

    async def _buffered(self, request: web.Request, call: Call, up: aiohttp.ClientResponse) -> web.StreamResponse:
        try:
            body = await up.read()
        except TimeoutError:
            raise errors.UpstreamTimeout("The upstream stopped sending before its response was complete.") from None
        except aiohttp.ClientError as exc:
            raise errors.UpstreamUnreachable(
                f"The upstream closed the connection before its response was complete: {type(exc).__name__}"
            ) from None
        meter = call.meter
        headers = self._client_headers(up, call, call.credentials)
        if up.status >= 400:
            err = call.fail(errors.category_for_status(up.status), upstreams.error_detail(body, up.status))
            headers["X-Meter-Error-Id"] = err.id
            # An upstream that echoes the key the proxy injected must not hand it to a client who never had it.
            body = call.secrets.mask_bytes(body, call.credentials)
        elif up.status >= 300:
            # Never followed (the next host would get our key and the prompt); the client decides.
            try:
                where = URL(up.headers.get("Location", "")).host or "the same host"
            except ValueError:
                where = "an invalid Location"
            headers["X-Meter-Error-Id"] = call.fail(
                Category.UPSTREAM_REDIRECT, f"the upstream answered {up.status} redirecting to {where}; not followed"
            ).id
        elif not body:
            headers["X-Meter-Error-Id"] = call.fail(Category.EMPTY_RESPONSE, "the upstream answered an empty body").id
        elif not meter.read_body(body):
            headers["X-Meter-Error-Id"] = call.fail(
                Category.INVALID_RESPONSE, f"the upstream's {up.status} body is not a JSON object"
            ).id
        resp = web.Response(body=body, status=up.status, headers=headers)
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            call.fail(Category.CLIENT_ABORTED, "the client disconnected before the response was sent")
        return resp

    async def _stream(self, request: web.Request, call: Call, up: aiohttp.ClientResponse) -> web.StreamResponse:
        meter = call.meter
        resp = web.StreamResponse(status=up.status, headers=self._client_headers(up, call, call.credentials))
        content = up.content
        # The read timeout from here on is the watch's: no timer re-armed per chunk (see read_watch.py).
        watched = self.read_watch.watch(up)
        last_read = self.read_watch.last_read
        try:
            await resp.prepare(request)
            while True:
                try:
                    chunk = await content.readany()
                except TimeoutError:
                    call.fail(Category.TIMEOUT, "the upstream stopped sending mid-stream (read timeout)")
                    break
                except aiohttp.ClientError as exc:
                    call.fail(Category.STREAM_INTERRUPTED, f"the upstream stream broke off: {type(exc).__name__}")
                    break
                if not chunk:
                    break
                now = perf_counter()
                if watched:
                    last_read[content] = now
                out = meter.feed(chunk, now)
                if out:
                    # An in-band error may quote the injected key (a secret split across two reads is
                    # not caught: the stream is never held back to look for one). The client's own key
                    # is looked for only in what may be an error event: content chunks are the hot path.
                    await resp.write(call.secrets.mask_bytes(out, call.credentials if b"rror" in out else ()))
                # Clients stop reading at the final event (the sync SDK closes at [DONE]): from here on
                # a hang-up is not an abort.
                call.delivered = meter.done
            tail = meter.finish(perf_counter())
            if tail:
                await resp.write(call.secrets.mask_bytes(tail))
            if call.error is None:
                self._check_stream_end(call)
            if call.error is not None and call.error.category in (Category.TIMEOUT, Category.STREAM_INTERRUPTED):
                message = f"metering-proxy: {call.error.detail} (error id {call.error.id})"
                await resp.write(meter.spec.error_event(call.error.category, message))
            await resp.write_eof()
        except ConnectionError:
            if not call.delivered:
                call.fail(Category.CLIENT_ABORTED, "the client disconnected mid-stream")
        finally:
            if watched:
                self.read_watch.unwatch(up)
        return resp

    def _check_stream_end(self, call: Call) -> None:
        meter = call.meter
        if meter.error_category is not None:
            call.fail(meter.error_category, meter.error_detail or "error event in the stream")
        elif meter.events == 0:
            call.fail(Category.EMPTY_RESPONSE, "the upstream stream ended without any event")
        elif not (meter.done or meter.finish_reason is not None):
            call.fail(Category.STREAM_INTERRUPTED, "the upstream stream ended before its final event")

    # -- record ----------------------------------------------------------------------------

    def _record(self, call: Call) -> None:
        end = perf_counter()
        meter = call.meter
        billed = call.ttfb is not None and call.status < 400
        usage, source = settle(meter.usage(), final=meter.usage_final, output_chars=meter.output_chars,
                               request=call.request_obj, billed=billed, tool_counts=meter.tool_counts)  # fmt: skip
        if call.error is None and meter.error_category is not None:
            call.fail(meter.error_category, meter.error_detail or "error in the response")
        provider = call.provider
        upstream_name = call.upstream.name if call.upstream else None
        if provider is None and call.upstream is not None:
            headers = call.up.headers if call.up is not None else None
            provider = self.upstreams.provider(call.upstream, headers, meter.provider_hint, meter.usage_raw)
        cost = None
        if self.pricebook is not None and source != "none":
            cost = self.pricebook.price(
                usage, model=meter.model, requested_model=call.requested_model, upstream=upstream_name,
                provider=provider, dialect=meter.dialect,
            )  # fmt: skip
        record = to_record(call, end, usage, source, provider, cost)
        raw = record.to_json()
        line = call.secrets.mask_bytes(raw, call.credentials)
        self.sink.write(call.run_id, line)
        if call.error is not None:
            # One line per failed call, so every X-Meter-Error-Id can be found; the detail stays in the
            # record (it may quote the upstream), the log gets only what the proxy itself decided.
            log.warning("call failed: category=%s error_id=%s run_id=%s status=%s upstream=%s request_id=%s",
                        call.error.category, call.error.id, call.run_id, call.status, upstream_name,
                        call.request_id)  # fmt: skip
        if line is not raw:  # a secret was masked (rare): observers get the record the file holds, never more
            try:
                record = records.from_line(line)
            except (ValueError, TypeError, KeyError):
                log.error("record of %s not observed: its masked line does not parse", call.request_id)
                return
        for observe in self.observers:
            try:
                observe(record)
            except Exception:  # an observer's bug must never lose the call or its record
                log.exception("record observer failed")
        if self.spans and call.trace is not None and call.endpoint is not None:
            self._span(call, record, end)

    def _span(self, call: Call, record: Record, end: float) -> None:
        """Hand the record and the call's span facts to the span observers (OTel on only)."""
        assert call.trace is not None and call.endpoint is not None
        start_ns = int(call.ts * 1e9)
        first = call.meter.first_output_at if call.stream else None
        host, port = self.upstreams.address(call.upstream) if call.upstream is not None else (None, None)
        facts = CallFacts(
            trace=call.trace, start_ns=start_ns,
            first_chunk_ns=None if first is None else start_ns + int((first - call.t0) * 1e9),
            end_ns=start_ns + int((end - call.t0) * 1e9), operation=call.endpoint.operation,
            server_address=host, server_port=port, response_id=call.meter.response_id,
        )  # fmt: skip
        for observe in self.spans:
            try:
                observe(record, facts)
            except Exception:  # an exporter's bug must never lose the call or its record
                log.exception("span observer failed")

    # -- everything else under /v1 ---------------------------------------------------------

    async def passthrough(self, request: web.Request, route: routes.Route) -> web.StreamResponse:
        """Forward an allow-listed path unmetered (e.g. GET /v1/models), streaming the answer back."""
        body = await read_body(request, self.cfg.max_body_bytes, self.cfg.client_body_timeout_s)
        model: Any = None
        if route.path.startswith("/v1/models/"):
            model = route.path.removeprefix("/v1/models/")  # GET /v1/models/{id}: ask the model's upstream
        elif body and "json" in request.headers.get("Content-Type", ""):
            try:
                model = orjson.loads(body).get("model")
            except (orjson.JSONDecodeError, AttributeError):
                model = None
        upstream = (self.router.pick(model) if isinstance(model, str) else None) or self.cfg.upstreams[0]
        url = self.upstreams.url(upstream, route, request.rel_url.raw_query_string)
        up = await self._send(request.method, url, body, self._upstream_headers(request, upstream))
        credentials = redact.credentials(request.headers)
        try:
            resp = web.StreamResponse(status=up.status, headers=self._client_headers(up, None, credentials))
            await resp.prepare(request)
            while chunk := await up.content.readany():
                await resp.write(self.secrets.mask_bytes(chunk, credentials))
            await resp.write_eof()
            return resp
        finally:
            up.release()


async def expect_continue(request: web.Request) -> None:
    """Answer ``Expect: 100-continue``; ignore any other expectation so the call still gets its record.

    aiohttp's default answers 417 before the handler runs (no record), and 500 when the value is not UTF-8.
    """
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the start of the response
