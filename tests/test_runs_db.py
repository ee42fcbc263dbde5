"""ship.postgres.serve_reads: two proxies ("hosts", each its own runs dir) ship to one PostgreSQL and read
/runs, /runs/{id}, its records, its events and /ui from it, so either host shows the whole fleet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest

from proxy import report
from proxy.config import Ship, ShipPostgres
from tests.conftest import Messages, ProxyFactory, ProxyUnderTest, make_client
from tests.pg_server import PgServer, new_database, pg_module, pg_own
from tests.test_report import RUN_A, RUN_B, write_run
from tests.test_ui import CHROMIUM, chromium, open_page

__all__ = ["chromium", "pg_module", "pg_own"]  # fixtures, used by name

MSG: Messages = [{"role": "user", "content": "hi"}]
RUN = "fleet-run"


def _ship(url: str, serve_reads: bool = True) -> Ship:
    return Ship(postgres=ShipPostgres(url=url, batch_size=5, interval_s=0.05, serve_reads=serve_reads),
                retry_max_s=0.2)  # fmt: skip


async def _host(make_proxy: ProxyFactory, tmp_path: Path, name: str, url: str) -> ProxyUnderTest:
    return await make_proxy(runs_dir=tmp_path / name / "runs", ship=_ship(url))


async def two_hosts(
    pg: PgServer, make_proxy: ProxyFactory, tmp_path: Path
) -> tuple[str, ProxyUnderTest, ProxyUnderTest]:
    """A fresh database and two hosts ("a", "b": own runs dirs) shipping to it and reading from it."""
    url = await new_database(pg)
    return url, await _host(make_proxy, tmp_path, "a", url), await _host(make_proxy, tmp_path, "b", url)


async def _rows(url: str, run_id: str | None = None) -> int:
    conn = await asyncpg.connect(url)
    try:
        if run_id is None:
            return int(await conn.fetchval("SELECT count(*) FROM calls"))
        return int(await conn.fetchval("SELECT count(*) FROM calls WHERE run_id = $1", run_id))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def _wait_rows(url: str, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (have := await _rows(url)) < n:
        assert time.monotonic() < deadline, f"{have} rows of {n} shipped"
        await asyncio.sleep(0.05)


async def _calls(proxy: ProxyUnderTest, run: str, n: int, offset: int = 0) -> None:
    async with make_client(proxy, run_id=run) as client:
        await _each(client, n, offset)


async def _each(client: openai.AsyncOpenAI, n: int, offset: int) -> None:
    for i in range(offset, offset + n):
        headers = {"X-Task-Name": f"t{i % 3}", "X-Fake": "status:429" if i % 4 == 3 else "think:0.01"}
        try:
            if i % 2:
                async for _ in await client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                                                    extra_headers=headers):  # fmt: skip
                    pass
            else:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=headers)
        except openai.RateLimitError:
            pass


async def _get(proxy: ProxyUnderTest, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url(path)) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, orjson.loads(body)
        return resp.status, body


def _union(tmp_path: Path, hosts: list[ProxyUnderTest], run: str) -> Path:
    """The run's records of every host in one file, in the order the database summarises them."""
    recs = [orjson.loads(line) for h in hosts if (h.runs_dir / f"{run}.jsonl").exists()
            for line in (h.runs_dir / f"{run}.jsonl").read_bytes().splitlines()]  # fmt: skip
    recs.sort(key=lambda r: (r["ts"], r["request_id"]))
    return write_run(tmp_path / "union", run, recs)


def _totals_from_file(path: Path, run: str) -> dict[str, Any]:
    summary = report.RunSummary(path, run, by=(), samples=False)
    summary.update()
    out = summary.totals_json()
    del out["size_bytes"], out["modified"]  # of a file; the database has neither
    return out


async def test_either_host_shows_the_fleet_and_equals_the_union_of_the_files(
    pg_module: PgServer, make_proxy: ProxyFactory, tmp_path: Path  # noqa: F811
) -> None:
    url, a, b = await two_hosts(pg_module, make_proxy, tmp_path)
    await _calls(a, RUN, 7)
    await _calls(b, RUN, 6, offset=7)
    await _calls(b, "only-b", 2)
    # Hand-made records on each host (estimated usage, tags, failures), one run spread over both.
    write_run(a.runs_dir, "hand", [{**r, "run_id": "hand", "request_id": f"a-{r['request_id']}"} for r in RUN_A])
    write_run(b.runs_dir, "hand", [{**r, "run_id": "hand", "request_id": f"b-{r['request_id']}"} for r in RUN_B])
    await a.settle(7)
    await b.settle(8)
    await _wait_rows(url, 15 + len(RUN_A) + len(RUN_B))

    for run in (RUN, "hand", "only-b"):
        union = _union(tmp_path, [a, b], run)
        want = orjson.loads(orjson.dumps(report.report_json([report.summarize(union, run, ["model", "task"])])))
        for host in (a, b):
            status, doc = await _get(host, f"/runs/{run}?by=model&by=task")
            assert status == 200, doc
            assert doc["runs"][0].pop("file").endswith(" calls")
            want["runs"][0].pop("file", None)
            assert doc == want
    assert doc["runs"][0]["calls"]["total"] == 2

    listed = {}
    for host in (a, b):
        status, doc = await _get(host, "/runs")
        assert status == 200
        got = {r["run_id"]: r for r in doc["runs"]}
        assert set(got) == {RUN, "hand", "only-b"}
        for run, entry in got.items():
            assert entry.pop("size_bytes") is None and entry.pop("modified")
            assert entry == _totals_from_file(tmp_path / "union" / f"{run}.jsonl", run), run
        listed[host.url("")] = got
    assert got[RUN]["calls"] == {"total": 13, "ok": 10, "failed": 3}

    # Later calls: a refresh folds only the new rows, and still equals the files.
    await _calls(a, RUN, 3, offset=13)
    await a.settle(10)
    await _wait_rows(url, 18 + len(RUN_A) + len(RUN_B))
    status, doc = await _get(b, "/runs")
    entry = next(r for r in doc["runs"] if r["run_id"] == RUN)
    del entry["size_bytes"], entry["modified"]
    assert entry == _totals_from_file(_union(tmp_path, [a, b], RUN), RUN)
    assert doc["runs"][0]["run_id"] == RUN  # the most recently shipped run first

    # /records: every record once, since=N counts records in arrival order, limit cuts.
    status, body = await _get(b, f"/runs/{RUN}/records")
    assert status == 200
    ids = [orjson.loads(line)["request_id"] for line in body.splitlines()]
    assert sorted(ids) == sorted(r["request_id"] for r in orjson.loads(b"[" + b",".join(
        (tmp_path / "union" / f"{RUN}.jsonl").read_bytes().splitlines()) + b"]"))  # fmt: skip
    status, body = await _get(a, f"/runs/{RUN}/records?since=4&limit=5")
    assert [orjson.loads(line)["request_id"] for line in body.splitlines()] == ids[4:9]
    status, body = await _get(a, f"/runs/{RUN}/records?since=99999999999999999999999")
    assert (status, body) == (200, b"")
    for path in ("/runs/nope", "/runs/nope/records", "/runs/nope/events"):
        status, doc = await _get(a, path)
        assert status == 404 and doc["error"]["code"] == "run_not_found", (path, doc)
    status, doc = await _get(a, "/runs/.x")
    assert status == 400


async def _frames(resp: aiohttp.ClientResponse, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next n record events of an SSE stream."""
    out: list[dict[str, Any]] = []
    buf = b""
    async with asyncio.timeout(timeout):
        while len(out) < n:
            buf += await resp.content.readany()
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                lines = frame.split(b"\n")
                if b"event: record" in lines:
                    out.append(orjson.loads(next(x for x in lines if x.startswith(b"data: "))[6:]))
    assert buf == b"" or buf.startswith(b":")
    return out


async def test_the_events_stream_on_one_host_delivers_the_calls_of_the_other(
    pg_module: PgServer, make_proxy: ProxyFactory, tmp_path: Path  # noqa: F811
) -> None:
    url, a, b = await two_hosts(pg_module, make_proxy, tmp_path)
    await _calls(a, RUN, 1)
    await _wait_rows(url, 1)
    async with aiohttp.ClientSession() as s, s.get(a.url(f"/runs/{RUN}/events")) as resp:
        assert resp.status == 200
        assert (await resp.content.readuntil(b"\n\n")).startswith(b": subscribed")
        await _calls(b, RUN, 2, offset=1)
        await _calls(a, RUN, 1, offset=3)
        await _calls(b, "other-run", 1)  # another run's call: not on this stream
        await _calls(b, RUN, 1, offset=4)
        got = await _frames(resp, 4)
        b_ids = [r["request_id"] for r in await b.wait_records(RUN, 3)]  # (a settle would wait for this stream)
        a_ids = [r["request_id"] for r in await a.wait_records(RUN, 2)]
        # Each new record once, none from before the subscription, host B's among them, in arrival order.
        assert sorted(r["request_id"] for r in got) == sorted(b_ids + a_ids[1:])
        conn = await asyncpg.connect(url)
        try:
            order = [r[0] for r in await conn.fetch("SELECT request_id FROM calls WHERE run_id = $1 ORDER BY seq",
                                                    RUN)]  # fmt: skip
        finally:
            await conn.close()
        assert [r["request_id"] for r in got] == order[1:]
        assert all(r["run_id"] == RUN for r in got)


async def test_a_database_that_is_down_answers_503_and_calls_go_on(
    pg_own: PgServer, make_proxy: ProxyFactory, tmp_path: Path  # noqa: F811
) -> None:
    url = (await new_database(pg_own)).replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    host = await _host(make_proxy, tmp_path, "a", url)
    await _calls(host, RUN, 2)
    await _wait_rows(url, 2)
    assert (await _get(host, "/runs"))[0] == 200
    pg_own.stop()
    for path in ("/runs", f"/runs/{RUN}", f"/runs/{RUN}/records", f"/runs/{RUN}/events"):
        status, doc = await _get(host, path)
        assert status == 503, (path, doc)
        err = doc["error"]
        assert err["type"] == "server_error" and err["code"] == "runs_database_unavailable"
        assert "s3cret-pw" not in orjson.dumps(doc).decode() and "runs database" in err["message"]
    # The metered calls do not need the database: answered, recorded, and the backlog shows.
    await _calls(host, RUN, 2, offset=2)
    assert len(await host.wait_records(RUN, 4)) == 4
    deadline = time.monotonic() + 10
    while True:
        status, health = await _get(host, "/healthz")
        pg_health = health["shipper"]["postgres"]
        if pg_health["failing"] and pg_health["backlog_records"] == 2:
            break
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.05)
    assert status == 200 and health["status"] == "degraded"
    pg_own.start()
    await _wait_rows(url, 4)
    status, doc = await _get(host, "/runs")
    assert status == 200 and doc["runs"][0]["calls"]["total"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium package")
async def test_the_dashboard_on_one_host_shows_the_fleet_total(
    pg_module: PgServer, make_proxy: ProxyFactory, tmp_path: Path, chromium: int  # noqa: F811
) -> None:
    url, a, b = await two_hosts(pg_module, make_proxy, tmp_path)
    await _calls(a, RUN, 2)
    await _calls(b, RUN, 3, offset=2)
    await _wait_rows(url, 5)
    async with aiohttp.ClientSession() as session:
        page = await open_page(session, chromium, a.url(f"/ui?run={RUN}"))
        try:
            await page.wait_for("document.body.dataset.live === '1' && document.body.dataset.state === 'ready'")
            await page.wait_for("document.querySelector('.card .v').innerText === '5'")  # A made 2 of them
            await _calls(b, RUN, 1, offset=5)  # a call on the other host: followed live from the table
            await page.wait_for("document.querySelector('.card .v').innerText === '6'", timeout=10)
            assert await page.eval("document.querySelectorAll('#timeline rect.bar').length") == 6
        finally:
            await page.close()
