"""The state behind run budgets: each run's spend and the reservations of its calls in flight.

``budgets.BudgetTracker`` is the policy (limits, estimates, messages, headers); a store is the state it
asks, through one small interface (``BudgetStore``):

- ``open(run)`` starts counting a run: its spend so far is read from its run file, once, off the loop.
- ``reserve(run, reservation_id, usd_units, tokens, limits) -> Decision`` checks and reserves in one
  atomic step: refused when spent >= limit, or spent + reserved by others + this reservation > limit
  (USD first, then tokens); admitted, the reservation is held until it is settled (or expires).
- ``settle(reservation_id, run, usd_units, tokens)`` releases the reservation and adds the call's actual
  spend in one atomic step, at most once per request id. It is sync (the record observer is): stores that
  talk to a server schedule it, and until it runs the reservation still holds, which is the safe side.
- ``spend(run)`` is the run's spend as the store holds it; ``seen_spend(run)`` what this process saw last.

Amounts are integers: USD in units of 1e-10 (a record's precision), tokens as counted.

Stores:

- ``LocalStore``: one process's memory (the default, and what a single ``serve`` process uses). A run's
  file is read once, in a worker thread, the first time the process sees the run; records settled while
  it is read are remembered by request id and skipped in it. Reservations never expire: the process that
  holds one is the one that settles it, and a crash loses both.
- ``SqliteStore``: the workers of one ``serve --workers N`` without Redis share ``<runs_dir>/.budgets.sqlite3``
  (WAL; every check-and-reserve and settle one ``BEGIN IMMEDIATE`` transaction, so the check and the
  reservation are atomic across processes; run in one worker thread per process). The supervisor creates
  it afresh at each start, so spend is what the run files hold. A settled request id is a row of
  ``settled`` (its trigger adds it to the run's spend once), and seeding a run inserts every record of its
  file the same way: a record settled live and also read from the file counts once, whichever came first.
  Reservations expire after ``reservation_ttl_s`` (a killed worker cannot hold budget forever).
- ``budget_redis.RedisStore``: several hosts sharing one Redis (see that module).

Shared stores count amounts up to SHARED_CAP (2**53 - 1 units, about $900,719, or tokens): sums saturate
there (Lua numbers are doubles, exact up to 2**53) and limits above it act as SHARED_CAP.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from proxy import errors
from proxy.config import Budgets
from proxy.records import JsonlSink, open_run_file

log = logging.getLogger("metering_proxy.budgets")

UNITS = 10**10
"""USD is counted in integer units of 1e-10 USD, the precision of a record's cost_usd."""
MAX_LIMIT = 1e12  # USD or tokens; larger limits mean "none" and would overflow the integer units
SHARED_CAP = 2**53 - 1
"""Largest amount a shared store counts (exact in a double): sums saturate here."""
SQLITE_NAME = ".budgets.sqlite3"
_MAX_UNITS = int(MAX_LIMIT) * UNITS
_MAX_TOKENS = int(MAX_LIMIT)
_DEDUPE = 65_536  # request ids LocalStore remembers as settled: far more than calls in flight at once


def to_units(usd: Any) -> int:
    """USD (a record's cost_usd) as integer 1e-10 units, never negative and never raising.

    Not a number (None, bools, strings, NaN) and anything <= 0 count 0; MAX_LIMIT or more (inf, 1e300,
    2**70) counts MAX_LIMIT: more than any limit can be, so such a record exhausts any budget rather than
    overflowing (round(inf) raises) or going uncounted. Records the proxy writes now stay far below it.
    """
    if isinstance(usd, bool) or not isinstance(usd, int | float) or not usd > 0:  # NaN fails usd > 0
        return 0
    if usd >= MAX_LIMIT:
        return _MAX_UNITS
    return round(usd * UNITS)


def to_tokens(count: Any) -> int:
    """A record's total_tokens as a spend, clamped like to_units: 0 for non-numbers and <= 0, MAX_LIMIT at most."""
    if isinstance(count, bool) or not isinstance(count, int | float) or not count > 0:
        return 0
    if count >= MAX_LIMIT:
        return _MAX_TOKENS
    return int(count)


@dataclass(frozen=True, slots=True)
class Limits:
    """The effective limits of one call: USD in 1e-10 units and tokens; None means no limit."""

    usd: int | None = None
    """Most the run may spend, in 1e-10 USD units."""
    tokens: int | None = None
    """Most tokens the run may use."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check-and-reserve, with the figures its messages and headers need."""

    refused: str | None
    """None when admitted (and reserved); "usd" or "tokens": the limit that refused it."""
    spent_usd: int
    """The run's spend before this call (1e-10 USD units)."""
    spent_tokens: int
    """The run's tokens before this call."""
    reserved_usd: int
    """Held by the run's other calls in flight."""
    reserved_tokens: int
    """Tokens held by the run's other calls in flight."""


def refuses(limit: int, spent: int, reserved: int, mine: int) -> bool:
    """The one admission rule: spend reached the limit, or this reservation would cross it."""
    return spent >= limit or spent + reserved + mine > limit


def decide(limits: Limits, usd: int, tokens: int, spent: tuple[int, int], reserved: tuple[int, int]) -> Decision:
    """Apply the admission rule, USD first, to a run's figures (as read inside the store's atomic step)."""
    refused = None
    if limits.usd is not None and refuses(limits.usd, spent[0], reserved[0], usd):
        refused = "usd"
    elif limits.tokens is not None and refuses(limits.tokens, spent[1], reserved[1], tokens):
        refused = "tokens"
    return Decision(refused, spent[0], spent[1], reserved[0], reserved[1])


class BudgetStore(Protocol):
    """Per-run spend and reservations, behind atomic check-and-reserve and settle."""

    def open(self, run_id: str) -> None:
        """Start counting a run (reading its file's spend) unless already counting it."""

    async def reserve(self, run_id: str, reservation_id: str, usd: int, tokens: int, limits: Limits) -> Decision:
        """Atomically refuse, or admit and hold usd/tokens for the call until it settles."""
        ...

    def settle(self, reservation_id: str, run_id: str | None, usd: int, tokens: int) -> None:
        """Release the call's reservation and add its actual spend, at most once per request id."""

    async def spend(self, run_id: str) -> tuple[int, int] | None:
        """The run's spend (USD units, tokens) as the store holds it; None if it holds nothing of it."""
        ...

    def seen_spend(self, run_id: str) -> tuple[int, int] | None:
        """The run's spend as this process last saw it, without waiting."""

    async def close(self) -> None:
        """Finish scheduled settlements and let go of connections."""


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a run file: JSON objects only (torn tails, blank lines and other JSON are skipped)."""
    try:
        f = open_run_file(path)  # never through a link planted in the runs dir (UnsafeRunFile, an OSError)
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn tail left by a killed writer, a blank line, or not JSON (NaN, 1e400, too deep)
            if isinstance(rec, dict):
                yield rec


def read_totals(path: Path, seen: set[str]) -> tuple[int, int]:
    """Sum cost (units) and tokens of a run file's records, skipping ids in seen."""
    usd = tokens = 0
    for rec in _lines(path):
        request_id = rec.get("request_id")
        if isinstance(request_id, str) and request_id in seen:  # a list or object id is unhashable
            continue
        usd += to_units(rec.get("cost_usd"))
        tokens += to_tokens(rec.get("total_tokens"))
    return usd, tokens


def read_records(path: Path, recent_from: str | None) -> tuple[int, int, list[tuple[str, int, int]]]:
    """A run file as (lump USD, lump tokens, [(request id, USD, tokens)]) for a shared store's seeding.

    Records that cost nothing are left out. Those with a string request id (and, given recent_from, an ISO
    ``ts`` at or after it) are listed one by one so the store can count each once; the rest are summed.
    """
    lump_usd = lump_tok = 0
    each: list[tuple[str, int, int]] = []
    for rec in _lines(path):
        usd, tok = to_units(rec.get("cost_usd")), to_tokens(rec.get("total_tokens"))
        if not usd and not tok:
            continue
        rid, ts = rec.get("request_id"), rec.get("ts")
        if isinstance(rid, str) and (recent_from is None or (isinstance(ts, str) and ts >= recent_from)):
            each.append((rid, usd, tok))
        else:
            lump_usd += usd
            lump_tok += tok
    return lump_usd, lump_tok, each


def describe_read_error(path: Path, exc: BaseException) -> str:
    why = (exc.strerror or exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return f"{path}: {why}"


# -- one process -------------------------------------------------------------------------------------


class _Run:
    """What is known about one run's spend."""

    __slots__ = ("usd", "tokens", "reserved_usd", "reserved_tokens", "loading", "seen", "failed")

    def __init__(self) -> None:
        self.usd = 0
        self.tokens = 0
        self.reserved_usd = 0
        self.reserved_tokens = 0
        self.loading: asyncio.Task[None] | None = None
        self.seen: set[str] | None = set()
        """Request ids of records settled while the run file is being read (counted once)."""
        self.failed: str | None = None


class LocalStore:
    """This process's memory: a run's file is read once, then each settled record is added."""

    def __init__(self, sink: JsonlSink) -> None:
        self.sink = sink
        self._runs: dict[str, _Run] = {}
        self._inflight: dict[str, tuple[_Run, int, int]] = {}
        self._settled: OrderedDict[str, None] = OrderedDict()

    def open(self, run_id: str) -> None:
        if run_id not in self._runs:
            run = self._runs[run_id] = _Run()
            run.loading = asyncio.create_task(self._load(run_id, run), name=f"budget-load-{run_id}")

    async def _load(self, run_id: str, run: _Run) -> None:
        """Add what the run file already holds (records from before a restart) to the run's spend."""
        assert run.seen is not None
        path = self.sink.path_for(run_id)
        try:
            # The thread reads `seen` while the loop adds to it: a record is settled before the
            # sink can flush it, so any line of it the thread reads is already in the set.
            usd, tokens = await asyncio.to_thread(read_totals, path, run.seen)
        except Exception as exc:
            # Whatever went wrong (a bug included), a run must never be judged on a spend of 0: its calls
            # are refused as for an unreadable file, and the next one reads it again.
            run.failed = describe_read_error(path, exc)
            log.error("budgets: cannot read %s", run.failed)
            if self._runs.get(run_id) is run:
                del self._runs[run_id]  # the run's next call tries again
            return
        finally:
            run.loading = None
        run.usd += usd
        run.tokens += tokens
        run.seen = None

    async def reserve(self, run_id: str, reservation_id: str, usd: int, tokens: int, limits: Limits) -> Decision:
        self.open(run_id)
        run = self._runs[run_id]
        if run.loading is not None:
            await asyncio.shield(run.loading)  # a client leaving must not cancel the read others wait for
        if run.failed is not None:
            raise errors.RecordingUnavailable(f"Cannot read the records of run {run_id!r} to enforce its"
                                              f" budget: {run.failed}")  # fmt: skip
        # No await from here on: the check and the reservation are one step on the loop.
        decision = decide(limits, usd, tokens, (run.usd, run.tokens), (run.reserved_usd, run.reserved_tokens))
        if decision.refused is None:
            run.reserved_usd += usd
            run.reserved_tokens += tokens
            self._inflight[reservation_id] = (run, usd, tokens)
        return decision

    def settle(self, reservation_id: str, run_id: str | None, usd: int, tokens: int) -> None:
        held = self._inflight.pop(reservation_id, None)
        if held is not None:
            holder, r_usd, r_tok = held
            holder.reserved_usd -= r_usd
            holder.reserved_tokens -= r_tok
        if reservation_id in self._settled:
            return
        self._settled[reservation_id] = None
        if len(self._settled) > _DEDUPE:
            self._settled.popitem(last=False)
        if run_id is None or (run := self._runs.get(run_id)) is None:
            return
        run.usd += usd
        run.tokens += tokens
        if run.seen is not None:
            run.seen.add(reservation_id)

    async def spend(self, run_id: str) -> tuple[int, int] | None:
        return self.seen_spend(run_id)

    def seen_spend(self, run_id: str) -> tuple[int, int] | None:
        run = self._runs.get(run_id)
        return None if run is None else (run.usd, run.tokens)

    def reserved(self, run_id: str) -> tuple[int, int]:
        """USD units and tokens the run's calls in flight hold."""
        run = self._runs.get(run_id)
        return (0, 0) if run is None else (run.reserved_usd, run.reserved_tokens)

    async def close(self) -> None:
        return None


# -- the workers of one host -------------------------------------------------------------------------

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, usd INTEGER NOT NULL DEFAULT 0,
    tok INTEGER NOT NULL DEFAULT 0, seeded INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, run TEXT NOT NULL, usd INTEGER NOT NULL,
    tok INTEGER NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS reservations_run ON reservations (run, expires);
CREATE TABLE IF NOT EXISTS settled (id TEXT PRIMARY KEY, run TEXT NOT NULL, usd INTEGER NOT NULL,
    tok INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS count_settled AFTER INSERT ON settled BEGIN
    INSERT INTO runs (run) VALUES (NEW.run) ON CONFLICT DO NOTHING;
    UPDATE runs SET usd = min(usd + NEW.usd, {SHARED_CAP}), tok = min(tok + NEW.tok, {SHARED_CAP})
        WHERE run = NEW.run;
END;
"""


def _cap(n: int) -> int:
    return min(max(n, 0), SHARED_CAP)


class SqliteStore:
    """The workers of one host sharing a SQLite file: atomic across processes by BEGIN IMMEDIATE."""

    def __init__(self, path: Path, sink: JsonlSink, reservation_ttl_s: float) -> None:
        self.path = path
        self.sink = sink
        self.ttl = reservation_ttl_s
        self._db: sqlite3.Connection | None = None
        # One thread per process: the connection is used by it alone, and the loop never blocks on a lock.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budget-sqlite")
        self._seeds: dict[str, asyncio.Task[None]] = {}
        self._seen: dict[str, tuple[int, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def create(path: Path) -> None:
        """Start from nothing (serve's supervisor, before forking): spend is then what the run files hold."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        finally:
            db.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost tail on power loss is re-read from the run files
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # Each _x_sync runs in the store's thread, as one transaction.

    def _seed_sync(self, run_id: str) -> None:
        db = self._conn()
        row = db.execute("SELECT seeded FROM runs WHERE run = ?", (run_id,)).fetchone()
        if row is not None and row[0]:
            return
        lump_usd, lump_tok, each = read_records(self.sink.path_for(run_id), None)
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT seeded FROM runs WHERE run = ?", (run_id,)).fetchone()
            if row is None or not row[0]:
                db.executemany("INSERT OR IGNORE INTO settled VALUES (?, ?, ?, ?)",
                               ((rid, run_id, _cap(u), _cap(t)) for rid, u, t in each))  # fmt: skip
                db.execute("INSERT INTO runs (run) VALUES (?) ON CONFLICT DO NOTHING", (run_id,))
                db.execute(f"UPDATE runs SET usd = min(usd + ?, {SHARED_CAP}), tok = min(tok + ?, {SHARED_CAP}),"
                           " seeded = 1 WHERE run = ?", (_cap(lump_usd), _cap(lump_tok), run_id))  # fmt: skip
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _reserve_sync(self, run_id: str, rid: str, usd: int, tokens: int, limits: Limits) -> Decision:
        db = self._conn()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM reservations WHERE run = ? AND expires <= ?", (run_id, now))
            row = db.execute("SELECT usd, tok FROM runs WHERE run = ?", (run_id,)).fetchone() or (0, 0)
            held = db.execute("SELECT coalesce(sum(usd), 0), coalesce(sum(tok), 0) FROM reservations WHERE run = ?",
                              (run_id,)).fetchone()  # fmt: skip
            capped = Limits(None if limits.usd is None else min(limits.usd, SHARED_CAP),
                            None if limits.tokens is None else min(limits.tokens, SHARED_CAP))  # fmt: skip
            d = decide(capped, _cap(usd), _cap(tokens), (row[0], row[1]), (held[0], held[1]))
            if d.refused is None:
                db.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?)",
                           (rid, run_id, _cap(usd), _cap(tokens), now + self.ttl))  # fmt: skip
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return d

    def _settle_sync(self, rid: str, run_id: str | None, usd: int, tokens: int) -> tuple[int, int] | None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM reservations WHERE id = ?", (rid,))
            row = None
            if run_id is not None:
                db.execute("INSERT OR IGNORE INTO settled VALUES (?, ?, ?, ?)", (rid, run_id, _cap(usd), _cap(tokens)))
                row = db.execute("SELECT usd, tok FROM runs WHERE run = ?", (run_id,)).fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return None if row is None else (row[0], row[1])

    def _spend_sync(self, run_id: str) -> tuple[int, int] | None:
        row = self._conn().execute("SELECT usd, tok FROM runs WHERE run = ?", (run_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def open(self, run_id: str) -> None:
        if run_id not in self._seeds:
            self._seeds[run_id] = asyncio.create_task(self._seed(run_id), name=f"budget-seed-{run_id}")

    async def _seed(self, run_id: str) -> None:
        try:
            await self._run(self._seed_sync, run_id)
        except Exception as exc:
            if self._seeds.get(run_id) is not None:
                del self._seeds[run_id]  # the run's next call tries again
            why = describe_read_error(self.sink.path_for(run_id), exc)
            log.error("budgets: cannot seed run %s: %s", run_id, why)
            raise errors.RecordingUnavailable(
                f"Cannot read the records of run {run_id!r} to enforce its budget: {why}") from None

    async def reserve(self, run_id: str, reservation_id: str, usd: int, tokens: int, limits: Limits) -> Decision:
        self.open(run_id)
        await asyncio.shield(self._seeds[run_id])
        d: Decision = await self._run(self._reserve_sync, run_id, reservation_id, usd, tokens, limits)
        self._seen[run_id] = (d.spent_usd, d.spent_tokens)
        return d

    def settle(self, reservation_id: str, run_id: str | None, usd: int, tokens: int) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(reservation_id, run_id, usd, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, rid: str, run_id: str | None, usd: int, tokens: int) -> None:
        try:
            spent = await self._run(self._settle_sync, rid, run_id, usd, tokens)
        except Exception:  # the reservation expires; the record stays in the run file for the next start
            log.exception("budgets: cannot settle %s in %s", rid, self.path)
            return
        if run_id is not None and spent is not None:
            self._seen[run_id] = spent

    async def spend(self, run_id: str) -> tuple[int, int] | None:
        result: tuple[int, int] | None = await self._run(self._spend_sync, run_id)
        return result

    def seen_spend(self, run_id: str) -> tuple[int, int] | None:
        return self._seen.get(run_id)

    async def drain(self) -> None:
        """Wait for the settlements scheduled so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def close(self) -> None:
        await self.drain()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._pool.shutdown(wait=False)


def for_config(budgets: Budgets, sink: JsonlSink, shared_file: Path | None = None) -> BudgetStore:
    """The store a process uses: Redis when budgets.store.url is set, else shared_file's SQLite (given by
    serve to its workers), else this process's memory."""
    conf = budgets.store
    if conf.url is not None:
        from proxy.budget_redis import RedisStore  # the fleet extra: imported only when configured

        return RedisStore(conf.url, sink, key_prefix=conf.key_prefix, reservation_ttl_s=conf.reservation_ttl_s,
                          on_unavailable=conf.on_unavailable)  # fmt: skip
    if shared_file is not None:
        return SqliteStore(shared_file, sink, conf.reservation_ttl_s)
    return LocalStore(sink)
