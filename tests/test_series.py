"""GET /runs/{id}/series: cumulative cost and tokens over time, bounded, exact, from the file or PostgreSQL."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import report, series
from tests.conftest import ProxyFactory, make_client
from tests.pg_server import PgServer, pg_module
from tests.test_report import write_run
from tests.test_runs_db import _calls, _get, _union, _wait_rows, two_hosts

__all__ = ["pg_module"]  # fixture, used by name

T0 = 1_767_225_600.0  # 2026-01-01


def _records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """n calls over about a day, with a long quiet gap, unpriced and failed calls among them."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        start = T0 + i * 3.1 + (40_000 if i > n // 2 else 0) + rnd.random()
        priced = i % 7 != 3
        out.append({
            "ts": report.iso(start), "request_id": f"r{i}", "run_id": "big", "model": "m",
            "duration_ms": rnd.random() * 9000, "success": i % 11 != 5, "status": 200,
            "input_tokens": rnd.randrange(0, 3000), "output_tokens": rnd.randrange(0, 900),
            "cost_usd": round(rnd.random() * 1e-2, 10) if priced else None,
        })  # fmt: skip
    return out


def _of(path: Path, points: int = series.MAX_POINTS) -> dict[str, Any]:
    s = series.RunSeries(path, path.stem, points)
    s.update()
    return s.series_json()


@pytest.mark.parametrize("points", [1, 7, 240])
def test_series_is_bounded_and_ends_at_the_run_totals(tmp_path: Path, points: int) -> None:
    recs = _records(20_000)
    path = write_run(tmp_path, "big", recs)
    got = _of(path, points)
    totals = report.summarize(path, "big", by=()).to_json()
    assert 2 <= len(got["points"]) <= points + 1  # the zero at the first start, then at most `points` buckets
    last = got["points"][-1]
    assert last["cost_usd"] == got["cost_usd"] == totals["cost_usd"]["total"]  # exactly, not approximately
    assert last["tokens"] == got["tokens"] == totals["tokens"]["total"]
    assert last["calls"] == got["calls"] == got["records"] == 20_000
    assert last["t"] == got["last_end"] == totals["time"]["last_end"]
    assert got["points"][0] == {"t": totals["time"]["first_start"], "s": 0.0, "calls": 0, "cost_usd": 0.0,
                                "input_tokens": 0, "output_tokens": 0, "tokens": 0}  # fmt: skip
    assert got["unpriced_calls"] == sum(1 for r in recs if r["cost_usd"] is None and (r["input_tokens"] or
                                                                                      r["output_tokens"]))  # fmt: skip
    for before, after in zip(got["points"], got["points"][1:], strict=False):
        assert before["s"] <= after["s"] and before["t"] <= after["t"]
        assert before["cost_usd"] <= after["cost_usd"] and before["calls"] < after["calls"]  # no empty bucket


def test_each_point_is_the_sum_of_the_calls_ended_by_then(tmp_path: Path) -> None:
    recs = _records(3_000)
    got = _of(write_run(tmp_path, "big", recs), 50)
    ends = sorted((report._epoch(r["ts"]) + r["duration_ms"] / 1000, r) for r in recs)
    for p in got["points"][1:]:
        n, at = p["calls"], report._epoch(p["t"])
        # The calls a point counts are those that ended first (t is rounded to the millisecond).
        assert ends[n - 1][0] <= at + 0.001 and (n == len(ends) or ends[n][0] >= at - 0.001)
        assert p["tokens"] == sum(r["input_tokens"] + r["output_tokens"] for _, r in ends[:n])
        assert p["input_tokens"] + p["output_tokens"] == p["tokens"]


def test_the_order_calls_are_read_in_changes_nothing(tmp_path: Path) -> None:
    recs = _records(5_000)
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    a = _of(write_run(tmp_path / "a", "big", recs))
    b = _of(write_run(tmp_path / "b", "big", shuffled))
    assert a == b


def test_an_appended_file_is_folded_on_and_a_truncated_one_read_again(tmp_path: Path) -> None:
    recs = _records(1_000)
    path = write_run(tmp_path, "big", recs[:600], tail=b'{"ts": "2026-01-01T0')  # a line being written
    s = series.RunSeries(path, "big")
    s.update(final=False)
    assert s.series_json()["calls"] == 600
    write_run(tmp_path, "big", recs)  # same file name, rewritten in full: a new inode or a longer file
    s.update(final=False)
    assert s.series_json() == _of(path)
    write_run(tmp_path, "big", recs[:10])
    s.update(final=False)
    assert s.series_json()["calls"] == 10


async def test_endpoint_follows_a_run_through_the_proxy(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    async with make_client(proxy, run_id="chart") as client:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        await proxy.wait_records("chart", 3)
        status, doc = await _get(proxy, "/runs/chart/series")
        assert status == 200 and doc["run_id"] == "chart" and doc["records"] == 3
        _, summary = await _get(proxy, "/runs/chart")
        run = summary["runs"][0]
        assert doc["points"][-1]["cost_usd"] == run["cost_usd"]["total"] and doc["tokens"] == run["tokens"]["total"]
        assert doc["points"][-1]["t"] == run["time"]["last_end"]
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        await proxy.wait_records("chart", 4)
        _, doc = await _get(proxy, "/runs/chart/series?points=1")
        assert doc["calls"] == 4 and len(doc["points"]) == 2
    for bad in ("points=0", "points=2001", "points=x", "points=-1"):
        status, err = await _get(proxy, f"/runs/chart/series?{bad}")
        assert status == 400 and err["error"]["param"] == "points", bad
    assert (await _get(proxy, "/runs/nope/series"))[0] == 404
    assert (await _get(proxy, "/runs/..%2Fx/series"))[0] in (400, 404)
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/runs/.hidden/series")) as resp:
        assert resp.status == 400


async def test_from_postgres_equals_the_union_of_the_files(
    pg_module: PgServer, make_proxy: ProxyFactory, tmp_path: Path  # noqa: F811
) -> None:
    url, a, b = await two_hosts(pg_module, make_proxy, tmp_path)
    await _calls(a, "fleet", 5)
    await _calls(b, "fleet", 4, offset=5)
    await a.settle(5)
    await b.settle(4)
    await _wait_rows(url, 9)
    want = _of(_union(tmp_path, [a, b], "fleet"))
    for host in (a, b):
        status, doc = await _get(host, "/runs/fleet/series")
        assert status == 200 and doc == want
    assert (await _get(a, "/runs/none/series"))[0] == 404
