"""Server-side tool fees (issue 15.3): counted from real payloads, priced to the cent, recorded, never 0 when unknown.

Crosses usage.py (the counts), meter.py (body and stream items), pricing.py (the fees) and records.py (the
fields), like test_hostile_usage.py: each case goes through a real proxy in front of a real loopback upstream.
Hand-computed figures, from the bundled table:
- claude-sonnet-4-5-20250929: input 3e-6, cache read 3e-7, output 1.5e-5, search_context_cost_per_query 0.01.
  6039 uncached + 2000 cached in, 931 out: 0.018117 + 0.0006 + 0.013965 = 0.032682; 3 searches: + 0.03.
- gpt-5-2025-08-07: input 1.25e-6, cache read 1.25e-7, output 1e-5, search_context_cost_per_query 0.01, no file
  search field (OpenAI's published $2.50 per 1,000 calls applies). 8000 uncached + 4000 cached in, 800 out:
  0.01 + 0.0005 + 0.008 = 0.0185; 2 searches: + 0.02; 1 file search: + 0.0025.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import report
from proxy.config import Upstream
from proxy.meter import Meter
from proxy.prices_cmd import lookup_text
from proxy.pricing import BUNDLED_PRICES, PriceBook
from proxy.usage import MAX_SERVER_TOOL_CALLS, MAX_SERVER_TOOLS, from_anthropic
from tests.conftest import KEY, FakeUpstream, ProxyFactory, ProxyUnderTest, load_case, make_client, payload_cases

BOOK = PriceBook.load(BUNDLED_PRICES)
TOKENS_CLAUDE = 0.032682
TOKENS_GPT5 = 0.0185
MSG = [{"role": "user", "content": "When was Claude Shannon born?"}]


def cents(value: float | None) -> int:
    assert value is not None
    return round(value * 100)


# -- counting: every payload fixture, buffered and split into pieces -------------------------------


def _count_cases() -> list[Any]:
    """Every payload fixture: a buffered body read whole, a stream whole and in pieces of 1, 7 and 61 bytes."""
    out = []
    for p, c in payload_cases():
        for piece in (0,) if load_case(p, c)[1] == "json" else (0, 1, 7, 61):
            out.append(pytest.param(p, c, piece, id=f"{p}/{c}/{piece}"))
    return out


@pytest.mark.parametrize(("provider", "case", "piece"), _count_cases())
def test_meter_counts_server_tool_calls(provider: str, case: str, piece: int) -> None:
    """Every fixture's tool counts (none for most), however the stream is cut into chunks."""
    data, kind, expected = load_case(provider, case)
    meter = Meter(expected["endpoint"])
    if kind == "json":
        assert meter.read_body(data)
    else:
        for i in range(0, len(data), piece or len(data)):
            meter.feed(data[i : i + (piece or len(data))], 0.0)
        meter.finish(0.0)
    usage = meter.usage()
    calls = dict(usage.server_tool_calls) if usage is not None else {}
    assert calls == expected.get("server_tool_calls", {})
    assert usage is None or "server_tool_calls" not in usage.invalid


# -- through the proxy: cost to the cent --------------------------------------------------------


async def _messages(proxy: ProxyUnderTest, case: str, run: str, stream: bool, **headers: str) -> bytes:
    body = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024, "messages": MSG, "stream": stream,
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}  # fmt: skip
    hdrs = {"X-Fake": f"fixture:anthropic/{case}", "X-Run-Id": run, "x-api-key": KEY, "anthropic-version": "2023-06-01",
            "X-Fake-Split": "13", **headers}  # fmt: skip
    async with aiohttp.ClientSession() as s, s.post(proxy.url("/v1/messages"), json=body, headers=hdrs) as r:
        assert r.status == 200
        return await r.read()


@pytest.mark.parametrize(
    ("case", "stream", "calls"),
    [("messages_web_search", False, {"web_search": 3, "web_fetch": 1}),
     ("messages_web_search_stream", True, {"web_search": 3})],
)  # fmt: skip
async def test_anthropic_web_search_priced(make_proxy: ProxyFactory, case: str, stream: bool,
                                           calls: dict[str, int]) -> None:  # fmt: skip
    proxy = await make_proxy(pricebook=BOOK)
    got = await _messages(proxy, case, "ws", stream)
    assert got == load_case("anthropic", case)[0], "the client gets the upstream's bytes unchanged"
    (rec,) = await proxy.wait_records("ws", 1)
    assert rec["server_tool_calls"] == calls and rec["usage_source"] == "upstream"
    assert rec["cost_usd"] == pytest.approx(TOKENS_CLAUDE + 0.03, abs=1e-12)
    assert cents(rec["cost_usd"]) == 6  # $0.0627: the $0.03 of searches is half of it
    b = rec["cost_breakdown"]
    assert b["tool_fees"] == pytest.approx(0.03, abs=1e-12)
    assert b["input"] + b["cached_input"] + b["cache_write"] + b["output"] == pytest.approx(TOKENS_CLAUDE, abs=1e-12)
    search = b["tool_fee_detail"]["web_search"]
    assert search == {"calls": 3, "usd_per_call": 0.01, "usd": 0.03,
                      "rate_source": "price_table:search_context_cost_per_query"}  # fmt: skip
    if "web_fetch" in calls:  # Anthropic charges no fee for fetches (tokens only): known, and 0
        assert b["tool_fee_detail"]["web_fetch"]["usd"] == 0.0
        assert b["tool_fee_detail"]["web_fetch"]["rate_source"] == "anthropic published price"
    assert rec["cost_unpriced"] == [] and rec["usage_invalid"] == []


async def test_anthropic_stream_cut_after_searches_still_bills_them(make_proxy: ProxyFactory) -> None:
    """Cut before message_delta: no usage block says how many searches ran, the server_tool_use blocks do."""
    data = load_case("anthropic", "messages_web_search_stream")[0]
    cut = data.index(b'"text":"Claude Shannon was born')  # after the third search's result
    proxy = await make_proxy(pricebook=BOOK)
    await _messages(proxy, "messages_web_search_stream", "cut", True, **{"X-Fake-Cut": str(cut)})
    (rec,) = await proxy.wait_records("cut", 1)
    assert rec["error"] is not None and rec["usage_source"] == "estimated"
    assert rec["server_tool_calls"] == {"web_search": 3}
    assert rec["cost_breakdown"]["tool_fees"] == pytest.approx(0.03, abs=1e-12)
    tokens = sum(rec["cost_breakdown"][k] for k in ("input", "cached_input", "cache_write", "output"))
    assert rec["cost_usd"] == pytest.approx(tokens + 0.03, abs=1e-12)


@pytest.mark.parametrize(
    ("case", "stream", "calls", "fees"),
    [("responses_web_search", False, {"web_search": 2}, 0.02),
     ("responses_web_search_stream", True, {"web_search": 2, "file_search": 1}, 0.0225)],
)  # fmt: skip
async def test_responses_tool_calls_priced(make_proxy: ProxyFactory, case: str, stream: bool,
                                           calls: dict[str, int], fees: float) -> None:  # fmt: skip
    proxy = await make_proxy(pricebook=BOOK)
    client = make_client(proxy, run_id="rs", headers={"X-Fake": f"fixture:openai/{case}", "X-Fake-Split": "17"})
    kw: dict[str, Any] = {"model": "gpt-5", "input": "When was Claude Shannon born?",
                          "tools": [{"type": "web_search"}]}  # fmt: skip
    if stream:
        async with await client.responses.create(stream=True, **kw) as events:
            kinds = [ev.type async for ev in events]
        assert kinds[-1] == "response.completed" and kinds.count("response.output_item.done") == 5
    else:
        resp = await client.responses.create(**kw)
        assert [item.type for item in resp.output].count("web_search_call") == 2
    (rec,) = await proxy.wait_records("rs", 1)
    assert rec["server_tool_calls"] == calls
    assert rec["cost_breakdown"]["tool_fees"] == pytest.approx(fees, abs=1e-12)
    assert rec["cost_usd"] == pytest.approx(TOKENS_GPT5 + fees, abs=1e-12)
    assert cents(rec["cost_usd"]) == round((TOKENS_GPT5 + fees) * 100)  # $0.0385 -> 4 cents, $0.041 -> 4
    detail = rec["cost_breakdown"]["tool_fee_detail"]
    assert detail["web_search"]["usd_per_call"] == 0.01
    if "file_search" in calls:
        assert detail["file_search"] == {"calls": 1, "usd_per_call": 0.0025, "usd": 0.0025,
                                         "rate_source": "openai published price"}  # fmt: skip
    assert rec["cost_unpriced"] == []


async def test_responses_stream_cut_before_completed_counts_finished_items(make_proxy: ProxyFactory) -> None:
    data = load_case("openai", "responses_web_search_stream")[0]
    cut = data.index(b"event: response.output_text.delta")  # all three tool items are done, no usage yet
    proxy = await make_proxy(pricebook=BOOK)
    headers = {"X-Fake": "fixture:openai/responses_web_search_stream", "X-Fake-Cut": str(cut), "X-Run-Id": "rc",
               "Authorization": f"Bearer {KEY}"}  # fmt: skip
    body = {"model": "gpt-5", "input": "When was Claude Shannon born?", "stream": True}
    async with aiohttp.ClientSession() as s, s.post(proxy.url("/v1/responses"), json=body, headers=headers) as r:
        await r.read()
    (rec,) = await proxy.wait_records("rc", 1)
    assert rec["usage_source"] == "estimated" and rec["server_tool_calls"] == {"web_search": 2, "file_search": 1}
    assert rec["cost_breakdown"]["tool_fees"] == pytest.approx(0.0225, abs=1e-12)


# -- unknown rates: null, named, never 0 ---------------------------------------------------------


async def test_unknown_fee_rate_is_null_and_named(make_proxy: ProxyFactory) -> None:
    """A table entry with no web search field, for a provider that publishes none here: the fee is unknown.

    cost_usd is then the tokens plus the fees that are known (file search's published rate), and says what it
    leaves out; a $0 for the searches would under-report the run by more than the tokens cost.
    """
    table = {"gpt-5-2025-08-07": {"input_cost_per_token": 1.25e-6, "cache_read_input_token_cost": 1.25e-7,
                                  "output_cost_per_token": 1e-5, "litellm_provider": "openai", "mode": "chat"}}
    proxy = await make_proxy(pricebook=PriceBook(table, "test-table"))
    client = make_client(proxy, run_id="unk", headers={"X-Fake": "fixture:openai/responses_web_search_stream"})
    async with await client.responses.create(model="gpt-5", input="q", stream=True) as events:
        async for _ in events:
            pass
    (rec,) = await proxy.wait_records("unk", 1)
    b = rec["cost_breakdown"]
    assert b["tool_fees"] is None
    assert b["tool_fee_detail"]["web_search"] == {"calls": 2, "usd_per_call": None, "usd": None, "rate_source": None}
    assert rec["cost_unpriced"] == ["web_search"]
    assert rec["cost_usd"] == pytest.approx(TOKENS_GPT5 + 0.0025, abs=1e-12)
    assert rec["cost_source"] == "price_table"


# -- hostile counts --------------------------------------------------------------------------------


@pytest.fixture
async def anthropic_upstream() -> AsyncIterator[TestServer]:
    """An Anthropic-shaped upstream whose usage.server_tool_use is the X-Tool-Use header's JSON, verbatim."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        body = {"id": "msg_h", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 1000, "output_tokens": 100, "server_tool_use": "TOOLS"}}  # fmt: skip
        # Spliced in as text: a count past 64 bits reaches the proxy as the upstream wrote it.
        raw = orjson.dumps(body).replace(b'"TOOLS"', request.headers["X-Tool-Use"].encode())
        return web.Response(body=raw, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


HOSTILE = [
    # (server_tool_use sent, server_tool_calls recorded, rejected?)
    ({"web_search_requests": -3}, {"web_search": None}, True),
    ({"web_search_requests": 10**30}, {"web_search": None}, True),
    ({"web_search_requests": 1e300}, {"web_search": None}, True),
    ({"web_search_requests": MAX_SERVER_TOOL_CALLS + 1}, {"web_search": None}, True),
    ({"web_search_requests": "3"}, {"web_search": None}, True),
    ({"web_search_requests": True}, {"web_search": None}, True),
    ({"web_search_requests": [3]}, {"web_search": None}, True),
    ({"web_search_requests": 3.7}, {"web_search": 3}, False),  # a float count is cut, as token counts are
    ({"web_search_requests": MAX_SERVER_TOOL_CALLS}, {"web_search": MAX_SERVER_TOOL_CALLS}, False),
    ({"web_search_requests": 0, "web_fetch_requests": None}, None, False),
    ({"web_search_requests": 2, "code_execution_requests": 1}, {"web_search": 2, "code_execution": 1}, False),
]


@pytest.mark.parametrize(("sent", "recorded", "rejected"), HOSTILE)
async def test_hostile_tool_counts(make_proxy: ProxyFactory, anthropic_upstream: TestServer, sent: dict[str, Any],
                                   recorded: dict[str, Any] | None, rejected: bool) -> None:  # fmt: skip
    proxy = await make_proxy(pricebook=BOOK,
                             upstreams=(Upstream(name="a", base_url=str(anthropic_upstream.make_url("/v1"))),))
    headers = {"X-Tool-Use": json.dumps(sent), "X-Run-Id": "h", "x-api-key": KEY}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MSG}
    async with aiohttp.ClientSession() as s, s.post(proxy.url("/v1/messages"), json=body, headers=headers) as r:
        assert r.status == 200
    (rec,) = await proxy.wait_records("h", 1)
    tokens = 1000 * 3e-6 + 100 * 1.5e-5
    assert rec["server_tool_calls"] == recorded
    assert ("server_tool_calls" in rec["usage_invalid"]) is rejected
    assert rec["usage_source"] == "upstream" and rec["input_tokens"] == 1000  # the tokens are still believed
    b = rec["cost_breakdown"]
    if recorded is None:
        assert "tool_fees" not in b and rec["cost_usd"] == pytest.approx(tokens, abs=1e-12)
    elif rejected:
        assert b["tool_fees"] is None and rec["cost_unpriced"] == ["web_search"]
        assert rec["cost_usd"] == pytest.approx(tokens, abs=1e-12)
    elif "code_execution" in recorded:  # a tool with no known fee: named, and left out of cost_usd
        assert b["tool_fees"] is None and rec["cost_unpriced"] == ["code_execution"]
        assert rec["cost_usd"] == pytest.approx(tokens + 0.02, abs=1e-12)
    else:
        searches = recorded["web_search"]
        assert b["tool_fees"] == pytest.approx(searches * 0.01, abs=1e-9)
        assert rec["cost_usd"] == pytest.approx(tokens + searches * 0.01, abs=1e-9) and rec["cost_unpriced"] == []


def test_too_many_tools_are_cut_and_flagged() -> None:
    block = {f"tool{i}_requests": 1 for i in range(MAX_SERVER_TOOLS + 5)}
    usage = from_anthropic({"input_tokens": 1, "output_tokens": 1, "server_tool_use": block})
    assert len(usage.server_tool_calls) == MAX_SERVER_TOOLS and usage.invalid == ("server_tool_calls",)
    long_name = from_anthropic({"input_tokens": 1, "server_tool_use": {"x" * 100 + "_requests": 5}})
    assert long_name.server_tool_calls == () and not long_name.invalid


def test_upstream_charge_wins_and_keeps_the_fee_detail() -> None:
    """OpenRouter's usage.cost already includes the searches: cost_usd is that, the fees are detail only."""
    usage = from_anthropic({"input_tokens": 10, "output_tokens": 1, "server_tool_use": {"web_search_requests": 1}})
    cost = BOOK.price(dataclasses.replace(usage, upstream_cost_usd=0.5), model="claude-sonnet-4-5",
                      requested_model=None, upstream="u", provider=None, dialect="messages")  # fmt: skip
    assert cost.cost_usd == 0.5 and cost.cost_source == "upstream" and cost.breakdown is not None
    assert cost.breakdown["tool_fees"] == 0.01


# -- lookup and report -----------------------------------------------------------------------------


def test_prices_lookup_shows_fee_rates() -> None:
    text = lookup_text(BOOK, "claude-sonnet-4-5")
    assert "web_search     $0.01 (price_table:search_context_cost_per_query)" in text
    assert "web_fetch      $0 (anthropic published price)" in text
    gpt4o = lookup_text(BOOK, "gpt-4o")
    assert "file_search    $0.0025 (openai published price)" in gpt4o
    assert "no fee known for web_search, web_fetch" in gpt4o


async def test_report_total_includes_tool_fees(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(pricebook=BOOK)
    await _messages(proxy, "messages_web_search", "rep", False)
    await _messages(proxy, "messages_web_search_stream", "rep", True)
    recs = await proxy.wait_records("rep", 2)
    total = report.summarize(proxy.runs_dir / "rep.jsonl", "rep", ("model",)).to_json()["cost_usd"]["total"]
    assert total == pytest.approx(2 * (TOKENS_CLAUDE + 0.03), abs=1e-9)
    assert total == pytest.approx(sum(r["cost_usd"] for r in recs), abs=1e-9)
