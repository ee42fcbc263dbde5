"""Copy records from the run files to destinations (PostgreSQL, a webhook): the files stay the write-ahead log.

One ``Shipper`` per destination tails ``runs/*.jsonl`` (and ``runs/.rejected.jsonl``: refused calls are
calls too), reads only complete lines past its persisted position in each file, hands them to the
destination in batches, and moves the position on, atomically on disk, only once the destination has
confirmed the batch. So a crash or an outage loses nothing; an idempotent destination (request_id)
duplicates nothing. All file I/O runs in worker threads. One process per runs dir ships (an flock on
``runs/.shipper/lock``); the others are on standby, report the same backlog from the shared position
files, and take over when the shipping process goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.records import REJECTED_FILE, open_run_fd

log = logging.getLogger("metering_proxy.shipper")

STATE_DIR = ".shipper"
LOCK_NAME = "lock"
STATE_VERSION = 1
#: Most bytes read for one batch: memory stays bounded however far behind a destination is.
MAX_BATCH_BYTES = 16 * 1024 * 1024
#: A line longer than this is not a record the proxy wrote: it is skipped (and counted), never shipped.
MAX_LINE_BYTES = 8 * 1024 * 1024
_COUNT_CHUNK = 1024 * 1024
_PEEK_BYTES = 64 * 1024
_MAX_REQUEST_ID = 200
_LOCK_RETRY_S = 1.0
_FIRST_BACKOFF_S = 0.25
_CLOSE_GRACE_S = 5.0


class DeliveryError(Exception):
    """A destination refused or could not take a batch; the message is safe to log (no secrets)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """Lines [start, end) of one run file, taken whole into a batch."""

    file: str
    ino: int
    start: int
    end: int
    lines: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Records to deliver together; batch_id is the same on every retry of the same lines."""

    batch_id: str
    records: list[dict[str, Any]]
    segments: tuple[Segment, ...]
    skipped: int = 0
    """Lines in the segments that are not records (torn fragments, not JSON objects, no request_id)."""


class Destination(Protocol):
    """Where a Shipper delivers batches. deliver raises on failure; it is retried with the same batch."""

    name: str

    async def deliver(self, batch: Batch) -> None: ...

    async def close(self) -> None: ...


def run_file_names(name: str) -> bool:
    """Whether a runs-dir entry is a file the shipper reads: run files and the rejected-calls file."""
    return name.endswith(".jsonl") and (not name.startswith(".") or name == f"{REJECTED_FILE}.jsonl")


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The record on a line, or None when the line is not one (torn, not an object, no usable request_id).

    orjson first; the standard library's parser as a fallback, which also takes what a hand-edited or
    foreign file may hold (NaN, integers past 64 bits), so such a record is shipped rather than lost.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(line.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            return None
    if not isinstance(obj, dict):
        return None
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not 0 < len(rid) <= _MAX_REQUEST_ID or "\x00" in rid:
        return None
    return obj


def record_epoch(obj: dict[str, Any]) -> float | None:
    """A record's ts as a Unix time, None when it has no valid one."""
    ts = obj.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def jsonable(value: Any) -> Any:
    """value with what jsonb cannot hold replaced: NUL in strings and keys, lone surrogates, NaN/inf."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {jsonable(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value



@dataclass
class _File:
    """What is known about one run file: where shipping stands and what lies beyond it."""

    ino: int
    pos: int
    counted: int = -1
    """Offset up to which complete lines have been counted (always a line boundary, >= pos)."""
    lines: int = 0
    """Complete lines in [pos, counted)."""
    first_ts: float | None = None
    """ts of the line at pos (the oldest unshipped record of this file), when looked at."""
    peeked_at: int = -1

    def __post_init__(self) -> None:
        if self.counted < self.pos:
            self.counted = self.pos


@dataclass
class Failing:
    """A destination that is failing: since when, how often in a row, and the last error (safe to show)."""

    since: float
    failures: int
    error: str


class RunTail:
    """The blocking half of a Shipper: scans the runs dir, reads batches, persists positions. Thread-side."""

    def __init__(self, runs_dir: Path, destination: str) -> None:
        self.runs_dir = runs_dir
        self.state_path = runs_dir / STATE_DIR / f"{destination}.json"
        self.files: dict[str, _File] = {}
        self.failing: Failing | None = None
        self._state_mtime: int | None = None

    # -- persisted state ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the persisted positions (a missing or unreadable state file means: from the start)."""
        try:
            st = os.stat(self.state_path)
            raw = orjson.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("shipper: cannot read %s (%s): shipping from the start (duplicates are dropped by request_id)",
                      self.state_path, exc)  # fmt: skip
            return
        self._state_mtime = st.st_mtime_ns
        files = raw.get("files") if isinstance(raw, dict) else None
        for name, entry in (files or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("ino"), int) and isinstance(entry.get("pos"), int):
                old = self.files.get(name)
                if old is None or old.ino != entry["ino"] or old.pos != entry["pos"]:
                    self.files[name] = _File(ino=entry["ino"], pos=max(0, entry["pos"]))
        failing = raw.get("failing") if isinstance(raw, dict) else None
        if isinstance(failing, dict):
            self.failing = Failing(float(failing.get("since") or 0), int(failing.get("failures") or 0),
                                   str(failing.get("error") or ""))  # fmt: skip
        else:
            self.failing = None

    def reload_if_changed(self) -> None:
        """Standby: pick up the shipping process's latest positions."""
        try:
            mtime = os.stat(self.state_path).st_mtime_ns
        except OSError:
            return
        if mtime != self._state_mtime:
            self.load()

    def save(self) -> None:
        """Write the positions atomically: a temp file in the same dir, fsynced, renamed over the old one."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "files": {name: {"ino": f.ino, "pos": f.pos} for name, f in sorted(self.files.items())},
            "failing": None if self.failing is None else {
                "since": self.failing.since, "failures": self.failing.failures, "error": self.failing.error},
        }  # fmt: skip
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            out.write(orjson.dumps(state))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.state_path)
        with contextlib.suppress(OSError):
            self._state_mtime = os.stat(self.state_path).st_mtime_ns

    # -- scanning ----------------------------------------------------------------------------------

    def scan(self) -> None:
        """stat every run file; count the complete lines appended since the last scan (each byte once)."""
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.runs_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not run_file_names(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            seen.add(entry.name)
            f = self.files.get(entry.name)
            if f is None or f.ino != st.st_ino or st.st_size < f.pos:
                if f is not None:
                    log.warning("shipper: %s was replaced or truncated: shipping it from the start", entry.name)
                f = self.files[entry.name] = _File(ino=st.st_ino, pos=0)
            if st.st_size > f.counted:
                self._count(entry.name, f, st.st_size)
        for gone in set(self.files) - seen:
            f = self.files.pop(gone)
            if f.lines:
                log.error("shipper: %s disappeared with %d record(s) not shipped", gone, f.lines)

    def _open(self, name: str, f: _File) -> int | None:
        try:
            fd = open_run_fd(self.runs_dir / name, os.O_RDONLY, self.runs_dir / name, "read")
        except OSError:
            return None
        if os.fstat(fd).st_ino != f.ino:
            os.close(fd)
            return None
        return fd

    def _count(self, name: str, f: _File, size: int) -> None:
        fd = self._open(name, f)
        if fd is None:
            return
        try:
            off = f.counted
            while off < size:
                chunk = os.pread(fd, min(_COUNT_CHUNK, size - off), off)
                if not chunk:
                    break
                last = chunk.rfind(b"\n")
                if last < 0:
                    if len(chunk) < _COUNT_CHUNK:
                        break  # a torn (or still being written) last line: it waits for its newline
                    off += len(chunk)  # one very long line: keep looking for its end
                    continue
                f.lines += chunk.count(b"\n", 0, last + 1)
                off += last + 1
                f.counted = off
        finally:
            os.close(fd)

    def backlog(self) -> tuple[int, int, float | None]:
        """(complete lines not shipped, their bytes, ts of the oldest of them) over every file."""
        lines = size = 0
        oldest: float | None = None
        for name, f in self.files.items():
            if f.counted <= f.pos:
                continue
            lines += f.lines
            size += f.counted - f.pos
            if f.peeked_at != f.pos:
                f.first_ts, f.peeked_at = self._peek_ts(name, f), f.pos
            if f.first_ts is not None and (oldest is None or f.first_ts < oldest):
                oldest = f.first_ts
        return lines, size, oldest

    def _peek_ts(self, name: str, f: _File) -> float | None:
        fd = self._open(name, f)
        if fd is None:
            return None
        try:
            head = os.pread(fd, _PEEK_BYTES, f.pos)
        finally:
            os.close(fd)
        # Skip lines that are not records (a torn fragment) to find the first real one in the window.
        for line in head.split(b"\n")[:-1]:
            obj = parse_line(line)
            if obj is not None:
                return record_epoch(obj) or time.time()
        return time.time()  # a record too long to peek at: its age counts from now

    # -- batches -----------------------------------------------------------------------------------

    def read_batch(self, max_records: int) -> Batch | None:
        """Up to max_records records from the complete lines past each file's position, oldest file first."""
        records: list[dict[str, Any]] = []
        segments: list[Segment] = []
        skipped = 0
        budget = MAX_BATCH_BYTES
        for name in sorted(self.files, key=lambda n: self.files[n].first_ts or 0.0):
            f = self.files[name]
            if f.counted <= f.pos or len(records) >= max_records or budget <= 0:
                continue
            fd = self._open(name, f)
            if fd is None:
                continue
            try:
                seg, got, bad = self._read_segment(fd, name, f, max_records - len(records), budget)
            finally:
                os.close(fd)
            if seg is not None:
                segments.append(seg)
                records.extend(got)
                skipped += bad
                budget -= seg.end - seg.start
        if not segments:
            return None
        ident = "\n".join(f"{s.file}:{s.ino}:{s.start}:{s.end}" for s in segments)
        batch_id = "b_" + hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return Batch(batch_id=batch_id, records=records, segments=tuple(segments), skipped=skipped)

    def _read_segment(self, fd: int, name: str, f: _File, want: int,
                      budget: int) -> tuple[Segment | None, list[dict[str, Any]], int]:  # fmt: skip
        data = os.pread(fd, min(f.counted - f.pos, budget), f.pos)
        end = data.rfind(b"\n") + 1
        if end == 0:
            # Not even one whole line fits: a line over MAX_BATCH_BYTES. Skip it (it is no record we wrote).
            skip_to = self._line_end(fd, f.pos, f.counted)
            log.error("shipper: %s: a line of %d bytes at offset %d is not a record; skipped",
                      name, skip_to - f.pos, f.pos)  # fmt: skip
            return Segment(name, f.ino, f.pos, skip_to, 1), [], 1
        got: list[dict[str, Any]] = []
        bad = 0
        off = 0
        lines = 0
        while off < end and len(got) < want:
            nl = data.index(b"\n", off)
            line = data[off:nl]
            off = nl + 1
            lines += 1
            obj = parse_line(line) if len(line) <= MAX_LINE_BYTES else None
            if obj is None:
                bad += 1
                if line.strip():
                    at = f.pos + off - len(line) - 1
                    log.warning("shipper: %s: a line at offset %d is not a record; skipped", name, at)
            else:
                got.append(obj)
        return Segment(name, f.ino, f.pos, f.pos + off, lines), got, bad

    @staticmethod
    def _line_end(fd: int, start: int, limit: int) -> int:
        off = start
        while off < limit:
            chunk = os.pread(fd, min(_COUNT_CHUNK, limit - off), off)
            nl = chunk.find(b"\n")
            if nl >= 0:
                return off + nl + 1
            off += len(chunk)
        return limit

    def commit(self, batch: Batch) -> None:
        """Move each file's position past the batch's lines, then persist (only after delivery)."""
        for seg in batch.segments:
            f = self.files.get(seg.file)
            if f is not None and f.ino == seg.ino and f.pos == seg.start:
                f.pos = seg.end
                f.lines = max(0, f.lines - seg.lines)
        self.failing = None
        self.save()


@dataclass
class ShipperStatus:
    """What /healthz and /metrics show for one destination."""

    destination: str
    owner: bool = False
    backlog_records: int = 0
    backlog_bytes: int = 0
    oldest_ts: float | None = None
    shipped: int = 0
    failures: int = 0
    skipped: int = 0
    failing: Failing | None = None
    scans: int = 0
    """Scans of the runs dir so far: a test waits for one to know a file was looked at."""

    def age_s(self, now: float | None = None) -> float:
        """Age of the oldest unshipped record in seconds (0 without a backlog)."""
        if self.oldest_ts is None or not self.backlog_records:
            return 0.0
        return max(0.0, (now or time.time()) - self.oldest_ts)


class Shipper:
    """Ships one destination's records from the run files: the async loop around a RunTail."""

    def __init__(self, runs_dir: Path, destination: Destination, batch_size: int, interval_s: float,
                 retry_max_s: float) -> None:  # fmt: skip
        self.destination = destination
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.retry_max_s = retry_max_s
        self.tail = RunTail(runs_dir, destination.name)
        self.status = ShipperStatus(destination.name)
        self._stop = asyncio.Event()

    async def run(self, group: Shipping) -> None:
        """Loop until stopped: ship while this process holds the lock, else watch the backlog."""
        await asyncio.to_thread(self.tail.load)
        was_owner = False
        while not self._stop.is_set():
            if group.owner and not was_owner:
                was_owner = self.status.owner = True
                await asyncio.to_thread(self._take_over)
            if was_owner:
                await self._ship_once()
            else:
                await asyncio.to_thread(self._watch)
                await self._sleep(self.interval_s)

    def _take_over(self) -> None:
        self.tail.files.clear()
        self.tail.load()
        self.tail.failing = None

    def _watch(self) -> None:
        self.tail.reload_if_changed()
        self.tail.scan()
        self._update_backlog()
        self.status.failing = self.tail.failing

    def _update_backlog(self) -> None:
        lines, size, oldest = self.tail.backlog()
        self.status.backlog_records, self.status.backlog_bytes, self.status.oldest_ts = lines, size, oldest
        self.status.scans += 1

    def _commit(self, batch: Batch) -> None:
        self.tail.commit(batch)
        self._update_backlog()

    def _rescan(self) -> None:
        self.tail.scan()
        self._update_backlog()

    def _read(self) -> Batch | None:
        self.tail.scan()
        self._update_backlog()
        return self.tail.read_batch(self.batch_size)

    async def _ship_once(self) -> None:
        batch = await asyncio.to_thread(self._read)
        if batch is None:
            await self._sleep(self.interval_s)
            return
        if batch.records:
            await self._deliver(batch)
        else:
            await asyncio.to_thread(self._commit, batch)  # only lines that are not records: nothing to send
        self.status.skipped += batch.skipped
        if len(batch.records) < self.batch_size:
            await self._sleep(self.interval_s)

    async def _deliver(self, batch: Batch) -> None:
        """Deliver one batch, retrying with capped exponential backoff until it is taken or we stop."""
        backoff = _FIRST_BACKOFF_S
        while not self._stop.is_set():
            try:
                await self.destination.deliver(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is retried; the files keep the records
                self.status.failures += 1
                why = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {str(exc)[:200]}"
                first = self.tail.failing is None
                failing = self.tail.failing or Failing(time.time(), 0, why)
                failing.failures += 1
                failing.error = why
                self.tail.failing = self.status.failing = failing
                if first or failing.failures % 100 == 0:
                    log.error("shipper: %s: delivery failed (%d in a row): %s; retrying, records wait in the "
                              "run files", self.destination.name, failing.failures, why)  # fmt: skip
                if first:
                    await asyncio.to_thread(self.tail.save)  # standby workers report it too
                await asyncio.to_thread(self._rescan)  # the backlog goes on growing while we wait
                await self._sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            recovered = self.tail.failing is not None
            await asyncio.to_thread(self._commit, batch)
            self.status.failing = None
            self.status.shipped += len(batch.records)
            if recovered:
                log.warning("shipper: %s: delivering again", self.destination.name)
            return

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def stop(self) -> None:
        """Ask the loop to end at its next wait; a batch not yet confirmed is shipped again next time."""
        self._stop.set()


class Shipping:
    """Every configured Shipper of this process, and the lock that makes one process per runs dir ship."""

    def __init__(self, runs_dir: Path, shippers: list[Shipper], degraded_after_s: float) -> None:
        self.runs_dir = runs_dir
        self.shippers = shippers
        self.degraded_after_s = degraded_after_s
        self.owner = False
        self._lock_fd: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _try_lock(self) -> bool:
        """Take runs/.shipper/lock (flock, never blocking); held until close or until this process dies."""
        try:
            state_dir = self.runs_dir / STATE_DIR
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            log.error("shipper: cannot open %s/%s/%s: %s", self.runs_dir, STATE_DIR, LOCK_NAME, exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _elect(self) -> None:
        while not await asyncio.to_thread(self._try_lock):
            await asyncio.sleep(_LOCK_RETRY_S)
        self.owner = True
        log.info("shipper: this process ships the records of %s", self.runs_dir)

    async def start(self) -> None:
        """Start the election and one loop per destination."""
        self._tasks.append(asyncio.create_task(self._elect(), name="shipper-lock"))
        for s in self.shippers:
            self._tasks.append(asyncio.create_task(s.run(self), name=f"shipper-{s.destination.name}"))

    async def close(self) -> None:
        """Stop the loops (a delivery still in flight after a grace is cancelled: shipped again later), unlock."""
        for s in self.shippers:
            s.stop()
        loops = self._tasks[1:]
        if self._tasks:
            self._tasks[0].cancel()  # the election
        if loops:
            # A delivery in flight may finish (and be committed) rather than be sent again after a restart.
            await asyncio.wait(loops, timeout=_CLOSE_GRACE_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for s in self.shippers:
            with contextlib.suppress(Exception):
                await s.destination.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(degraded?, per-destination figures) for /healthz."""
        now = time.time()
        degraded = False
        out: dict[str, Any] = {}
        for s in self.shippers:
            st = s.status
            age = st.age_s(now)
            late = age > self.degraded_after_s
            degraded = degraded or late or st.failing is not None
            out[st.destination] = {
                "role": "shipping" if st.owner else "standby",
                "backlog_records": st.backlog_records,
                "backlog_bytes": st.backlog_bytes,
                "backlog_age_s": round(age, 3),
                "failing": st.failing is not None,
                "failures_in_a_row": st.failing.failures if st.failing else 0,
                "error": st.failing.error if st.failing else None,
                "shipped_records": st.shipped,
            }
        return degraded, out


@dataclass(frozen=True, slots=True)
class ShippingCollector:
    """The shippers' figures for /metrics, read at scrape time."""

    shipping: Shipping

    def collect(self) -> Iterator[Metric]:
        """Yield one family per figure, labelled by destination."""
        now = time.time()
        shippers = self.shipping.shippers
        for kind, name, doc, value in _FIGURES:
            fam: GaugeMetricFamily | CounterMetricFamily
            if kind == "gauge":
                fam = GaugeMetricFamily(name, doc, labels=["destination"])
            else:
                fam = CounterMetricFamily(name, doc, labels=["destination"])
            for s in shippers:
                fam.add_metric([s.status.destination], value(s.status, now))
            yield fam


_FIGURES: tuple[tuple[str, str, str, Callable[[ShipperStatus, float], float]], ...] = (
    ("gauge", "metering_proxy_shipper_backlog_records", "Complete record lines in the run files not yet shipped.",
     lambda st, now: st.backlog_records),
    ("gauge", "metering_proxy_shipper_backlog_bytes", "Bytes of those lines.", lambda st, now: st.backlog_bytes),
    ("gauge", "metering_proxy_shipper_backlog_age_seconds", "Age of the oldest unshipped record (0 without one).",
     lambda st, now: st.age_s(now)),
    ("counter", "metering_proxy_shipper_shipped_records", "Records the destination confirmed, by this process.",
     lambda st, now: st.shipped),
    ("counter", "metering_proxy_shipper_delivery_failures", "Failed delivery attempts, by this process.",
     lambda st, now: st.failures),
    ("counter", "metering_proxy_shipper_skipped_lines", "Lines skipped as not records (torn, not JSON objects).",
     lambda st, now: st.skipped),
    ("gauge", "metering_proxy_shipper_shipping", "1 in the process that ships (holds the lock), 0 on standby.",
     lambda st, now: 1 if st.owner else 0),
    ("gauge", "metering_proxy_shipper_failing", "1 while deliveries to the destination fail.",
     lambda st, now: 1 if st.failing is not None else 0),
)  # fmt: skip


def from_config(runs_dir: Path, ship: Any) -> Shipping | None:
    """The Shipping for a config's ship section, or None when no destination is configured."""
    shippers: list[Shipper] = []
    if ship.postgres is not None:
        from proxy.pg import PostgresDestination

        p = ship.postgres
        shippers.append(Shipper(runs_dir, PostgresDestination(p), p.batch_size, p.interval_s, ship.retry_max_s))
    if ship.webhook is not None:
        from proxy.webhook import WebhookDestination

        w = ship.webhook
        shippers.append(Shipper(runs_dir, WebhookDestination(w), w.batch_size, w.interval_s, ship.retry_max_s))
    return Shipping(runs_dir, shippers, ship.degraded_after_s) if shippers else None
