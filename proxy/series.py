"""A run's cumulative cost and tokens over time, in a bounded number of time buckets: the dashboard's chart.

The page never downloads a run's records to draw it: a run of 1,000,000 calls is folded here, next to the
file (or the database), into at most ``points`` buckets. Sums are integers of fixed units, as in
report.Stats, so the last point is exactly the run's total whatever the order the calls are read in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from proxy import report

MAX_POINTS = 240
"""Buckets a series has at most unless asked for fewer or more (GET /runs/{id}/series?points=)."""
POINTS_LIMIT = 2000
"""The most buckets a client may ask for."""
_FIRST_WIDTH_S = 0.001
_USD_UNITS = 10**10  # as report.Stats: a record's cost_usd has at most 10 decimals


class Series:
    """Calls folded into buckets by the time they ended; the bucket width doubles whenever there are too many."""

    __slots__ = ("points", "width", "buckets", "first_start", "last_end", "calls", "unpriced")

    def __init__(self, points: int = MAX_POINTS) -> None:
        self.points = max(1, points)
        self.width = _FIRST_WIDTH_S
        # Bucket number (end time // width) -> [calls, cost units, input tokens, output tokens]: sparse, so a
        # run with a long quiet gap costs no empty buckets.
        self.buckets: dict[int, list[int]] = {}
        self.first_start = math.inf
        self.last_end = -math.inf
        self.calls = 0
        self.unpriced = 0

    def add(self, c: report.RecordedCall) -> None:
        """Fold one call in at its end time."""
        end = c.start + c.duration_ms / 1000
        self.first_start = min(self.first_start, c.start)
        self.last_end = max(self.last_end, end)
        self.calls += 1
        cost = 0
        if c.cost_usd is not None:
            cost = round(c.cost_usd * _USD_UNITS)
        elif c.input_tokens or c.output_tokens:
            self.unpriced += 1
        key = math.floor(end / self.width)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = [0, 0, 0, 0]
        bucket[0] += 1
        bucket[1] += cost
        bucket[2] += c.input_tokens
        bucket[3] += c.output_tokens
        while len(self.buckets) > self.points:
            self._coarsen()

    def _coarsen(self) -> None:
        # Anchored at the epoch, a doubled bucket is exactly two old ones: merging loses nothing but resolution.
        self.width *= 2
        merged: dict[int, list[int]] = {}
        for key, (n, cost, inp, out) in self.buckets.items():
            into = merged.get(key // 2)
            if into is None:
                merged[key // 2] = [n, cost, inp, out]
            else:
                into[0] += n
                into[1] += cost
                into[2] += inp
                into[3] += out
        self.buckets = merged

    def to_json(self) -> dict[str, Any]:
        """Return the documented shape: cumulative points from the run's first start to its last end."""
        points: list[dict[str, Any]] = []
        if self.calls:
            points.append(_point(self.first_start, 0.0, 0, 0, 0, 0))
        n = cost = inp = out = 0
        for key in sorted(self.buckets):
            b = self.buckets[key]
            n, cost, inp, out = n + b[0], cost + b[1], inp + b[2], out + b[3]
            # A bucket's point is at its end, but never after the run's last end (nor before its first start).
            at = min(max((key + 1) * self.width, self.first_start), self.last_end)
            points.append(_point(at, at - self.first_start, n, cost, inp, out))
        return {
            "first_start": report.iso(self.first_start) if self.calls else None,
            "last_end": report.iso(self.last_end) if self.calls else None,
            "bucket_s": self.width,
            "calls": self.calls,
            "cost_usd": round(cost / _USD_UNITS, 9),
            "tokens": inp + out,
            "unpriced_calls": self.unpriced,
            "points": points,
        }


def _point(at: float, offset: float, n: int, cost: int, inp: int, out: int) -> dict[str, Any]:
    return {"t": report.iso(at), "s": round(offset, 3), "calls": n, "cost_usd": round(cost / _USD_UNITS, 9),
            "input_tokens": inp, "output_tokens": out, "tokens": inp + out}  # fmt: skip


class RunSeries(report.RunSummary):
    """A run file's series, kept up to date like a summary: update() folds in only the lines appended since."""

    def __init__(self, path: Path, run_id: str, points: int = MAX_POINTS, source: str | None = None) -> None:
        self.max_points = points
        super().__init__(path, run_id, by=(), samples=False, source=source)

    def _reset(self, ino: int | None) -> None:
        super()._reset(ino)
        self.series = Series(self.max_points)

    def _fold(self, line: bytes | str, terminated: bool) -> None:
        # Only the series and the record count: no totals, breakdowns or top lists are kept for it.
        taken = self.reader.take(self.lineno, line, terminated)
        if taken is not None:
            self.series.add(taken[0])

    def fold_all(self, lines: Iterable[bytes]) -> None:
        """Fold in whole records (a batch read from the database)."""
        for line in lines:
            self.fold(line)

    def series_json(self) -> dict[str, Any]:
        """Return the run's series with its id and record count."""
        head = {"run_id": self.run_id, "records": self.reader.records, "skipped_lines": self.reader.skipped}
        return {**head, **self.series.to_json()}
