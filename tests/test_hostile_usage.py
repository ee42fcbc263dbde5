"""Hostile usage from an upstream (issue 11), through the real proxy: its counts and costs are validated,
budgets count a safe value, a run's history survives a restart, and a huge usage block is no huge record.

The fake upstream sends the usage block named by X-Fake-Usage (tests/conftest.py) with the normal answer:
11 prompt + 3 completion tokens for gpt-4o-mini ($0.15 / $0.60 per million tokens) unless the block says
otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy import budget_store
from proxy import budgets as B
from proxy import usage as U
from proxy.config import BudgetRule, Budgets
from proxy.pricing import BUNDLED_PRICES, PriceBook
from proxy.records import Record
from tests.conftest import FakeUpstream, Messages, ProxyFactory, make_client

MSGS: Messages = [{"role": "user", "content": "Hi"}]
PRICES = PriceBook.load(BUNDLED_PRICES)
CALL_UNITS = 11 * 1500 + 3 * 6000  # 1e-10 USD: the table's price of the fake's normal answer
EST_IN = 9  # estimate_input_tokens(MSGS): (2 chars + 3) // 4 + 4 per message + 3
EST_OUT = 3  # estimate_output_tokens of the fake's 12 characters of content ("Hello there!")
NORMAL = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}

# The record's invalid-usage flag and the bounded usage_raw are filled in forward.py's _record (not
# this change's file); until that is wired these tests are expected to fail, and then they must pass.
WIRED = "usage_invalid" in {f.name for f in dataclasses.fields(Record)}
needs_wiring = pytest.mark.xfail(not WIRED, strict=True,
                                 reason="forward.py _record: usage_invalid, with_estimates, bounded_raw")  # fmt: skip


def hostile(**fields: Any) -> dict[str, str]:
    """Headers that make the fake upstream answer with the normal usage block, fields replaced."""
    # json, not orjson: it writes integers past 64 bits (2**70) as the wire would carry them.
    return {"X-Fake-Usage": json.dumps({**NORMAL, **fields})}


async def chat(c: openai.AsyncOpenAI, stream: bool = False, **kwargs: Any) -> Any:
    """One chat call (a stream read to its end); the raw response, or the APIStatusError raised."""
    try:
        resp = await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS,
                                                                 stream=stream, **kwargs)  # fmt: skip
    except openai.APIStatusError as exc:
        return exc
    if stream:
        events = resp.parse()
        assert isinstance(events, openai.AsyncStream)  # stream is a bool here: the SDK's types allow either
        _ = [chunk async for chunk in events]
    return resp


def usd_budget(usd: float | None = 1.0, tokens: int | None = None) -> Budgets:
    return Budgets(default=BudgetRule(usd=usd, tokens=tokens))


# -- budgets: an upstream's cost never lowers spend, never goes uncounted ---------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
async def test_negative_upstream_cost_never_lowers_spend(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                         stream: bool) -> None:  # fmt: skip
    proxy = await make_proxy(pricebook=PRICES, budgets=usd_budget())
    assert (await chat(make_client(proxy, run_id="neg"), max_tokens=1)).status_code == 200
    c = make_client(proxy, run_id="neg", headers=hostile(cost=-100))
    assert (await chat(c, stream, max_tokens=1)).status_code == 200
    recs = await proxy.wait_records("neg", 2)
    # The upstream's charge is not believed: the price table's is the cost, and the rejected one is not kept.
    assert [B.to_units(r["cost_usd"]) for r in recs] == [CALL_UNITS, CALL_UNITS]
    assert recs[1]["cost_source"] == "price_table" and recs[1]["upstream_cost_usd"] is None
    assert recs[1]["usage_raw"]["cost"] == -100  # the raw block is kept as it came
    resp = await chat(make_client(proxy, run_id="neg"), max_tokens=1)
    assert resp.headers["X-Run-Spend-Usd"] == B.fmt_usd(2 * CALL_UNITS)


async def test_absurd_upstream_cost_is_counted_and_survives_a_restart(make_proxy: ProxyFactory,
                                                                     fake_upstream: FakeUpstream) -> None:  # fmt: skip
    cfg = {"pricebook": PRICES, "budgets": usd_budget()}
    first = await make_proxy(**cfg)
    assert (await chat(make_client(first, run_id="huge", headers=hostile(cost=1e300)), max_tokens=1)).status_code == 200
    [rec] = await first.wait_records("huge", 1)
    assert B.to_units(rec["cost_usd"]) == CALL_UNITS and rec["upstream_cost_usd"] is None
    # The spend was counted (the observer did not raise), so the next call sees it.
    resp = await chat(make_client(first, run_id="huge"), max_tokens=1)
    assert resp.status_code == 200 and resp.headers["X-Run-Spend-Usd"] == B.fmt_usd(CALL_UNITS)
    await first.wait_records("huge", 2)
    await first.server.close()  # the restart: a new proxy on the same runs dir
    second = await make_proxy(**cfg)
    resp = await chat(make_client(second, run_id="huge"), max_tokens=1)
    assert resp.status_code == 200 and resp.headers["X-Run-Spend-Usd"] == B.fmt_usd(2 * CALL_UNITS)


@pytest.mark.parametrize(
    "fields",
    [{"prompt_tokens": -5}, {"prompt_tokens": "11"}, {"prompt_tokens": True}, {"prompt_tokens": 200_000_000},
     {"completion_tokens": 1e300}, {"completion_tokens": 2**70}, {"total_tokens": -14},
     {"prompt_tokens_details": {"cached_tokens": 150_000_000}}, {"completion_tokens": 100_000_001}],
    ids=["negative", "string", "bool", "200M", "1e300", "2**70", "negative-total", "cached-150M", "bound+1"],
)  # fmt: skip
async def test_hostile_counts_never_reach_the_record_or_the_budget(make_proxy: ProxyFactory,
                                                                   fake_upstream: FakeUpstream,
                                                                   fields: dict[str, Any]) -> None:  # fmt: skip
    proxy = await make_proxy(pricebook=PRICES, budgets=usd_budget(1.0, 1_000_000_000))
    assert (await chat(make_client(proxy, run_id="counts", headers=hostile(**fields)), max_tokens=1)).status_code == 200
    [rec] = await proxy.wait_records("counts", 1)
    for name in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
                 "total_tokens"):  # fmt: skip
        assert isinstance(rec[name], int) and 0 <= rec[name] <= U.MAX_TOKENS_PER_CALL, (name, rec[name])
    assert rec["cached_input_tokens"] <= rec["input_tokens"] or rec["input_tokens"] == 0
    assert math.isfinite(rec["cost_usd"]) and 0 <= B.to_units(rec["cost_usd"]) <= CALL_UNITS
    resp = await chat(make_client(proxy, run_id="counts"), max_tokens=1)
    assert resp.headers["X-Run-Spend-Tokens"] == str(rec["total_tokens"])
    assert resp.headers["X-Run-Spend-Usd"] == B.fmt_usd(B.to_units(rec["cost_usd"]))


# -- replay: a run's history survives a restart whatever its file holds ------------------------------


async def test_restart_replays_a_run_file_of_hostile_lines(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                           tmp_path: Path) -> None:  # fmt: skip
    runs = tmp_path / "runs"
    runs.mkdir()
    lines = [
        b'{"request_id": "req_ok", "cost_usd": 0.25, "total_tokens": 1000}',
        b'{"request_id": "req_neg", "cost_usd": -100, "total_tokens": -5000}',  # counts 0, never less
        b'{"request_id": "req_neg_zero", "cost_usd": -0.0, "total_tokens": -0.0}',
        b'{"request_id": "req_str", "cost_usd": "0.5", "total_tokens": "10"}',
        b'{"request_id": "req_bool", "cost_usd": true, "total_tokens": true}',
        b'{"request_id": "req_obj", "cost_usd": {"usd": 1}, "total_tokens": [1]}',
        b'{"request_id": ["not", "hashable"], "cost_usd": 0.125, "total_tokens": 10}',  # counted
        b'{"request_id": {"an": "object"}, "cost_usd": 0.125, "total_tokens": 10}',  # counted
        b'{"request_id": "req_nan", "cost_usd": NaN, "total_tokens": Infinity}',  # not JSON: skipped
        b'{"request_id": "req_inf", "cost_usd": 1e400}',  # not a double: skipped
        b"[1, 2, 3]", b'"a string"', b"null", b"", b"\xff\xfe\x00",
        b'{"request_id": "req_deep", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",  # deeper than orjson reads
    ]
    (runs / "hostile.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    proxy = await make_proxy(pricebook=PRICES, budgets=usd_budget(1.0, 2000))
    resp = await chat(make_client(proxy, run_id="hostile"), max_tokens=1)
    assert resp.status_code == 200
    assert resp.headers["X-Run-Spend-Usd"] == "0.5" and resp.headers["X-Run-Spend-Tokens"] == "1020"
    tracker = proxy.server.app[B.BUDGETS]
    await proxy.settle(1)  # the record is counted when the call's handler ends, just after the response
    assert tracker.spend("hostile") == (B.fmt_usd(B.UNITS // 2 + CALL_UNITS), 1034)


async def test_restart_clamps_absurd_spend_and_keeps_the_run_refused(make_proxy: ProxyFactory,
                                                                     fake_upstream: FakeUpstream,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    runs = tmp_path / "runs"
    runs.mkdir()
    lines = [
        b'{"request_id": "req_ok", "cost_usd": 0.25, "total_tokens": 1000}',
        # Written by a proxy that believed an upstream's usage.cost: 1e300 and a 2**70-token count.
        b'{"request_id": "req_huge", "cost_usd": 1e300, "total_tokens": 1180591620717411303424}',
    ]
    (runs / "absurd.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    proxy = await make_proxy(pricebook=PRICES, budgets=usd_budget(5.0, 10**9))
    for _ in range(2):  # the history is not forgotten after the first refusal either
        exc = await chat(make_client(proxy, run_id="absurd"), max_tokens=1)
        assert isinstance(exc, openai.RateLimitError), exc  # a 429 with the run's spend, not a 500
        assert "has reached its USD budget: spent $1000000000000.25 of its $5 limit" in str(exc)
        assert exc.response.headers["X-Run-Spend-Tokens"] == str(10**12 + 1000)
    assert fake_upstream.requests == []


async def test_replay_that_fails_refuses_instead_of_forgetting(make_proxy: ProxyFactory,
                                                               fake_upstream: FakeUpstream, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "kept.jsonl").write_bytes(b'{"request_id": "req_ok", "cost_usd": 0.25, "total_tokens": 1000}\n')
    real = budget_store.read_totals  # the replay moved to the budget store

    def broken(*args: Any) -> tuple[int, int]:
        raise RuntimeError("a bug in replay")

    monkeypatch.setattr(budget_store, "read_totals", broken)
    proxy = await make_proxy(pricebook=PRICES, budgets=usd_budget())
    exc = await chat(make_client(proxy, run_id="kept"), max_tokens=1)
    # Not admitted on a spend of 0: the call is refused as for an unreadable run file, and nothing is sent.
    assert isinstance(exc, openai.InternalServerError) and exc.status_code == 503, exc
    assert exc.response.json()["error"]["code"] == "recording_unavailable"
    assert fake_upstream.requests == []
    monkeypatch.setattr(budget_store, "read_totals", real)
    resp = await chat(make_client(proxy, run_id="kept"), max_tokens=1)  # the next call reads the file again
    assert resp.status_code == 200 and resp.headers["X-Run-Spend-Usd"] == "0.25"


# -- the record: the invalid flag, the estimate, a bounded usage_raw ---------------------------------


@needs_wiring
@pytest.mark.parametrize(
    ("fields", "invalid", "tokens"),
    [({"prompt_tokens": -5}, ["input_tokens"], (EST_IN, 3)),
     ({"prompt_tokens": "11", "completion_tokens": 1e300}, ["input_tokens", "output_tokens"], (EST_IN, EST_OUT)),
     ({"completion_tokens": 200_000_000, "total_tokens": 200_000_011}, ["output_tokens", "total_tokens"],
      (11, EST_OUT)),
     ({"prompt_tokens_details": {"cached_tokens": -1}}, ["cached_input_tokens"], (11, 3)),
     ({"cost": -100}, ["upstream_cost_usd"], (11, 3)),
     ({"cost": 1e300, "total_tokens": True}, ["total_tokens", "upstream_cost_usd"], (11, 3))],
    ids=["negative-input", "string-and-1e300", "200M-output", "negative-cached", "negative-cost", "1e300-cost"],
)  # fmt: skip
@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
async def test_record_flags_invalid_usage_and_estimates_the_counts(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream, fields: dict[str, Any], invalid: list[str],
    tokens: tuple[int, int], stream: bool,
) -> None:
    proxy = await make_proxy(pricebook=PRICES)
    assert (await chat(make_client(proxy, run_id="flag", headers=hostile(**fields)), stream)).status_code == 200
    assert (await chat(make_client(proxy, run_id="flag"), stream)).status_code == 200
    rec, normal = await proxy.wait_records("flag", 2)
    assert rec["usage_invalid"] == invalid and normal["usage_invalid"] == []
    assert (rec["input_tokens"], rec["output_tokens"]) == tokens
    assert rec["total_tokens"] == sum(tokens)
    # "estimated" exactly when a count in the record is the proxy's estimate rather than the upstream's.
    estimated = bool({"input_tokens", "output_tokens"} & set(invalid))
    assert rec["usage_source"] == ("estimated" if estimated else "upstream")
    assert rec["usage_raw"] == {**NORMAL, **fields}  # kept as it came: the evidence of what was rejected
    assert rec["upstream_cost_usd"] is None and rec["cost_source"] == "price_table"


@needs_wiring
@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
async def test_huge_usage_block_gives_a_small_record(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                     stream: bool) -> None:  # fmt: skip
    pad = 4 << 20
    proxy = await make_proxy(pricebook=PRICES)
    headers = {**hostile(), "X-Fake-Usage-Pad": str(pad)}
    assert (await chat(make_client(proxy, run_id="padded", headers=headers), stream)).status_code == 200
    [rec] = await proxy.wait_records("padded", 1)
    assert (proxy.runs_dir / "padded.jsonl").stat().st_size < 16 * 1024
    raw = rec["usage_raw"]
    sent = json.dumps({**NORMAL, "pad": "x" * pad}, separators=(",", ":"))
    assert raw["_truncated"] is True and raw["bytes"] == len(sent)
    assert (raw["prompt_tokens"], raw["completion_tokens"]) == (11, 3) and len(raw["pad"]) < 300
    assert (rec["input_tokens"], rec["output_tokens"], rec["usage_invalid"]) == (11, 3, [])


@needs_wiring
async def test_deeply_nested_usage_still_leaves_a_record(make_proxy: ProxyFactory,
                                                         fake_upstream: FakeUpstream) -> None:  # fmt: skip
    # orjson reads 1024 levels but writes only 255: the block, kept verbatim, made the record unwritable.
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    proxy = await make_proxy(pricebook=PRICES)
    assert (await chat(make_client(proxy, run_id="deep", headers=hostile(deep=deep)))).status_code == 200
    [rec] = await proxy.wait_records("deep", 1)
    assert rec["usage_raw"]["_truncated"] is True and rec["usage_raw"]["prompt_tokens"] == 11
    assert (rec["input_tokens"], rec["output_tokens"], rec["success"]) == (11, 3, True)
