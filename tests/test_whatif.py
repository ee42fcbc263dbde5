"""What-if prices (report --price-as): recorded tokens re-priced from the bundled table, against hand-computed
figures; OLD=NEW mappings; unknown models; the text, JSON and CSV outputs."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import report, whatif
from proxy.cli import main
from proxy.pricing import PriceBook
from tests.test_report import rec, write_run

# Rates from the bundled table (proxy/data/model_prices.json), USD per token:
#   gpt-4.1-mini: input 4e-7, cache read 1e-7, output 1.6e-6
#   gemini-2.5-pro: input 1.25e-6, cache read 1.25e-7, output 1e-5; above 200k input tokens
#     input 2.5e-6, cache read 2.5e-7, output 1.5e-5
#   claude-sonnet-4-5: input 3e-6, cache write 3.75e-6 (5 minutes) and 6e-6 (1 hour), output 1.5e-5
CACHED = rec("00.000", model="m1", task="t1", input_tokens=1000, cached_input_tokens=400, output_tokens=200,
             cost_usd=0.01, duration_ms=100.0)  # fmt: skip
CACHED_AS_MINI = 600 * 4e-7 + 400 * 1e-7 + 200 * 1.6e-6  # 0.0006
LONG = rec("01.000", model="m1", task="t2", input_tokens=250_000, cached_input_tokens=50_000, output_tokens=1000,
           cost_usd=0.2, duration_ms=100.0)  # fmt: skip
LONG_AS_GEMINI = 200_000 * 2.5e-6 + 50_000 * 2.5e-7 + 1000 * 1.5e-5  # 0.5275: the above-200k tier
SHORT_AS_GEMINI = 100_000 * 1.25e-6 + 1000 * 1e-5  # 0.135: same model, under the tier
WRITES = rec("02.000", model="m2", task="t1", input_tokens=1000, cache_write_tokens=500, cache_write_1h_tokens=200,
             output_tokens=100, cost_usd=0.004, duration_ms=100.0)  # fmt: skip
WRITES_AS_SONNET = 500 * 3e-6 + 300 * 3.75e-6 + 200 * 6e-6 + 100 * 1.5e-5  # 0.005325
FAILED = rec("03.000", requested_model="m1", status=429, success=False, usage_source="none", duration_ms=10.0,
             error={"category": "rate_limit", "id": "0123456789ab", "detail": "fake error 429"})  # fmt: skip
UNPRICED = rec("04.000", model="m3", input_tokens=100, output_tokens=10, duration_ms=10.0)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load()


def _price_as(tmp_path: Path, records: list[dict[str, Any]], book: PriceBook, *specs: str,
              by: str = "model") -> dict[str, Any]:  # fmt: skip
    path = write_run(tmp_path / "runs", "r", records)
    repricer = whatif.Repricer(book, whatif.parse(list(specs)))
    doc = report.report_json([report.summarize(path, "r", (by,), price_as=repricer)])
    return doc


def test_cache_reads_are_priced_at_the_targets_cache_rate(tmp_path: Path, book: PriceBook) -> None:
    doc = _price_as(tmp_path, [CACHED], book, "gpt-4.1-mini")
    p = doc["runs"][0]["price_as"]
    assert p["total"] == pytest.approx(CACHED_AS_MINI)
    assert p["breakdown"] == pytest.approx({"input": 600 * 4e-7, "cached_input": 400 * 1e-7, "cache_write": 0.0,
                                            "output": 200 * 1.6e-6})  # fmt: skip
    assert p["recorded"] == pytest.approx(0.01)
    assert p["delta"] == pytest.approx(CACHED_AS_MINI - 0.01)
    assert p["pct"] == pytest.approx((CACHED_AS_MINI - 0.01) / 0.01 * 100, abs=0.01)
    assert doc["price_as"] == {"models": {"*": "gpt-4.1-mini"}, "note": whatif.TOKENIZER_NOTE}


def test_long_context_tier_is_chosen_per_call(tmp_path: Path, book: PriceBook) -> None:
    short = rec("05.000", model="m1", task="t2", input_tokens=100_000, output_tokens=1000, cost_usd=0.1)
    doc = _price_as(tmp_path, [LONG, short], book, "gemini-2.5-pro")
    assert doc["runs"][0]["price_as"]["total"] == pytest.approx(LONG_AS_GEMINI + SHORT_AS_GEMINI)
    assert doc["runs"][0]["price_as"]["repriced_recorded_usd"] == pytest.approx(0.3)


def test_cache_writes_use_the_5m_and_1h_rates(tmp_path: Path, book: PriceBook) -> None:
    doc = _price_as(tmp_path, [WRITES], book, "claude-sonnet-4-5")
    assert doc["runs"][0]["price_as"]["total"] == pytest.approx(WRITES_AS_SONNET)
    assert doc["runs"][0]["price_as"]["breakdown"]["cache_write"] == pytest.approx(300 * 3.75e-6 + 200 * 6e-6)


def test_an_upstream_charge_is_not_carried_over(tmp_path: Path, book: PriceBook) -> None:
    charged = dict(CACHED, upstream_cost_usd=5.0, cost_source="upstream", cost_usd=5.0)
    doc = _price_as(tmp_path, [charged], book, "gpt-4.1-mini")
    assert doc["runs"][0]["price_as"]["total"] == pytest.approx(CACHED_AS_MINI)


def test_calls_without_usage_and_unpriced_calls_are_counted(tmp_path: Path, book: PriceBook) -> None:
    doc = _price_as(tmp_path, [CACHED, FAILED, UNPRICED], book, "gpt-4.1-mini")
    p = doc["runs"][0]["price_as"]
    assert (p["repriced_calls"], p["no_usage_calls"], p["unpriced_recorded_calls"], p["kept_calls"]) == (2, 1, 1, 0)
    assert p["total"] == pytest.approx(CACHED_AS_MINI + 100 * 4e-7 + 10 * 1.6e-6)
    assert p["repriced_recorded_usd"] == pytest.approx(0.01)  # the unpriced call recorded no cost


def test_old_new_mapping_keeps_other_models_at_their_recorded_cost(tmp_path: Path, book: PriceBook) -> None:
    doc = _price_as(tmp_path, [CACHED, LONG, WRITES, FAILED], book, "M1=gpt-4.1-mini")
    run = doc["runs"][0]
    p = run["price_as"]
    long_as_mini = 200_000 * 4e-7 + 50_000 * 1e-7 + 1000 * 1.6e-6
    assert p["total"] == pytest.approx(CACHED_AS_MINI + long_as_mini + 0.004)
    assert (p["repriced_calls"], p["kept_calls"], p["no_usage_calls"]) == (2, 1, 1)  # the 429 asked for m1
    groups = {g["key"]: g["price_as"] for g in run["breakdown"]["model"]}
    assert groups["m2"]["total"] == pytest.approx(0.004) and groups["m2"]["delta"] == 0
    assert groups["m1"]["total"] == pytest.approx(CACHED_AS_MINI + long_as_mini)


def test_several_mappings_and_a_default(tmp_path: Path, book: PriceBook) -> None:
    doc = _price_as(tmp_path, [CACHED, WRITES, UNPRICED], book, "m2=claude-sonnet-4-5", "gpt-4.1-mini")
    p = doc["runs"][0]["price_as"]
    assert p["total"] == pytest.approx(CACHED_AS_MINI + WRITES_AS_SONNET + 100 * 4e-7 + 10 * 1.6e-6)
    assert doc["price_as"]["models"] == {"m2": "claude-sonnet-4-5", "*": "gpt-4.1-mini"}


@pytest.mark.parametrize("specs", [["a=b", "A=c"], ["x", "y"], ["=x"], ["x="], [" "]])
def test_bad_specs(specs: list[str]) -> None:
    with pytest.raises(ValueError, match="--price-as"):
        whatif.parse(specs)


def test_unknown_target_model_is_refused(book: PriceBook) -> None:
    with pytest.raises(ValueError, match="no price for 'no-such-model-x'"):
        whatif.Repricer(book, {"*": "no-such-model-x"})


# -- the command -----------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    write_run(tmp_path / "runs", "r", [CACHED, LONG, WRITES, FAILED, UNPRICED])
    return tmp_path / "runs"


def test_cli_text_shows_the_what_if_next_to_the_recorded_cost(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "r", "--runs-dir", str(runs), "--price-as", "gpt-4.1-mini"]) == 0
    out = capsys.readouterr().out
    assert "what-if prices: gpt-4.1-mini" in out
    assert "another model's tokenizer counts the same text differently" in out
    line = next(x for x in out.splitlines() if x.startswith("  price as"))
    assert "(recorded $0.214000;" in line
    assert "4 calls re-priced, 1 call without usage" in line and "1 call unpriced when recorded" in line
    assert " as $ " in out  # the breakdown's what-if column


def test_cli_json_and_csv_fields(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "r", "--runs-dir", str(runs), "--price-as", "m1=gpt-4.1-mini", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["schema"] == report.SCHEMA  # fields added, nothing bumped
    p = doc["runs"][0]["price_as"]
    assert set(p) == {"total", "recorded", "delta", "pct", "repriced_calls", "repriced_usd", "repriced_recorded_usd",
                      "breakdown", "unpriced_recorded_calls", "no_usage_calls", "kept_calls",
                      "tool_fees_unpriced_calls"}  # fmt: skip
    assert main(["report", "r", "--runs-dir", str(runs), "--price-as", "m1=gpt-4.1-mini", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(rows[0]["price_as_cost_usd"]) == pytest.approx(p["total"])
    assert float(rows[0]["price_as_delta_usd"]) == pytest.approx(p["delta"])
    assert rows[0]["price_as_kept_calls"] == "2" and rows[0]["price_as_repriced_calls"] == "2"
    m2 = next(r for r in rows if r["group"] == "m2")
    assert float(m2["price_as_cost_usd"]) == pytest.approx(0.004)


def test_cli_without_price_as_is_unchanged(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "r", "--runs-dir", str(runs), "--csv"]) == 0
    assert "price_as_" not in capsys.readouterr().out
    assert main(["report", "r", "--runs-dir", str(runs), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert "price_as" not in doc and "price_as" not in doc["runs"][0]


def test_cli_unknown_or_malformed_model_exits_2(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "r", "--runs-dir", str(runs), "--price-as", "no-such-model-x"]) == 2
    assert "no price for 'no-such-model-x'" in capsys.readouterr().err
    assert main(["report", "r", "--runs-dir", str(runs), "--price-as", "a="]) == 2
    assert "MODEL or OLD=NEW" in capsys.readouterr().err


# -- GET /runs/{id}?price_as= ----------------------------------------------------------------------


async def test_runs_endpoint_takes_price_as(tmp_path: Path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from proxy import runs_api
    from proxy.app import error_middleware

    runs = tmp_path / "runs"
    write_run(runs, "r", [CACHED, FAILED])
    app = web.Application(middlewares=[error_middleware])  # renders the 400 as the proxy does
    runs_api.install(app, runs_api.RunsApi(runs))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/runs/r", params=[("price_as", "gpt-4.1-mini"), ("by", "task")])
        doc = await resp.json()
        assert doc["runs"][0]["price_as"]["total"] == pytest.approx(CACHED_AS_MINI)
        assert doc["runs"][0]["price_as"]["no_usage_calls"] == 1
        assert doc["price_as"]["note"] == whatif.TOKENIZER_NOTE
        assert "price_as" in doc["runs"][0]["breakdown"]["task"][0]
        plain = await (await client.get("/runs/r")).json()
        assert "price_as" not in plain and "price_as" not in plain["runs"][0]  # a separate cached summary
        resp = await client.get("/runs/r", params={"price_as": "no-such-model-x"})
        assert resp.status == 400
        body = await resp.json()
        assert body["error"]["param"] == "price_as" and "no-such-model-x" in body["error"]["message"]


def test_server_tool_calls_are_priced_at_the_targets_fee(tmp_path: Path, book: PriceBook) -> None:
    # claude-sonnet-4-5: web search $0.01 per call (search_context_cost_per_query in the bundled table)
    searched = rec("06.000", model="m1", input_tokens=1000, output_tokens=100, server_tool_calls={"web_search": 3},
                   cost_usd=0.01)  # fmt: skip
    p = _price_as(tmp_path, [searched], book, "claude-sonnet-4-5")["runs"][0]["price_as"]
    assert p["total"] == pytest.approx(1000 * 3e-6 + 100 * 1.5e-5 + 3 * 0.01)
    assert p["breakdown"]["tool_fees"] == pytest.approx(0.03)
    assert p["tool_fees_unpriced_calls"] == 0
