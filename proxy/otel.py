"""OpenTelemetry export (the otel extra): one span per call, the GenAI client metrics, optionally each record
as a log record, all over OTLP/HTTP, batched in worker threads.

Imported only when ``otel.enabled`` is set, so the default install never loads the SDK. The request path
only calls ``OtelExporter.observe`` once per record, on the loop: it builds the span and records the
metrics in memory (microseconds, no I/O). Export runs in threads; a collector that is down or hangs costs
at most ``export_timeout_s`` per batch there, while the bounded queues fill and then drop (counted, shown
in /healthz and /metrics). Names follow the GenAI semantic conventions (see README, "OpenTelemetry").
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import orjson
from opentelemetry import trace as trace_api
from opentelemetry._logs import LogRecord
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy import __version__
from proxy.config import Otel, redact_url
from proxy.records import Record
from proxy.tracecontext import CallFacts, TraceContext

log = logging.getLogger("metering_proxy.otel")

T = TypeVar("T")

#: Our provider names -> gen_ai.provider.name where the spec has a well-known value (as /metrics maps them).
PROVIDER_NAMES = {"gemini": "gcp.gemini", "xai": "x_ai", "mistral": "mistral_ai", "azure": "azure.ai.openai"}
UNKNOWN_PROVIDER = "_OTHER"
MAX_MODELS = 200  # distinct model names in metric attributes; the rest are "other" (spans keep the real name)
FIRST_TOKEN_EVENT = "metering_proxy.first_token"
RECORD_EVENT = "metering_proxy.record"
# The conventions' recommended ExplicitBucketBoundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))
TTFC_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_BATCH = 512
_DELAY_S = 1.0
_BUILD_DELAY_S = 0.05  # a call's span is built within this; the export batches wait _DELAY_S


class Batcher(Generic[T]):
    """A bounded queue drained by one daemon thread that hands batches to an export function.

    put() runs on the event loop and never blocks: past max_queue the item is dropped and counted. Each
    counter is written by one thread only (dropped by the loop, the rest by the worker).
    """

    def __init__(self, name: str, export: Callable[[list[T]], bool], max_queue: int,
                 delay_s: float = _DELAY_S) -> None:  # fmt: skip
        self.name = name
        self.export = export
        self.max_queue = max_queue
        self.delay_s = delay_s
        self.exported = 0
        self.failed = 0
        """Items whose export failed (collector down, refused, timed out): lost, like dropped ones."""
        self.dropped = 0
        """Items refused because the queue was full."""
        self.healthy = True
        self.last_error: str | None = None
        self._queue: collections.deque[T] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"otel-{name}", daemon=True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: T) -> None:
        """Queue one item for export; drop it (counted) when the queue is full."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("otel: %s export queue full; %d dropped so far", self.name, self.dropped)
            return
        self._queue.append(item)
        if len(self._queue) >= _BATCH:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        while self._queue and not (self._stop and not self.healthy):
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            try:
                ok = self.export(batch)
                error = None if ok else "the collector refused or did not answer the export"
            except Exception as exc:  # an exporter bug must not kill the thread
                ok, error = False, f"{type(exc).__name__}: {exc}"
            if ok:
                self.exported += len(batch)
            else:
                self.failed += len(batch)
                if self.healthy or error != self.last_error:
                    log.warning("otel: %s export failed (%s); %d lost so far", self.name, error, self.failed)
            self.healthy, self.last_error = ok, error

    def close(self, timeout: float) -> None:
        """Export what is queued (unless the collector is failing) and stop, waiting at most timeout."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._drain()  # what was put after the worker's last drain


class _Ids(IdGenerator):
    """Hands the SDK the ids the proxy chose before the call was sent (its traceparent named them).

    Set just before the span is started, on the calls thread, which is the only thread that starts spans.
    """

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


class _ToBatcher(SpanProcessor):
    """The span processor: ended spans go to the batcher, nothing else."""

    def __init__(self, batcher: Batcher[ReadableSpan]) -> None:
        self.batcher = batcher

    def on_end(self, span: ReadableSpan) -> None:
        self.batcher.put(span)


class _CountingMetricExporter(OTLPMetricExporter):
    """The OTLP metric exporter, counting failed exports for /healthz and /metrics."""

    failed = 0
    exported = 0
    last_error: str | None = None

    def export(self, metrics_data: MetricsData, timeout_millis: float | None = 10_000,
               **kwargs: Any) -> MetricExportResult:  # fmt: skip
        try:
            result = super().export(metrics_data, timeout_millis, **kwargs)
        except Exception as exc:
            self.failed += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self.exported += 1
            self.last_error = None
        else:
            self.failed += 1
            self.last_error = "the collector refused or did not answer the export"
        return result


def _signal_url(cfg: Otel, path: str) -> str | None:
    # None lets the SDK resolve OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_,LOGS_}ENDPOINT (default localhost:4318).
    return f"{cfg.endpoint}{path}" if cfg.endpoint else None


def resource(cfg: Otel) -> Resource:
    """service.name and friends: the config's, else OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (read by the SDK)."""
    attrs: dict[str, Any] = {"service.version": __version__}
    if cfg.service_name:
        attrs["service.name"] = cfg.service_name
    res = Resource.create(attrs)
    if str(res.attributes.get("service.name", "")).startswith("unknown_service"):
        res = res.merge(Resource({"service.name": "metering-proxy"}))
    return res


def _provider(name: str | None) -> str:
    return PROVIDER_NAMES.get(name, name) if name else UNKNOWN_PROVIDER


def _log_value(value: Any) -> Any:
    """A JSON value as an OTLP AnyValue: nulls dropped (AnyValue has none)."""
    if isinstance(value, dict):
        return {k: _log_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_log_value(v) for v in value if v is not None]
    return value


class OtelExporter:
    """Spans, GenAI metrics and record logs for one app; observe() is its span observer."""

    def __init__(self, cfg: Otel) -> None:
        self.cfg = cfg
        self.resource = resource(cfg)
        headers = dict(cfg.headers) or None
        timeout = cfg.export_timeout_s
        self._ids = _Ids()
        self.span_exporter = OTLPSpanExporter(endpoint=_signal_url(cfg, "/v1/traces"), headers=headers,
                                              timeout=timeout)  # fmt: skip
        self.spans: Batcher[ReadableSpan] = Batcher("spans", self._export_spans, cfg.queue_size)
        self.calls: Batcher[tuple[Record, CallFacts]] = Batcher("calls", self._build, cfg.queue_size, _BUILD_DELAY_S)
        """Finished calls waiting to become spans, metrics and logs (the only thread that starts spans)."""
        # Never the global providers: several apps (the tests) each have their own.
        self.tracer_provider = TracerProvider(resource=self.resource, id_generator=self._ids,
                                              sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)  # fmt: skip
        self.tracer_provider.add_span_processor(_ToBatcher(self.spans))
        self.tracer = self.tracer_provider.get_tracer("metering-proxy", __version__)
        self.metric_exporter = _CountingMetricExporter(endpoint=_signal_url(cfg, "/v1/metrics"), headers=headers,
                                                       timeout=timeout)  # fmt: skip
        self.meter_provider: MeterProvider | None = None
        self.logs: Batcher[ReadableLogRecord] | None = None
        self.log_exporter: OTLPLogExporter | None = None
        if cfg.logs:
            self.log_exporter = OTLPLogExporter(endpoint=_signal_url(cfg, "/v1/logs"), headers=headers,
                                                timeout=timeout)  # fmt: skip
            self.logs = Batcher("logs", self._export_logs, cfg.queue_size)
        self._scope = InstrumentationScope("metering-proxy", __version__)
        self._models: set[str] = set()

    # -- lifetime (on the loop, at start-up and shutdown) ------------------------------------

    def start(self) -> None:
        """Start the export threads and the metrics reader."""
        reader = PeriodicExportingMetricReader(self.metric_exporter,
                                               export_interval_millis=self.cfg.metrics_interval_s * 1000,
                                               export_timeout_millis=self.cfg.export_timeout_s * 1000)  # fmt: skip
        self.meter_provider = mp = MeterProvider(resource=self.resource, metric_readers=[reader],
                                                 shutdown_on_exit=False)  # fmt: skip
        meter = mp.get_meter("metering-proxy", __version__)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)  # fmt: skip
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)  # fmt: skip
        self.ttfc = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=TTFC_BUCKETS)  # fmt: skip
        self.cost = meter.create_counter("metering_proxy.client.cost", unit="USD",
                                         description="What the calls cost, as priced by the proxy.")  # fmt: skip
        self.spans.start()
        if self.logs is not None:
            self.logs.start()
        self.calls.start()

    async def close(self) -> None:
        """Export what is queued and stop; bounded, so a collector that hangs cannot hold up shutdown."""
        budget = self.cfg.export_timeout_s + 1

        def stop() -> None:
            self.calls.close(budget)  # first: what it builds goes to the other queues
            self.spans.close(budget)
            if self.logs is not None:
                self.logs.close(budget)
            if self.meter_provider is not None:
                self.meter_provider.shutdown(timeout_millis=budget * 1000)
            self.tracer_provider.shutdown()

        # A daemon thread, not the loop's executor: the interpreter never waits for it at exit.
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                stop()
            finally:
                loop.call_soon_threadsafe(finished)

        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, budget * 2)
        except TimeoutError:
            log.warning("otel: export did not finish within %.0f s at shutdown; the rest is dropped", budget * 2)

    # -- export (worker threads) --------------------------------------------------------------

    def _export_spans(self, batch: list[ReadableSpan]) -> bool:
        return self.span_exporter.export(batch) is SpanExportResult.SUCCESS

    def _export_logs(self, batch: list[ReadableLogRecord]) -> bool:
        assert self.log_exporter is not None
        return self.log_exporter.export(batch) is LogRecordExportResult.SUCCESS

    # -- the request path (the loop) --------------------------------------------------------

    def observe(self, record: Record, facts: CallFacts) -> None:
        """Queue one finished call: its span, metrics and log are built by the calls thread, off the loop.

        Building them in the SDK took about 0.2 ms of the loop's time per call; queuing takes a deque append.
        """
        self.calls.put((record, facts))

    def _build(self, batch: list[tuple[Record, CallFacts]]) -> bool:
        for record, facts in batch:
            self._build_one(record, facts)
            # Hand the GIL back after each call: else the loop, waking with work, could wait out the whole
            # switch interval (5 ms) behind this thread, which would cost the p99 more than building inline.
            time.sleep(0)
        return True

    def _build_one(self, record: Record, facts: CallFacts) -> None:
        provider = _provider(record.provider)
        if facts.trace.sampled:
            self._span(record, facts, provider)
        if self.meter_provider is not None:
            self._metrics(record, facts, provider)
        if self.logs is not None:
            self._log(record, facts)

    def _span(self, record: Record, facts: CallFacts, provider: str) -> None:
        trace = facts.trace
        assert trace.span_id is not None
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": facts.operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.stream": record.stream,
            "http.response.status_code": record.status,
            "metering_proxy.request_id": record.request_id,
            "metering_proxy.usage_source": record.usage_source,
        }
        optional: dict[str, Any] = {
            "gen_ai.request.model": record.requested_model,
            "gen_ai.response.model": record.model,
            "gen_ai.response.id": facts.response_id,
            "server.address": facts.server_address,
            "server.port": facts.server_port,
            "metering_proxy.run_id": record.run_id,
            "metering_proxy.task": record.task,
            "metering_proxy.upstream": record.upstream,
            "metering_proxy.cost_usd": record.cost_usd,
            "metering_proxy.cost_source": record.cost_source,
            "metering_proxy.upstream_request_id": record.upstream_request_id,
        }
        attrs.update((k, v) for k, v in optional.items() if v is not None)
        if record.finish_reason is not None:
            attrs["gen_ai.response.finish_reasons"] = (record.finish_reason,)
        if record.ttft_ms is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = record.ttft_ms / 1000
        if record.usage_source != "none":
            attrs["gen_ai.usage.input_tokens"] = record.input_tokens
            attrs["gen_ai.usage.output_tokens"] = record.output_tokens
            attrs["gen_ai.usage.cache_read.input_tokens"] = record.cached_input_tokens
            attrs["gen_ai.usage.cache_creation.input_tokens"] = record.cache_write_tokens
            attrs["gen_ai.usage.reasoning.output_tokens"] = record.reasoning_tokens
        for key, value in record.tags.items():
            attrs[f"metering_proxy.tag.{key}"] = value
        if record.error is not None:
            attrs["error.type"] = str(record.error.category)
        self._ids.trace_id, self._ids.span_id = int(trace.trace_id, 16), int(trace.span_id, 16)
        span = self.tracer.start_span(
            f"{facts.operation} {record.requested_model}" if record.requested_model else facts.operation,
            context=_parent_context(trace), kind=SpanKind.CLIENT, attributes=attrs, start_time=facts.start_ns,
            record_exception=False, set_status_on_exception=False,
        )  # fmt: skip
        if facts.first_chunk_ns is not None:
            span.add_event(FIRST_TOKEN_EVENT, timestamp=facts.first_chunk_ns)
        if record.error is not None:
            # The category only: the error's detail may quote the upstream, and spans never carry text.
            span.set_status(Status(StatusCode.ERROR, str(record.error.category)))
        span.end(end_time=facts.end_ns)

    def _model(self, model: str | None) -> str | None:
        if model is None or model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model

    def _metrics(self, record: Record, facts: CallFacts, provider: str) -> None:
        base: dict[str, Any] = {"gen_ai.operation.name": facts.operation, "gen_ai.provider.name": provider}
        for key, value in (("gen_ai.request.model", self._model(record.requested_model)),
                           ("gen_ai.response.model", self._model(record.model)),
                           ("server.address", facts.server_address), ("server.port", facts.server_port)):
            if value is not None:
                base[key] = value
        timed = dict(base, **{"error.type": str(record.error.category)}) if record.error is not None else base
        self.duration.record(record.duration_ms / 1000, timed)
        if record.ttft_ms is not None:
            self.ttfc.record(record.ttft_ms / 1000, timed)
        if record.usage_source != "none":
            self.token_usage.record(record.input_tokens, dict(base, **{"gen_ai.token.type": "input"}))
            if facts.operation != "embeddings":
                self.token_usage.record(record.output_tokens, dict(base, **{"gen_ai.token.type": "output"}))
        if record.cost_usd:
            self.cost.add(record.cost_usd, base)

    def _log(self, record: Record, facts: CallFacts) -> None:
        assert self.logs is not None
        trace = facts.trace
        context = None
        if trace.span_id is not None:
            own = SpanContext(int(trace.trace_id, 16), int(trace.span_id, 16), is_remote=False,
                              trace_flags=TraceFlags(TraceFlags.SAMPLED if trace.sampled else 0))  # fmt: skip
            context = trace_api.set_span_in_context(NonRecordingSpan(own), Context())
        body = _log_value(orjson.loads(record.to_json()))
        entry = LogRecord(timestamp=facts.end_ns, observed_timestamp=facts.end_ns, context=context, body=body,
                          event_name=RECORD_EVENT, attributes={"metering_proxy.request_id": record.request_id})
        self.logs.put(ReadableLogRecord(entry, self.resource, self._scope))

    # -- health ------------------------------------------------------------------------------

    def _batchers(self) -> Sequence[Batcher[Any]]:
        return (self.calls, self.spans) if self.logs is None else (self.calls, self.spans, self.logs)

    @property
    def healthy(self) -> bool:
        """Whether the last export of every signal succeeded."""
        return all(b.healthy for b in self._batchers()) and self.metric_exporter.last_error is None

    def health(self) -> dict[str, Any]:
        """The /healthz view: the collector's state and what was lost. A failing collector never fails /healthz."""
        out: dict[str, Any] = {
            "status": "ok" if self.healthy else "degraded",
            "endpoint": redact_url(self.cfg.endpoint) if self.cfg.endpoint else "OTEL_EXPORTER_OTLP_ENDPOINT",
        }
        for b in self._batchers():
            out[b.name] = {"exported": b.exported, "queued": b.queued, "dropped": b.dropped, "failed": b.failed,
                           "error": b.last_error}  # fmt: skip
        out["metrics"] = {"exports": self.metric_exporter.exported, "failed": self.metric_exporter.failed,
                          "error": self.metric_exporter.last_error}  # fmt: skip
        return out

    def collect(self) -> Iterator[Metric]:
        """The exporter's own counters for /metrics (a prometheus_client collector)."""
        exported = CounterMetricFamily("metering_proxy_otel_exported", "Spans and log records exported over OTLP.",
                                       labels=["signal"])  # fmt: skip
        lost = CounterMetricFamily("metering_proxy_otel_dropped",
                                   "Spans and log records lost: queue_full (never queued) or export_failed.",
                                   labels=["signal", "reason"])  # fmt: skip
        queued = GaugeMetricFamily("metering_proxy_otel_queued", "Spans and log records waiting for export.",
                                   labels=["signal"])  # fmt: skip
        for b in self._batchers():
            exported.add_metric([b.name], b.exported)
            lost.add_metric([b.name, "queue_full"], b.dropped)
            lost.add_metric([b.name, "export_failed"], b.failed)
            queued.add_metric([b.name], b.queued)
        yield exported
        yield lost
        yield queued
        yield CounterMetricFamily("metering_proxy_otel_metric_exports_failed",
                                  "OTLP metric exports that failed.", self.metric_exporter.failed)  # fmt: skip
        yield GaugeMetricFamily("metering_proxy_otel_healthy", "1 while the last OTLP export of each signal worked.",
                                1 if self.healthy else 0)  # fmt: skip


def _parent_context(trace: TraceContext) -> Context:
    """The client's span as the parent (remote), or an empty context: the span is a new trace's root."""
    if trace.parent is None:
        return Context()
    p = trace.parent
    state = TraceState.from_header([trace.tracestate]) if trace.tracestate else None
    parent = SpanContext(int(p.trace_id, 16), int(p.span_id, 16), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED if p.sampled else 0), trace_state=state)  # fmt: skip
    return trace_api.set_span_in_context(NonRecordingSpan(parent), Context())
