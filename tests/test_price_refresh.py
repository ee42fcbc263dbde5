"""prices.refresh: a table served by a real aiohttp server reaches later calls without a restart; a bad one
is refused and the table in use kept; a hung download blocks neither start, nor a call, nor shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import PRICE_REFRESH
from proxy.config import price_cache_path
from proxy.price_refresh import PriceRefresher
from proxy.pricing import BUNDLED_PRICES, PriceBook
from tests.conftest import make_client

LOGGER = "metering_proxy.pricing"


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METERING_PROXY_CACHE_DIR", str(tmp_path / "user-cache"))


def _table(marker_rate: float) -> bytes:
    """A table update_prices accepts (101 priced chat models) with a `marker` model at this input rate."""
    data: dict[str, Any] = {
        f"model-{i}": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6} for i in range(101)
    }
    data["marker"] = {"mode": "chat", "input_cost_per_token": marker_rate, "output_cost_per_token": 0.0}
    return orjson.dumps(data)


class TableServer:
    """Serves whatever body is current at /prices.json, counting requests; hang=True holds each one."""

    def __init__(self) -> None:
        self.body = _table(1e-6)
        self.hang = False
        self.requests = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/prices.json", self.handle)
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        return web.Response(body=self.body, content_type="application/json")

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/prices.json"))


@pytest.fixture
async def tables() -> Any:
    t = TableServer()
    t.server = TestServer(t.app, host="127.0.0.1")
    await t.server.start_server()
    yield t
    t.release.set()
    await t.server.close()


async def _until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _marker_cost(proxy: Any, run_id: str) -> float:
    """One call on `marker` through the proxy; the fake upstream reports 11 prompt and 3 completion tokens."""
    before = len(await proxy.records(run_id))
    await make_client(proxy, run_id=run_id).chat.completions.create(
        model="marker", messages=[{"role": "user", "content": "hi"}]
    )
    records = await proxy.wait_records(run_id, before + 1)
    return float(records[-1]["cost_usd"])


@pytest.mark.slow
async def test_a_new_table_prices_later_calls_and_a_bad_one_is_refused(
    make_proxy: Any, tables: TableServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Started on the bundled table, where `marker` has no price.
    proxy = await make_proxy(pricebook=PriceBook.load(BUNDLED_PRICES), prices_refresh_s=1.0,
                             prices_refresh_url=tables.url)  # fmt: skip
    refresher = proxy.server.app[PRICE_REFRESH]
    await _until(lambda: refresher.refreshed >= 1)  # no cached copy yet: the first download is at start
    assert await _marker_cost(proxy, "fresh") == pytest.approx(11 * 1e-6, rel=1e-9)

    tables.body = _table(4e-6)  # the published table changes; the proxy keeps running
    await _until(lambda: refresher.refreshed >= 2)
    assert await _marker_cost(proxy, "fresh") == pytest.approx(11 * 4e-6, rel=1e-9)
    assert orjson.loads(price_cache_path().read_bytes())["marker"]["input_cost_per_token"] == 4e-6

    tables.body = orjson.dumps({"marker": {"mode": "chat", "input_cost_per_token": 9e-6}})  # too small a table
    await _until(lambda: refresher.failed >= 1)
    assert await _marker_cost(proxy, "fresh") == pytest.approx(11 * 4e-6, rel=1e-9)
    assert orjson.loads(price_cache_path().read_bytes())["marker"]["input_cost_per_token"] == 4e-6
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert failures and "only 1 priced chat models" in failures[0] and "kept the table in use" in failures[0]
    assert "\n" not in failures[0]
    # /runs/{id}?price_as= re-prices with the table calls are priced with: the bundled one has no `marker` (400).
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url("/runs/fresh"), params={"price_as": "marker"}) as resp:
            assert resp.status == 200, await resp.text()


async def test_a_hung_download_blocks_neither_start_nor_a_call_nor_shutdown(
    make_proxy: Any, tables: TableServer
) -> None:
    tables.hang = True
    proxy = await make_proxy(pricebook=PriceBook.load(BUNDLED_PRICES), prices_refresh_s=3600.0,
                             prices_refresh_url=tables.url)  # fmt: skip
    await asyncio.wait_for(tables.arrived.wait(), 10)
    reply = await make_client(proxy, run_id="hung").chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == 11
    [rec] = await proxy.wait_records("hung", 1)
    assert rec["cost_usd"] == pytest.approx(5.75e-5, rel=1e-9)  # the bundled table, still in use
    started = time.monotonic()
    await proxy.server.close()  # the download thread is still waiting on the table server
    assert time.monotonic() - started < 5
    assert proxy.server.app[PRICE_REFRESH].refreshed == 0


async def test_refresh_on_a_dead_host_keeps_the_table_and_says_why(
    caplog: pytest.LogCaptureFixture, refused_port: int
) -> None:
    installed: list[PriceBook] = []
    url = f"http://user:s3cret@127.0.0.1:{refused_port}/prices.json"
    refresher = PriceRefresher(60.0, installed.append, url=url)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await refresher.refresh() is False
    assert installed == [] and refresher.failed == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "cannot fetch" in line and "kept the table in use" in line
    assert "s3cret" not in line and "***@" in line


def test_a_fresh_cached_copy_defers_the_first_download() -> None:
    dest = price_cache_path()
    refresher = PriceRefresher(3600.0, lambda book: None)
    assert refresher.first_delay() == 0.0  # nothing cached: download at once
    dest.parent.mkdir(parents=True)
    dest.write_bytes(_table(1e-6))
    assert 3590 < refresher.first_delay() <= 3600
    os.utime(dest, (time.time() - 7200, time.time() - 7200))
    assert refresher.first_delay() == 0.0
