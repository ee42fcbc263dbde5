"""Run budgets through the real proxy: USD and token limits, precedence, resume, overshoot under load."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from proxy import budgets as B
from proxy.budget_store import Limits, LocalStore
from proxy.config import BudgetRule, Budgets
from proxy.pricing import BUNDLED_PRICES, PriceBook
from proxy.records import JsonlSink
from tests.conftest import FakeUpstream, Messages, ProxyFactory, make_client, make_record

MSGS: Messages = [{"role": "user", "content": "Hi"}]
# The fake upstream answers every chat call with 11 input + 3 output tokens; gpt-4o-mini costs
# $0.15 / $0.60 per million tokens (1500 / 6000 units of 1e-10 USD per token): $0.00000345 a call.
CALL_UNITS = 11 * 1500 + 3 * 6000  # in 1e-10 USD
EST_IN = 9  # estimate_input_tokens(MSGS): (4 + 2 chars + 3) // 4 + 4 per message + 3
PRICES = PriceBook.load(BUNDLED_PRICES)


def usd(units: int) -> float:
    return units / B.UNITS


async def chat(c: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    """One chat call; returns the raw response (headers) or the APIStatusError raised."""
    try:
        return await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, **kwargs)
    except openai.APIStatusError as exc:
        return exc


def refusal(exc: Any) -> str:
    """Assert exc is the budget 429 in OpenAI's shape; return its message."""
    assert isinstance(exc, openai.RateLimitError), exc
    err = exc.response.json()["error"]
    assert err["type"] == "budget_exceeded" and err["code"] == "run_budget_exceeded" and err["param"] is None
    return str(err["message"])


def budgets(usd_limit: float | None = None, tokens: int | None = None, *rules: BudgetRule) -> Budgets:
    return Budgets(default=BudgetRule(usd=usd_limit, tokens=tokens), runs=rules)


async def test_usd_budget_counts_spend_until_429(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    limit = 3 * CALL_UNITS  # exactly three calls' worth
    proxy = await make_proxy(pricebook=PRICES, budgets=budgets(usd(limit)))
    c = make_client(proxy, run_id="usd-run")
    seen = []
    for i in range(3):
        # max_tokens=3 reserves 9 * 1500 + 3 * 6000 units, under the actual cost: all three fit.
        resp = await chat(c, max_tokens=3, stream=i == 1)
        assert resp.status_code == 200
        if i == 1:
            _ = [chunk async for chunk in resp.parse()]
        seen.append((resp.headers["X-Run-Spend-Usd"], resp.headers["X-Run-Budget-Remaining-Usd"]))
        await proxy.wait_records("usd-run", i + 1)
    assert seen == [("0", "0.00001035"), ("0.00000345", "0.0000069"), ("0.0000069", "0.00000345")]
    exc = await chat(c, max_tokens=3)
    assert refusal(exc) == (
        "Run 'usd-run' has reached its USD budget: spent $0.00001035 of its $0.00001035 limit"
        " (set by budgets.default). Nothing was sent upstream."
    )
    assert exc.response.headers["X-Run-Spend-Usd"] == "0.00001035"
    assert exc.response.headers["X-Run-Budget-Remaining-Usd"] == "0"
    assert "X-Run-Spend-Tokens" not in exc.response.headers
    assert len(fake_upstream.requests) == 3
    # The SDK's own retries (on by default for 429) are told not to bother: one call, one record.
    retrying = openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key="sk-test", default_headers={"X-Run-Id": "usd-run"}
    )
    assert isinstance(await chat(retrying, max_tokens=3), openai.RateLimitError)
    recs = await proxy.wait_records("usd-run", 6, timeout=0.3)  # a retry would add a sixth
    assert len(recs) == 5
    recs = recs[:4]
    assert [r["status"] for r in recs] == [200, 200, 200, 429]
    assert sum(B.to_units(r["cost_usd"]) for r in recs) == limit
    last = recs[-1]
    assert last["error"]["category"] == "budget_exceeded" and last["usage_source"] == "none"
    assert last["cost_usd"] is None and last["success"] is False and last["upstream"] == "fake"


async def test_token_budget(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(
        pricebook=PRICES, budgets=budgets(None, None, BudgetRule(match="tok-*", tokens=28))
    )
    c = make_client(proxy, run_id="tok-1")
    for i, (spent, left) in enumerate((("0", "28"), ("14", "14"))):
        await proxy.wait_records("tok-1", i)  # spend counts records: let the last one land
        resp = await chat(c, max_tokens=3)
        assert resp.status_code == 200
        assert (resp.headers["X-Run-Spend-Tokens"], resp.headers["X-Run-Budget-Remaining-Tokens"]) == (
            spent,
            left,
        )
        assert "X-Run-Spend-Usd" not in resp.headers  # no USD budget on this run
    await proxy.wait_records("tok-1", 2)
    exc = await chat(c, max_tokens=3)
    assert refusal(exc) == (
        "Run 'tok-1' has reached its token budget: spent 28 tokens of its 28-token limit"
        " (set by budgets.runs[0] 'tok-*'). Nothing was sent upstream."
    )
    # A run the rule does not match has no budget and no budget headers.
    other = await chat(make_client(proxy, run_id="other"), max_tokens=3)
    assert other.status_code == 200 and "X-Run-Spend-Tokens" not in other.headers
    assert len(fake_upstream.requests) == 3


async def test_reservation_that_would_cross_is_refused(make_proxy: ProxyFactory,
                                                       fake_upstream: FakeUpstream) -> None:  # fmt: skip
    proxy = await make_proxy(pricebook=PRICES, budgets=budgets(None, 500))
    c = make_client(proxy, run_id="big")
    exc = await chat(c, max_tokens=1000)
    assert refusal(exc) == (
        "Run 'big' would exceed its token budget: spent 0 tokens + 0 tokens reserved by calls in flight"
        f" + {EST_IN + 1000} tokens reserved for this call (estimated input {EST_IN} tokens + max output 1000"
        " tokens) is over its 500-token limit (set by budgets.default). Lower max_tokens, wait for calls in"
        " flight, or raise the budget. Nothing was sent upstream."
    )
    # Without max_tokens the documented default is reserved: 9 + 1024 > 500 as well.
    assert f"+ max output {B.UNCAPPED_OUTPUT_RESERVE} tokens" in refusal(await chat(c))
    assert (await chat(c, max_tokens=400)).status_code == 200
    assert len(fake_upstream.requests) == 1


async def test_header_and_config_precedence(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    rule = BudgetRule(match="eval-*", usd=0.5)
    proxy = await make_proxy(pricebook=PRICES, budgets=budgets(1.0, 14, rule))
    # Rule stricter than the default: the rule's limit and name.
    resp = await chat(make_client(proxy, run_id="eval-a"), max_tokens=1)
    assert resp.headers["X-Run-Budget-Remaining-Usd"] == "0.5"
    await proxy.wait_records("eval-a", 1)
    # Header stricter than config: the header's limit wins and is named.
    c = make_client(proxy, run_id="eval-a", headers={"X-Run-Budget-Usd": "0.000001"})
    assert "spent $0.00000345 of its $0.000001 limit (set by X-Run-Budget-Usd header)" in refusal(
        await chat(c)
    )
    # Header looser than config: the config's limit still holds (tokens: 14 by budgets.default).
    c = make_client(proxy, run_id="eval-a", headers={"X-Run-Budget-Tokens": "1000000"})
    msg = refusal(await chat(c, max_tokens=1))
    assert "spent 14 tokens of its 14-token limit (set by budgets.default)" in msg
    # A header alone budgets a run the config does not limit (looser default skipped here by a fresh run).
    proxy2 = await make_proxy(pricebook=PRICES)
    c = make_client(proxy2, run_id="self-capped", headers={"X-Run-Budget-Tokens": "20"})
    ok = await chat(c, max_tokens=1)
    assert ok.headers["X-Run-Spend-Tokens"] == "0" and ok.headers["X-Run-Budget-Remaining-Tokens"] == "20"
    await proxy2.wait_records("self-capped", 1)
    assert "would exceed its token budget: spent 14 tokens" in refusal(await chat(c, max_tokens=1))
    assert "set by X-Run-Budget-Tokens header" in refusal(await chat(c, max_tokens=1))
    # The budget headers are the proxy's own: never sent upstream.
    assert all(not k.lower().startswith("x-run-budget") for r in fake_upstream.requests for k in r["headers"])


@pytest.mark.parametrize(("header", "value"), [("X-Run-Budget-Usd", "lots"), ("X-Run-Budget-Usd", "-1"),
                                               ("X-Run-Budget-Usd", "nan"), ("X-Run-Budget-Tokens", "1.5"),
                                               ("X-Run-Budget-Tokens", "-3"), ("X-Run-Budget-Usd", "1e300"),
                                               ("X-Run-Budget-Tokens", "10" * 20)])  # fmt: skip
async def test_invalid_budget_header_is_400(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream, header: str, value: str
) -> None:
    proxy = await make_proxy(pricebook=PRICES)
    exc = await chat(make_client(proxy, run_id="bad", headers={header: value}))
    assert isinstance(exc, openai.BadRequestError)
    err = exc.response.json()["error"]
    assert err["code"] == "invalid_budget" and err["param"] == header and header in err["message"]
    assert err["type"] == "invalid_request_error" and not fake_upstream.requests
    [rec] = await proxy.wait_records("bad", 1)
    assert rec["error"]["category"] == "bad_request" and rec["status"] == 400


async def test_resume_after_restart(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    cfg = {"pricebook": PRICES, "budgets": budgets(usd(2 * CALL_UNITS), 100)}
    first = await make_proxy(**cfg)
    c = make_client(first, run_id="long-run")
    assert (await chat(c, max_tokens=1)).status_code == 200
    assert (await chat(c, max_tokens=1)).status_code == 200
    await first.wait_records("long-run", 2)
    await first.server.close()  # the "restart": a new proxy on the same runs dir
    second = await make_proxy(**cfg)
    exc = await chat(make_client(second, run_id="long-run"), max_tokens=1)
    assert "has reached its USD budget: spent $0.0000069 of its $0.0000069 limit" in refusal(exc)
    assert exc.response.headers["X-Run-Spend-Tokens"] == "28"
    assert len(fake_upstream.requests) == 2


async def test_resume_reads_file_once_skipping_torn_lines(make_proxy: ProxyFactory, tmp_path: Any) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    lines = [
        {"request_id": "req_a", "cost_usd": 0.25, "total_tokens": 1000},
        {"request_id": "req_b", "cost_usd": None, "total_tokens": 500},  # unpriced model: tokens only
        {"request_id": "req_c", "cost_usd": 0.5, "total_tokens": 10},
    ]
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines) + b'{"request_id": "req_torn", "cost_us'
    (runs / "resumed.jsonl").write_bytes(data)
    proxy = await make_proxy(pricebook=PRICES, budgets=budgets(1.0, 2000))
    c = make_client(proxy, run_id="resumed")
    resp = await chat(c, max_tokens=1)
    assert resp.headers["X-Run-Spend-Usd"] == "0.75" and resp.headers["X-Run-Spend-Tokens"] == "1510"
    tracker = proxy.server.app[B.BUDGETS]
    await proxy.settle(1)  # the record is counted when the call's handler ends, just after the response
    assert tracker.spend("resumed") == ("0.75000345", 1524)
    # The file is not read again: the new record is counted once, from memory.
    resp = await chat(c, max_tokens=1)
    assert resp.headers["X-Run-Spend-Usd"] == "0.75000345" and resp.headers["X-Run-Spend-Tokens"] == "1524"


# -- hostile numbers (issue 11): spend is clamped, never negative, and counting it never raises ------

_MAX_UNITS = int(B.MAX_LIMIT) * B.UNITS
_MAX_TOKENS = int(B.MAX_LIMIT)
_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("value", "units", "tokens"),
    [(1e300, _MAX_UNITS, _MAX_TOKENS), (_INF, _MAX_UNITS, _MAX_TOKENS), (2**70, _MAX_UNITS, _MAX_TOKENS),
     (10**400, _MAX_UNITS, _MAX_TOKENS), (B.MAX_LIMIT, _MAX_UNITS, _MAX_TOKENS), (-1, 0, 0), (-1e300, 0, 0),
     (-_INF, 0, 0), (_NAN, 0, 0), (-0.0, 0, 0), (True, 0, 0), ("5", 0, 0), (None, 0, 0), ([1], 0, 0),
     (0.25, B.UNITS // 4, 0), (1500, 1500 * B.UNITS, 1500), (1500.0, 1500 * B.UNITS, 1500)],
)  # fmt: skip
def test_units_and_tokens_are_clamped_never_raise(value: Any, units: int, tokens: int) -> None:
    assert B.to_units(value) == units
    assert B.to_tokens(value) == tokens


@pytest.mark.parametrize(
    ("cost", "tokens", "units", "counted"),
    [(1e300, 1e300, _MAX_UNITS, _MAX_TOKENS), (_INF, _INF, _MAX_UNITS, _MAX_TOKENS),
     (2**70, 2**70, _MAX_UNITS, _MAX_TOKENS), (-1, -1, 0, 0), (-1e300, -(2**70), 0, 0), (_NAN, _NAN, 0, 0)],
)  # fmt: skip
async def test_observer_counts_hostile_records_and_never_raises(tmp_path: Any, cost: Any, tokens: Any,
                                                                units: int, counted: int) -> None:  # fmt: skip
    store = LocalStore(JsonlSink(tmp_path / "runs"))
    tracker = B.BudgetTracker(budgets(1.0, 1000), store.sink, store=store)
    # No run file yet: spend starts at 0; the call holds 7 units and 9 tokens.
    admitted = await store.reserve("r", "req_1", 7, 9, Limits(B.UNITS, 1000))
    assert admitted.refused is None and store.reserved("r") == (7, 9)
    tracker.observe(make_record(cost_usd=cost, total_tokens=tokens))
    # The reservation is released and the spend counted, clamped: never negative, never lost.
    assert store.reserved("r") == (0, 0)
    spent = store.seen_spend("r")
    assert spent == (units, counted) and all(isinstance(x, int) for x in spent)
    tracker.observe(make_record(request_id="req_2", cost_usd=0.5, total_tokens=10))
    assert tracker.spend("r") == (B.fmt_usd(units + B.UNITS // 2), counted + 10)


@pytest.mark.parametrize(("max_tokens", "admitted"), [(5, 4), (1, 5)])
async def test_overshoot_bound_under_concurrency(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                 max_tokens: int, admitted: int) -> None:  # fmt: skip
    """20 calls at once on a small budget: spend <= limit + sum over admitted of max(0, actual - reserved)."""
    limit = 100_000 if max_tokens == 1 else 200_000
    reserved = EST_IN * 1500 + max_tokens * 6000  # units; actual is CALL_UNITS whatever max_tokens says
    assert limit // reserved == admitted
    proxy = await make_proxy(pricebook=PRICES, budgets=budgets(usd(limit)))
    # Each upstream call takes 0.3 s, so all 20 are in flight together (no record yet to count).
    c = make_client(proxy, run_id="swarm", headers={"X-Fake": "think:0.3"})
    results = await asyncio.wait_for(asyncio.gather(*(chat(c, max_tokens=max_tokens) for _ in range(20))), 10)
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [refusal(r) for r in results if isinstance(r, Exception)]
    assert len(ok) == admitted and len(refused) == 20 - admitted
    assert all("reserved by calls in flight" in m for m in refused)
    recs = await proxy.wait_records("swarm", 20)
    spend = sum(B.to_units(r["cost_usd"]) for r in recs)
    assert len(recs) == 20 and spend == admitted * CALL_UNITS
    bound = admitted * max(0, CALL_UNITS - reserved)
    assert spend <= limit + bound
    assert 20 * CALL_UNITS > limit + bound  # without reservations the run would have overshot
    assert len(fake_upstream.requests) == admitted
    # Every reservation was released with its record: the next call sees only recorded spend.
    resp = await chat(make_client(proxy, run_id="swarm"), max_tokens=max_tokens)
    spent = B.fmt_usd(spend)
    if spend + reserved <= limit:
        assert resp.headers["X-Run-Spend-Usd"] == spent
    else:
        assert f"has reached its USD budget: spent ${spent} of its" in refusal(resp)


def test_units_and_reserve() -> None:
    assert B.fmt_usd(34500) == "0.00000345" and B.fmt_usd(0) == "0" and B.fmt_usd(25 * B.UNITS) == "25"
    assert B.to_units(0.1) + B.to_units(0.2) == B.to_units(0.3)  # exact, unlike floats
    assert B.to_units(None) == 0 and B.to_units(True) == 0 and B.to_units(float("nan")) == 0
    assert B.output_reserve({"max_tokens": 10, "max_completion_tokens": 50}, "chat") == 50
    assert B.output_reserve({"max_tokens": 10, "n": 3}, "chat") == 30
    assert B.output_reserve({"max_tokens": 10, "n": 2, "best_of": 4}, "completions") == 40
    assert B.output_reserve({"max_output_tokens": 7}, "responses") == 7
    assert B.output_reserve({"max_tokens": True}, "chat") == B.UNCAPPED_OUTPUT_RESERVE
    assert B.output_reserve({"max_tokens": 10}, "embeddings") == 0


async def test_resume_never_reads_through_a_planted_link(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                         tmp_path: Any) -> None:  # fmt: skip
    """runs/linked.jsonl -> another directory's JSONL: its spend is not replayed; the run's budgeted
    calls are refused (recording unavailable) instead of being judged on someone else's records."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    spent = outside / "spent.jsonl"
    spent.write_bytes(orjson.dumps({"request_id": "req_x", "cost_usd": 0.75, "total_tokens": 1000}) + b"\n")
    before = spent.read_bytes()
    (runs / "linked.jsonl").symlink_to(spent)
    proxy = await make_proxy(pricebook=PRICES, budgets=budgets(1.0, 2000))
    exc = await chat(make_client(proxy, run_id="linked"), max_tokens=1)
    assert isinstance(exc, openai.InternalServerError) and exc.status_code == 503, exc
    err = exc.response.json()["error"]
    assert err["code"] == "recording_unavailable"
    why = f"{runs / 'linked.jsonl'}: is a symlink (or not a regular file): refusing to read through it"
    assert why in err["message"]
    assert fake_upstream.requests == [] and proxy.server.app[B.BUDGETS].spend("linked") is None
    assert spent.read_bytes() == before
    # A run with a real file is replayed as before.
    assert (await chat(make_client(proxy, run_id="fine"), max_tokens=1)).status_code == 200
