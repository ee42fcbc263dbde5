"""The per-call record and the batched JSONL sink that appends it to runs/<run_id>.jsonl.

Records are queued on the event loop (a list append) and written by a background task in a worker
thread, one ``write()`` of complete lines per run file per batch, so the hot path never touches
the disk. A record is therefore on disk at most ``flush_interval`` after its call ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from proxy.errors import Category
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.pricing import Cost

log = logging.getLogger("metering_proxy.records")

#: Records held in memory while the runs dir cannot be written, before the oldest are dropped.
MAX_PENDING = 100_000
REJECTED_FILE = ".rejected"  # not a valid run id (leading '.'), so it can never collide with one
#: Never followed when a run file is opened: a link planted in the runs dir must not make the proxy write
#: (or create, or read) a file elsewhere. O_NONBLOCK keeps a FIFO planted there from blocking the open.
_RUN_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeRunFile(OSError):
    """A run file name that is a symlink, a FIFO, a directory...: anything but a regular file is refused.

    Its errno is ELOOP, what an O_NOFOLLOW open of a link fails with, whatever the name turned out to be.
    """

    def __init__(self, path: Path | str, verb: str) -> None:
        super().__init__(errno.ELOOP, f"is a symlink (or not a regular file): refusing to {verb} through it", str(path))

    def __str__(self) -> str:
        return f"{self.filename} {self.strerror}"


def _lstat_mode(name: str | Path, dir_fd: int | None) -> int | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None  # nothing there (or not even that can be looked at): the open's own error says more


def open_run_fd(name: str | Path, flags: int, shown: Path, verb: str, dir_fd: int | None = None) -> int:
    """Open a run file (name, relative to dir_fd if given) without following a symlink; return its fd.

    Raises UnsafeRunFile (shown as the file's path) unless it is a regular file, or the OSError of the open.
    """
    try:
        fd = os.open(name, flags | _RUN_FILE_FLAGS, 0o644, dir_fd=dir_fd)
    except OSError:
        # The errno for "that was a link" differs between systems (ELOOP, EMLINK; EISDIR for a directory):
        # look at what the name is instead, so a real failure (EACCES, ENOSPC...) still reads as one.
        mode = _lstat_mode(name, dir_fd)
        if mode is not None and not stat.S_ISREG(mode):
            raise UnsafeRunFile(shown, verb) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeRunFile(shown, verb)
        os.set_blocking(fd, True)  # O_NONBLOCK was for the open only; some filesystems honour it on I/O
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_run_file(path: Path, buffering: int = -1) -> BinaryIO:
    """Open a run file for reading, the one way the /runs API, report and budgets' replay open them.

    path's last component is never followed (the caller builds it as runs_dir / f"{valid run id}.jsonl",
    so it names a file directly in the runs dir). FileNotFoundError when there is none, UnsafeRunFile
    when it is anything but a regular file.
    """
    return os.fdopen(open_run_fd(path, os.O_RDONLY, path, "read"), "rb", buffering=buffering)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a call failed."""

    category: Category
    id: str
    detail: str


# Not frozen: one is built per call, and a frozen dataclass's __init__ (object.__setattr__ for each of its
# 43 fields) cost about three times a plain one's. Nothing changes a Record once built; the bytes are the same.
@dataclass(slots=True)
class Record:
    """One JSONL line: everything measured about one call. Never prompt text, never keys."""

    ts: str
    run_id: str | None
    request_id: str
    trace_id: str | None
    task: str | None
    tags: dict[str, str]
    endpoint: str
    method: str
    upstream: str | None
    provider: str | None
    requested_model: str | None
    model: str | None
    stream: bool
    status: int
    success: bool
    finish_reason: str | None
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    cache_write_5m_tokens: int | None
    cache_write_1h_tokens: int | None
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    usage_source: str
    usage_raw: dict[str, Any] | None
    stream_usage_injected: bool
    ttfb_ms: float | None
    ttft_ms: float | None
    duration_ms: float
    tokens_per_second: float | None
    server_timing: dict[str, float] | None
    upstream_request_id: str | None
    error: ErrorInfo | None
    cost_usd: float | None = None
    cost_source: str | None = None
    price_model: str | None = None
    cost_breakdown: dict[str, Any] | None = None
    upstream_cost_usd: float | None = None
    service_tier: str | None = None
    usage_invalid: tuple[str, ...] = ()
    server_tool_calls: dict[str, int | None] | None = None
    """Server-side tool calls billed per call (``{"web_search": 3}``); null when none ran."""
    cost_unpriced: tuple[str, ...] = ()
    """Server tools whose fee cost_usd leaves out because its rate (or count) is unknown."""

    def to_json(self) -> bytes:
        """Return the record as one JSON line, newline included."""
        try:
            return orjson.dumps(self, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            # Header bytes that are not UTF-8 reach us as lone surrogates (aiohttp decodes with
            # surrogateescape), and integers past 64 bits, are refused by orjson; a record is never
            # lost over one header value or one absurd number.
            return orjson.dumps(_clean(dataclasses.asdict(self)), option=orjson.OPT_APPEND_NEWLINE)


def from_line(line: bytes) -> Record:
    """The Record a line written by Record.to_json holds (after masking, the one its observers must see)."""
    obj = orjson.loads(line)
    err = obj.get("error")
    if err is not None:
        obj["error"] = ErrorInfo(Category(err["category"]), err["id"], err["detail"])
    obj["usage_invalid"] = tuple(obj.get("usage_invalid") or ())
    obj["cost_unpriced"] = tuple(obj.get("cost_unpriced") or ())
    return Record(**obj)


def usage_fields(usage: Usage, source: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    """The record fields that say what a call used: the one place a Usage maps onto a Record."""
    return {
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_5m_tokens": usage.cache_write_5m_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "total_tokens": usage.total_tokens,
        "usage_source": source,
        "usage_raw": raw,
        "usage_invalid": usage.invalid,
        "upstream_cost_usd": usage.upstream_cost_usd,
        "service_tier": usage.service_tier,
        "server_tool_calls": dict(usage.server_tool_calls) or None,
    }


def cost_fields(cost: Cost | None) -> dict[str, Any]:
    """The record fields that say what a call cost: the one place a Cost maps onto a Record."""
    return {
        "cost_usd": cost.cost_usd if cost else None,
        "cost_source": cost.cost_source if cost else None,
        "price_model": cost.price_model if cost else None,
        "cost_breakdown": cost.breakdown if cost else None,
        "cost_unpriced": cost.unpriced if cost else (),
    }


def _clean(value: Any) -> Any:
    """Replace what is not valid UTF-8 in every string of a JSON-like value with U+FFFD."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)  # orjson writes 64-bit integers only; the record must still be written
    return value


class JsonlSink:
    """Appends record lines to one file per run, in batches, off the event loop."""

    def __init__(self, runs_dir: Path, flush_interval: float = 0.2, fsync: bool = False) -> None:
        self.runs_dir = runs_dir
        self.flush_interval = flush_interval
        self.fsync = fsync
        self.healthy = True
        self.last_error: str | None = None
        self.written = 0
        self.dropped = 0
        self._pending: dict[str, list[bytes]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._flush_lock = asyncio.Lock()
        self._dir_fd: int | None = None
        # Written from the flusher's worker thread, read on the loop: single set operations, atomic under the GIL.
        self._blocked: set[str] = set()
        #: Called on the loop after every flush, written or idle: what follows the shared files (other workers'
        #: records in live events, the host's metrics) looks at once instead of at its next poll.
        self.on_flush: list[Callable[[], None]] = []

    @property
    def pending(self) -> int:
        """Records queued in memory, not yet written."""
        return self._count

    def path_for(self, run_id: str) -> Path:
        """Return the JSONL file of a run (run ids are validated before they get here)."""
        return self.runs_dir / f"{run_id}.jsonl"

    def run_blocked(self, run_id: str | None) -> bool:
        """Whether the run's file was refused (a symlink, FIFO...) and not written since: its calls are not
        recorded. A set lookup, cheap enough for every call."""
        return (run_id or REJECTED_FILE) in self._blocked

    def write(self, run_id: str | None, line: bytes) -> None:
        """Queue one record line for its run's file; never blocks."""
        key = run_id or REJECTED_FILE
        self._pending.setdefault(key, []).append(line)
        self._count += 1
        if self._count > MAX_PENDING:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        for lines in self._pending.values():
            if lines:
                lines.pop(0)
                self._count -= 1
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("records: records cannot be written; %d record(s) dropped so far", self.dropped)
                return

    def _dir(self) -> int:
        """The runs dir's fd, opened once; opened again (and the dir created) when it went missing or was
        replaced, so records never go on into a directory that was moved aside or deleted."""
        try:
            st = os.stat(self.runs_dir)
        except FileNotFoundError:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            st = os.stat(self.runs_dir)
        if self._dir_fd is not None:
            held = os.fstat(self._dir_fd)
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino) and held.st_nlink:
                return self._dir_fd
            self._close_dir()
        self._dir_fd = os.open(self.runs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._dir_fd

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def check_writable(self) -> bool:
        """Create the runs dir if needed and probe that it can be written; update health."""
        try:
            dir_fd = self._dir()
            probe = f".probe-{os.getpid()}"
            # Our own name, yet something may be planted under it: remove it, then create a new file (O_EXCL),
            # never truncating or writing through a link.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe, dir_fd=dir_fd)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _RUN_FILE_FLAGS, 0o644, dir_fd=dir_fd)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe, dir_fd=dir_fd)
        except OSError as exc:
            self._set_unhealthy(f"{self.runs_dir}: {exc.strerror or exc}")
            return False
        self._set_healthy()
        return True

    def _set_unhealthy(self, why: str) -> None:
        if self.healthy or why != self.last_error:
            log.error("records: CANNOT WRITE RECORDS: %s", why)
        self.healthy = False
        self.last_error = why

    def _set_healthy(self) -> None:
        if not self.healthy:
            log.warning("records: runs dir writable again; recording resumed")
        self.healthy = True
        self.last_error = None

    async def start(self) -> None:
        """Start the background flusher."""
        await asyncio.to_thread(self.check_writable)
        self._task = asyncio.create_task(self._run(), name="jsonl-sink")

    async def close(self) -> None:
        """Flush everything queued and stop the flusher."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        self._close_dir()

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every queued line now (in a worker thread); returns once they are on disk.

        Flushes are serialised: a caller that arrives while the background flusher is writing
        waits for that batch too, so "flush() returned" means everything queued before is written,
        and a failed batch is always put back before the next one is taken.
        """
        async with self._flush_lock:
            await self._flush()
        for listener in self.on_flush:
            listener()

    async def _flush(self) -> None:
        if not self._pending:
            if not self.healthy:
                await asyncio.to_thread(self.check_writable)
            return
        batch, self._pending, self._count = self._pending, {}, 0
        failed = await asyncio.to_thread(self._write_batch, batch)
        if failed:
            # Put what could not be written back in front of anything queued meanwhile.
            for key, lines in self._pending.items():
                failed.setdefault(key, []).extend(lines)
            self._pending = failed
            self._count = sum(len(v) for v in failed.values())
            while self._count > MAX_PENDING:
                self._drop_oldest()

    def _write_batch(self, batch: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
        """Append each run's lines with one write; return what could not be written."""
        failed: dict[str, list[bytes]] = {}
        error: str | None = None
        try:
            self._dir()
        except OSError as exc:
            error = f"{self.runs_dir}: {exc.strerror or exc}"
        for key, lines in batch.items():
            if error is not None:
                failed[key] = lines
                continue
            try:
                self._append(key, b"".join(lines))
            except UnsafeRunFile as exc:
                # Only this run cannot be recorded: its records are held like any unwritten ones, the other
                # runs' are written and health is left alone. Logged once, not on every retry.
                failed[key] = lines
                if key not in self._blocked:
                    self._blocked.add(key)
                    log.error("records: %s", exc)
                continue
            except OSError as exc:
                error = f"{self.path_for(key)}: {exc.strerror or exc}"
                failed[key] = lines
                continue
            self.written += len(lines)
            if key in self._blocked:
                self._blocked.discard(key)
                log.warning("records: %s is a regular file now; recording of its run resumed", self.path_for(key))
        if error is not None:
            self._set_unhealthy(error)
        else:
            self._set_healthy()
        return failed

    def _append(self, key: str, data: bytes) -> None:
        path, name = self.path_for(key), f"{key}.jsonl"
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
        dir_fd = self._dir_fd if self._dir_fd is not None else self._dir()
        try:
            fd = open_run_fd(name, flags, path, "write", dir_fd=dir_fd)
        except FileNotFoundError:
            # The runs dir was removed since the batch began (creating a file in it fails): make and open it anew.
            self._close_dir()
            fd = open_run_fd(name, flags, path, "write", dir_fd=self._dir())
        try:
            # Workers share run files: the lock makes "check the tail, then append" one step for them
            # (a reader never waits; it is held for one write per file per batch).
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # a filesystem without locks: appends are still whole, just unordered with checks
            # A writer killed mid-line leaves a torn tail: start on a fresh line after it. Checked on
            # every batch (one pread per file), not once: another worker may be killed at any time.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            written = 0
            try:
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            except OSError:
                if written:
                    # The disk filled mid-batch: take the partial lines back, or the retry of the whole
                    # batch would double the complete ones and tear the last. Not if someone appended
                    # without the lock meanwhile (then the fresh-line check keeps the damage to one line).
                    end = os.lseek(fd, 0, os.SEEK_CUR)
                    if os.fstat(fd).st_size == end:
                        os.ftruncate(fd, end - written)
                raise
            if self.fsync:
                fcntl.flock(fd, fcntl.LOCK_UN)  # the other workers need not wait for our fsync
                os.fsync(fd)
        finally:
            os.close(fd)
