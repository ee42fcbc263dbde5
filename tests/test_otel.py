"""OpenTelemetry export against a real OTLP/HTTP receiver: spans, parent/child links, metrics, logs, and a
collector that is down or hangs (calls and records unaffected, losses counted)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.config import Otel
from proxy.pricing import BUNDLED_PRICES, PriceBook
from tests.conftest import FakeUpstream, ProxyFactory, ProxyUnderTest, health, make_client
from tests.helpers import MSG, serve, wait_lines

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
PROMPT = "Say hello to the tests."  # MSG's text: must appear in no export


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Receiver:
    """A real OTLP/HTTP collector on 127.0.0.1 that decodes what it gets with opentelemetry-proto."""

    mode: str = "ok"
    """ok, or hang: accept the export and never answer (until the test ends)."""
    spans: list[Span] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, list[Any]] = field(default_factory=dict)
    logs: list[Any] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    requests: int = 0
    got: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.mode == "hang":
            await self.release.wait()
            return web.Response(status=503)
        assert request.headers["Content-Type"] == "application/x-protobuf"
        self.raw.append(body)
        self.headers.append(dict(request.headers))
        if request.path == "/v1/traces":
            req = ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                self.resources.append(_attrs(rs.resource.attributes))
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
        elif request.path == "/v1/metrics":
            mreq = ExportMetricsServiceRequest.FromString(body)
            for rm in mreq.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        self.metrics.setdefault(m.name, []).append(m)
        elif request.path == "/v1/logs":
            lreq = ExportLogsServiceRequest.FromString(body)
            for rl in lreq.resource_logs:
                for sl in rl.scope_logs:
                    self.logs.extend(sl.log_records)
        self.got.set()
        return web.Response(status=200, content_type="application/x-protobuf")

    async def wait(self, what: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until count spans (or logs, or one metric named what) arrived."""
        deadline = time.monotonic() + timeout
        while True:
            have = len(self.spans) if what == "spans" else len(self.logs) if what == "logs" else (
                1 if what in self.metrics else 0)  # fmt: skip
            if have >= count:
                return
            assert time.monotonic() < deadline, f"{what}: {have} of {count} arrived"
            self.got.clear()
            try:
                await asyncio.wait_for(self.got.wait(), 0.2)
            except TimeoutError:
                pass


async def _receiver(mode: str = "ok") -> Receiver:
    rec = Receiver(mode=mode)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/{signal}", rec.handle)
    rec.server = TestServer(app, host="127.0.0.1")
    await rec.server.start_server()
    return rec


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = await _receiver()
    yield rec
    rec.release.set()
    assert rec.server is not None
    await rec.server.close()


@pytest.fixture
async def hanging() -> AsyncIterator[Receiver]:
    rec = await _receiver("hang")
    yield rec
    rec.release.set()
    assert rec.server is not None
    await rec.server.close()


def _otel(endpoint: str, **kw: Any) -> Otel:
    kw.setdefault("metrics_interval_s", 0.2)
    kw.setdefault("export_timeout_s", 2.0)
    return Otel(enabled=True, endpoint=endpoint, service_name="proxy-under-test", **kw)


async def _traced(make_proxy: ProxyFactory, endpoint: str, **kw: Any) -> ProxyUnderTest:
    return await make_proxy(otel=_otel(endpoint, **kw), pricebook=PriceBook.load(BUNDLED_PRICES))


def _hex(b: bytes) -> str:
    return b.hex()


# -- spans ---------------------------------------------------------------------------------------


async def test_span_is_the_clients_child_and_upstream_gets_the_proxys_traceparent(
    make_proxy: ProxyFactory, receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    proxy = await _traced(make_proxy, receiver.endpoint)
    client = make_client(proxy, run_id="otel-run", headers={"traceparent": TRACEPARENT, "tracestate": "k=v",
                                                            "X-Task-Name": "t1", "X-Meter-Tag-Team": "ml"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await receiver.wait("spans")
    (span,) = receiver.spans
    assert _hex(span.trace_id) == CLIENT_TRACE
    assert _hex(span.parent_span_id) == CLIENT_SPAN
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.name == "chat gpt-4o-mini"
    # The upstream was sent the proxy's traceparent, naming this span; the client's tracestate went on.
    sent = fake_upstream.requests[-1]["headers"]
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{_hex(span.span_id)}-01"
    assert sent["tracestate"] == "k=v"
    (rec,) = await proxy.records("otel-run")
    assert rec["trace_id"] == CLIENT_TRACE
    a = _attrs(span.attributes)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "_OTHER"  # a loopback fake: no provider known
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.input_tokens"] == 11 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.usage.cache_read.input_tokens"] == 0
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 0
    assert a["gen_ai.usage.reasoning.output_tokens"] == 0
    assert a["gen_ai.response.id"] == "chatcmpl-fake"
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.stream"] is False
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == fake_upstream.server.port  # type: ignore[union-attr]
    assert a["metering_proxy.run_id"] == "otel-run" and a["metering_proxy.task"] == "t1"
    assert a["metering_proxy.tag.team"] == "ml"
    assert a["metering_proxy.usage_source"] == "upstream"
    assert a["metering_proxy.request_id"] == rec["request_id"]
    assert a["metering_proxy.cost_usd"] == pytest.approx(rec["cost_usd"]) and rec["cost_usd"] > 0
    assert "error.type" not in a
    assert span.end_time_unix_nano - span.start_time_unix_nano == pytest.approx(rec["duration_ms"] * 1e6, rel=0.05)
    assert receiver.resources[0]["service.name"] == "proxy-under-test"
    assert all(PROMPT.encode() not in raw for raw in receiver.raw)


async def test_stream_span_has_first_token_event_and_time_to_first_chunk(
    make_proxy: ProxyFactory, receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    proxy = await _traced(make_proxy, receiver.endpoint)
    client = make_client(proxy, run_id="s", headers={"X-Fake-Delay": "0.02"})
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    async for _ in stream:
        pass
    await receiver.wait("spans")
    (span,) = receiver.spans
    (rec,) = await proxy.wait_records("s", 1)
    # No traceparent from the client: the proxy's span is the root of a new trace, the record names it.
    assert span.parent_span_id == b""
    assert _hex(span.trace_id) == rec["trace_id"]
    assert fake_upstream.requests[-1]["headers"]["traceparent"] == f"00-{rec['trace_id']}-{_hex(span.span_id)}-01"
    a = _attrs(span.attributes)
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.time_to_first_chunk"] == pytest.approx(rec["ttft_ms"] / 1000)
    (event,) = span.events
    assert event.name == "metering_proxy.first_token"
    assert event.time_unix_nano - span.start_time_unix_nano == pytest.approx(rec["ttft_ms"] * 1e6, abs=2e6)


async def test_failed_call_span_has_error_type_and_status(make_proxy: ProxyFactory, receiver: Receiver) -> None:
    proxy = await _traced(make_proxy, receiver.endpoint)
    client = make_client(proxy, run_id="e", headers={"X-Fake": "status:503"})
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await receiver.wait("spans")
    (span,) = receiver.spans
    (rec,) = await proxy.records("e")
    a = _attrs(span.attributes)
    assert a["error.type"] == rec["error"]["category"]
    assert a["http.response.status_code"] == 503
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert span.status.message == rec["error"]["category"]  # the category, never the upstream's text


async def test_unsampled_parent_gets_no_span_but_keeps_its_flag_upstream(
    make_proxy: ProxyFactory, receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    proxy = await _traced(make_proxy, receiver.endpoint)
    unsampled = make_client(proxy, run_id="u", headers={"traceparent": TRACEPARENT[:-2] + "00"})
    await unsampled.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    sent = fake_upstream.requests[-1]["headers"]["traceparent"]
    assert sent.startswith(f"00-{CLIENT_TRACE}-") and sent.endswith("-00") and CLIENT_SPAN not in sent
    sampled = make_client(proxy, run_id="u")
    await sampled.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await receiver.wait("spans")
    recs = await proxy.records("u")
    assert [r["trace_id"] for r in recs][0] == CLIENT_TRACE
    # Spans are exported in order: the one that came is the second call's; the first had none.
    assert [_hex(s.trace_id) for s in receiver.spans] == [recs[1]["trace_id"]]


# -- metrics and logs ----------------------------------------------------------------------------


async def test_genai_metrics_and_cost_reach_the_collector(make_proxy: ProxyFactory, receiver: Receiver) -> None:
    proxy = await _traced(make_proxy, receiver.endpoint)
    client = make_client(proxy, run_id="m")
    await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    async for _ in stream:
        pass
    await proxy.wait_records("m", 2)
    for name in ("gen_ai.client.token.usage", "gen_ai.client.operation.duration",
                 "gen_ai.client.operation.time_to_first_chunk", "metering_proxy.client.cost"):  # fmt: skip
        await receiver.wait(name)
    # Cumulative: the last export holds every call so far (exports keep coming while the test waits).
    deadline = time.monotonic() + 10
    while True:
        usage = receiver.metrics["gen_ai.client.token.usage"][-1]
        points = {_attrs(p.attributes)["gen_ai.token.type"]: p for p in usage.histogram.data_points}
        if sum(p.count for p in points.values()) == 4:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert usage.unit == "{token}"
    assert points["input"].sum == 22 and points["output"].sum == 6
    attrs = _attrs(points["input"].attributes)
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert list(points["input"].explicit_bounds)[:3] == [1.0, 4.0, 16.0]
    duration = receiver.metrics["gen_ai.client.operation.duration"][-1]
    assert duration.unit == "s" and sum(p.count for p in duration.histogram.data_points) == 2
    ttfc = receiver.metrics["gen_ai.client.operation.time_to_first_chunk"][-1]
    assert sum(p.count for p in ttfc.histogram.data_points) == 1  # the stream only
    cost = receiver.metrics["metering_proxy.client.cost"][-1]
    recs = await proxy.records("m")
    assert cost.sum.data_points[0].as_double == pytest.approx(sum(r["cost_usd"] for r in recs))


async def test_each_record_as_a_log_record_in_its_span(make_proxy: ProxyFactory, receiver: Receiver) -> None:
    proxy = await _traced(make_proxy, receiver.endpoint, logs=True)
    client = make_client(proxy, run_id="l", headers={"traceparent": TRACEPARENT})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await receiver.wait("logs")
    await receiver.wait("spans")
    (entry,) = receiver.logs
    (rec,) = await proxy.records("l")
    body = _value(entry.body)
    assert body["request_id"] == rec["request_id"] and body["trace_id"] == CLIENT_TRACE
    assert body["input_tokens"] == 11
    assert entry.event_name == "metering_proxy.record"
    assert _hex(entry.trace_id) == CLIENT_TRACE and entry.span_id == receiver.spans[0].span_id
    assert all(PROMPT.encode() not in raw for raw in receiver.raw)


# -- a collector that is down or hangs ------------------------------------------------------------


async def _timed_calls(proxy: ProxyUnderTest, run_id: str, n: int) -> list[float]:
    client = make_client(proxy, run_id=run_id)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        times.append(time.perf_counter() - t0)
    return times


async def test_collector_down_calls_unaffected_and_losses_counted(
    make_proxy: ProxyFactory, refused_port: int
) -> None:
    proxy = await _traced(make_proxy, f"http://127.0.0.1:{refused_port}")
    times = await _timed_calls(proxy, "down", 20)
    assert len(await proxy.wait_records("down", 20)) == 20
    assert max(times) < 0.5  # each a loopback call; an export on the request path would show
    # The first export fails (connection refused is not retried): visible in /healthz and /metrics.
    deadline = time.monotonic() + 10
    while True:
        status, body = await health(proxy.url("").rstrip("/"))
        if body["otel"]["spans"]["failed"] >= 1:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)
    assert status == 200 and body["status"] == "ok"  # records are written: the proxy is healthy
    assert body["otel"]["status"] == "degraded" and body["otel"]["spans"]["error"]
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/metrics")) as r:
        text = await r.text()
    assert 'metering_proxy_otel_dropped_total{reason="export_failed",signal="spans"}' in text
    assert "metering_proxy_otel_healthy 0.0" in text


async def test_collector_that_hangs_delays_no_call_and_a_full_queue_drops(
    make_proxy: ProxyFactory, hanging: Receiver
) -> None:
    proxy = await _traced(make_proxy, hanging.endpoint, queue_size=5)
    baseline = await _traced(make_proxy, hanging.endpoint)  # warm-up of a second app: same machine, same load
    await _timed_calls(baseline, "warm", 3)
    times = await _timed_calls(proxy, "hang", 20)
    assert len(await proxy.wait_records("hang", 20)) == 20
    assert max(times) < 0.5
    # Calls become spans in the calls thread; the span worker holds at most one batch in the hung export and
    # its queue 5 more: the rest were dropped, at one queue or the other, and counted.
    # Wait until the calls thread has finished with every call (a drained queue is not enough: the batch it
    # took may still be being built into spans).
    for _ in range(250):
        status, body = await health(proxy.url("").rstrip("/"))
        calls = body["otel"]["calls"]
        if calls["exported"] + calls["dropped"] + calls["failed"] == 20:
            break
        await asyncio.sleep(0.02)
    spans, calls = body["otel"]["spans"], body["otel"]["calls"]
    assert status == 200 and calls["exported"] + calls["dropped"] + calls["failed"] == 20
    assert spans["dropped"] + calls["dropped"] >= 10 and spans["exported"] == 0
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/metrics")) as r:
        text = await r.text()
    for signal, lost in (("spans", spans), ("calls", calls)):
        line = f'metering_proxy_otel_dropped_total{{reason="queue_full",signal="{signal}"}} {float(lost["dropped"])}'
        assert line in text


# -- off, and the standard variables --------------------------------------------------------------


async def test_off_passes_the_clients_traceparent_and_records_its_trace(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream
) -> None:
    client = make_client(proxy, run_id="off", headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    sent = fake_upstream.requests[-1]["headers"]
    assert sent["traceparent"] == TRACEPARENT and sent["tracestate"] == "k=v"
    plain = make_client(proxy, run_id="off")
    await plain.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert "traceparent" not in {k.lower() for k in fake_upstream.requests[-1]["headers"]}
    recs = await proxy.records("off")
    assert [r["trace_id"] for r in recs] == [CLIENT_TRACE, None]  # the field is always there


def test_off_never_imports_opentelemetry(tmp_path: Path) -> None:
    code = ("import sys; from proxy.app import make_app; from proxy.config import Config; "
            f"make_app(Config(runs_dir=__import__('pathlib').Path({str(tmp_path)!r}))); "
            "sys.exit(1 if [m for m in sys.modules if m.startswith('opentelemetry')] else 0)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0


@pytest.mark.slow
async def test_serve_reads_the_standard_otel_variables(
    fake_upstream: FakeUpstream, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=abc")
    served = await serve(fake_upstream, tmp_path / "runs", otel={"enabled": True})
    try:
        client = openai.AsyncOpenAI(base_url=served.base + "/v1", api_key="k", max_retries=0,
                                    default_headers={"X-Run-Id": "env", "traceparent": TRACEPARENT})  # fmt: skip
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        (rec,) = await wait_lines(tmp_path / "runs" / "env.jsonl", 1)
        assert await served.stop() == 0  # shutdown exports what is queued
    finally:
        if served.proc.returncode is None:
            await served.kill()
    await receiver.wait("spans")
    assert _hex(receiver.spans[0].trace_id) == rec["trace_id"] == CLIENT_TRACE
    assert receiver.resources[0]["service.name"] == "from-env"
    assert receiver.resources[0]["deployment.environment.name"] == "test"
    assert receiver.headers[0]["x-collector-key"] == "abc"

