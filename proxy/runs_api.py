"""HTTP views of the runs: GET /runs, /runs/{id}, /runs/{id}/records, /runs/{id}/events (SSE), /ui.

Files are read in worker threads, never on the event loop. Live events come from a Forwarder observer
that hands each record to the subscribers of its run: one dict lookup per call while nobody watches.
A worker of ``serve --workers N`` follows the run files instead (FollowingHub), since its observer
sees only the calls it serves itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy import errors, report, series, tail, ui, whatif
from proxy.config import RUN_ID_RE
from proxy.pricing import PriceBook
from proxy.records import Record, UnsafeRunFile

if TYPE_CHECKING:
    from proxy.runs_db import PostgresRuns

log = logging.getLogger("metering_proxy.runs")

QUEUE_SIZE = 1024
"""Records an events subscriber may lag behind before it is dropped (memory stays bounded)."""
MAX_SUBSCRIBERS = 100
KEEPALIVE_S = 15.0
POLL_S = 0.05
"""How often a worker looks at the run files it follows for the other workers' records."""
BATCH_LINES = 2000
SUMMARY_CACHE = 4
"""Run summaries kept (with their per-call samples) so a refresh reads only the new lines."""


class UnknownRun(errors.ProxyError):
    """No file for this run id in the runs dir."""

    status = 404
    type = "invalid_request_error"
    category = errors.Category.UNKNOWN


class TooManySubscribers(errors.ProxyError):
    """MAX_SUBSCRIBERS event streams are open already."""

    status = 503
    type = "server_error"
    category = errors.Category.UNKNOWN


class Subscriber:
    """One events stream: a bounded queue of SSE frames; None in the queue ends the stream."""

    __slots__ = ("queue", "end_reason", "start")

    def __init__(self, start: int = 0) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_SIZE)
        self.end_reason: str | None = None
        self.start = start
        """Followed files: the offset the run file had when the stream began (earlier lines are not sent)."""

    def end(self, reason: str) -> None:
        """Make the stream finish: what is queued is discarded, the end marker goes in."""
        self.end_reason = reason
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventHub:
    """Fans each new record out to the subscribers of its run."""

    def __init__(self) -> None:
        self._subs: dict[str | None, set[Subscriber]] = {}
        self.count = 0
        self.dropped = 0

    def subscribe(self, run_id: str, start: int = 0) -> Subscriber:
        """Return a new subscriber to a run's records."""
        sub = Subscriber(start)
        self._subs.setdefault(run_id, set()).add(sub)
        self.count += 1
        return sub

    async def join(self, run_id: str, path: Path | None) -> Subscriber:
        """Subscribe an events stream to the run whose file is path."""
        return self.subscribe(run_id)

    def wake(self) -> None:
        """Nothing to wake: records arrive through observe()."""

    async def stop(self) -> None:
        """Nothing runs in the background here."""

    def _send(self, run_id: str | None, subs: set[Subscriber], frame: bytes, offset: int = 0) -> None:
        for sub in list(subs):
            if offset < sub.start:
                continue
            try:
                sub.queue.put_nowait(frame)
            except asyncio.QueueFull:
                # A reader this far behind would make us hold an unbounded backlog: cut it loose.
                self.dropped += 1
                self.unsubscribe(run_id, sub)
                sub.end("too_slow")

    def unsubscribe(self, run_id: str | None, sub: Subscriber) -> None:
        """Forget a subscriber (idempotent)."""
        subs = self._subs.get(run_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self.count -= 1
            if not subs:
                del self._subs[run_id]

    def observe(self, record: Record) -> None:
        """Forwarder observer: queue the record for its run's subscribers; O(1) when there are none."""
        subs = self._subs.get(record.run_id)
        if not subs:
            return
        frame = b"event: record\ndata: " + record.to_json() + b"\n"  # the line ends in its own newline
        self._send(record.run_id, subs, frame)

    def close_all(self, reason: str) -> None:
        """End every stream (the proxy is shutting down)."""
        for run_id, subs in list(self._subs.items()):
            for sub in list(subs):
                self.unsubscribe(run_id, sub)
                sub.end(reason)


class FollowingHub(EventHub):
    """The hub of one of several workers: streams are fed from the run files, so they carry every
    worker's records, each once, in file order.

    One Tail per run with subscribers, read in one worker thread per look: woken by this worker's own
    flushes (sink.on_flush) and every POLL_S for the others'. observe() does nothing: the file brings
    this worker's records too, and sending them twice is what following the file avoids.
    """

    def __init__(self, poll_s: float = POLL_S) -> None:
        super().__init__()
        self.poll_s = poll_s
        self._tails: dict[str, tail.Tail] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def observe(self, record: Record) -> None:
        """Nothing to do: records reach the streams through the run file."""

    def wake(self) -> None:
        """Look at the followed files now (a flush just wrote some)."""
        self._wake.set()

    async def join(self, run_id: str, path: Path | None) -> Subscriber:
        """Subscribe from the file's current end on; FileNotFoundError when it went away meanwhile."""
        assert path is not None
        start = await asyncio.to_thread(tail.size, path)
        sub = self.subscribe(run_id, start)
        if run_id not in self._tails:
            self._tails[run_id] = tail.Tail(path, start)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="runs-follow")
        return sub

    @staticmethod
    def _read(tails: list[tuple[str, tail.Tail]]) -> list[tuple[str, list[tuple[int, bytes]], bool]]:
        out = []
        for run_id, t in tails:
            try:
                lines = [(at, line) for at, line in t.read() if tail.is_record(line)]
            except OSError as exc:
                log.warning("runs: cannot follow %s: %s", t.path, exc.strerror or exc)
                lines = []
            out.append((run_id, lines, t.more))
        return out

    async def _follow(self) -> None:
        while self._tails and not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()
            batches = await asyncio.to_thread(self._read, list(self._tails.items()))
            for run_id, lines, more in batches:
                subs = self._subs.get(run_id)
                for at, line in lines:
                    if subs:
                        self._send(run_id, subs, b"event: record\ndata: " + line + b"\n", at)
                if more:
                    self._wake.set()
            # Closed here, between reads, never while a thread reads them.
            for run_id in [r for r in self._tails if r not in self._subs or self._stopping]:
                self._tails.pop(run_id).close()

    async def stop(self) -> None:
        """Stop following (shutdown): the current read finishes, then every file is closed."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for t in self._tails.values():
            t.close()
        self._tails.clear()


def _unknown(run_id: str) -> UnknownRun:
    return UnknownRun(f"No run {run_id!r}: there is no {run_id}.jsonl in the runs dir.", param="run_id",
                      code="run_not_found")  # fmt: skip


def _refused(run_id: str, exc: UnsafeRunFile) -> UnknownRun:
    """The 404 of a run whose file is a link: the client learns no more than for a missing run; the log says why."""
    log.warning("runs: %s", exc)
    return _unknown(run_id)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def _by_specs(request: web.Request) -> list[str]:
    specs = request.query.getall("by", []) or ["model"]
    try:
        return [report.check_by(s) for spec in specs for s in spec.split(",") if s]
    except ValueError as exc:
        raise errors.BadRequest(str(exc).replace("--by", "by"), param="by") from None


def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise errors.BadRequest(f"'{name}' must be a whole number >= 0 (got {raw[:40]!r}).", param=name)
    return int(raw)


class RunsApi:
    """The /runs and /ui handlers over one runs dir (or, with db, the fleet's calls table), plus the live-events hub."""

    def __init__(self, runs_dir: Path, follow_files: bool = False, db: PostgresRuns | None = None) -> None:
        self.runs_dir = runs_dir
        self.db = db
        """Set (ship.postgres.serve_reads): every read goes to the database, none to the runs dir."""
        self.hub: EventHub = db.hub if db is not None else FollowingHub() if follow_files else EventHub()
        self.keepalive_s = KEEPALIVE_S
        self._totals: dict[str, report.RunSummary] = {}
        self._summaries: dict[tuple[str, tuple[str, ...], tuple[str, ...]], tuple[report.RunSummary, Any, bytes]] = {}
        self._series: dict[tuple[str, int], series.RunSeries] = {}
        self.pricebook: PriceBook | None = None
        """The price table ?price_as= re-prices with (make_app's; the bundled one, loaded when first asked, if none)."""
        # One file scan at a time: summaries of huge runs are CPU-heavy and share the CPU with calls.
        self._lock = asyncio.Lock()

    @staticmethod
    def run_id(request: web.Request) -> str:
        """Return the run id of a /runs/{run_id}... request, checked with the proxy's own RUN_ID_RE (400 if not)."""
        run_id = request.match_info["run_id"]
        if not RUN_ID_RE.fullmatch(run_id):
            raise errors.InvalidRunId(
                f"Invalid run id {run_id[:40]!r}: use 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-',"
                " not starting with '.'.", param="run_id")  # fmt: skip
        return run_id

    def path(self, request: web.Request) -> tuple[str, Path]:
        """Return the run id and file of a /runs/{run_id}... request: 400 if invalid, 404 if unknown.

        The id is checked before it goes near the filesystem (no '/', no leading '.'); a name that is a
        symlink or no regular file answers 404 like a missing run.
        """
        run_id = self.run_id(request)
        try:
            return run_id, report.run_path(self.runs_dir, run_id)
        except report.RunNotFound:
            raise _unknown(run_id) from None
        except UnsafeRunFile as exc:
            raise _refused(run_id, exc) from None

    # -- GET /runs -------------------------------------------------------------------------

    def _all_totals(self) -> list[dict[str, Any]]:
        ids = report.list_runs(self.runs_dir)
        for gone in set(self._totals) - set(ids):
            del self._totals[gone]
        out = []
        for run_id in ids:
            totals = self._totals.get(run_id)
            if totals is None:
                path = self.runs_dir / f"{run_id}.jsonl"
                totals = self._totals[run_id] = report.RunSummary(path, run_id, by=(), samples=False)
            try:
                totals.update(final=False)
            except OSError:
                continue  # removed, or swapped for a link, since it was listed
            out.append(totals.totals_json())
        out.sort(key=lambda r: r["modified"] or "", reverse=True)
        return out

    async def list_runs(self, request: web.Request) -> web.Response:
        """GET /runs: every run with its totals, most recently written first."""
        if self.db is not None:
            return _json({"runs": await self.db.list_totals()})
        async with self._lock:
            runs = await asyncio.to_thread(self._all_totals)
        return _json({"runs": runs})

    # -- GET /runs/{run_id} ----------------------------------------------------------------

    def _summary(self, run_id: str, path: Path, specs: list[str], price_as: list[str] | None = None) -> bytes:
        key = (run_id, tuple(specs), tuple(price_as or ()))
        entry = self._summaries.pop(key, None)  # re-inserted below: the dict's order is least recent first
        if entry is None:
            entry = (report.RunSummary(path, run_id, specs, price_as=self._repricer(price_as)), None, b"")
        summary, seen, body = entry
        summary.update(final=False)
        state = (summary.ino, summary.offset, summary.tail_note)
        if state != seen:
            body = orjson.dumps(report.report_json([summary]))
        self._summaries[key] = (summary, state, body)
        while len(self._summaries) > SUMMARY_CACHE:
            del self._summaries[next(iter(self._summaries))]
        return body

    def _repricer(self, price_as: list[str] | None) -> whatif.Repricer | None:
        """The ?price_as= what-if pricing (blocking: the price table may be read here, in the summary's thread)."""
        if not price_as:
            return None
        mapping = whatif.parse(price_as)
        if self.pricebook is None:
            self.pricebook = PriceBook.load()
        return whatif.Repricer(self.pricebook, mapping)

    async def summary(self, request: web.Request) -> web.Response:
        """GET /runs/{run_id}[?by=model&by=task]: the report --json document for one run."""
        if self.db is not None:
            specs = _by_specs(request)
            body = await self.db.summary(self.run_id(request), specs)
            return web.Response(body=body, content_type="application/json")
        run_id, path = self.path(request)
        specs = _by_specs(request)
        price_as = request.query.getall("price_as", []) or None
        async with self._lock:
            try:
                body = await asyncio.to_thread(self._summary, run_id, path, specs, price_as)
            except ValueError as exc:  # ?price_as=: a model without a price, or not MODEL / OLD=NEW
                raise errors.BadRequest(str(exc).replace("--price-as", "price_as"), param="price_as") from None
            except FileNotFoundError:
                raise _unknown(run_id) from None  # removed since path() looked
            except UnsafeRunFile as exc:
                raise _refused(run_id, exc) from None  # swapped for a link since path() looked
        return web.Response(body=body, content_type="application/json")

    # -- GET /runs/{run_id}/series ---------------------------------------------------------

    def _file_series(self, run_id: str, path: Path, points: int) -> bytes:
        key = (run_id, points)
        found = self._series.pop(key, None)  # re-inserted below: least recently used first
        found = found or series.RunSeries(path, run_id, points)
        found.update(final=False)
        self._series[key] = found
        while len(self._series) > SUMMARY_CACHE:
            del self._series[next(iter(self._series))]
        return orjson.dumps(found.series_json())

    async def run_series(self, request: web.Request) -> web.Response:
        """GET /runs/{run_id}/series[?points=N]: cumulative cost and tokens over time, in at most N buckets."""
        points = _int_param(request, "points", series.MAX_POINTS)
        assert points is not None
        if not 1 <= points <= series.POINTS_LIMIT:
            raise errors.BadRequest(f"'points' must be 1 to {series.POINTS_LIMIT}.", param="points")
        if self.db is not None:
            # Not kept between requests: the database's rows are read again, a batch at a time, in a thread each.
            run_id = self.run_id(request)
            db_series = series.RunSeries(Path(run_id), run_id, points)
            async for batch in await self.db.records(run_id, 0, None):
                await asyncio.to_thread(db_series.fold_all, batch)
            return _json(db_series.series_json())
        run_id, path = self.path(request)
        async with self._lock:
            try:
                body = await asyncio.to_thread(self._file_series, run_id, path, points)
            except FileNotFoundError:
                raise _unknown(run_id) from None
            except UnsafeRunFile as exc:
                raise _refused(run_id, exc) from None
        return web.Response(body=body, content_type="application/json")

    # -- GET /runs/{run_id}/records --------------------------------------------------------

    async def records(self, request: web.Request) -> web.StreamResponse:
        """GET /runs/{run_id}/records[?since=N][&limit=M]: JSONL from the N-th record (0-based) on."""
        if self.db is not None:
            return await self._db_records(request)
        run_id, path = self.path(request)
        since = _int_param(request, "since", 0)
        limit = _int_param(request, "limit", None)
        assert since is not None
        source = report.records_since(path, since)
        lines: Iterator[bytes] = source if limit is None else islice(source, limit)
        next_batch: Callable[[], list[bytes]] = lambda: list(islice(lines, BATCH_LINES))  # noqa: E731
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "X-Run-Id": run_id,
                                           "Cache-Control": "no-store"})  # fmt: skip
        try:
            try:
                batch = await asyncio.to_thread(next_batch)  # opens the file: nothing is sent before that worked
            except FileNotFoundError:
                raise _unknown(run_id) from None
            except UnsafeRunFile as exc:
                raise _refused(run_id, exc) from None
            await resp.prepare(request)
            while batch:
                await resp.write(b"".join(batch))
                batch = await asyncio.to_thread(next_batch)
            await resp.write_eof()
        finally:
            try:
                source.close()  # the file, if the client left half way
            except ValueError:
                pass  # still running in its thread (we were cancelled): it closes when collected
        return resp

    async def _db_records(self, request: web.Request) -> web.StreamResponse:
        assert self.db is not None
        run_id = self.run_id(request)
        since = _int_param(request, "since", 0)
        limit = _int_param(request, "limit", None)
        assert since is not None
        batches = await self.db.records(run_id, since, limit)  # the first batch is read: errors come now
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "X-Run-Id": run_id,
                                           "Cache-Control": "no-store"})  # fmt: skip
        await resp.prepare(request)
        try:
            async for batch in batches:
                await resp.write(b"".join(batch))
        except errors.ProxyError as exc:
            # The status went out with the first batch: cut the body short rather than end it as if complete.
            log.warning("runs: records of %s cut short: %s", run_id, exc.message)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    # -- GET /runs/{run_id}/events ---------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """GET /runs/{run_id}/events: Server-Sent Events, one 'record' event per new record."""
        run_id, path = (self.run_id(request), None) if self.db is not None else self.path(request)
        if self.hub.count >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(
                f"Too many event streams open (at most {MAX_SUBSCRIBERS}); try again later.",
                code="too_many_subscribers",
            )
        try:
            sub = await self.hub.join(run_id, path)
        except FileNotFoundError:
            raise _unknown(run_id) from None  # removed since path() looked
        try:
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-store",
                    "X-Accel-Buffering": "no",
                }
            )
            await resp.prepare(request)
            await resp.write(b": subscribed to run " + run_id.encode() + b"\nretry: 2000\n\n")
            while True:
                try:
                    frame = await asyncio.wait_for(sub.queue.get(), self.keepalive_s)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                frames = [frame]
                while frame is not None and not sub.queue.empty() and len(frames) < 256:
                    frame = sub.queue.get_nowait()
                    frames.append(frame)
                await resp.write(b"".join(f for f in frames if f is not None))
                if frame is None:
                    end = orjson.dumps({"reason": sub.end_reason})
                    await resp.write(b"event: end\ndata: " + end + b"\n\n")
                    break
            await resp.write_eof()
        except ConnectionError:
            pass  # the client left
        finally:
            self.hub.unsubscribe(run_id, sub)
        return resp

    async def on_shutdown(self, app: web.Application) -> None:
        """End the event streams so shutdown need not wait for them."""
        self.hub.close_all("shutdown")
        await self.hub.stop()

    async def on_cleanup(self, app: web.Application) -> None:
        """Close the database pool, once no handler can use it."""
        if self.db is not None:
            await self.db.close()


RUNS_API = web.AppKey("runs_api", RunsApi)


def install(app: web.Application, api: RunsApi) -> None:
    """Add the /runs and /ui routes to app (make_app adds api.hub.observe to the record observers)."""
    app[RUNS_API] = api
    app.router.add_get("/runs", api.list_runs)
    app.router.add_get("/runs/{run_id}", api.summary)
    app.router.add_get("/runs/{run_id}/records", api.records)
    app.router.add_get("/runs/{run_id}/series", api.run_series)
    app.router.add_get("/runs/{run_id}/events", api.events)
    app.router.add_get("/ui", ui.handle)
    app.on_shutdown.append(api.on_shutdown)
    app.on_cleanup.append(api.on_cleanup)
