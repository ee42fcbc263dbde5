"""GET /metrics: Prometheus metrics named after the OpenTelemetry GenAI conventions, fed by a record observer.

Every app has its own ``CollectorRegistry`` (never the global one), so several apps in one process,
as in the tests, never share or clash over series. The observer runs on the hot path once per
record: it looks up the labelled children for the record's label tuple in a small cache and only
increments and observes them.

With ``serve --workers N`` every worker's values live in prometheus_client's multiprocess files (one
mmap file per worker and metric type in a directory the supervisor made), and a scrape of any worker
merges them all: the host's totals, whichever worker answers.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from proxy.records import JsonlSink, Record
from proxy.routes import ENDPOINTS

# A `*_created` gauge beside every counter and histogram child doubles the series for nothing Prometheus
# needs (process-wide setting; this is the only prometheus_client user in the proxy).
disable_created_metrics()

#: Record endpoint -> gen_ai.operation.name, from the endpoint table.
OPERATIONS: dict[str, str] = {e.path: e.operation for e in ENDPOINTS}
#: Our provider names -> gen_ai.provider.name where the spec has a well-known value; the rest
#: (vllm, ollama, openrouter, ...) keep their own name, as the spec asks for custom systems.
PROVIDER_NAMES: dict[str, str] = {
    "gemini": "gcp.gemini",
    "xai": "x_ai",
    "mistral": "mistral_ai",
    "azure": "azure.ai.openai",
}
UNKNOWN_PROVIDER = "_OTHER"  # the spec's value when no provider applies
OTHER_MODEL = "other"
MAX_MODELS = 200
MAX_LABEL_LEN = 128
_CACHE_MAX = 4096

# OpenTelemetry's recommended ExplicitBucketBoundaries for each GenAI histogram.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ..., 67108864
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

BASE_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "upstream",
)
TOKEN_TYPES = ("input", "cached", "cache_write", "output", "reasoning")


def _observe(histogram: Histogram, value: float) -> None:
    """Histogram.observe for a labelled child and a finite value: its bucket found by bisection.

    prometheus_client's own walks the bounds in Python and checks the child's labels on every call:
    half of this observer's cost with three histograms per record. The result is the same bucket
    (the first bound >= value) and the same sum.
    """
    histogram._sum.inc(value)
    histogram._buckets[bisect_left(histogram._upper_bounds, value)].inc(1)


class _Series:
    """The labelled children one record label tuple updates, resolved once and reused."""

    __slots__ = (
        "base", "requests", "duration", "tokens", "usage_in", "usage_out", "cost", "unpriced", "ttft", "tpot",
    )  # fmt: skip

    def __init__(self, m: Metrics, base: tuple[str, ...], outcome: tuple[str, str, str]) -> None:
        endpoint, status, error_type = outcome
        self.base = base
        self.requests = m.requests.labels(*base, endpoint, status, error_type)
        self.duration = m.duration.labels(*base, error_type)
        self.tokens = tuple(m.tokens.labels(*base, t) for t in TOKEN_TYPES)
        self.usage_in = m.token_usage.labels(*base, "input")
        # Embeddings have no output tokens; an always-empty histogram would only add series.
        self.usage_out = m.token_usage.labels(*base, "output") if base[0] != "embeddings" else None
        self.cost = m.cost.labels(*base)
        self.unpriced = m.unpriced.labels(*base)
        self.ttft: Histogram | None = None  # streams only: created on first use, not for every series
        self.tpot: Histogram | None = None


class SinkCollector:
    """Reports the record sink's health at scrape time."""

    def __init__(self, sink: JsonlSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        """Yield the sink's counters and gauges as they are now."""
        sink = self.sink
        yield CounterMetricFamily(
            "metering_proxy_records_written", "Records appended to run files.", sink.written
        )
        yield CounterMetricFamily(
            "metering_proxy_records_dropped",
            "Records dropped because the runs dir stayed unwritable.",
            sink.dropped,
        )
        # JsonlSink keeps its queue length private; reading it here is cheaper than a lock-step copy.
        yield GaugeMetricFamily(
            "metering_proxy_records_pending", "Records queued, not yet written.", sink.pending
        )
        yield GaugeMetricFamily("metering_proxy_sink_healthy", "1 while records can be written, else 0.",
                                1 if sink.healthy else 0)  # fmt: skip


class SinkMirror:
    """A worker's sink figures copied into the host's metric files, labelled by pid (at each flush and scrape).

    The sink counts in plain attributes that only its own process can read; a scrape answered by another
    worker sees them only through the files. Each worker has its own pid series: summed, they are the host's.
    """

    def __init__(self, sink: JsonlSink) -> None:
        self.sink = sink
        pid = str(os.getpid())
        self.written = Counter("metering_proxy_records_written", "Records appended to run files.", ("pid",),
                               registry=None).labels(pid)  # fmt: skip
        self.dropped = Counter("metering_proxy_records_dropped",
                               "Records dropped because the runs dir stayed unwritable.", ("pid",),
                               registry=None).labels(pid)  # fmt: skip
        # liveall: prometheus_client adds the pid label, and a dead worker's gauges leave with it.
        self.pending = Gauge("metering_proxy_records_pending", "Records queued, not yet written.", registry=None,
                             multiprocess_mode="liveall")  # fmt: skip
        self.healthy = Gauge("metering_proxy_sink_healthy", "1 while records can be written, else 0.",
                             registry=None, multiprocess_mode="liveall")  # fmt: skip
        self._written = self._dropped = 0
        self.update()

    def update(self) -> None:
        """Copy the sink's figures now (a few mmap writes: run once per flush interval, not per record)."""
        sink = self.sink
        if sink.written != self._written:
            self.written.inc(sink.written - self._written)
            self._written = sink.written
        if sink.dropped != self._dropped:
            self.dropped.inc(sink.dropped - self._dropped)
            self._dropped = sink.dropped
        self.pending.set(sink.pending)
        self.healthy.set(1 if sink.healthy else 0)


def use_multiprocess(directory: Path) -> None:
    """Back every metric value this process creates from now on with mmap files in directory.

    prometheus_client picks its value class once, at import, from PROMETHEUS_MULTIPROC_DIR. A worker sets
    both itself, after the fork and before its first metric, so nothing hangs on who imported it first;
    the variable stays set because each new value reads it to name its file.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()


class Metrics:
    """One app's registry, its metrics, the record observer and the /metrics handler.

    multiprocess_dir (each worker of ``serve --workers N``): the values go to the host's shared files,
    and the registry serves their merge; the metrics themselves are in no registry, so that this
    worker's own values are not counted twice.
    """

    def __init__(self, sink: JsonlSink, max_models: int = MAX_MODELS, multiprocess_dir: Path | None = None) -> None:
        self.max_models = max_models
        self.registry = CollectorRegistry()
        self.mirror: SinkMirror | None = None
        if multiprocess_dir is not None:
            use_multiprocess(multiprocess_dir)
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
        reg = self.registry if multiprocess_dir is None else None
        self.requests = Counter(
            "metering_proxy_requests", "Metered calls, by outcome.",
            (*BASE_LABELS, "endpoint", "status", "error_type"), registry=reg,
        )  # fmt: skip
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "Call duration: request received to last byte sent.",
            (*BASE_LABELS, "error_type"), buckets=DURATION_BUCKETS, registry=reg,
        )  # fmt: skip
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Input and output tokens per call.",
            (*BASE_LABELS, "gen_ai_token_type"), buckets=TOKEN_BUCKETS, registry=reg,
        )  # fmt: skip
        self.tokens = Counter(
            "gen_ai_client_tokens", "Tokens by type (cached, cache_write in input; reasoning in output).",
            (*BASE_LABELS, "gen_ai_token_type"), registry=reg,
        )  # fmt: skip
        self.cost = Counter("metering_proxy_cost_usd", "Cost of the calls in USD.", BASE_LABELS, registry=reg)
        self.unpriced = Counter(
            "metering_proxy_unpriced_requests", "Calls with usage but no known price (not in the cost).",
            BASE_LABELS, registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Streams: request received to first output.",
            BASE_LABELS, buckets=TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Streams: (duration - TTFT) / output tokens.",
            BASE_LABELS, buckets=TPOT_BUCKETS, registry=reg,
        )  # fmt: skip
        PlatformCollector(registry=self.registry)  # python_info: the same in every worker
        if reg is not None:
            ProcessCollector(registry=reg)
            GCCollector(registry=reg)
            reg.register(SinkCollector(sink))
        else:
            # One process's CPU, memory and GC figures, served by whichever worker answers, would jump
            # between workers from scrape to scrape: left out, not mislabelled as the host's.
            self.mirror = SinkMirror(sink)
            sink.on_flush.append(self.mirror.update)
        self._models: set[str] = set()
        self._cache: dict[tuple[object, ...], _Series] = {}

    def _model(self, name: str | None) -> str:
        """Return the label for a client-chosen model name, folding new names into 'other' past the cap."""
        if not name:
            return ""
        name = name[:MAX_LABEL_LEN]
        if name in self._models:
            return name
        if len(self._models) >= self.max_models:
            return OTHER_MODEL
        self._models.add(name)
        return name

    def _series(self, key: tuple[object, ...], record: Record, error_type: str) -> _Series:
        provider = record.provider
        base = (
            OPERATIONS.get(record.endpoint, "chat"),
            PROVIDER_NAMES.get(provider, provider) if provider else UNKNOWN_PROVIDER,
            self._model(record.requested_model),
            self._model(record.model or record.requested_model),
            record.upstream or "",
        )
        endpoint = record.endpoint if record.endpoint in OPERATIONS else "other"
        series = _Series(self, base, (endpoint, str(record.status), error_type))
        if len(self._cache) >= _CACHE_MAX:
            # Only client-chosen model names past the cap can grow this; starting over keeps it bounded.
            self._cache.clear()
        self._cache[key] = series
        return series

    def observe(self, record: Record) -> None:
        """Count one record (a Forwarder observer: O(1), no I/O)."""
        err = record.error
        error_type = err.category if err is not None else ("" if record.success else "unknown")
        key = (record.endpoint, record.upstream, record.provider, record.requested_model, record.model,
               record.status, error_type)  # fmt: skip
        s = self._cache.get(key) or self._series(key, record, error_type)
        s.requests.inc()
        _observe(s.duration, record.duration_ms / 1000)
        if record.usage_source != "none":
            counts = (
                record.input_tokens,
                record.cached_input_tokens,
                record.cache_write_tokens,
                record.output_tokens,
                record.reasoning_tokens,
            )
            for child, n in zip(s.tokens, counts, strict=True):
                if n > 0:
                    child.inc(n)
            _observe(s.usage_in, record.input_tokens)
            if s.usage_out is not None:
                _observe(s.usage_out, record.output_tokens)
            if record.cost_usd is None:
                s.unpriced.inc()
            elif record.cost_usd > 0:
                s.cost.inc(record.cost_usd)
        ttft_ms = record.ttft_ms
        if ttft_ms is None or not record.success:
            return
        if s.ttft is None:
            s.ttft = self.ttft.labels(*s.base)
        _observe(s.ttft, ttft_ms / 1000)
        window_ms = record.duration_ms - ttft_ms
        # Same rule as the record's tokens_per_second: under 1 ms of generation the rate means nothing.
        if record.output_tokens > 0 and window_ms >= 1:
            if s.tpot is None:
                s.tpot = self.tpot.labels(*s.base)
            _observe(s.tpot, window_ms / 1000 / record.output_tokens)

    async def handle(self, request: web.Request) -> web.Response:
        """Serve the registry in Prometheus text format (rendered off the event loop)."""
        if self.mirror is not None:
            self.mirror.update()  # this worker's sink figures as of now, not of its last flush
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
