"""Read runs/<run_id>.jsonl files, one line at a time, and summarise them: totals, percentiles, breakdowns.

Memory stays small whatever the file size: a record is folded into counters as soon as it is read and
only its duration and TTFT are kept (8 bytes each, for the exact percentiles). Lines that are not a
record (a torn last line from a writer killed mid-write, a blank or corrupt line) are skipped and
counted, never fatal.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
import os
import stat
from array import array
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson

from proxy.config import RUN_ID_RE
from proxy.records import UnsafeRunFile, open_run_file
from proxy.whatif import Repricer, WhatIf

SCHEMA = "metering-proxy.report/1"
BY_FIELDS = ("model", "task", "upstream")
TOP_N = 5
MAX_NOTES = 20
#: Calls a run view (the /ui page, report --html) shows on its timeline: the most recent ones.
VIEW_CALLS = 5000
#: A run file at least this large is read in several processes by report (--jobs); below it the workers'
#: start-up costs more than they save.
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
#: Read buffer for a whole run file: lines are about 1.3 kB, and with the default 8 kB buffer the read calls
#: cost 0.9 us a line, 0.26 us with this.
_READ_BUFFER = 1 << 20
#: Record fields a run view needs for its timeline and failed-call list.
VIEW_FIELDS = ("ts", "request_id", "model", "requested_model", "task", "status", "success", "duration_ms",
               "ttft_ms", "input_tokens", "output_tokens", "cost_usd", "error")  # fmt: skip


class RunNotFound(LookupError):
    """No runs/<run_id>.jsonl file exists (or the id is not a valid run id).

    A name that is there but is no regular file (a symlink, a FIFO...) raises UnsafeRunFile instead.
    """


class RecordedCall(NamedTuple):
    """What a summary needs from one record, type-checked."""

    start: float
    duration_ms: float
    ttft_ms: float | None
    success: bool
    status: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: float | None
    estimated: bool
    tokens_per_second: float | None
    error: str | None
    request_id: str
    ts: str
    model: str | None
    task: str | None
    upstream: str | None
    tags: dict[str, Any]


def _epoch_iso(ts: str) -> float:
    dt = datetime.fromisoformat(ts)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


#: Epoch seconds of the whole seconds ("2026-12-01T14:54:10") that record timestamps start with: a run's calls
#: share them, and a datetime parse is most of the cost of reading a ts.
_SECONDS: dict[str, int] = {}


def _epoch(ts: str) -> float:
    """Return the epoch seconds of an ISO 8601 timestamp (naive means UTC)."""
    ms = ts[20:23]
    if len(ts) == 24 and ts[19] == "." and ts[23] == "Z" and ms.isascii() and ms.isdigit():
        # As records write it (YYYY-MM-DDTHH:MM:SS.mmmZ). (s*1000 + ms)/1000 is the float datetime.timestamp()
        # gives: both are the correctly rounded quotient of the same integers.
        sec = _SECONDS.get(ts[:19])
        if sec is None:
            if len(_SECONDS) >= 100_000:
                _SECONDS.clear()
            sec = _SECONDS[ts[:19]] = int(_epoch_iso(ts[:19]))
        return (sec * 1000 + int(ms)) / 1000
    return _epoch_iso(ts)


def iso(epoch: float) -> str:
    """Return epoch seconds as UTC ISO 8601 with milliseconds, like a record's ts."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


#: The record fields a RecordedCall is made of, read with one C call (a record the proxy wrote has them all).
_READ = ("ts", "duration_ms", "ttft_ms", "success", "status", "input_tokens", "cached_input_tokens",
         "cache_write_tokens", "output_tokens", "reasoning_tokens", "cost_usd", "usage_source", "tokens_per_second",
         "error", "request_id", "model", "requested_model", "task", "upstream", "tags")  # fmt: skip
_read = operator.itemgetter(*_READ)


def reader_like(obj: dict[str, Any]) -> operator.itemgetter[Any]:
    """A getter of _READ that looks the fields up by the very key objects of obj.

    orjson hands out the same str object for a key in every record it parses (it caches them); a dict lookup
    by that object skips comparing the strings, which halves the cost of reading 20 fields. Any other key
    object finds the same values, only slower.
    """
    same = {key: key for key in obj}
    return operator.itemgetter(*(same.get(name, name) for name in _READ))


def parse_call(obj: Any, read: operator.itemgetter[Any] = _read) -> RecordedCall:
    """Return the RecordedCall in a parsed record; raise TypeError/ValueError when it is not a record."""
    if not isinstance(obj, dict):
        raise TypeError("not a JSON object")
    try:
        values = read(obj)
    except KeyError:  # an older or hand-written record: a missing field reads as null
        values = tuple(map(obj.get, _READ))
    (ts, duration, ttft, success, status, inp, cached, cache_write, out, reasoning, cost, source, tps, error,
     request_id, model, requested_model, task, upstream, tags) = values  # fmt: skip
    if not isinstance(ts, str):
        raise TypeError("no ts")
    model = model or requested_model
    # Positional, in field order: a NamedTuple built by keyword costs about twice as much, once per record.
    return _new_call(RecordedCall, (
        _epoch(ts),
        float(duration or 0.0),
        None if ttft is None else float(ttft),
        success is True,
        int(status or 0),
        int(inp or 0),
        int(cached or 0),
        int(cache_write or 0),
        int(out or 0),
        int(reasoning or 0),
        None if cost is None else float(cost),
        source == "estimated",
        None if tps is None else float(tps),
        str(error.get("category") or "unknown") if isinstance(error, dict) else None,
        str(request_id or ""),
        ts,
        model if isinstance(model, str) else None,
        task if isinstance(task, str) else None,
        upstream if isinstance(upstream, str) else None,
        tags if isinstance(tags, dict) else {},
    ))  # fmt: skip


_new_call = tuple.__new__


def nearest_rank(ordered: list[float], p: int) -> float | None:
    """Return the p-th percentile by the nearest-rank method: the ceil(p/100*n)-th smallest value."""
    n = len(ordered)
    if n == 0:
        return None
    return ordered[_rank(n, p) - 1]


def _rank(n: int, p: int) -> int:
    """The nearest rank of the p-th percentile of n values: ceil(p/100*n), at least 1."""
    return max(1, (p * n + 99) // 100)


#: Samples are kept as sorted runs of at most this many values: sorting one makes that many float objects
#: for a moment (about 2 MB), where sorting a million-call run at once made 32 MB of them.
SORTED_RUN = 65_536


def kth_smallest(runs: list[array[float]], k: int) -> float:
    """The k-th smallest (1-based) of the values in sorted runs, found by bisection: no run is merged."""
    live = [r for r in runs if r]
    if len(live) == 1:
        return live[0][k - 1]
    best = math.inf
    for run in live:
        # The smallest value of this run with at least k values <= it; the answer is the least of those.
        lo, hi = 0, len(run)
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(bisect.bisect_right(other, run[mid]) for other in live) >= k:
                hi = mid
            else:
                lo = mid + 1
        if lo < len(run):
            best = min(best, run[lo])
    return best


def _percentile(runs: list[array[float]], n: int, p: int) -> float | None:
    """The p-th percentile by nearest rank (as nearest_rank) of n values held in sorted runs."""
    return kth_smallest(runs, _rank(n, p)) if n else None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


_USD_UNITS = 10**10
_MICRO = 10**6


def _into_runs(runs: list[array[float]], fresh: array[float]) -> array[float]:
    """Sort fresh into runs (with the last run if it is short); return the empty array to fold into next."""
    if not fresh:
        return fresh
    if runs and len(runs[-1]) < SORTED_RUN:
        fresh = runs.pop() + fresh
    for at in range(0, len(fresh), SORTED_RUN):
        runs.append(array("d", sorted(fresh[at : at + SORTED_RUN])))
    return array("d")


class Stats:
    """Counters for a set of calls (a run or one group of a breakdown), folded in one call at a time."""

    __slots__ = (
        "calls", "ok", "input", "cached", "cache_write", "output", "reasoning", "cost", "priced",
        "unknown_cost", "est_cost", "est_calls", "first_start", "last_end", "call_ms", "tps_sum", "tps_n",
        "dur_max", "ttft_n", "ttft_sum", "ttft_max", "errors", "durations", "ttfts", "whatif", "dur_runs",
        "ttft_runs",
    )  # fmt: skip

    def __init__(self, samples: bool = True) -> None:
        self.calls = self.ok = self.input = self.cached = self.cache_write = self.output = self.reasoning = 0
        # Sums of floats as integers of fixed units (1e-10 USD, as records round cost_usd; 1e-6 ms; 1e-6
        # tokens/s): exact, so the figures do not depend on the order the calls are read in (a run file's
        # order, or the database's across hosts).
        self.cost = self.est_cost = self.call_ms = self.tps_sum = self.ttft_sum = 0
        self.priced = self.unknown_cost = self.est_calls = self.tps_n = self.ttft_n = 0
        self.first_start = math.inf
        self.last_end = -math.inf
        self.dur_max = self.ttft_max = -math.inf
        self.errors: dict[str, int] = {}
        # Exact percentiles need every value; None when only totals are wanted (GET /runs).
        self.durations: array[float] | None = array("d") if samples else None
        self.ttfts: array[float] | None = array("d") if samples else None
        # report --price-as: the same calls at another model's rates (RunSummary folds these).
        self.whatif: WhatIf | None = None
        # Samples already sorted, in runs of at most SORTED_RUN (durations and ttfts hold those not yet sorted).
        self.dur_runs: list[array[float]] = []
        self.ttft_runs: list[array[float]] = []

    def add(self, c: RecordedCall) -> None:
        """Fold in one call."""
        # Run for every record of a report, so written for speed: locals, one attribute store per counter.
        self.calls += 1
        if c.success:
            self.ok += 1
        self.input += c.input_tokens
        self.cached += c.cached_input_tokens
        self.cache_write += c.cache_write_tokens
        self.output += c.output_tokens
        self.reasoning += c.reasoning_tokens
        cost = c.cost_usd
        if cost is not None:
            units = round(cost * _USD_UNITS)
            self.cost += units
            self.priced += 1
            if c.estimated:
                self.est_cost += units
        elif c.input_tokens or c.output_tokens:
            self.unknown_cost += 1
        if c.estimated:
            self.est_calls += 1
        start = c.start
        ms = c.duration_ms
        if start < self.first_start:
            self.first_start = start
        end = start + ms / 1000
        if end > self.last_end:
            self.last_end = end
        self.call_ms += round(ms * _MICRO)
        if ms > self.dur_max:
            self.dur_max = ms
        tps = c.tokens_per_second
        if tps is not None:
            self.tps_sum += round(tps * _MICRO)
            self.tps_n += 1
        ttft = c.ttft_ms
        if ttft is not None:
            self.ttft_n += 1
            self.ttft_sum += round(ttft * _MICRO)
            if ttft > self.ttft_max:
                self.ttft_max = ttft
            if self.ttfts is not None:
                self.ttfts.append(ttft)
        if self.durations is not None:
            self.durations.append(ms)
        if c.error is not None:
            self.errors[c.error] = self.errors.get(c.error, 0) + 1

    def sort_samples(self) -> None:
        """Move the samples folded since the last call into sorted runs (the last, if short, is sorted again with
        them). Cells are sorted before they are combined, and the parts of a parallel read in their own
        processes; combining then only gathers runs, and percentiles bisect them (kth_smallest)."""
        if self.durations is None or self.ttfts is None:
            return
        self.durations = _into_runs(self.dur_runs, self.durations)
        self.ttfts = _into_runs(self.ttft_runs, self.ttfts)

    @classmethod
    def combined(cls, parts: Iterable[Stats], samples: bool) -> Stats:
        """Return one Stats for the union of the calls folded into parts (exact: every sum is an integer)."""
        out = cls(samples)
        for p in parts:
            out.calls += p.calls
            out.ok += p.ok
            out.input += p.input
            out.cached += p.cached
            out.cache_write += p.cache_write
            out.output += p.output
            out.reasoning += p.reasoning
            out.cost += p.cost
            out.est_cost += p.est_cost
            out.call_ms += p.call_ms
            out.tps_sum += p.tps_sum
            out.ttft_sum += p.ttft_sum
            out.priced += p.priced
            out.unknown_cost += p.unknown_cost
            out.est_calls += p.est_calls
            out.tps_n += p.tps_n
            out.ttft_n += p.ttft_n
            out.first_start = min(out.first_start, p.first_start)
            out.last_end = max(out.last_end, p.last_end)
            out.dur_max = max(out.dur_max, p.dur_max)
            out.ttft_max = max(out.ttft_max, p.ttft_max)
            for key, n in p.errors.items():
                out.errors[key] = out.errors.get(key, 0) + n
            if out.durations is not None and p.durations is not None:
                p.sort_samples()
                out.dur_runs.extend(p.dur_runs)  # shared, not copied: a combined Stats is read, not folded into
                out.ttft_runs.extend(p.ttft_runs)
        return out

    def _dist(self, runs: list[array[float]] | None, n: int, total: float, top: float) -> dict[str, Any]:
        out: dict[str, Any] = {"count": n}
        if runs is not None:  # GET /runs totals keep no samples, so no percentiles
            out["p50"] = _r(_percentile(runs, n, 50))
            out["p95"] = _r(_percentile(runs, n, 95))
        out["max"] = _r(top) if n else None
        out["mean"] = _r(total / n) if n else None
        return out

    def to_json(self) -> dict[str, Any]:
        """Return the documented JSON shape (calls, tokens, cost_usd, time, duration_ms, ttft_ms, errors)."""
        wall = self.last_end - self.first_start if self.calls else None
        self.sort_samples()
        kept = self.durations is not None  # GET /runs totals keep no samples
        out = {
            "calls": {"total": self.calls, "ok": self.ok, "failed": self.calls - self.ok},
            "tokens": {
                "input": self.input,
                "cached_input": self.cached,
                "cache_write": self.cache_write,
                "output": self.output,
                "reasoning": self.reasoning,
                "total": self.input + self.output,
            },  # fmt: skip
            "cost_usd": {
                "total": round(self.cost / _USD_UNITS, 9),
                "priced_calls": self.priced,
                "unknown_calls": self.unknown_cost,
                "estimated": round(self.est_cost / _USD_UNITS, 9),
                "estimated_calls": self.est_calls,
            },  # fmt: skip
            "time": {
                "first_start": iso(self.first_start) if self.calls else None,
                "last_end": iso(self.last_end) if self.calls else None,
                "wall_s": _r(wall),
                "call_time_s": _r(self.call_ms / _MICRO / 1000),
                "tokens_per_second_mean": _r(self.tps_sum / _MICRO / self.tps_n) if self.tps_n else None,
                "output_tokens_per_wall_s": _r(self.output / wall) if wall else None,
            },
            "duration_ms": self._dist(self.dur_runs if kept else None, self.calls, self.call_ms / _MICRO, self.dur_max),
            "ttft_ms": self._dist(self.ttft_runs if kept else None, self.ttft_n, self.ttft_sum / _MICRO, self.ttft_max),
            "errors": dict(sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
        if self.whatif is not None:
            out["price_as"] = self.whatif.to_json(self.cost / _USD_UNITS)
        return out


def check_by(spec: str) -> str:
    """Return a valid --by spec (model, task, upstream or tag:NAME) or raise ValueError."""
    if spec in BY_FIELDS or (spec.startswith("tag:") and len(spec) > 4):
        return spec
    raise ValueError(f"--by must be model, task, upstream or tag:NAME (got {spec!r})")


def _group_key(spec: str, c: RecordedCall) -> str | None:
    if spec == "model":
        return c.model
    if spec == "task":
        return c.task
    if spec == "upstream":
        return c.upstream
    value = c.tags.get(spec[4:].lower())
    return None if value is None else str(value)


def _brief(c: RecordedCall) -> dict[str, Any]:
    return {
        "request_id": c.request_id, "ts": c.ts, "model": c.model, "task": c.task, "upstream": c.upstream,
        "status": c.status, "success": c.success, "duration_ms": c.duration_ms, "ttft_ms": c.ttft_ms,
        "input_tokens": c.input_tokens, "output_tokens": c.output_tokens, "cost_usd": c.cost_usd,
        "error": c.error,
    }  # fmt: skip


class LineReader:
    """Turns lines into Calls, counting and noting the lines that are not records."""

    def __init__(self) -> None:
        self.records = 0
        self.skipped = 0
        self.skips: list[tuple[int, str]] = []
        """(line number, why) of the first MAX_NOTES lines skipped."""
        self._read: operator.itemgetter[Any] | None = None

    @property
    def notes(self) -> list[str]:
        """What the report says about the lines it skipped."""
        out = [f"line {lineno}: {why}; skipped" for lineno, why in self.skips]
        if self.skipped > MAX_NOTES:
            out.append("further skipped lines not listed")
        return out

    def extend(self, other: LineReader, lines_before: int) -> None:
        """Add the counts of a reader that read the part of the file after lines_before lines."""
        self.records += other.records
        self.skipped += other.skipped
        room = MAX_NOTES - len(self.skips)
        self.skips.extend((lineno + lines_before, why) for lineno, why in other.skips[:room])

    def take(
        self, lineno: int, line: bytes | str, terminated: bool = True
    ) -> tuple[RecordedCall, dict[str, Any]] | None:
        """Return (call, parsed record) for a record line; None (and a note) for anything else."""
        try:
            obj = orjson.loads(line)  # JSON's own whitespace (the newline) is allowed
            if self._read is None and isinstance(obj, dict):
                self._read = reader_like(obj)
            call = parse_call(obj, self._read or _read)
        except (ValueError, TypeError, OverflowError):
            # Rare: only now strip (bytes.strip also drops \v and \f, which JSON does not allow around a value).
            body = line.strip()
            if not body:
                self._skip(lineno, "blank line")
                return None
            try:
                call = parse_call(obj := orjson.loads(body))
            except (ValueError, TypeError, OverflowError) as exc:
                why = (
                    "torn last line (no newline at the end: writer stopped mid-write)"
                    if not terminated
                    else (f"not a record ({exc if isinstance(exc, TypeError) else 'invalid JSON or field'})")
                )
                self._skip(lineno, why)
                return None
        self.records += 1
        return call, obj

    def _skip(self, lineno: int, why: str) -> None:
        self.skipped += 1
        if len(self.skips) < MAX_NOTES:
            self.skips.append((lineno, why))


def iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (line number, line, ends with newline) from a run file, streaming (UnsafeRunFile for a link)."""
    with open_run_file(path) as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line, line.endswith(b"\n")


def run_path(runs_dir: Path, run_id: str) -> Path:
    """Return the file of a run; RunNotFound for an invalid id (no path tricks) or a missing file,
    UnsafeRunFile when the name is a symlink or anything else but a regular file."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise RunNotFound(f"invalid run id {run_id[:40]!r}")
    path = runs_dir / f"{run_id}.jsonl"
    try:
        st = os.lstat(path)
    except OSError:
        raise RunNotFound(f"no run {run_id!r} in {runs_dir}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeRunFile(path, "read")
    return path


def list_runs(runs_dir: Path) -> list[str]:
    """Return the run ids that have a regular file (never a symlink) directly in runs_dir, sorted."""
    ids = []
    try:
        with os.scandir(runs_dir) as entries:
            for entry in entries:
                run_id = entry.name[:-6]
                if not entry.name.endswith(".jsonl") or not RUN_ID_RE.fullmatch(run_id):
                    continue
                try:
                    regular = entry.is_file(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                if regular:
                    ids.append(run_id)
    except OSError:
        return []
    return sorted(ids)


class _Earlier:
    """A request id that sorts the lesser id higher: in a top list, the earlier call wins a tie."""

    __slots__ = ("rid",)

    def __init__(self, rid: str) -> None:
        self.rid = rid

    def __lt__(self, other: _Earlier) -> bool:
        return self.rid > other.rid

    def __gt__(self, other: _Earlier) -> bool:
        return self.rid < other.rid

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Earlier) and self.rid == other.rid

    __hash__ = None  # type: ignore[assignment]


_Top = tuple[float, float, _Earlier, RecordedCall]


def _offer(heap: list[_Top], item: _Top) -> None:
    """Keep item if it is among the TOP_N greatest (by value, then the earlier start and request id)."""
    if len(heap) < TOP_N:
        heapq.heappush(heap, item)
    elif item[:3] > heap[0][:3]:
        heapq.heapreplace(heap, item)


class RunSummary:
    """A run's figures, folded in line by line; update() reads only what was appended since its last call."""

    def __init__(
        self,
        path: Path,
        run_id: str,
        by: Iterable[str] = ("model",),
        view_calls: int = 0,
        samples: bool = True,
        source: str | None = None,
        price_as: Repricer | None = None,
    ) -> None:
        self.path = path
        self.source = source or str(path)
        """What the report names as the run's "file": the path, or the table it was read from."""
        self.run_id = run_id
        self.specs = list(dict.fromkeys(by))
        self.shown = self.specs
        """The breakdowns the output has (all of specs unless show_only was called)."""
        self.samples = samples
        self.view_limit = view_calls
        self.repricer = price_as
        """report --price-as: re-prices every call folded in at the mapped models' rates."""
        self._reset(None)

    def _reset(self, ino: int | None) -> None:
        self.ino = ino
        self.offset = 0
        self.lineno = 0
        self.mtime = 0.0
        self.tail_note: str | None = None
        self.reader = LineReader()
        # Each call is folded into one cell, the Stats of its combination of --by keys (one key with one spec);
        # the run's totals and each breakdown's groups are the cells combined when asked for. One add per call
        # instead of one for the run and one per spec: the fold is most of a large report's time.
        self._cells: dict[Any, Stats] = {}
        self._combined: tuple[Stats, dict[str, dict[str | None, Stats]]] | None = None
        # What-if sums are floats, so they are kept apart and folded in file order as they always were.
        self._whatif: WhatIf | None = WhatIf() if self.repricer is not None else None
        self._whatif_groups: dict[str, dict[str | None, WhatIf]] = {spec: {} for spec in self.specs}
        self._slow: list[_Top] = []
        self._dear: list[_Top] = []
        self._recent: deque[dict[str, Any]] = deque(maxlen=self.view_limit)

    def show_only(self, spec: str) -> None:
        """Keep one breakdown in the output (report --html folds model and task for the page, prints --by)."""
        self.shown = [spec]

    def _sort_cells(self) -> None:
        for cell in self._cells.values():
            cell.sort_samples()

    def _cell_key(self, call: RecordedCall) -> Any:
        specs = self.specs
        if len(specs) == 1:
            return _group_key(specs[0], call)
        return tuple(_group_key(spec, call) for spec in specs)

    def _combine(self) -> tuple[Stats, dict[str, dict[str | None, Stats]]]:
        if self._combined is None:
            self._sort_cells()
            cells = self._cells
            run = Stats.combined(cells.values(), self.samples)
            run.whatif = self._whatif
            breakdowns: dict[str, dict[str | None, Stats]] = {}
            for i, spec in enumerate(self.specs):
                parts: dict[str | None, list[Stats]] = {}
                for key, cell in cells.items():
                    parts.setdefault(key if len(self.specs) == 1 else key[i], []).append(cell)
                groups = breakdowns[spec] = {k: Stats.combined(v, self.samples) for k, v in parts.items()}
                for k, group in groups.items():
                    group.whatif = self._whatif_groups[spec].get(k)
            self._combined = run, breakdowns
        return self._combined

    @property
    def stats(self) -> Stats:
        """The run's totals."""
        return self._combine()[0]

    @property
    def breakdowns(self) -> dict[str, dict[str | None, Stats]]:
        """Each shown --by spec's groups, by key."""
        groups = self._combine()[1]
        return {spec: groups[spec] for spec in self.shown}

    def update(self, final: bool = True) -> None:
        """Fold in the lines appended since the last update (blocking: run it in a thread off the loop).

        final=False (a file that may be written to right now) leaves an unterminated last line for
        the next update instead of judging it: it may be a line the writer has not finished.
        """
        # lstat first: a refresh of an unchanged file (GET /runs, for every run) opens nothing.
        st = os.lstat(self.path)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeRunFile(self.path, "read")
        if st.st_ino == self.ino and st.st_size == self.offset:
            self.mtime = st.st_mtime
            self.tail_note = None
            return
        with open_run_file(self.path, _READ_BUFFER) as f:
            st = os.fstat(f.fileno())  # what was opened, should the name have been replaced since the lstat
            if st.st_ino != self.ino or st.st_size < self.offset:  # a new or truncated file: start over
                self._reset(st.st_ino)
            self.mtime = st.st_mtime
            self.tail_note = None
            f.seek(self.offset)
            for line in f:
                terminated = line.endswith(b"\n")
                if not terminated and not final:
                    if line.strip():
                        self.tail_note = (
                            f"line {self.lineno + 1}: last line incomplete (being written, or torn by a"
                            " writer stopped mid-write); not counted yet"
                        )
                    break
                self.offset += len(line)
                self.lineno += 1
                self._fold(line, terminated)

    def fold(self, line: bytes | str) -> None:
        """Fold in one record given whole (a complete line, or a record read from the database)."""
        self.lineno += 1
        self._fold(line, True)

    def update_parallel(self, jobs: int) -> None:
        """Read the whole file as update(final=True) does, in jobs processes (this one and jobs - 1 forked
        workers), each folding the whole lines of one part; the parts are then merged, in file order, into
        exactly the summary one process gets (sums are integers, the top lists break ties the same way).

        For one-shot reads of a large file from a process without threads (report): fork is how the workers
        start. A file under PARALLEL_MIN_BYTES, or jobs <= 1, is read here alone.
        """
        if jobs > 1 and self.repricer is None:  # what-if sums are floats: they keep the file's order
            with open_run_file(self.path, _READ_BUFFER) as f:
                st = os.fstat(f.fileno())
                ranges = _split(f, st.st_size, jobs) if st.st_size >= PARALLEL_MIN_BYTES else []
                if len(ranges) > 1:
                    self._reset(st.st_ino)
                    self.mtime = st.st_mtime
                    import multiprocessing  # here: the server, which never reads in parts, need not load it

                    # Pool forks its workers before it starts its own threads.
                    with multiprocessing.get_context("fork").Pool(len(ranges) - 1) as pool:
                        pending = [
                            pool.apply_async(_fold_part, (self._fresh(), st.st_ino, a, b)) for a, b in ranges[1:]
                        ]
                        self._fold_range(f, *ranges[0])
                        self._sort_cells()  # while the workers may still be folding theirs
                        parts = [p.get() for p in pending]
                    for part in parts:
                        self._absorb(part)
                    return
        self.update(final=True)

    def _fresh(self) -> RunSummary:
        """An empty summary of the same file and settings."""
        return RunSummary(self.path, self.run_id, self.specs, self.view_limit, self.samples, self.source)

    def _fold_range(self, f: BinaryIO, start: int, end: int) -> None:
        """Fold the lines of f from start (a line start) to end (one too, or the end of the file)."""
        f.seek(start)
        self.offset = start
        for line in f:
            self.offset += len(line)
            self.lineno += 1
            self._fold(line, line.endswith(b"\n"))
            if self.offset >= end:
                break

    def _absorb(self, part: RunSummary) -> None:
        """Merge in the summary of the part of the file right after what this one has read."""
        self.reader.extend(part.reader, self.lineno)
        self.lineno += part.lineno
        self.offset = part.offset
        for key, cell in part._cells.items():
            mine = self._cells.get(key)
            self._cells[key] = cell if mine is None else Stats.combined((mine, cell), self.samples)
        for heap, theirs in ((self._slow, part._slow), (self._dear, part._dear)):
            for item in sorted(theirs, key=lambda t: t[:3], reverse=True):
                _offer(heap, item)
        self._recent.extend(part._recent)
        self._combined = None

    def _fold(self, line: bytes | str, terminated: bool) -> None:
        taken = self.reader.take(self.lineno, line, terminated)
        if taken is None:
            return
        call, obj = taken
        self._combined = None
        key = self._cell_key(call)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Stats(self.samples)
        cell.add(call)
        if self._whatif is not None and self.repricer is not None:
            repriced = self.repricer.price(obj)
            self._whatif.add(call.cost_usd, repriced)
            for spec, group_key in zip(self.specs, (key,) if len(self.specs) == 1 else key, strict=True):
                groups = self._whatif_groups[spec]
                whatif = groups.get(group_key)
                if whatif is None:
                    whatif = groups[group_key] = WhatIf()
                whatif.add(call.cost_usd, repriced)
        # Bounded heaps; on ties the earlier call stays (by start, then request id: the same whatever order
        # the calls are read in, a file's or the database's). Most calls are not even a tie with the least
        # kept one: they are turned away on the first number alone.
        slow = self._slow
        if len(slow) < TOP_N or call.duration_ms >= slow[0][0]:
            _offer(slow, (call.duration_ms, -call.start, _Earlier(call.request_id), call))
        if call.cost_usd is not None:
            dear = self._dear
            if len(dear) < TOP_N or call.cost_usd >= dear[0][0]:
                _offer(dear, (call.cost_usd, -call.start, _Earlier(call.request_id), call))
        if self.view_limit:
            self._recent.append({k: obj.get(k) for k in VIEW_FIELDS})

    @property
    def slowest(self) -> list[RecordedCall]:
        """The TOP_N longest calls, longest first."""
        return [c for *_, c in sorted(self._slow, key=lambda t: t[:3], reverse=True)]

    @property
    def most_expensive(self) -> list[RecordedCall]:
        """The TOP_N costliest priced calls, costliest first."""
        return [c for *_, c in sorted(self._dear, key=lambda t: t[:3], reverse=True)]

    @property
    def view_calls(self) -> list[dict[str, Any]]:
        """The most recent calls (VIEW_FIELDS of each) kept for a run view."""
        return list(self._recent)

    def _head(self) -> dict[str, Any]:
        tail = [self.tail_note] if self.tail_note else []
        return {
            "run_id": self.run_id, "file": self.source, "records": self.reader.records,
            "skipped_lines": self.reader.skipped + len(tail), "notes": self.reader.notes + tail,
        }  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Return the run's summary in the documented shape."""
        out = self._head()
        out.update(self.stats.to_json())
        out["breakdown"] = {
            spec: [{"key": key, **stats.to_json()} for key, stats in _ordered(groups)]
            for spec, groups in self.breakdowns.items()
        }
        out["slowest"] = [_brief(c) for c in self.slowest]
        out["most_expensive"] = [_brief(c) for c in self.most_expensive]
        return out

    def totals_json(self) -> dict[str, Any]:
        """Return the run's entry for GET /runs: totals without percentiles, breakdowns or top lists."""
        out = self._head()
        del out["notes"], out["file"]
        out["size_bytes"] = self.offset
        out["modified"] = iso(self.mtime) if self.offset else None
        out.update(self.stats.to_json())
        return out


def _ordered(groups: dict[str | None, Stats]) -> list[tuple[str | None, Stats]]:
    """Heaviest first: by cost, then calls, then name."""
    return sorted(groups.items(), key=lambda kv: (-kv[1].cost, -kv[1].calls, kv[0] is None, kv[0] or ""))


def summarize(
    path: Path,
    run_id: str,
    by: Iterable[str] = ("model",),
    view_calls: int = 0,
    price_as: Repricer | None = None,
    jobs: int = 1,
) -> RunSummary:
    """Read a whole run file once and return its summary; view_calls keeps that many recent calls.

    jobs > 1 reads a large file in that many processes (RunSummary.update_parallel): only from a process
    without threads.
    """
    summary = RunSummary(path, run_id, by, view_calls, price_as=price_as)
    summary.update_parallel(jobs)
    return summary


def _split(f: BinaryIO, size: int, parts: int) -> list[tuple[int, int]]:
    """Cut [0, size) into about equal ranges that start and end at line starts."""
    bounds = [0]
    for k in range(1, parts):
        f.seek(max(size * k // parts - 1, bounds[-1]))  # one byte early: a cut right at a line start stays there
        f.readline()
        bounds.append(min(f.tell(), size))
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _fold_part(summary: RunSummary, ino: int, start: int, end: int) -> RunSummary:
    """In a worker: fold one range of the run file into summary (a fresh copy) and hand it back."""
    with open_run_file(summary.path, _READ_BUFFER) as f:
        if os.fstat(f.fileno()).st_ino != ino:
            raise RunNotFound(f"{summary.path} was replaced while it was read")
        summary._fold_range(f, start, end)
    summary._sort_cells()
    summary._combined = None
    return summary


#: Metrics compared between runs: (JSON section, key).
COMPARED = (
    ("calls", "total"), ("calls", "ok"), ("calls", "failed"),
    ("tokens", "input"), ("tokens", "cached_input"), ("tokens", "cache_write"), ("tokens", "output"),
    ("tokens", "reasoning"),
    ("cost_usd", "total"), ("cost_usd", "unknown_calls"), ("cost_usd", "estimated"),
    ("time", "wall_s"), ("time", "call_time_s"), ("time", "tokens_per_second_mean"),
    ("time", "output_tokens_per_wall_s"),
    ("duration_ms", "p50"), ("duration_ms", "p95"), ("duration_ms", "max"),
    ("ttft_ms", "p50"), ("ttft_ms", "p95"), ("ttft_ms", "max"),
)  # fmt: skip


def _delta(base: float | None, value: float | None) -> dict[str, Any]:
    delta = None if base is None or value is None else round(value - base, 9)
    pct = round(delta / base * 100, 2) if delta is not None and base else None
    return {"baseline": base, "value": value, "delta": delta, "pct": pct}


def comparison(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return each run's deltas against the first run (the baseline); None for a single run."""
    if len(runs) < 2:
        return None
    base = runs[0]
    return {
        "baseline": base["run_id"],
        "runs": [
            {"run_id": run["run_id"],
             "metrics": {f"{sec}.{key}": _delta(base[sec][key], run[sec][key]) for sec, key in COMPARED}}
            for run in runs[1:]
        ],
    }  # fmt: skip


def report_json(summaries: list[RunSummary]) -> dict[str, Any]:
    """Return the whole report document: schema, runs, comparison."""
    runs = [s.to_json() for s in summaries]
    doc = {"schema": SCHEMA, "runs": runs, "comparison": comparison(runs)}
    repricer = next((s.repricer for s in summaries if s.repricer is not None), None)
    if repricer is not None:
        doc["price_as"] = repricer.head()
    return doc


def records_since(path: Path, since: int) -> Generator[bytes, None, None]:
    """Yield the record lines of a run from the since-th record (0-based; lines that are not records
    do not count), complete lines only (blocking: iterate it in a thread)."""
    reader = LineReader()
    for lineno, line, terminated in iter_lines(path):
        if not terminated:
            return  # still being written
        before = reader.records
        if reader.take(lineno, line) is not None and before >= since:
            yield line
