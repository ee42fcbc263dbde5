"""Records shipped into a real PostgreSQL (started by tests/pg_server.py): exactly once, columns equal to the
records, through outages and SIGKILLs; the schema migrates itself, once, under a lock."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy import config as C
from proxy import pg
from proxy.shipper import Batch, Shipper, Shipping
from tests.conftest import FakeUpstream, ProxyFactory, make_client, make_record
from tests.helpers import CHAT, MSG, parse_lines, post, serve
from tests.pg_server import PgServer, new_database, pg_module, pg_own  # noqa: F401 - fixtures

asyncpg = pytest.importorskip("asyncpg")


async def fetch(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def count(url: str) -> int:
    try:
        rows = await fetch(url, "SELECT count(*) AS n FROM calls")
    except asyncpg.UndefinedTableError:
        return 0
    return int(rows[0]["n"])


async def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.05)


def file_ids(runs: Path) -> list[str]:
    return sorted(r["request_id"] for p in runs.glob("*.jsonl") for r in parse_lines(p))


def pg_shipping(runs: Path, url: str, batch_size: int = 500) -> Shipping:
    cfg = C.ShipPostgres(url=url, batch_size=batch_size, interval_s=0.02)
    return Shipping(runs, [Shipper(runs, pg.PostgresDestination(cfg), batch_size, cfg.interval_s, 0.1)], 60.0)


def _same(column: Any, value: Any) -> bool:
    if isinstance(value, float) and isinstance(column, float):
        return math.isclose(column, value, rel_tol=1e-12)
    return bool(column == value)


async def test_records_through_a_real_proxy_arrive_once_with_their_values(
    make_proxy: ProxyFactory, pg_module: PgServer  # noqa: F811
) -> None:
    url = await new_database(pg_module)
    ship = C.Ship(postgres=C.ShipPostgres(url=url, batch_size=4, interval_s=0.02))
    proxy = await make_proxy(ship=ship)
    client = make_client(proxy, run_id="pg-run", headers={"X-Task-Name": "sum", "X-Meter-Tag-Variant": "A"})
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    async for _ in stream:
        pass
    status, _, _ = await post(proxy.url(CHAT), {"model": "gpt-4o-mini", "messages": MSG},
                              headers={"X-Run-Id": "pg-run", "X-Fake": "status:429"})  # fmt: skip
    assert status == 429
    await post(proxy.url(CHAT), {"model": "m"}, headers={"X-Run-Id": "../bad"})  # .rejected.jsonl, run_id null
    await proxy.settle(6)
    recs = await proxy.records("pg-run") + await proxy.records(".rejected")
    await wait_until(lambda: _has(url, 6), what="6 rows")
    rows = {r["request_id"]: r for r in await fetch(url, "SELECT * FROM calls")}
    assert sorted(rows) == sorted(r["request_id"] for r in recs)
    for rec in recs:
        got = rows[rec["request_id"]]
        assert orjson.loads(got["record"]) == rec
        assert got["ts"].isoformat(timespec="milliseconds").replace("+00:00", "Z") == rec["ts"]
        assert orjson.loads(got["tags"]) == rec["tags"]
        err = rec["error"] or {}
        assert (got["error_category"], got["error_id"], got["error_detail"]) == (
            err.get("category"), err.get("id"), err.get("detail"))
        for name in pg.COLUMN_NAMES:
            if name not in ("ts", "tags", "record", "shipped_by") and not name.startswith("error_"):
                assert _same(got[name], rec[name]), (name, got[name], rec[name])
    assert {r["run_id"] for r in rows.values()} == {"pg-run", None}
    assert [r["version"] for r in await fetch(url, "SELECT version FROM metering_proxy_schema")] == [1, 2]


async def test_version_2_numbers_the_rows_of_a_version_1_table_and_new_rows_follow(
    pg_module: PgServer,  # noqa: F811
) -> None:
    url = await new_database(pg_module)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():  # a database that a version-1 proxy made and filled
            await conn.execute("CREATE TABLE metering_proxy_schema "
                               "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            for statement in pg.MIGRATIONS[0]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO metering_proxy_schema (version) VALUES (1)")
        old = [pg.row(orjson.loads(make_record(request_id=f"old{i}").to_json()), "h") for i in range(3)]
        await conn.copy_records_to_table("calls", records=old, columns=pg.COLUMN_NAMES)
        assert await pg.migrate(conn) == 2
    finally:
        await conn.close()
    dest = pg.PostgresDestination(C.ShipPostgres(url=url))
    try:
        await dest.deliver(Batch("b", [orjson.loads(make_record(request_id="new").to_json())], ()))
    finally:
        await dest.close()
    rows = await fetch(url, "SELECT request_id, seq FROM calls ORDER BY seq")
    assert sorted(r["request_id"] for r in rows[:3]) == ["old0", "old1", "old2"]
    assert rows[3]["request_id"] == "new" and len({r["seq"] for r in rows}) == 4


async def _has(url: str, n: int) -> bool:
    return await count(url) >= n


async def test_migrations_run_once_when_proxies_start_together(pg_module: PgServer) -> None:  # noqa: F811
    url = await new_database(pg_module)
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        versions = await asyncio.gather(*(pg.migrate(c) for c in conns))
        assert versions == [pg.SCHEMA_VERSION] * 4
        assert await pg.migrate(conns[0]) == pg.SCHEMA_VERSION  # again: nothing to do
    finally:
        for c in conns:
            await c.close()
    assert [r["version"] for r in await fetch(url, "SELECT version FROM metering_proxy_schema")] == [1, 2]
    cols = [r["column_name"] for r in await fetch(
        url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'calls' ORDER BY ordinal_position")]
    assert cols == [*pg.COLUMN_NAMES, "shipped_at", "seq"]


async def test_hostile_values_never_wedge_the_shipper(tmp_path: Path, pg_module: PgServer) -> None:  # noqa: F811
    url = await new_database(pg_module)
    runs = tmp_path / "runs"
    runs.mkdir()
    base = orjson.loads(make_record(request_id="ok-1", run_id="h").to_json())
    hostile: list[dict[str, Any]] = [
        {**base, "request_id": "nul", "task": "a\x00b", "model": "m\x00", "tags": {"k\x00": "v\x00"}},
        {**base, "request_id": "huge", "input_tokens": 2**63, "output_tokens": -(2**70), "duration_ms": 1e300,
         "cost_usd": -1e308, "status": 2**40, "ttft_ms": "12"},
        {**base, "request_id": "types", "stream": "yes", "success": 1, "tags": ["x"], "error": "boom", "ts": 5,
         "usage_raw": {"deep": [[[[{"x": None}]]]]}},
        {**base, "request_id": "long", "model": "x" * 100_000, "error": {"category": "unknown", "detail": "d" * 10**6}},
        {**base, "request_id": "ts", "ts": "9999-12-31T23:59:59.999Z"},
        {**base, "request_id": "ts2", "ts": "not a time"},
    ]
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in [base, *hostile])  # json: integers past 64 bits
    lines += b'{"request_id": "nan", "cost_usd": NaN, "input_tokens": 100000000000000000000000}\n'
    (runs / "h.jsonl").write_bytes(lines)
    s = pg_shipping(runs, url)
    await s.start()
    try:
        await wait_until(lambda: _has(url, 8), what="8 rows")
    finally:
        await s.close()
    rows = {r["request_id"]: r for r in await fetch(url, "SELECT * FROM calls")}
    assert rows["nul"]["task"] == "a\ufffdb" and orjson.loads(rows["nul"]["record"])["tags"] == {"k\ufffd": "v\ufffd"}
    huge = rows["huge"]
    assert (huge["input_tokens"], huge["output_tokens"], huge["duration_ms"], huge["cost_usd"], huge["status"],
            huge["ttft_ms"]) == (None, None, None, None, None, None)  # fmt: skip
    assert orjson.loads(huge["record"])["input_tokens"] == 2**63  # the JSONB keeps what the record said
    types = rows["types"]
    assert (types["stream"], types["success"], types["tags"], types["error_category"], types["ts"]) == (
        None, None, None, None, None)
    assert len(rows["long"]["model"]) == 1024 and len(rows["long"]["error_detail"]) == 4096
    assert len(orjson.loads(rows["long"]["record"])["model"]) == 100_000
    assert rows["ts"]["ts"].year == 9999 and rows["ts2"]["ts"] is None
    assert rows["nan"]["cost_usd"] is None and orjson.loads(rows["nan"]["record"])["cost_usd"] is None


async def test_the_same_batch_twice_is_inserted_once(pg_module: PgServer) -> None:  # noqa: F811
    from proxy.shipper import Batch

    url = await new_database(pg_module)
    dest = pg.PostgresDestination(C.ShipPostgres(url=url))
    recs = [orjson.loads(make_record(request_id=f"r{i}").to_json()) for i in range(5)]
    try:
        await dest.deliver(Batch("b", recs, ()))
        await dest.deliver(Batch("b", recs, ()))
        await dest.deliver(Batch("c", recs[2:] + recs[2:], ()))  # duplicates inside one batch too
    finally:
        await dest.close()
    assert await count(url) == 5


# -- real serve processes -------------------------------------------------------------------------


def ship_cfg(url: str, batch_size: int = 200) -> dict[str, Any]:
    return {"postgres": {"url": url, "batch_size": batch_size, "interval_ms": 50}, "retry_max_s": 0.2,
            "degraded_after_s": 1}  # fmt: skip


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


@pytest.mark.slow
async def test_postgres_stopped_mid_load_then_restarted(fake_upstream: FakeUpstream, tmp_path: Path,
                                                         pg_own: PgServer) -> None:  # noqa: F811
    """Every record arrives exactly once; /healthz degraded and /metrics show the backlog while it is down."""
    url = pg_own.url
    runs = tmp_path / "runs"
    served = await serve(fake_upstream, runs, ship=ship_cfg(url))
    body = {"model": "gpt-4o-mini", "messages": MSG}
    try:
        async with aiohttp.ClientSession() as session:
            async def load(n: int, run: str) -> None:
                for _ in range(n):
                    status, _, _ = await post(served.base + CHAT, body, headers={"X-Run-Id": run}, session=session)
                    assert status == 200

            await load(40, "before")
            await wait_until(lambda: _has(url, 40), what="first 40")
            pg_own.stop()
            await load(60, "during")
            await wait_until(lambda: _degraded(served.base), what="degraded")
            status, health = await get_json(served.base + "/healthz")
            assert status == 200 and health["shipper"]["postgres"]["failing"]
            assert health["shipper"]["postgres"]["backlog_records"] >= 1
            text = await get_text(served.base + "/metrics")
            backlog = [ln for ln in text.splitlines() if ln.startswith("metering_proxy_shipper_backlog_records")]
            assert backlog and float(backlog[0].split()[-1]) >= 1, backlog
            assert "metering_proxy_shipper_delivery_failures_total" in text
            pg_own.start()
            await load(20, "after")
            await wait_until(lambda: _has(url, 120), timeout=30, what="all 120")
            await wait_until(lambda: _ok(served.base), what="healthy again")
    finally:
        await served.stop()
        await served.kill()
    ids = [r["request_id"] for r in await fetch(url, "SELECT request_id FROM calls")]
    assert sorted(ids) == file_ids(runs) and len(ids) == 120


async def _degraded(base: str) -> bool:
    return (await get_json(base + "/healthz"))[1]["status"] == "degraded"


async def _ok(base: str) -> bool:
    _, body = await get_json(base + "/healthz")
    return bool(body["status"] == "ok" and body["shipper"]["postgres"]["backlog_records"] == 0)


@pytest.mark.slow
async def test_sigkill_mid_shipping_loses_and_doubles_nothing(fake_upstream: FakeUpstream, tmp_path: Path,
                                                             pg_module: PgServer) -> None:  # noqa: F811
    url = await new_database(pg_module)
    runs = tmp_path / "runs"
    runs.mkdir()
    total = 0
    for run in range(5):
        with (runs / f"pre{run}.jsonl").open("wb") as f:
            for i in range(4000):
                f.write(make_record(request_id=f"req_{run}_{i}", run_id=f"pre{run}").to_json())
                total += 1
    served = await serve(fake_upstream, runs, ship=ship_cfg(url, batch_size=100))
    try:
        await wait_until(lambda: _has(url, 1500), what="some shipped")
        await served.kill()  # SIGKILL, mid-shipping
    finally:
        await served.kill()
    shipped_at_kill = await count(url)
    assert shipped_at_kill < total, "all shipped before the kill: the test proved nothing"
    served = await serve(fake_upstream, runs, ship=ship_cfg(url, batch_size=1000))
    try:
        await wait_until(lambda: _has(url, total), timeout=60, what="all shipped")
        await wait_until(lambda: _ok(served.base), what="backlog drained")
    finally:
        await served.stop()
        await served.kill()
    ids = [r["request_id"] for r in await fetch(url, "SELECT request_id FROM calls")]
    assert sorted(ids) == file_ids(runs) and len(ids) == total
