"""Cost of the budget check per call: reserve + settle on each store, and calls through the app with each store.

python -m tests.benchmarks.budget_store_bench  (starts its own redis-server on a free port)
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import openai
from aiohttp.test_utils import TestServer

from proxy.app import make_app
from proxy.budget_redis import RedisStore
from proxy.budget_store import SQLITE_NAME, BudgetStore, Limits, LocalStore, SqliteStore
from proxy.config import BudgetRule, Budgets, BudgetStoreConfig, Config, Timeouts, Upstream
from proxy.records import JsonlSink
from tests.conftest import FakeUpstream
from tests.redis_server import RedisServer

N = 2000


async def store_loop(store: BudgetStore, n: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per reserve + settle, one call at a time."""
    limits = Limits(usd=10**15, tokens=10**9)
    await store.reserve("bench", "warm", 1, 1, limits)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        await store.reserve("bench", f"r{i}", 100, 10, limits)
        store.settle(f"r{i}", "bench", 90, 9)
        drain = getattr(store, "drain", None)
        if drain is not None:
            await drain()
    return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6


async def app_loop(tmp: Path, fake: FakeUpstream, store: BudgetStoreConfig | None, n: int) -> tuple[float, float]:
    """(wall, CPU of this process) microseconds per chat call through the in-process app, budgeted."""
    budgets = Budgets(default=BudgetRule(tokens=10**9), store=store or BudgetStoreConfig())
    cfg = Config(runs_dir=tmp / "runs", upstreams=(Upstream(name="f", base_url=fake.base_url),),
                 timeouts=Timeouts(connect_s=2, read_s=5, total_s=10), budgets=budgets)  # fmt: skip
    server = TestServer(make_app(replace(cfg)), host="127.0.0.1")
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="sk-x", max_retries=0,
                                default_headers={"X-Run-Id": "bench"})  # fmt: skip
    try:
        msgs = [{"role": "user", "content": "hi"}]
        for _ in range(50):
            await client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=5)  # type: ignore[arg-type]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=5)  # type: ignore[arg-type]
        return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6
    finally:
        await client.close()
        await server.close()


async def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis = RedisServer(tmp / "redis")
        redis.start()
        try:
            sink = JsonlSink(tmp / "runs")
            SqliteStore.create(tmp / "runs" / SQLITE_NAME)
            stores: dict[str, BudgetStore] = {
                "local": LocalStore(sink),
                "sqlite": SqliteStore(tmp / "runs" / SQLITE_NAME, sink, 1800),
                "redis": RedisStore(redis.url, sink),
            }
            for name, store in stores.items():
                wall, cpu = await store_loop(store, N)
                print(f"reserve+settle {name:7s} {wall:8.1f} us wall {cpu:8.1f} us CPU per call")
                await store.close()
            fake = FakeUpstream()
            fake.server = TestServer(fake.app, host="127.0.0.1")
            await fake.server.start_server()
            for i, (name, conf) in enumerate((("local", None), ("redis", BudgetStoreConfig(url=redis.url)))):
                (tmp / str(i)).mkdir()
                wall, cpu = await app_loop(tmp / str(i), fake, conf, N // 2)
                print(f"app call      {name:7s} {wall:8.1f} us wall {cpu:8.1f} us CPU per call (client+proxy+fake)")
            await fake.server.close()
        finally:
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
