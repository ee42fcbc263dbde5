"""GET /metrics: real calls through the proxy, then the exposition parsed and checked value by value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.app import METRICS
from proxy.config import custom_prices as parse_custom_prices
from proxy.errors import Category
from proxy.metrics import _CACHE_MAX, DURATION_BUCKETS, MAX_LABEL_LEN, TOKEN_BUCKETS, Metrics, _observe
from proxy.pricing import BUNDLED_PRICES, PriceBook
from proxy.records import ErrorInfo, JsonlSink
from tests.conftest import Messages, ProxyFactory, ProxyUnderTest, make_client, make_record

RUN = "metrics-run-7f3a9c"
MSGS: Messages = [{"role": "user", "content": "hi"}]
# USD per million tokens: each fake call (11 in, 3 out) costs 11 * 1e-6 + 3 * 4e-6 = 2.3e-5.
HOUSE = [{"model": "house-*", "input": 1, "output": 4}]


async def scrape(proxy: ProxyUnderTest) -> tuple[str, list[Sample]]:
    """GET /metrics; return the text and every parsed sample."""
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    return text, [sample for fam in text_string_to_metric_families(text) for sample in fam.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include labels (KeyError if there is none)."""
    hits = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    if not hits:
        raise KeyError(f"{name} {labels}")
    return sum(hits)


def label_values(samples: list[Sample], name: str, label: str) -> set[str]:
    return {s.labels[label] for s in samples if s.name == name}


async def test_metrics_after_real_calls(make_proxy: ProxyFactory) -> None:
    book = PriceBook.load(BUNDLED_PRICES, custom=parse_custom_prices(HOUSE))
    proxy = await make_proxy(pricebook=book)
    headers = {"X-Task-Name": "task-secret-name", "X-Meter-Tag-Variant": "tagvalue-b1"}
    async with make_client(proxy, run_id=RUN, headers=headers) as c:
        await c.chat.completions.create(model="house-large", messages=MSGS)
        stream = await c.chat.completions.create(model="house-large", messages=MSGS, stream=True,
                                                 extra_headers={"X-Fake-Delay": "0.01"})  # fmt: skip
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        assert text == "Hello there!"
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="house-large", messages=MSGS,
                                            extra_headers={"X-Fake": "status:429"})  # fmt: skip
    recs = await proxy.wait_records(RUN, 3)
    assert len(recs) == 3
    plain, streamed, limited = sorted(recs, key=lambda r: (r["status"], r["stream"]))
    assert streamed["stream"] and not plain["stream"] and limited["status"] == 429
    text, samples = await scrape(proxy)

    chat = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "_OTHER", "upstream": "fake",
            "gen_ai_request_model": "house-large", "gen_ai_response_model": "house-large"}  # fmt: skip
    req = "metering_proxy_requests_total"
    ok = {"endpoint": "/v1/chat/completions", "status": "200", "error_type": ""}
    assert value(samples, req, **chat, **ok) == 2
    limited_labels = {"endpoint": "/v1/chat/completions", "status": "429", "error_type": "rate_limit"}
    assert value(samples, req, **chat, **limited_labels) == 1
    assert value(samples, req) == 3
    assert label_values(samples, req, "status") == {"200", "429"}
    assert label_values(samples, req, "error_type") == {"", "rate_limit"}

    # The 429 carried no usage: tokens and cost come from the two successful calls only.
    tok = "gen_ai_client_tokens_total"
    expected = {"input": 22, "cached": 0, "cache_write": 0, "output": 6, "reasoning": 0}
    for kind, n in expected.items():
        assert value(samples, tok, **chat, gen_ai_token_type=kind) == n
    assert label_values(samples, tok, "gen_ai_token_type") == set(expected)
    use = "gen_ai_client_token_usage"
    assert value(samples, use + "_count", gen_ai_token_type="input") == 2
    assert value(samples, use + "_sum", gen_ai_token_type="input") == 22
    assert value(samples, use + "_bucket", gen_ai_token_type="input", le="4.0") == 0
    assert value(samples, use + "_bucket", gen_ai_token_type="input", le="16.0") == 2  # 11 <= 16
    assert value(samples, use + "_count", gen_ai_token_type="output") == 2
    assert value(samples, use + "_bucket", gen_ai_token_type="output", le="1.0") == 0
    assert value(samples, use + "_bucket", gen_ai_token_type="output", le="4.0") == 2  # 3 <= 4
    assert value(samples, use + "_bucket", gen_ai_token_type="output", le="+Inf") == 2
    assert plain["cost_usd"] == pytest.approx(2.3e-5) and streamed["cost_usd"] == pytest.approx(2.3e-5)
    assert value(samples, "metering_proxy_cost_usd_total", **chat) == pytest.approx(4.6e-5)
    assert value(samples, "metering_proxy_unpriced_requests_total", **chat) == 0

    dur = "gen_ai_client_operation_duration_seconds"
    assert value(samples, dur + "_count", **chat, error_type="") == 2
    assert value(samples, dur + "_count", **chat, error_type="rate_limit") == 1
    assert value(samples, dur + "_sum") == pytest.approx(sum(r["duration_ms"] for r in recs) / 1000)
    # The stream took >= 60 ms (X-Fake-Delay between its pieces), so at most the plain call is <= 0.04 s.
    assert streamed["duration_ms"] >= 60
    assert value(samples, dur + "_bucket", error_type="", le="0.04") <= 1
    assert value(samples, dur + "_bucket", error_type="", le="81.92") == 2

    ttft, tpot = "gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"
    assert value(samples, ttft + "_count", **chat) == 1
    assert value(samples, ttft + "_sum", **chat) == pytest.approx(streamed["ttft_ms"] / 1000)
    assert value(samples, tpot + "_count", **chat) == 1
    per_token = (streamed["duration_ms"] - streamed["ttft_ms"]) / 1000 / 3
    assert per_token > 0.005
    assert value(samples, tpot + "_sum", **chat) == pytest.approx(per_token)

    assert value(samples, "metering_proxy_records_written_total") == 3
    assert value(samples, "metering_proxy_records_dropped_total") == 0
    assert value(samples, "metering_proxy_records_pending") == 0
    assert value(samples, "metering_proxy_sink_healthy") == 1
    assert value(samples, "process_cpu_seconds_total") > 0
    assert "_created" not in text

    # Nothing per-call or per-run is ever a label: no run id, request ids, task names or tag values.
    forbidden = [RUN, "task-secret-name", "tagvalue-b1", "up-req-1"] + [r["request_id"] for r in recs]
    for word in forbidden:
        assert word not in text, word
    for s in samples:
        assert not {"run_id", "request_id", "task"} & s.labels.keys()


async def test_model_cap_through_the_proxy(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    proxy.server.app[METRICS].max_models = 3
    req = "metering_proxy_requests_total"
    async with make_client(proxy, run_id=RUN) as c:
        for i in range(5):
            await c.chat.completions.create(model=f"model-{i}", messages=MSGS)
        await proxy.wait_records(RUN, 5)
        _, samples = await scrape(proxy)
        capped = {"model-0", "model-1", "model-2", "other"}
        assert label_values(samples, req, "gen_ai_request_model") == capped
        assert label_values(samples, req, "gen_ai_response_model") == capped
        assert value(samples, req, gen_ai_request_model="other") == 2
        assert value(samples, req, gen_ai_request_model="model-1") == 1
        # A known model keeps its own label after the cap is reached.
        await c.chat.completions.create(model="model-0", messages=MSGS)
    await proxy.wait_records(RUN, 6)
    _, samples = await scrape(proxy)
    assert value(samples, req, gen_ai_request_model="model-0") == 2
    assert value(samples, req, gen_ai_request_model="other") == 2


async def test_failure_before_upstream_and_unpriced(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(pricebook=PriceBook.load(BUNDLED_PRICES))
    async with make_client(proxy, run_id=RUN) as c:
        await c.embeddings.create(model="no-such-priced-model-xyz", input="hi")
        with pytest.raises(openai.BadRequestError):  # no model: refused by the proxy, never sent upstream
            await c.chat.completions.create(model="", messages=MSGS)
    await proxy.wait_records(RUN, 2)
    _, samples = await scrape(proxy)
    req = "metering_proxy_requests_total"
    emb = {"gen_ai_operation_name": "embeddings", "gen_ai_request_model": "no-such-priced-model-xyz"}
    assert value(samples, req, **emb, endpoint="/v1/embeddings", status="200", error_type="") == 1
    assert value(samples, "metering_proxy_unpriced_requests_total", **emb) == 1
    assert value(samples, "gen_ai_client_tokens_total", **emb, gen_ai_token_type="input") == 8
    assert value(samples, "gen_ai_client_token_usage_count", **emb, gen_ai_token_type="input") == 1
    with pytest.raises(KeyError):  # embeddings have no output-token histogram at all
        value(samples, "gen_ai_client_token_usage_count", **emb, gen_ai_token_type="output")
    refused = {"upstream": "", "gen_ai_provider_name": "_OTHER", "gen_ai_request_model": "", "status": "400"}
    assert value(samples, req, **refused, error_type="bad_request") == 1
    assert value(samples, "metering_proxy_cost_usd_total") == 0


def _samples(m: Metrics) -> list[Sample]:
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


@pytest.mark.slow
def test_default_cap_is_200_models_and_caches_stay_bounded(tmp_path: Path) -> None:
    m = Metrics(JsonlSink(tmp_path))
    gemini: dict[str, Any] = {"provider": "gemini", "input_tokens": 5, "total_tokens": 7}
    for i in range(250):
        m.observe(make_record(**gemini, requested_model=f"m{i:03d}", model=f"m{i:03d}"))
    m.observe(make_record(**gemini, requested_model="x" * 500, model=None))
    samples = _samples(m)
    models = label_values(samples, "metering_proxy_requests_total", "gen_ai_request_model")
    assert len(models) == 201 and "other" in models and "m199" in models and "m200" not in models
    assert value(samples, "metering_proxy_requests_total", gen_ai_request_model="other") == 51
    tokens = value(samples, "gen_ai_client_tokens_total", gen_ai_provider_name="gcp.gemini")
    assert tokens == 251 * 5 + 251 * 2
    m2 = Metrics(JsonlSink(tmp_path))
    m2.observe(make_record(requested_model="y" * 500, model=None))
    assert label_values(_samples(m2), "metering_proxy_requests_total", "gen_ai_response_model") == {
        "y" * MAX_LABEL_LEN
    }
    for i in range(_CACHE_MAX + 100):
        m.observe(make_record(requested_model=f"client-{i}"))
    assert len(m._cache) <= _CACHE_MAX


def test_streams_failed_and_instant(tmp_path: Path) -> None:
    m = Metrics(JsonlSink(tmp_path))
    err = ErrorInfo(Category.STREAM_INTERRUPTED, "abc", "cut")
    m.observe(make_record(stream=True, ttft_ms=100.0, duration_ms=300.0, output_tokens=4))  # tpot 0.05
    m.observe(make_record(stream=True, ttft_ms=100.0, duration_ms=100.5, output_tokens=4))  # < 1 ms: no tpot
    m.observe(make_record(stream=True, ttft_ms=50.0, duration_ms=90.0, success=False, error=err))  # neither
    samples = _samples(m)
    ttft, tpot = "gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"
    assert value(samples, ttft + "_count") == 2 and value(samples, ttft + "_sum") == pytest.approx(0.2)
    assert value(samples, ttft + "_bucket", le="0.1") == 2
    assert value(samples, ttft + "_bucket", le="0.08") == 0
    assert value(samples, tpot + "_count") == 1 and value(samples, tpot + "_sum") == pytest.approx(0.05)
    assert value(samples, tpot + "_bucket", le="0.05") == 1
    assert value(samples, tpot + "_bucket", le="0.025") == 0
    dur = "gen_ai_client_operation_duration_seconds"
    assert value(samples, dur + "_count", error_type="stream_interrupted") == 1
    assert value(samples, "metering_proxy_requests_total", error_type="stream_interrupted", status="200") == 1


@pytest.mark.parametrize("buckets", [DURATION_BUCKETS, TOKEN_BUCKETS], ids=["duration", "tokens"])
def test_observe_fills_the_buckets_prometheus_client_would(buckets: tuple[float, ...]) -> None:
    """The observer's bisecting observe: same buckets and sum as Histogram.observe, bounds included."""
    values = [0, 0.0001, *buckets, *(b * 1.0001 for b in buckets), *(b * 0.9999 for b in buckets), 1e12]
    ours, theirs = (Histogram(f"h_{i}", "h", ("l",), buckets=buckets, registry=CollectorRegistry()).labels("x")
                    for i in range(2))  # fmt: skip
    for v in values:
        _observe(ours, v)
        theirs.observe(v)

    def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name.split("_", 2)[-1], s.labels, s.value) for m in h.collect() for s in m.samples]

    assert samples(ours) == samples(theirs)
    assert sum(1 for _ in values) == samples(ours)[-3][2]  # +Inf bucket: every value counted once
