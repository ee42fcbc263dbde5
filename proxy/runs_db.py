"""The runs API read from the PostgreSQL ``calls`` table (ship.postgres.serve_reads): every host's runs.

The figures come from the summariser the files use (``report.RunSummary``), fed the stored records, so a
summary read here equals one over the union of the hosts' files; no SQL aggregate stands in for it. SQL
does only what it does equivalently: pick a run's rows, order them, and say whether anything changed.

- GET /runs folds every row into a per-run RunSummary without samples once, then only the rows with a
  ``seq`` above the last one folded: one indexed range scan per refresh, whatever the table's size.
- GET /runs/{id} reads the run in (ts, request_id) order, like ``report --db``, and is kept until the
  run's highest ``seq`` moves.
- /records?since=N counts records in ``seq`` (arrival) order, which only grows at its end, so N is
  stable like a line number in a file.
- /events polls for rows above the highest ``seq`` seen; seq is drawn under a lock held to commit
  (pg._DDL_V2), so each record is sent once, in arrival order.

Rows are fetched with asyncpg and folded in worker threads, never on the event loop. A database that is
down answers 503 (DatabaseUnavailable, the URL redacted); metered calls never touch this module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from proxy import errors, pg, report
from proxy.config import ConfigError, ShipPostgres, redact_url
from proxy.report_db import UNREAD_FIELDS
from proxy.runs_api import EventHub, Subscriber, UnknownRun

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("metering_proxy.runs")

POLL_S = 0.25
"""How often the events streams look for new rows (one query per look for every followed run)."""
FETCH_ROWS = 2000
"""Rows per fetch: folded in one worker thread, or written to a client in one go."""
RETRY_MAX_S = 5.0
SUMMARY_CACHE = 4
_NO_FILE = Path()
#: since past this is past any run's end (and still a bigint for OFFSET).
_BIG = 2**62
T = TypeVar("T")


class DatabaseUnavailable(errors.ProxyError):
    """The runs database cannot be read (down, refused, wrong credentials); the message holds no secret."""

    status = 503
    type = "server_error"
    category = errors.Category.UNKNOWN  # not a call's error: no record is made for a /runs request


def _unknown(run_id: str) -> UnknownRun:
    return UnknownRun(f"No run {run_id!r}: the calls table has no row for it.", param="run_id",
                      code="run_not_found")  # fmt: skip


def _fold(summary: report.RunSummary, texts: list[str]) -> None:
    for text in texts:
        summary.fold(text)


class PostgresRuns:
    """The runs API's reads from the calls table: totals, summaries, records and the events hub."""

    def __init__(self, cfg: ShipPostgres, poll_s: float = POLL_S) -> None:
        try:
            import asyncpg  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"config: ship.postgres.serve_reads needs the fleet extra: pip install "
                              f"'metering-proxy[fleet]' ({exc})") from None  # fmt: skip
        self.cfg = cfg
        self.source = f"{redact_url(cfg.url)} calls"
        """What a summary names as the run's "file"."""
        self.hub = DbHub(self, poll_s)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        # Summaries share the CPU with the calls: one fold at a time, as the file reader does.
        self._lock = asyncio.Lock()
        self._totals: dict[str, report.RunSummary] = {}
        self._modified: dict[str, float] = {}
        self._totals_seq = 0
        self._summaries: dict[tuple[str, tuple[str, ...]], tuple[int, bytes]] = {}

    def _down(self, exc: BaseException) -> DatabaseUnavailable:
        url = self.cfg.url
        detail = str(exc)[:200].replace(url, "[url]")
        return DatabaseUnavailable(f"The runs database {redact_url(url)} cannot be read: {type(exc).__name__}"
                                   f"{': ' + detail if detail else ''}", code="runs_database_unavailable")  # fmt: skip

    async def _open(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                pool = await pg.open_pool(self.cfg, max_size=4)
                try:
                    async with pool.acquire() as conn:
                        await pg.migrate(conn)  # the seq column, should this host read before any shipped
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; every database failure inside becomes DatabaseUnavailable."""
        import asyncpg

        try:
            pool = await self._open()
            async with pool.acquire(timeout=10) as conn:
                yield conn
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise self._down(exc) from None

    async def query(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """fn's result on a pooled connection (DatabaseUnavailable when the database fails)."""
        async with self.connection() as conn:
            return await fn(conn)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows of one query on a pooled connection."""
        async with self.connection() as conn:
            return list(await conn.fetch(sql, *args))

    # -- GET /runs -------------------------------------------------------------------------

    def _fold_totals(self, rows: list[Any]) -> None:
        for seq, run_id, shipped, text in rows:
            summary = self._totals.get(run_id)
            if summary is None:
                summary = self._totals[run_id] = report.RunSummary(_NO_FILE, run_id, by=(), samples=False)
            summary.fold(text)
            self._modified[run_id] = max(self._modified.get(run_id, 0.0), shipped)
            self._totals_seq = seq  # after the row is folded: a failure half way resumes at the next row

    async def list_totals(self) -> list[dict[str, Any]]:
        """Every run in the table with its totals (RunSummary.totals_json), most recently shipped first.

        size_bytes is null (there is no file); modified is when the run's last row was shipped.
        """
        query = ("SELECT seq, run_id, extract(epoch FROM shipped_at)::float8, (record - $3::text[])::text "
                 "FROM calls WHERE seq > $1 AND run_id IS NOT NULL ORDER BY seq LIMIT $2")  # fmt: skip
        async with self._lock:
            while True:
                rows = await self.fetch(query, self._totals_seq, FETCH_ROWS, list(UNREAD_FIELDS))
                if rows:
                    await asyncio.to_thread(self._fold_totals, rows)
                if len(rows) < FETCH_ROWS:
                    break
            out = []
            for run_id, summary in self._totals.items():
                totals = summary.totals_json()
                totals["size_bytes"] = None
                totals["modified"] = report.iso(self._modified[run_id])
                out.append(totals)
        out.sort(key=lambda r: r["modified"], reverse=True)
        return out

    # -- GET /runs/{run_id} ----------------------------------------------------------------

    async def summary(self, run_id: str, specs: list[str]) -> bytes:
        """The report --json document of one run, read in (ts, request_id) order; UnknownRun without rows."""
        key = (run_id, tuple(specs))
        async with self._lock, self.connection() as conn, conn.transaction(isolation="repeatable_read",
                                                                            readonly=True):  # fmt: skip
            # One snapshot: the seq the cache is keyed on is that of exactly the rows folded.
            top = await conn.fetchval("SELECT max(seq) FROM calls WHERE run_id = $1", run_id)
            if top is None:
                raise _unknown(run_id)
            cached = self._summaries.pop(key, None)  # re-inserted below: least recently used first
            if cached is not None and cached[0] == top:
                body = cached[1]
            else:
                summary = report.RunSummary(_NO_FILE, run_id, specs, source=self.source)
                query = ("SELECT (record - $2::text[])::text FROM calls WHERE run_id = $1 "
                         "ORDER BY ts, request_id")  # fmt: skip
                cursor = await conn.cursor(query, run_id, list(UNREAD_FIELDS))
                while rows := await cursor.fetch(FETCH_ROWS):
                    await asyncio.to_thread(_fold, summary, [r[0] for r in rows])
                body = await asyncio.to_thread(lambda: orjson.dumps(report.report_json([summary])))
            self._summaries[key] = (top, body)
            while len(self._summaries) > SUMMARY_CACHE:
                del self._summaries[next(iter(self._summaries))]
        return body

    # -- GET /runs/{run_id}/records --------------------------------------------------------

    async def records(self, run_id: str, since: int, limit: int | None) -> AsyncIterator[list[bytes]]:
        """Batches of the run's records (JSON lines) from the since-th (0-based, seq order) on.

        The first batch is fetched before anything is yielded: UnknownRun (or DatabaseUnavailable)
        comes before a response is started. Each batch is its own query (keyset on seq), so a slow
        client holds no connection and no transaction.
        """
        left = limit
        size = FETCH_ROWS if left is None else min(FETCH_ROWS, left)
        rows = await self.fetch("SELECT seq, record::text FROM calls WHERE run_id = $1 ORDER BY seq "
                                "OFFSET $2 LIMIT $3", run_id, min(since, _BIG), size)  # fmt: skip
        if not rows and not await self.fetch("SELECT 1 FROM calls WHERE run_id = $1 LIMIT 1", run_id):
            raise _unknown(run_id)
        return self._batches(run_id, rows, left)

    async def _batches(self, run_id: str, rows: list[Any], left: int | None) -> AsyncIterator[list[bytes]]:
        while rows:
            # jsonb text holds no raw newline (it escapes control characters): one record, one line.
            yield [text.encode() + b"\n" for _, text in rows]
            if left is not None:
                left -= len(rows)
                if left <= 0:
                    return
            if len(rows) < FETCH_ROWS:
                return
            last = rows[-1][0]
            size = FETCH_ROWS if left is None else min(FETCH_ROWS, left)
            rows = await self.fetch("SELECT seq, record::text FROM calls WHERE run_id = $1 AND seq > $2 "
                                    "ORDER BY seq LIMIT $3", run_id, last, size)  # fmt: skip

    async def close(self) -> None:
        """Close the pool (shutdown)."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class DbHub(EventHub):
    """Events streams fed from the calls table: every host's records of the run, each once, in seq order.

    One task polls every poll_s for the rows above the highest seq read, for all followed runs in one
    query. observe() does nothing: this host's records come back through the table like every other's.
    """

    def __init__(self, runs: PostgresRuns, poll_s: float = POLL_S) -> None:
        super().__init__()
        self.runs = runs
        self.poll_s = poll_s
        self._last = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._failing = False

    def observe(self, record: Any) -> None:
        """Nothing to do: records reach the streams through the table."""

    async def join(self, run_id: str, path: Path | None) -> Subscriber:
        """Subscribe from the table's current end on; UnknownRun for a run without rows."""

        async def look(c: asyncpg.Connection) -> tuple[int, bool]:
            row = await c.fetchrow("SELECT (SELECT coalesce(max(seq), 0) FROM calls), "
                                   "EXISTS (SELECT 1 FROM calls WHERE run_id = $1)", run_id)  # fmt: skip
            return int(row[0]), bool(row[1])

        top, known = await self.runs.query(look)
        if not known:
            raise _unknown(run_id)
        if not self._subs:
            self._last = top  # nobody followed anything: older rows are nobody's news
        sub = self.subscribe(run_id, top + 1)
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.create_task(self._follow(), name="runs-follow-db")
        return sub

    async def _poll(self) -> int:
        query = ("SELECT seq, run_id, record::text FROM calls WHERE seq > $1 AND run_id = ANY($2::text[]) "
                 "ORDER BY seq LIMIT $3")  # fmt: skip
        rows = await self.runs.fetch(query, self._last, list(self._subs), FETCH_ROWS)
        for seq, run_id, text in rows:
            subs = self._subs.get(run_id)
            if subs:
                self._send(run_id, subs, b"event: record\ndata: " + text.encode() + b"\n\n", seq)
            self._last = seq
        return len(rows)

    async def _follow(self) -> None:
        wait = self.poll_s
        while self._subs and not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), wait)
                break
            except TimeoutError:
                pass
            if not self._subs:
                break
            try:
                n = await self._poll()
            except DatabaseUnavailable as exc:
                if not self._failing:
                    log.warning("runs: events cannot follow the database: %s", exc.message)
                self._failing = True
                wait = min(max(wait * 2, self.poll_s), RETRY_MAX_S)
                continue
            if self._failing:
                log.warning("runs: events follow the database again")
                self._failing = False
            wait = 0 if n == FETCH_ROWS else self.poll_s  # a backlog: read on at once

    async def stop(self) -> None:
        """Stop polling (shutdown): a query in flight finishes first."""
        self._stop.set()
        if self._task is not None:
            await self._task
