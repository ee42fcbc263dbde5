"""What-if prices: a recorded run's normalised tokens re-priced at another model's rates (report --price-as).

A call is re-priced from the token counts its record holds (input, cached reads, cache writes and their
5m/1h split, output, service tier) through the same PriceBook.price a live call goes through, so cache
rates, long-context tiers and service tiers apply as they would have. The upstream's own charge is left
out on purpose: it was the charge of the model that ran. Token counts are taken as recorded although
another model's tokenizer would count the same text differently; the output says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.pricing import PriceBook
from proxy.usage import Usage, valid_count

ANY = "*"
"""The mapping key of a bare --price-as MODEL: every call not mapped by name."""
TOKENIZER_NOTE = (
    "re-priced from the recorded token counts: another model's tokenizer counts the same text differently,"
    " so the what-if cost assumes the same counts"
)
PARTS = ("input", "cached_input", "cache_write", "output")


def parse(specs: list[str]) -> dict[str, str]:
    """Turn --price-as values (MODEL, or OLD=NEW, repeatable) into {old model (lower case) or ANY: new model}."""
    mapping: dict[str, str] = {}
    for spec in specs:
        old, sep, new = spec.partition("=")
        old, new = (old.strip(), new.strip()) if sep else (ANY, old.strip())
        if not old or not new:
            raise ValueError(f"--price-as takes MODEL or OLD=NEW (got {spec!r})")
        key = old if old == ANY else old.lower()
        if key in mapping:
            which = "a bare MODEL" if key == ANY else f"{old!r}"
            raise ValueError(f"--price-as gives {which} twice")
        mapping[key] = new
    if not mapping:
        raise ValueError("--price-as needs a model")
    return mapping


@dataclass(frozen=True, slots=True)
class Repriced:
    """One call's what-if outcome: re-priced (cost and parts), kept at its recorded cost, or without usage."""

    kind: str
    """'repriced', 'kept' (its model is not mapped) or 'no_usage' (no tokens recorded: failed, or no usage)."""
    cost: float | None = None
    parts: dict[str, Any] | None = None
    """PriceBook.price's breakdown: input, cached_input, cache_write, output; tool_fees (null when the target
    has no rate for a tool) and tool_fee_detail when the call ran server-side tools."""


_KEPT = Repriced("kept")
_NO_USAGE = Repriced("no_usage")


def _count(obj: dict[str, Any], field: str) -> int:
    return valid_count(obj.get(field)) or 0


def _opt_count(obj: dict[str, Any], field: str) -> int | None:
    return valid_count(obj.get(field))


def _tool_calls(value: Any) -> tuple[tuple[str, int | None], ...]:
    """A record's server_tool_calls ({tool: count or null}) as Usage holds them, in a stable order."""
    if not isinstance(value, dict):
        return ()
    return tuple(sorted((str(k), valid_count(v)) for k, v in value.items() if isinstance(k, str)))


def usage_of(obj: dict[str, Any]) -> Usage:
    """The Usage a record's normalised fields describe (without the upstream's own charge)."""
    tier = obj.get("service_tier")
    return Usage(
        server_tool_calls=_tool_calls(obj.get("server_tool_calls")),
        input_tokens=_count(obj, "input_tokens"),
        cached_input_tokens=_count(obj, "cached_input_tokens"),
        cache_write_tokens=_count(obj, "cache_write_tokens"),
        cache_write_5m_tokens=_opt_count(obj, "cache_write_5m_tokens"),
        cache_write_1h_tokens=_opt_count(obj, "cache_write_1h_tokens"),
        output_tokens=_count(obj, "output_tokens"),
        reasoning_tokens=_count(obj, "reasoning_tokens"),
        total_tokens=_count(obj, "total_tokens"),
        service_tier=tier if isinstance(tier, str) else None,
    )


class Repricer:
    """Re-prices records at the rates of the models a --price-as mapping names."""

    def __init__(self, book: PriceBook, mapping: dict[str, str]) -> None:
        unknown = [new for new in dict.fromkeys(mapping.values()) if not book.explain(new).priced]
        if unknown:
            raise ValueError(
                f"--price-as: no price for {', '.join(repr(m) for m in unknown)} in {book.source}"
                " (see `metering-proxy prices lookup MODEL`)"
            )
        self.book = book
        self.mapping = mapping

    def target(self, obj: dict[str, Any]) -> str | None:
        """The model a record is re-priced as, None when the mapping leaves its model alone."""
        for field in ("model", "requested_model"):
            name = obj.get(field)
            if isinstance(name, str) and (new := self.mapping.get(name.lower())) is not None:
                return new
        return self.mapping.get(ANY)

    def price(self, obj: dict[str, Any]) -> Repriced:
        """Re-price one parsed record."""
        target = self.target(obj)
        if target is None:
            return _KEPT
        usage = usage_of(obj)
        if not usage.input_tokens and not usage.output_tokens:
            return _NO_USAGE
        endpoint = obj.get("endpoint")
        embeddings = isinstance(endpoint, str) and endpoint.endswith("/embeddings")
        cost = self.book.price(usage, model=target, requested_model=None, upstream=None, provider=None,
                               dialect="embeddings" if embeddings else "chat")  # fmt: skip
        return Repriced("repriced", cost.cost_usd, cost.breakdown)

    def head(self) -> dict[str, Any]:
        """The report document's price_as entry: the mapping and the tokenizer caveat."""
        return {"models": dict(self.mapping), "note": TOKENIZER_NOTE}


class WhatIf:
    """What-if counters for a set of calls (a run or one group), next to its recorded cost."""

    __slots__ = ("repriced", "cost", "recorded_of_repriced", "unpriced_recorded", "no_usage", "kept",
                 "kept_cost", "parts", "fees_unpriced")  # fmt: skip

    def __init__(self) -> None:
        self.repriced = self.unpriced_recorded = self.no_usage = self.kept = self.fees_unpriced = 0
        self.cost = self.recorded_of_repriced = self.kept_cost = 0.0
        self.parts = dict.fromkeys(PARTS, 0.0)

    def add(self, recorded: float | None, r: Repriced) -> None:
        """Fold in one call: its recorded cost and its what-if outcome."""
        if r.kind == "kept":
            self.kept += 1
            self.kept_cost += recorded or 0.0
        elif r.kind == "no_usage":
            self.no_usage += 1
            self.kept_cost += recorded or 0.0  # nothing to re-price; a recorded charge (if any) stands
        else:
            self.repriced += 1
            self.cost += r.cost or 0.0
            parts = r.parts or {}
            for part, value in parts.items():
                if isinstance(value, int | float) and not isinstance(value, bool):  # not tool_fee_detail
                    self.parts[part] = self.parts.get(part, 0.0) + value
            if "tool_fees" in parts and parts["tool_fees"] is None:
                self.fees_unpriced += 1
            if recorded is None:
                self.unpriced_recorded += 1
            else:
                self.recorded_of_repriced += recorded

    def to_json(self, recorded_total: float) -> dict[str, Any]:
        """The documented price_as figures; recorded_total is the set's recorded cost_usd.total."""
        total = round(self.cost + self.kept_cost, 9)
        delta = round(total - recorded_total, 9)
        return {
            "total": total,
            "recorded": round(recorded_total, 9),
            "delta": delta,
            "pct": round(delta / recorded_total * 100, 2) if recorded_total else None,
            "repriced_calls": self.repriced,
            "repriced_usd": round(self.cost, 9),
            "repriced_recorded_usd": round(self.recorded_of_repriced, 9),
            "breakdown": {k: round(v, 9) for k, v in self.parts.items()},
            "unpriced_recorded_calls": self.unpriced_recorded,
            "no_usage_calls": self.no_usage,
            "kept_calls": self.kept,
            "tool_fees_unpriced_calls": self.fees_unpriced,
        }
