"""Run budgets in USD and tokens: refuse a call before it is forwarded once its run's limit is spent.

Spend is the run's recorded total (``cost_usd`` and ``total_tokens`` of its records). The run's file
is read once, in a worker thread, the first time the proxy sees the run; from then on an observer
adds each new record in memory. USD amounts are kept as integers of 1e-10 USD (records round
``cost_usd`` to 10 places), so sums, limits and the figures in messages and headers are exact.
Whatever a record holds, counting it never raises and never lowers spend: ``to_units``/``to_tokens``
read a negative or non-number as 0 and clamp anything from MAX_LIMIT up to MAX_LIMIT, and lines of a
run file that are not JSON objects are skipped.

Concurrency: every call admitted under a limit reserves an estimate of its cost, released when its
record arrives, and a call is refused when spend + reservations in flight + its own reservation
would cross the limit. The reservation prices the request's estimated input tokens
(``usage.estimate_input_tokens``: 1 token per 4 characters) plus its output cap (the largest of
``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, times ``n`` or ``best_of``;
``UNCAPPED_OUTPUT_RESERVE`` tokens when the request sets none; none for embeddings) at the price
table's rates. Hence the bound, for a run whose limit does not change: final spend <= limit + the
sum, over the run's calls in flight when its last call was admitted, of max(0, actual - reserved)
(a call carrying no limit reserves nothing, so all of its cost counts). A call's actual exceeds its
reservation only when its input is underestimated by more than the unused part of its output
reserve, or, with no cap, when it writes more than UNCAPPED_OUTPUT_RESERVE tokens.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy import errors
from proxy.config import BudgetRule, Budgets
from proxy.records import JsonlSink, Record, open_run_file
from proxy.usage import Usage, estimate_input_tokens

if TYPE_CHECKING:
    from proxy.call import Call
    from proxy.pricing import PriceBook

log = logging.getLogger("metering_proxy.budgets")

UNITS = 10**10
MAX_LIMIT = 1e12  # USD or tokens; larger limits mean "none" and would overflow the integer units
"""USD is counted in integer units of 1e-10 USD, the precision of a record's cost_usd."""
UNCAPPED_OUTPUT_RESERVE = 1024
"""Output tokens reserved for a call that sets no max_tokens (its excess over this is unbounded)."""
USD_HEADER, TOKENS_HEADER = "X-Run-Budget-Usd", "X-Run-Budget-Tokens"
_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_MEMO_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Limit:
    """One effective limit (1e-10 USD units or tokens) and where it came from."""

    value: int
    source: str


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
        """Request ids of records observed while the run file is being read (counted once)."""
        self.failed: str | None = None


_MAX_UNITS = int(MAX_LIMIT) * UNITS
_MAX_TOKENS = int(MAX_LIMIT)


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


def fmt_usd(units: int) -> str:
    """Exact decimal text of an amount in units, without trailing zeros: 345000 -> '0.0000345'."""
    sign, units = ("-", -units) if units < 0 else ("", units)
    whole, frac = divmod(units, UNITS)
    return sign + f"{whole}.{frac:010d}".rstrip("0").rstrip(".")


def _stricter(a: Limit | None, b: Limit | None) -> Limit | None:
    if a is None:
        return b
    return a if b is None or a.value <= b.value else b


def _header_limit(request: web.Request, name: str, usd: bool) -> Limit | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw) if usd else int(raw.strip())
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 0 or value > MAX_LIMIT:
        kind = (f"a number of USD from 0 to {MAX_LIMIT:.0e}, e.g. 2.50" if usd
                else f"a whole number of tokens from 0 to {MAX_LIMIT:.0e}, e.g. 500000")  # fmt: skip
        raise errors.BadRequest(
            f"{name} must be {kind} (got {raw[:40]!r}).", param=name, code="invalid_budget"
        )
    return Limit(round(value * UNITS) if usd else int(value), f"{name} header")


def output_reserve(obj: dict[str, Any], dialect: str) -> int:
    """Output tokens a call may produce: its largest cap times n/best_of, or the uncapped reserve."""
    if dialect == "embeddings":
        return 0
    caps = [v for k in _CAP_FIELDS if isinstance(v := obj.get(k), int) and not isinstance(v, bool) and v > 0]
    out = max(caps) if caps else UNCAPPED_OUTPUT_RESERVE
    copies = [
        v for k in ("n", "best_of") if isinstance(v := obj.get(k), int) and not isinstance(v, bool) and v > 1
    ]
    return out * max(copies, default=1)


def _read_totals(path: Path, seen: set[str]) -> tuple[int, int]:
    """Sum cost (units) and tokens of a run file's records, skipping torn lines and ids in seen."""
    usd = tokens = 0
    try:
        f = open_run_file(path)  # never through a link planted in the runs dir (UnsafeRunFile, an OSError)
    except FileNotFoundError:
        return 0, 0
    with f:
        for line in f:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn tail left by a killed writer, a blank line, or not JSON (NaN, 1e400, too deep)
            if not isinstance(rec, dict):
                continue
            request_id = rec.get("request_id")
            if isinstance(request_id, str) and request_id in seen:  # a list or object id is unhashable
                continue
            usd += to_units(rec.get("cost_usd"))
            tokens += to_tokens(rec.get("total_tokens"))
    return usd, tokens


class BudgetTracker:
    """Per-run spend and reservations; its check refuses calls over budget, its observer counts records."""

    def __init__(self, budgets: Budgets, sink: JsonlSink, pricebook: PriceBook | None = None) -> None:
        self.budgets = budgets
        self.sink = sink
        self.pricebook = pricebook
        self._runs: dict[str, _Run] = {}
        self._inflight: dict[str, tuple[_Run, int, int]] = {}
        self._memo: dict[str, tuple[Limit | None, Limit | None]] = {}

    def config_limits(self, run_id: str) -> tuple[Limit | None, Limit | None]:
        """(USD, tokens) limits from the config: the default and the first matching rule, stricter wins."""
        hit = self._memo.get(run_id)
        if hit is not None:
            return hit
        rules: list[tuple[BudgetRule, str]] = [(self.budgets.default, "budgets.default")]
        for i, rule in enumerate(self.budgets.runs):
            if fnmatchcase(run_id, rule.match):
                rules.append((rule, f"budgets.runs[{i}] {rule.match!r}"))
                break
        usd: Limit | None = None
        tokens: Limit | None = None
        for rule, source in rules:
            if rule.usd is not None:
                usd = _stricter(usd, Limit(round(rule.usd * UNITS), source))
            if rule.tokens is not None:
                tokens = _stricter(tokens, Limit(rule.tokens, source))
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[run_id] = hit = (usd, tokens)
        return hit

    def spend(self, run_id: str) -> tuple[str, int] | None:
        """A run's recorded spend as (USD text, tokens), or None before the proxy has seen the run."""
        run = self._runs.get(run_id)
        return None if run is None else (fmt_usd(run.usd), run.tokens)

    def _track(self, run_id: str) -> _Run:
        run = self._runs[run_id] = _Run()
        run.loading = asyncio.create_task(self._load(run_id, run), name=f"budget-load-{run_id}")
        return run

    async def _load(self, run_id: str, run: _Run) -> None:
        """Add what the run file already holds (records from before a restart) to the run's spend."""
        assert run.seen is not None
        path = self.sink.path_for(run_id)
        try:
            # The thread reads `seen` while the loop adds to it: a record is observed before the
            # sink can flush it, so any line of it the thread reads is already in the set.
            usd, tokens = await asyncio.to_thread(_read_totals, path, run.seen)
        except Exception as exc:
            # Whatever went wrong (a bug included), a run must never be judged on a spend of 0: its calls
            # are refused as for an unreadable file, and the next one reads it again.
            why = (exc.strerror or exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            run.failed = f"{path}: {why}"
            log.error("budgets: cannot read %s", run.failed)
            if self._runs.get(run_id) is run:
                del self._runs[run_id]  # the run's next call tries again
            return
        finally:
            run.loading = None
        run.usd += usd
        run.tokens += tokens
        run.seen = None

    async def check(self, call: Call, request: web.Request, obj: dict[str, Any]) -> None:
        """Refuse the call (429) if its run's budget is spent or its reservation would cross it."""
        run_id = call.run_id
        assert run_id is not None and call.upstream is not None
        usd_limit, tok_limit = self.config_limits(run_id)
        if USD_HEADER in request.headers:
            usd_limit = _stricter(usd_limit, _header_limit(request, USD_HEADER, usd=True))
        if TOKENS_HEADER in request.headers:
            tok_limit = _stricter(tok_limit, _header_limit(request, TOKENS_HEADER, usd=False))
        run = self._runs.get(run_id) or self._track(run_id)
        if usd_limit is None and tok_limit is None:
            return
        if run.loading is not None:
            await asyncio.shield(run.loading)  # a client leaving must not cancel the read others wait for
        if run.failed is not None:
            raise errors.RecordingUnavailable(f"Cannot read the records of run {run_id!r} to enforce its"
                                              f" budget: {run.failed}")  # fmt: skip
        est_in = estimate_input_tokens(obj)
        est_out = output_reserve(obj, call.meter.dialect)
        r_usd = 0
        r_tok = est_in + est_out if tok_limit is not None else 0
        if usd_limit is not None:
            call.extra_headers["X-Run-Spend-Usd"] = fmt_usd(run.usd)
            call.extra_headers["X-Run-Budget-Remaining-Usd"] = fmt_usd(max(0, usd_limit.value - run.usd))
            if self.pricebook is not None:
                cost = self.pricebook.price(
                    Usage(input_tokens=est_in, output_tokens=est_out, total_tokens=est_in + est_out),
                    model=None, requested_model=call.requested_model, upstream=call.upstream.name,
                    provider=call.provider, dialect=call.meter.dialect,
                )  # fmt: skip
                r_usd = to_units(cost.cost_usd)
        if tok_limit is not None:
            call.extra_headers["X-Run-Spend-Tokens"] = str(run.tokens)
            call.extra_headers["X-Run-Budget-Remaining-Tokens"] = str(max(0, tok_limit.value - run.tokens))
        why = f"estimated input {est_in} tokens + max output {est_out} tokens"
        try:
            if usd_limit is not None:
                _admit(run_id, True, usd_limit, run.usd, run.reserved_usd, r_usd, why)
            if tok_limit is not None:
                _admit(run_id, False, tok_limit, run.tokens, run.reserved_tokens, r_tok, why)
        except errors.BudgetExceeded:
            # The OpenAI and Anthropic SDKs retry 429s unless told not to; waiting frees no budget.
            call.extra_headers["X-Should-Retry"] = "false"
            raise
        run.reserved_usd += r_usd
        run.reserved_tokens += r_tok
        self._inflight[call.request_id] = (run, r_usd, r_tok)

    def observe(self, record: Record) -> None:
        """Add a record to its run's spend and release the call's reservation."""
        held = self._inflight.pop(record.request_id, None)
        if held is not None:
            holder, r_usd, r_tok = held
            holder.reserved_usd -= r_usd
            holder.reserved_tokens -= r_tok
        if record.run_id is None or (run := self._runs.get(record.run_id)) is None:
            return
        # Clamped, never raising: a spend that is not counted would let the run's next call in.
        run.usd += to_units(record.cost_usd)
        run.tokens += to_tokens(record.total_tokens)
        if run.seen is not None:
            run.seen.add(record.request_id)


def _admit(run_id: str, usd: bool, limit: Limit, spent: int, reserved: int, mine: int, why: str) -> None:
    """Raise BudgetExceeded when spend reached the limit or this call's reservation would cross it."""
    kind = "USD" if usd else "token"

    def amount(value: int) -> str:
        return f"${fmt_usd(value)}" if usd else f"{value} tokens"

    cap = f"${fmt_usd(limit.value)}" if usd else f"{limit.value}-token"
    if spent >= limit.value:
        raise errors.BudgetExceeded(
            f"Run {run_id!r} has reached its {kind} budget: spent {amount(spent)} of its {cap} limit"
            f" (set by {limit.source}). Nothing was sent upstream.",
            code="run_budget_exceeded",
        )
    if spent + reserved + mine > limit.value:
        raise errors.BudgetExceeded(
            f"Run {run_id!r} would exceed its {kind} budget: spent {amount(spent)} + {amount(reserved)}"
            f" reserved by calls in flight + {amount(mine)} reserved for this call ({why}) is over its"
            f" {cap} limit (set by {limit.source}). Lower max_tokens, wait for calls in flight, or raise the"
            " budget. Nothing was sent upstream.",
            code="run_budget_exceeded",
        )


BUDGETS = web.AppKey("budgets", BudgetTracker)


#: Request headers budgets read (a client capping its own run); never sent upstream.
HEADERS = frozenset({USD_HEADER.lower(), TOKENS_HEADER.lower()})
