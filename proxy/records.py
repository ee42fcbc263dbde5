"""The per-call record and the batched JSONL sink that appends it to runs/<run_id>.jsonl.

Records are queued on the event loop (a list append) and written by a background task in a worker
thread, one ``write()`` of complete lines per run file per batch, so the hot path never touches
the disk. A record is therefore on disk at most ``flush_interval`` after its call ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("metering_proxy.records")

#: Records held in memory while the runs dir cannot be written, before the oldest are dropped.
MAX_PENDING = 100_000
REJECTED_FILE = ".rejected"  # not a valid run id (leading '.'), so it can never collide with one


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a call failed."""

    category: str
    id: str
    detail: str


@dataclass(frozen=True, slots=True)
class Record:
    """One JSONL line: everything measured about one call. Never prompt text, never keys."""

    ts: str
    run_id: str | None
    request_id: str
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
    cost_breakdown: dict[str, float] | None = None
    upstream_cost_usd: float | None = None
    service_tier: str | None = None

    def to_json(self) -> bytes:
        """Return the record as one JSON line, newline included."""
        try:
            return orjson.dumps(self, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            # Header bytes that are not UTF-8 reach us as lone surrogates (aiohttp decodes with
            # surrogateescape), and integers past 64 bits, are refused by orjson; a record is never
            # lost over one header value or one absurd number.
            return orjson.dumps(_clean(dataclasses.asdict(self)), option=orjson.OPT_APPEND_NEWLINE)


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

    @property
    def pending(self) -> int:
        """Records queued in memory, not yet written."""
        return self._count

    def path_for(self, run_id: str) -> Path:
        """Return the JSONL file of a run (run ids are validated before they get here)."""
        return self.runs_dir / f"{run_id}.jsonl"

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
                    log.error("records: runs dir unwritable; %d record(s) dropped so far", self.dropped)
                return

    def check_writable(self) -> bool:
        """Create the runs dir if needed and probe that it can be written; update health."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            probe = self.runs_dir / f".probe-{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
                os.unlink(probe)
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
        for key, lines in batch.items():
            if error is not None:
                failed[key] = lines
                continue
            try:
                self._append(key, b"".join(lines))
                self.written += len(lines)
            except OSError as exc:
                error = f"{self.path_for(key)}: {exc.strerror or exc}"
                failed[key] = lines
        if error is not None:
            self._set_unhealthy(error)
        else:
            self._set_healthy()
        return failed

    def _append(self, key: str, data: bytes) -> None:
        path = self.path_for(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
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
