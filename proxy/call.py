"""One call in flight, and the record it becomes: what the handler observed, mapped onto a Record.

Nothing here talks to the network: forward.py fills a Call as the call goes, and to_record turns it,
with its settled usage, provider and cost, into the one JSON line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from time import perf_counter
from typing import TYPE_CHECKING, Any

from proxy import errors, redact, routes, tracecontext
from proxy.config import Upstream
from proxy.meter import Meter
from proxy.records import ErrorInfo, Record, cost_fields, usage_fields
from proxy.usage import Usage, bounded_raw

if TYPE_CHECKING:
    import aiohttp

    from proxy.pricing import Cost


class Call:
    """What is known about one call while it is in flight."""

    __slots__ = (
        "t0", "ts", "request_id", "run_id", "task", "tags", "endpoint", "path", "method", "upstream", "provider",
        "requested_model", "stream", "status", "meter", "ttfb", "error", "injected", "upstream_request_id",
        "request_obj", "up", "extra_headers", "delivered", "secrets", "credentials", "request_headers", "trace",
    )  # fmt: skip

    def __init__(self, endpoint: routes.Endpoint | None, method: str, path: str, secrets: redact.Secrets,
                 request_headers: Mapping[str, str], traced: bool = False) -> None:  # fmt: skip
        self.t0 = perf_counter()
        self.ts = time.time()
        self.request_id = "req_" + os.urandom(12).hex()
        self.run_id: str | None = None
        self.task: str | None = None
        self.tags: dict[str, str] = {}
        self.endpoint = endpoint
        self.path = path
        """The canonical path: the endpoint's, or what a refused request asked for."""
        self.method = method
        self.upstream: Upstream | None = None
        self.provider: str | None = None
        self.requested_model: str | None = None
        self.stream = False
        self.status = 0
        self.meter = Meter(endpoint.dialect if endpoint else "chat")
        self.ttfb: float | None = None
        self.error: ErrorInfo | None = None
        self.injected = False
        self.upstream_request_id: str | None = None
        self.request_obj: dict[str, Any] | None = None
        self.up: aiohttp.ClientResponse | None = None
        self.extra_headers: dict[str, str] = {}
        """Headers a pre-forward check wants on the client's response (e.g. budget spend)."""
        self.delivered = False
        """The stream's final event reached the client: a hang-up after it loses nothing."""
        self.secrets = secrets
        """The proxy's secrets: masked in all this call sends out."""
        self.credentials = redact.credentials(request_headers)
        """This client's own credentials: masked in its record and in error answers."""
        self.request_headers = request_headers
        # With OTel off only a traceparent the client sent is read (its trace id goes in the record); on,
        # the proxy's own span id is made now: the traceparent sent upstream names it.
        self.trace = tracecontext.begin(request_headers) if traced else tracecontext.incoming(request_headers)
        """The call's W3C trace: the client's, the proxy's span in it, or None (OTel off, no traceparent)."""

    def fail(self, category: errors.Category, detail: str) -> ErrorInfo:
        """Mark the call failed (first failure wins) and return its error.

        The detail may quote the upstream, which may quote the request or a key: secrets are masked by
        value, the text is cut where it starts echoing the request, key-shaped strings are masked.
        """
        if self.error is None:
            needles = redact.request_text(self.request_headers, self.request_obj)
            detail = redact.cut_echo(self.secrets.mask(detail, self.credentials), needles)
            self.error = ErrorInfo(category=category, id=errors.new_error_id(), detail=errors.scrub(detail))
        return self.error


_ISO_SECOND: list[Any] = [-1, ""]  # the last whole second formatted: calls mostly share it


def _iso(ts: float) -> str:
    """Return ts as UTC ISO 8601 with milliseconds; strftime runs once per second, not per call."""
    sec = int(ts)
    micros = round((ts - sec) * 1e6)  # as datetime rounds, so both agree to the millisecond
    if micros >= 1_000_000:
        sec, micros = sec + 1, micros - 1_000_000
    if sec != _ISO_SECOND[0]:
        _ISO_SECOND[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _ISO_SECOND[0] = sec
    return f"{_ISO_SECOND[1]}.{micros // 1000:03d}Z"


def _ms(start: float, end: float | None) -> float | None:
    return None if end is None else round((end - start) * 1000, 3)


def to_record(call: Call, end: float, usage: Usage, source: str, provider: str | None, cost: Cost | None) -> Record:
    """The record of a finished call (end: its perf_counter time)."""
    meter = call.meter
    duration = (end - call.t0) * 1000
    ttft = _ms(call.t0, meter.first_output_at) if call.stream else None
    window = duration - ttft if ttft is not None else duration
    # Under 1 ms of generation time the rate says nothing but "the upstream sent it all at once".
    tps = round(usage.output_tokens / (window / 1000), 3) if usage.output_tokens and window >= 1 else None
    return Record(
        ts=_iso(call.ts),
        run_id=call.run_id,
        request_id=call.request_id,
        trace_id=call.trace.trace_id if call.trace is not None else None,
        task=call.task,
        tags=call.tags,
        endpoint=call.path,
        method=call.method,
        upstream=call.upstream.name if call.upstream else None,
        provider=provider,
        requested_model=call.requested_model,
        model=meter.model,
        stream=call.stream,
        status=call.status,
        success=call.error is None and 0 < call.status < 400,
        finish_reason=meter.finish_reason,
        stream_usage_injected=call.injected,
        ttfb_ms=_ms(call.t0, call.ttfb),
        ttft_ms=ttft,
        duration_ms=round(duration, 3),
        tokens_per_second=tps,
        server_timing=meter.server_timing,
        upstream_request_id=call.upstream_request_id,
        error=call.error,
        **usage_fields(usage, source, bounded_raw(meter.usage_raw)),
        **cost_fields(cost),
    )
