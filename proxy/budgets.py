"""Run budgets in USD and tokens: refuse a call before it is forwarded once its run's limit is spent.

This module is the policy: limits from the config and the X-Run-Budget-* headers, the reservation
estimated for a call, the refusal messages and the X-Run-Spend-* headers. The state (each run's spend
and reservations, seeded from its run file) is a ``budget_store.BudgetStore``: this process's memory by
default, a SQLite file shared by the workers of one host, or a Redis shared by a fleet.

Spend is the run's recorded total (``cost_usd`` and ``total_tokens`` of its records), counted in
integer units of 1e-10 USD (records round ``cost_usd`` to 10 places), so sums, limits and the figures
in messages and headers are exact. Whatever a record holds, counting it never raises and never lowers
spend: ``to_units``/``to_tokens`` read a negative or non-number as 0 and clamp anything from MAX_LIMIT
up to MAX_LIMIT, and lines of a run file that are not JSON objects are skipped.

Concurrency: every call admitted under a limit reserves an estimate of its cost, released when its
record arrives, and a call is refused when spend + reservations in flight + its own reservation
would cross the limit (one atomic step of the store). The reservation prices the request's estimated
input tokens (``usage.estimate_input_tokens``: 1 token per 4 characters) plus its output cap (the
largest of ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, times ``n`` or
``best_of``; ``UNCAPPED_OUTPUT_RESERVE`` tokens when the request sets none; none for embeddings) at the
price table's rates. Hence the bound, for a run whose limit does not change and whose store is shared
by every process serving it: final spend <= limit + the sum, over the run's calls in flight when its
last call was admitted, of max(0, actual - reserved) (a call carrying no limit reserves nothing, so all
of its cost counts). A call's actual exceeds its reservation only when its input is underestimated by
more than the unused part of its output reserve, or, with no cap, when it writes more than
UNCAPPED_OUTPUT_RESERVE tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import errors
from proxy.budget_store import MAX_LIMIT, UNITS, BudgetStore, Limits, LocalStore, to_tokens, to_units
from proxy.config import BudgetRule, Budgets
from proxy.records import JsonlSink, Record
from proxy.usage import Usage, estimate_input_tokens

if TYPE_CHECKING:
    from proxy.call import Call
    from proxy.pricing import PriceBook

log = logging.getLogger("metering_proxy.budgets")

__all__ = ["MAX_LIMIT", "UNITS", "to_tokens", "to_units"]  # re-exported: the units are part of the policy's API

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


class BudgetTracker:
    """Per-run spend and reservations; its check refuses calls over budget, its observer counts records."""

    def __init__(self, budgets: Budgets, sink: JsonlSink, pricebook: PriceBook | None = None,
                 store: BudgetStore | None = None) -> None:  # fmt: skip
        self.budgets = budgets
        self.sink = sink
        self.pricebook = pricebook
        self.store: BudgetStore = store if store is not None else LocalStore(sink)
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
        """A run's recorded spend as (USD text, tokens) as this process last saw it, or None before it has."""
        seen = self.store.seen_spend(run_id)
        return None if seen is None else (fmt_usd(seen[0]), seen[1])

    async def check(self, call: Call, request: web.Request, obj: dict[str, Any]) -> None:
        """Refuse the call (429) if its run's budget is spent or its reservation would cross it."""
        run_id = call.run_id
        assert run_id is not None and call.upstream is not None
        usd_limit, tok_limit = self.config_limits(run_id)
        if USD_HEADER in request.headers:
            usd_limit = _stricter(usd_limit, _header_limit(request, USD_HEADER, usd=True))
        if TOKENS_HEADER in request.headers:
            tok_limit = _stricter(tok_limit, _header_limit(request, TOKENS_HEADER, usd=False))
        self.store.open(run_id)  # every run is counted from its first call: a header may budget it later
        if usd_limit is None and tok_limit is None:
            return
        est_in = estimate_input_tokens(obj)
        est_out = output_reserve(obj, call.meter.dialect)
        r_usd = 0
        r_tok = est_in + est_out if tok_limit is not None else 0
        if usd_limit is not None and self.pricebook is not None:
            cost = self.pricebook.price(
                Usage(input_tokens=est_in, output_tokens=est_out, total_tokens=est_in + est_out),
                model=None, requested_model=call.requested_model, upstream=call.upstream.name,
                provider=call.provider, dialect=call.meter.dialect,
            )  # fmt: skip
            r_usd = to_units(cost.cost_usd)
        limits = Limits(None if usd_limit is None else usd_limit.value, None if tok_limit is None else tok_limit.value)
        d = await self.store.reserve(run_id, call.request_id, r_usd, r_tok, limits)
        if usd_limit is not None:
            call.extra_headers["X-Run-Spend-Usd"] = fmt_usd(d.spent_usd)
            call.extra_headers["X-Run-Budget-Remaining-Usd"] = fmt_usd(max(0, usd_limit.value - d.spent_usd))
        if tok_limit is not None:
            call.extra_headers["X-Run-Spend-Tokens"] = str(d.spent_tokens)
            call.extra_headers["X-Run-Budget-Remaining-Tokens"] = str(max(0, tok_limit.value - d.spent_tokens))
        if d.refused is None:
            return
        # The OpenAI and Anthropic SDKs retry 429s unless told not to; waiting frees no budget.
        call.extra_headers["X-Should-Retry"] = "false"
        why = f"estimated input {est_in} tokens + max output {est_out} tokens"
        if d.refused == "usd" and usd_limit is not None:
            raise _refusal(run_id, True, usd_limit, d.spent_usd, d.reserved_usd, r_usd, why)
        assert tok_limit is not None
        raise _refusal(run_id, False, tok_limit, d.spent_tokens, d.reserved_tokens, r_tok, why)

    def observe(self, record: Record) -> None:
        """Settle the call: release its reservation and add its record's spend to its run."""
        # Clamped, never raising: a spend that is not counted would let the run's next call in.
        self.store.settle(record.request_id, record.run_id, to_units(record.cost_usd), to_tokens(record.total_tokens))


def _refusal(run_id: str, usd: bool, limit: Limit, spent: int, reserved: int, mine: int,
             why: str) -> errors.BudgetExceeded:  # fmt: skip
    """The 429 for a call the store refused: the limit is reached, or this call's reservation would cross it."""
    kind = "USD" if usd else "token"

    def amount(value: int) -> str:
        return f"${fmt_usd(value)}" if usd else f"{value} tokens"

    cap = f"${fmt_usd(limit.value)}" if usd else f"{limit.value}-token"
    if spent >= limit.value:
        return errors.BudgetExceeded(
            f"Run {run_id!r} has reached its {kind} budget: spent {amount(spent)} of its {cap} limit"
            f" (set by {limit.source}). Nothing was sent upstream.",
            code="run_budget_exceeded",
        )
    return errors.BudgetExceeded(
        f"Run {run_id!r} would exceed its {kind} budget: spent {amount(spent)} + {amount(reserved)}"
        f" reserved by calls in flight + {amount(mine)} reserved for this call ({why}) is over its"
        f" {cap} limit (set by {limit.source}). Lower max_tokens, wait for calls in flight, or raise the"
        " budget. Nothing was sent upstream.",
        code="run_budget_exceeded",
    )


BUDGETS = web.AppKey("budgets", BudgetTracker)


#: Request headers budgets read (a client capping its own run); never sent upstream.
HEADERS = frozenset({USD_HEADER.lower(), TOKENS_HEADER.lower()})
