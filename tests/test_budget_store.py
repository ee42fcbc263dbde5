"""The budget stores: each one's atomic contract, then real serve processes sharing budgets (Redis, SQLite)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from redis.asyncio import Redis

from proxy import errors
from proxy.budget_redis import RedisStore
from proxy.budget_store import SQLITE_NAME, BudgetStore, Limits, LocalStore, SqliteStore
from proxy.records import JsonlSink
from proxy.usage import estimate_input_tokens
from tests.conftest import KEY, FakeUpstream
from tests.helpers import MSG, Served, alive, parse_lines, serve
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name

StoreFactory = Callable[..., Awaitable[BudgetStore]]


@pytest.fixture(params=["local", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Stores of one kind over one runs dir (several of them: several processes of one host)."""
    kind = request.param
    runs = tmp_path / "runs"
    made: list[BudgetStore] = []
    server: RedisServer | None = request.getfixturevalue("redis_server") if kind == "redis" else None
    if kind == "sqlite":
        SqliteStore.create(runs / SQLITE_NAME)

    async def make(ttl: float = 1800.0, host: str | None = None, runs_dir: Path = runs) -> BudgetStore:
        sink = JsonlSink(runs_dir)
        store: BudgetStore
        if kind == "local":
            store = LocalStore(sink)
        elif kind == "sqlite":
            store = SqliteStore(runs / SQLITE_NAME, sink, ttl)
        else:
            assert server is not None
            store = RedisStore(server.url, sink, reservation_ttl_s=ttl, host=host)
        made.append(store)
        return store

    make.kind = kind  # type: ignore[attr-defined]
    yield make
    for store in made:
        await store.close()


async def settled(store: BudgetStore) -> None:
    """Wait until the settlements the store scheduled have reached it."""
    drain = getattr(store, "drain", None)
    if drain is not None:
        await drain()


async def test_refused_at_the_limit(make_store: StoreFactory) -> None:
    store = await make_store()
    limits = Limits(usd=100, tokens=50)
    first = await store.reserve("r", "req_1", 10, 5, limits)
    assert first.refused is None and (first.spent_usd, first.spent_tokens) == (0, 0)
    store.settle("req_1", "r", 100, 20)
    await settled(store)
    assert await store.spend("r") == (100, 20)
    refused = await store.reserve("r", "req_2", 0, 0, limits)
    assert refused.refused == "usd" and (refused.spent_usd, refused.spent_tokens) == (100, 20)
    # USD under its limit, tokens at theirs: refused by tokens.
    tok = await store.reserve("r", "req_3", 0, 0, Limits(usd=1000, tokens=20))
    assert tok.refused == "tokens" and tok.spent_tokens == 20
    # Refusals reserve nothing.
    ok = await store.reserve("r", "req_4", 900, 0, Limits(usd=1000))
    assert ok.refused is None and ok.reserved_usd == 0


async def test_reservations_are_counted_and_released(make_store: StoreFactory) -> None:
    a, b = await make_store(), await make_store()  # two processes of one host
    limits = Limits(usd=100)
    assert (await a.reserve("r", "req_1", 60, 0, limits)).refused is None
    crossing = await b.reserve("r", "req_2", 50, 0, limits)
    if getattr(make_store, "kind") == "local":  # noqa: B009 - one process's memory: b knows nothing of a
        assert crossing.refused is None
        return
    assert crossing.refused == "usd" and crossing.reserved_usd == 60 and crossing.spent_usd == 0
    assert (await b.reserve("r", "req_3", 40, 0, limits)).refused is None  # 60 + 40 fits exactly
    a.settle("req_1", "r", 30, 0)  # actual below the reservation: 30 of it is free again
    await settled(a)
    after = await b.reserve("r", "req_4", 30, 0, limits)
    assert after.refused is None and after.spent_usd == 30 and after.reserved_usd == 40


async def test_settle_is_idempotent(make_store: StoreFactory) -> None:
    store = await make_store()
    assert (await store.reserve("r", "req_1", 10, 10, Limits(usd=100, tokens=100))).refused is None
    for _ in range(3):
        store.settle("req_1", "r", 7, 3)
    await settled(store)
    assert await store.spend("r") == (7, 3)
    d = await store.reserve("r", "req_2", 0, 0, Limits(usd=100, tokens=100))
    assert d.reserved_usd == 0 and d.reserved_tokens == 0  # released once, not three times


async def test_expired_reservations_are_freed(make_store: StoreFactory) -> None:
    if getattr(make_store, "kind") == "local":  # noqa: B009
        pytest.skip("the process that holds a local reservation is the one that settles it; none expire")
    dead, alive_ = await make_store(ttl=1), await make_store(ttl=1)
    limits = Limits(tokens=100)
    assert (await dead.reserve("r", "req_dead", 0, 80, limits)).refused is None  # its process never settles
    assert (await alive_.reserve("r", "req_2", 0, 80, limits)).reserved_tokens == 80
    deadline = time.monotonic() + 5
    while (d := await alive_.reserve("r", "req_2", 0, 80, limits)).refused is not None:
        assert time.monotonic() < deadline, d
        await asyncio.sleep(0.05)
    assert d.reserved_tokens == 0


async def test_seeded_from_the_run_file_once(make_store: StoreFactory, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
    lines = [{"request_id": "old", "ts": "2020-01-01T00:00:00.000Z", "cost_usd": 0.5, "total_tokens": 100},
             {"request_id": "new", "ts": now, "cost_usd": 0.25, "total_tokens": 10}]  # fmt: skip
    (runs / "r.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + b'{"torn')
    a = await make_store()
    a.open("r")
    d = await a.reserve("r", "req_1", 0, 0, Limits(tokens=1000))
    assert (d.spent_usd, d.spent_tokens) == (75 * 10**8, 110)
    a.settle("new", "r", 25 * 10**8, 10)  # the same record settled live as well: counted once
    await settled(a)
    b = await make_store()  # another process of the same host: the file (and the live record) count once
    assert (await b.reserve("r", "req_2", 0, 0, Limits(tokens=1000))).spent_tokens == 110
    if getattr(make_store, "kind") == "redis":  # noqa: B009
        other = tmp_path / "other-host"
        other.mkdir()
        (other / "r.jsonl").write_bytes(orjson.dumps({"request_id": "x", "cost_usd": 0, "total_tokens": 5}) + b"\n")
        c = await make_store(host="host-2", runs_dir=other)  # a second host adds its own file
        assert (await c.reserve("r", "req_3", 0, 0, Limits(tokens=1000))).spent_tokens == 115


async def test_redis_unreachable_refuse_and_local(redis_server: RedisServer, tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "runs")
    refuse = RedisStore(redis_server.url, sink, on_unavailable="refuse", host="h1")
    local = RedisStore(redis_server.url, sink, on_unavailable="local", host="h2")
    try:
        limits = Limits(tokens=100)
        for store in (refuse, local):
            assert (await store.reserve("r", f"req_{store.host}", 0, 10, limits)).refused is None
        redis_server.stop()
        t0 = time.perf_counter()
        with pytest.raises(errors.BudgetStoreUnavailable) as exc:
            await refuse.reserve("r", "req_a", 0, 10, limits)
        assert exc.value.status == 503 and time.perf_counter() - t0 < 1.5
        t0 = time.perf_counter()
        with pytest.raises(errors.BudgetStoreUnavailable):  # marked down: no connection attempt at all
            await refuse.reserve("r", "req_b", 0, 10, limits)
        assert time.perf_counter() - t0 < 0.05
        d = await local.reserve("r", "req_c", 0, 10, limits)
        assert d.refused is None  # judged by this process's view
        refuse.settle("req_h1", "r", 0, 7)  # calls admitted before the outage settle during it
        local.settle("req_c", "r", 0, 4)
        await refuse.drain()
        await local.drain()
        assert len(refuse.pending) == 1 and len(local.pending) == 1
        redis_server.restart()  # with no data: the settlements are replayed
        deadline = time.monotonic() + 5
        while not (refuse.up and local.up):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert not refuse.pending and not local.pending
        assert await refuse.spend("r") == (0, 11)
    finally:
        await refuse.close()
        await local.close()


# -- real serve processes ----------------------------------------------------------------------------

EST_IN = estimate_input_tokens({"model": "gpt-4o-mini", "messages": MSG})
ACTUAL = 14  # the fake upstream's total_tokens per chat call
MAX_TOKENS = 5
RESERVED = EST_IN + MAX_TOKENS  # > ACTUAL: a call never costs more than it reserved, so the bound is the limit


def client(p: Served, run: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.base + "/v1", api_key=KEY, max_retries=0,
                              default_headers={"X-Run-Id": run, **headers})  # fmt: skip


async def call(c: openai.AsyncOpenAI) -> Any:
    try:
        return await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG,
                                                                 max_tokens=MAX_TOKENS)  # fmt: skip
    except openai.APIStatusError as exc:
        return exc


async def once(p: Served, run: str) -> Any:
    """One call through a client of its own (closed after)."""
    async with client(p, run) as c:
        return await call(c)


def file_tokens(runs: list[Path], run: str) -> int:
    total = 0
    for d in runs:
        path = d / f"{run}.jsonl"
        total += sum(r["total_tokens"] or 0 for r in parse_lines(path)) if path.exists() else 0
    return total


async def wait_records(runs: list[Path], run: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        recs = [r for d in runs if (d / f"{run}.jsonl").exists() for r in parse_lines(d / f"{run}.jsonl")]
        if len(recs) >= n:
            return recs
        assert time.monotonic() < deadline, f"{len(recs)} of {n} records"
        await asyncio.sleep(0.02)


def host_dirs(tmp_path: Path, n: int) -> list[Path]:
    """One runs dir per "host" (each its own proxy, as on separate machines)."""
    for i in range(n):
        (tmp_path / f"host{i}").mkdir()
    return [tmp_path / f"host{i}" / "runs" for i in range(n)]


def store_cfg(url: str, limit: int, mode: str = "refuse") -> dict[str, Any]:
    return {"budgets": {"default": {"tokens": limit}, "store": {"url": url, "on_unavailable": mode}}}


async def stop_all(procs: list[Served]) -> None:
    for p in procs:
        try:
            assert await p.stop() == 0, p.err_text()
        finally:
            await p.kill()


@pytest.mark.slow
async def test_three_hosts_share_one_budget(fake_upstream: FakeUpstream, redis_server: RedisServer,
                                            tmp_path: Path) -> None:  # fmt: skip
    limit = 100
    admitted = limit // RESERVED
    runs = host_dirs(tmp_path, 3)
    procs = [await serve(fake_upstream, r, **store_cfg(redis_server.url, limit)) for r in runs]
    try:
        # 30 calls at once, 10 per proxy, each held 0.3 s upstream: all in flight together.
        clients = [client(p, "fleet", **{"X-Fake": "think:0.3"}) for p in procs]
        results = await asyncio.gather(*(call(clients[i % 3]) for i in range(30)))
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        # Exactly `admitted` while all are in flight together; a loaded machine may let a few finish (and settle
        # below their reservation) first, making room for more. The bound holds either way.
        assert len(ok) >= admitted and len(ok) + len(refused) == 30, results
        recs = await wait_records(runs, "fleet", 30)
        spend = sum(r["total_tokens"] or 0 for r in recs)
        assert spend == len(ok) * ACTUAL <= limit  # the bound: limit + sum of max(0, actual - reserved) = limit
        assert 15 * ACTUAL > limit  # three unshared views would each have admitted `admitted`
        async with Redis.from_url(redis_server.url) as r:
            deadline = time.monotonic() + 5
            while int(await r.hget("metering-proxy:{fleet}:spend", "tok") or 0) != spend:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        d = await once(procs[1], "fleet")
        headers = d.response.headers if isinstance(d, openai.APIStatusError) else d.headers  # refused at the limit
        assert int(headers["X-Run-Spend-Tokens"]) == spend == file_tokens(runs, "fleet")
    finally:
        await stop_all(procs)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["refuse", "local"])
async def test_redis_stopped_mid_run(fake_upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path,
                                     mode: str) -> None:  # fmt: skip
    runs = host_dirs(tmp_path, 2)
    cfg = store_cfg(redis_server.url, 10_000, mode)
    procs = [await serve(fake_upstream, r, **cfg) for r in runs]
    try:
        for p in procs:
            assert (await once(p, "mid")).status_code == 200
        await wait_records(runs, "mid", 2)
        redis_server.stop()
        during = [await once(p, "mid") for p in procs for _ in range(2)]
        recs = await wait_records(runs, "mid", 6)
        if mode == "refuse":
            assert all(isinstance(r, openai.InternalServerError) and r.status_code == 503 for r in during), during
            assert all(r.response.json()["error"]["code"] == "budget_store_unavailable" for r in during)
            assert sum(1 for r in recs if (r["error"] or {}).get("category") == "budget_store_unavailable") == 4
        else:
            assert all(r.status_code == 200 for r in during), during
            assert sum(1 for r in recs if r["success"]) == 6
        assert all("unreachable" in p.err_text() for p in procs)
        redis_server.restart()  # empty: Redis lost everything
        deadline = time.monotonic() + 10
        while not all("reachable again" in p.err_text() for p in procs):  # and each has re-seeded what it knows
            assert time.monotonic() < deadline, procs[0].err_text()
            await asyncio.sleep(0.05)
        expected = file_tokens(runs, "mid")
        for p in procs:  # replayed (local) and re-seeded from both hosts' files
            deadline = time.monotonic() + 10
            while isinstance(got := await once(p, "mid"), Exception):  # refuse: until the probe finds it back
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.1)
            assert int(got.headers["X-Run-Spend-Tokens"]) == expected
            await wait_records(runs, "mid", len(recs) + 1)
            recs = await wait_records(runs, "mid", 0)
            expected = file_tokens(runs, "mid")
        await stop_all(procs)
        procs = [await serve(fake_upstream, r, **cfg) for r in runs]  # restart of every proxy
        for p in procs:  # Redis kept its data this time: nothing is added twice
            total = len(await wait_records(runs, "mid", 0))
            got = await once(p, "mid")
            assert int(got.headers["X-Run-Spend-Tokens"]) == file_tokens(runs, "mid")
            await wait_records(runs, "mid", total + 1)
    finally:
        await stop_all(procs)


def _has_open(pid: int, name: str) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if fd.readlink().name == name:
                return True
        except OSError:
            continue
    return False


@pytest.mark.slow
async def test_workers_share_a_budget_without_redis(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    limit = 100
    admitted = limit // RESERVED
    p = await serve(fake_upstream, tmp_path / "runs", "--workers", "2", budgets={"default": {"tokens": limit}})
    try:
        results: list[Any] = []
        for _ in range(3):  # fresh connections each round, so the kernel hands calls to both workers
            c = client(p, f"w{len(results)}", **{"X-Fake": "think:0.3"})
            results += await asyncio.gather(*(call(c) for _ in range(12)))
            await c.close()
        # Both workers served budgeted calls: each has the shared SQLite file open.
        assert all(alive(w) and _has_open(w, SQLITE_NAME) for w in p.workers), p.workers
        for i in range(3):
            run = results[i * 12 : (i + 1) * 12]
            ok = [r for r in run if not isinstance(r, Exception)]
            assert len(ok) == admitted, run  # as one process: two unshared workers could admit twice as many
            recs = await wait_records([p.runs], f"w{i * 12}", 12)
            assert sum(r["total_tokens"] or 0 for r in recs) == admitted * ACTUAL <= limit
    finally:
        await stop_all([p])
