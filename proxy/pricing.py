"""Cost in USD for one call: a LiteLLM-format price table plus custom per-million overrides."""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson

from proxy.config import CustomPrice, price_cache_path
from proxy.usage import MAX_RATE_PER_TOKEN, MAX_SERVER_TOOL_CALLS, MAX_TOKENS_PER_CALL, Usage, valid_cost

log = logging.getLogger("metering_proxy.pricing")

# Package data, so an installed wheel has it too (config/ beside the package exists only in a source tree).
BUNDLED_PRICES: Path = Path(__file__).resolve().parent / "data" / "model_prices.json"

_IN, _OUT = "input_cost_per_token", "output_cost_per_token"
_READ, _WRITE = "cache_read_input_token_cost", "cache_creation_input_token_cost"
_WRITE_1H = "cache_creation_input_token_cost_above_1hr"
_BASES = (_IN, _READ, _WRITE, _WRITE_1H, _OUT)
_TIER_SUFFIX = {"priority": "_priority", "flex": "_flex", "batch": "_batches", "batches": "_batches"}
_THRESHOLD = re.compile(r"_above_(\d+)k_tokens")
# A dated or versioned tail, only ever cut at a '-' or '@' so 'gpt-4o-minix' never becomes 'gpt-4o'.
_SUFFIX = re.compile(r"[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{2}-\d{2}|\d{4}|0\d\d|latest|v\d+:\d+)$")
# Provider names as upstreams are often called, where the table spells the prefix differently.
_ALIAS = {"together": "together_ai", "fireworks": "fireworks_ai", "google": "gemini", "vertex": "vertex_ai"}
#: Per-call fees the price table spells, by server tool: (entry field, how many calls that price is for).
_FEE_FIELDS = {
    "web_search": ("search_context_cost_per_query", 1),
    "file_search": ("file_search_cost_per_1k_calls", 1000),
}
#: search_context_cost_per_query is keyed by the request's search_context_size; medium is OpenAI's default, and
#: every OpenAI and Anthropic entry in the bundled table has one rate for all three sizes.
_CONTEXT_SIZE = "search_context_size_medium"
PROVIDER_TOOL_FEES: dict[tuple[str, str], float] = {
    ("anthropic", "web_search"): 0.01,  # $10 per 1,000 searches (Anthropic's web search tool pricing)
    ("anthropic", "web_fetch"): 0.0,  # no charge beyond the tokens of the fetched content (web fetch tool docs)
    ("openai", "file_search"): 0.0025,  # $2.50 per 1,000 tool calls (openai.com/api/pricing, Responses API)
}
"""USD per call a provider publishes for a server tool, used when the matched table entry has no fee field for
it; (provider, tool) pairs not here and not in the table are unknown (cost_unpriced), never 0."""
SERVER_TOOLS = ("web_search", "web_fetch", "file_search")
"""The server tools whose fees `prices lookup` shows (any other tool a response names is priced only if known)."""
MAX_FEE_PER_CALL = 1.0
"""The largest per-call tool fee believed from the table, in USD: about 30x the priciest in it ($0.035)."""
_WARN_LIMIT = 1000  # distinct unknown model names warned about; names can come from clients
_MEMO_LIMIT = 4096  # model names can come from clients; keep the memo from growing without bound

def _num(value: Any) -> float | None:
    """Return value as a finite float, or None for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _rate(value: Any) -> float | None:
    """A per-token price from the table, or None when it is not one to price with (see MAX_RATE_PER_TOKEN)."""
    rate = _num(value)
    return rate if rate is not None and 0 <= rate <= MAX_RATE_PER_TOKEN else None


def _tokens(value: Any) -> int:
    """A count to price: whatever a caller built a Usage from, never negative, NaN or unbounded."""
    if type(value) is int and 0 <= value <= MAX_TOKENS_PER_CALL:  # what settle() builds: the usual case
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 0
    return int(min(max(value, 0), MAX_TOKENS_PER_CALL))


@dataclass(frozen=True, slots=True)
class _Rates:
    """Resolved USD-per-token rates for one call's tiers."""

    input: float
    cached_input: float
    cache_write: float
    cache_write_1h: float
    output: float


def _custom_rates(custom: CustomPrice) -> _Rates:
    """Per-token rates of a custom price (USD per million), unset cache prices taking the input price."""
    read = custom.input if custom.cached_input is None else custom.cached_input
    write = custom.input if custom.cache_write is None else custom.cache_write
    return _Rates(custom.input / 1e6, read / 1e6, write / 1e6, write / 1e6, custom.output / 1e6)


@dataclass(frozen=True, slots=True)
class Cost:
    """What one call cost, where that figure came from, and our own breakdown of it."""

    cost_usd: float | None
    cost_source: str | None
    price_model: str | None
    breakdown: dict[str, Any] | None
    upstream_cost_usd: float | None
    unpriced: tuple[str, ...] = ()
    """Server tools whose fee cost_usd leaves out: their rate or their count is unknown."""


@dataclass(frozen=True, slots=True)
class ToolFee:
    """The per-call fee of one server tool, and where it came from."""

    usd_per_call: float
    source: str
    """``price_table:<field>`` or ``<provider> published price``."""


def tool_fee(tool: str, entry: dict[str, Any] | None, provider: str | None) -> ToolFee | None:
    """A server tool's per-call fee: the matched table entry's field, else the provider's published one."""
    if entry is not None and (spec := _FEE_FIELDS.get(tool)) is not None:
        field, per = spec
        value = entry.get(field)
        if isinstance(value, dict):
            sizes = {v for v in value.values() if _num(v) is not None}
            value = value.get(_CONTEXT_SIZE, next(iter(sizes)) if len(sizes) == 1 else None)
        rate = _num(value)
        if rate is not None and 0 <= rate / per <= MAX_FEE_PER_CALL:
            return ToolFee(rate / per, f"price_table:{field}")
    table_provider = entry.get("litellm_provider") if entry is not None else None
    for who in (provider, table_provider):
        if isinstance(who, str) and (fee := PROVIDER_TOOL_FEES.get((who.lower(), tool))) is not None:
            return ToolFee(fee, f"{who.lower()} published price")
    return None


def priced_entry(key: str, entry: Any) -> bool:
    """An entry is a model price when it has a per-token input or output price (sample_spec is docs)."""
    return (
        key != "sample_spec"
        and isinstance(entry, dict)
        and (_rate(entry.get(_IN)) is not None or _rate(entry.get(_OUT)) is not None)
    )


def check_table(data: Any) -> str | None:
    """Return why data is not a usable full price table, or None when it is."""
    if not isinstance(data, dict):
        return "not a JSON object"
    chat = sum(
        1
        for key, entry in data.items()
        if priced_entry(key, entry) and entry.get("mode") == "chat" and _rate(entry.get(_IN)) is not None
    )
    return None if chat > 100 else f"only {chat} priced chat models (need more than 100)"


def _read_table(path: Path) -> dict[str, Any]:
    """Parse a table file; ValueError names the file."""
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"price table {path}: cannot read: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"price table {path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"price table {path}: not a JSON object keyed by model name")
    if not any(priced_entry(key, entry) for key, entry in data.items()):
        raise ValueError(f"price table {path}: no model with input_cost_per_token or output_cost_per_token")
    return data


class PriceBook:
    """The loaded price table and custom prices, with memoised matching."""

    __slots__ = ("source", "_index", "_custom", "_matches", "_rates_memo", "_thresholds", "_warned")

    def __init__(self, table: dict[str, Any], source: str, custom: tuple[CustomPrice, ...] = ()) -> None:
        self.source = source
        # Lower-cased key -> (table key, entry), for case-insensitive matching in one dict lookup.
        self._index = {key.lower(): (key, entry) for key, entry in table.items() if priced_entry(key, entry)}
        self._custom = custom
        self._matches: dict[tuple[str, str | None], tuple[str, dict[str, Any]] | None] = {}
        self._rates_memo: dict[tuple[str, int, str], _Rates] = {}
        self._thresholds: dict[str, tuple[int, ...]] = {}
        self._warned: set[str] = set()

    @classmethod
    def load(cls, path: Path | None = None, custom: tuple[CustomPrice, ...] = ()) -> PriceBook:
        """Explicit path, else the refreshed cache copy if newer than the bundled table, else bundled."""
        if path is not None:
            path = Path(path).expanduser()
            return cls(_read_table(path), str(path), custom)
        cached = price_cache_path()
        try:
            newer = cached.is_file() and cached.stat().st_mtime > BUNDLED_PRICES.stat().st_mtime
        except OSError:
            newer = cached.is_file()
        if newer:
            try:
                data = _read_table(cached)
                if (problem := check_table(data)) is None:
                    return cls(data, str(cached), custom)
                log.warning("ignoring refreshed price table %s: %s", cached, problem)
            except ValueError as exc:
                log.warning("ignoring refreshed price table: %s", exc)
        return cls(_read_table(BUNDLED_PRICES), str(BUNDLED_PRICES), custom)

    def match(self, model: str | None, *, provider: str | None = None) -> tuple[str, dict] | None:
        """Find the table entry for a model name: exact, provider prefix, then dated suffix removed."""
        if not model:
            return None
        memo_key = (model, provider)
        if memo_key in self._matches:
            return self._matches[memo_key]
        if len(self._matches) >= _MEMO_LIMIT:
            self._matches.clear()
        result = self._matches[memo_key] = self._match(model.strip().lower(), (provider or "").lower())
        return result

    def _match(self, name: str, provider: str) -> tuple[str, dict[str, Any]] | None:
        prefix = _ALIAS.get(provider, provider)
        forms = [name]  # then with leading 'provider/' segments dropped one at a time
        while "/" in forms[-1]:
            forms.append(forms[-1].split("/", 1)[1])

        def find(form: str) -> tuple[str, dict[str, Any]] | None:
            # The upstream's own provider first: e.g. fireworks_ai/x is priced differently from x.
            if prefix and not form.startswith(prefix + "/") and (hit := self._index.get(f"{prefix}/{form}")):
                return hit
            return self._index.get(form)

        for form in forms:
            if hit := find(form):
                return hit
        for form in forms:
            while (cut := _SUFFIX.search(form)) is not None:
                form = form[: cut.start()]
                if hit := find(form):
                    return hit
        return None

    def _custom_for(self, name: str | None, upstream: str | None) -> CustomPrice | None:
        """Upstream-scoped custom prices first (more specific), then unscoped; first glob match wins."""
        if not name or not self._custom:
            return None
        lowered = name.lower()
        scoped = [c for c in self._custom if c.upstream is not None and c.upstream == upstream]
        for entry in scoped + [c for c in self._custom if c.upstream is None]:
            if fnmatchcase(lowered, entry.model.lower()):
                return entry
        return None

    def _rates(self, key: str, entry: dict[str, Any], input_tokens: int, tier: str | None) -> _Rates:
        """Pick the long-context and service-tier variant of each rate, falling back to the plain one."""
        thresholds = self._thresholds.get(key)
        if thresholds is None:
            found = {int(m) for field in entry for m in _THRESHOLD.findall(field)}
            thresholds = self._thresholds[key] = tuple(sorted(found, reverse=True))
        above = next((t for t in thresholds if input_tokens > t * 1000), 0)
        tier_sfx = _TIER_SUFFIX.get((tier or "").lower(), "")
        if (hit := self._rates_memo.get((key, above, tier_sfx))) is not None:
            return hit
        above_sfx = f"_above_{above}k_tokens" if above else ""

        def get(base: str, fallback: float | None) -> float | None:
            for cand in (base + above_sfx + tier_sfx, base + above_sfx, base + tier_sfx, base):
                if (value := _rate(entry.get(cand))) is not None:
                    return value
            return fallback

        inp = get(_IN, 0.0) or 0.0
        # Some keys (deepseek/...) also spell the cache-read price input_cost_per_token_cache_hit.
        read = get(_READ, _rate(entry.get("input_cost_per_token_cache_hit")))
        write = get(_WRITE, inp) or 0.0
        rates = _Rates(
            inp, inp if read is None else read, write, get(_WRITE_1H, write) or 0.0, get(_OUT, 0.0) or 0.0
        )
        self._rates_memo[(key, above, tier_sfx)] = rates
        return rates

    def price(
        self,
        usage: Usage,
        *,
        model: str | None,
        requested_model: str | None,
        upstream: str | None,
        provider: str | None,
        dialect: str,
    ) -> Cost:
        """Price one call's usage: custom beats the table; the upstream's own charge beats ours.

        Never a negative, NaN or infinite cost: counts are clamped to 0..MAX_TOKENS_PER_CALL, rates out of
        range are not used, and an upstream charge usage.py would reject is ignored here too.
        """
        upstream_cost = valid_cost(usage.upstream_cost_usd)
        rates: _Rates | None = None
        price_model: str | None = None
        source: str | None = None
        entry: dict[str, Any] | None = None
        embedding = dialect == "embeddings"
        for name in (model, requested_model) if self._custom else ():
            if (custom := self._custom_for(name, upstream)) is not None:
                rates, price_model, source = _custom_rates(custom), f"custom:{custom.model}", "custom"
                break
        else:
            for name in (model, requested_model):
                if (hit := self.match(name, provider=provider)) is not None:
                    key, entry = hit
                    rates = self._rates(key, entry, _tokens(usage.input_tokens), usage.service_tier)
                    price_model, source = key, "price_table"
                    embedding = embedding or entry.get("mode") == "embedding"
                    break
        if rates is None:
            if upstream_cost is not None:  # the upstream priced it; nothing to warn about
                return Cost(upstream_cost, "upstream", None, None, upstream_cost)
            name = model or requested_model or "<none>"
            if name not in self._warned and len(self._warned) < _WARN_LIMIT:
                self._warned.add(name)
                hint = "add it under prices.custom or run `metering-proxy prices update`"
                log.warning(
                    "no price for model %r (upstream %s): cost_usd stays null; %s", name, upstream, hint
                )
            return Cost(None, None, None, None, None)
        parts = _breakdown(usage, rates, embedding)
        breakdown: dict[str, Any] = {k: round(v, 10) for k, v in parts.items()}
        fees: float = 0.0
        unpriced: tuple[str, ...] = ()
        if usage.server_tool_calls:
            if entry is None:  # a custom price spells no tool fees: the table's entry for the model may
                for name in (model, requested_model):
                    if (hit := self.match(name, provider=provider)) is not None:
                        entry = hit[1]
                        break
            fees, unpriced = _tool_fees(usage, entry, provider, breakdown)
        if upstream_cost is not None:  # the upstream's charge includes its own tool fees
            return Cost(upstream_cost, "upstream", price_model, breakdown, upstream_cost)
        return Cost(round(sum(parts.values()) + fees, 10), source, price_model, breakdown, None, unpriced)

    def explain(self, model: str, upstream: str | None = None, provider: str | None = None) -> Explanation:
        """Which price applies to a model, and at what rates (for `prices lookup`)."""
        custom, hit = self._custom_for(model, upstream), self.match(model, provider=provider)
        if custom is not None:
            return Explanation(model, upstream, self.source, custom, _custom_rates(custom), hit and hit[0])
        if hit is None:
            close = difflib.get_close_matches(model.lower(), list(self._index), n=5, cutoff=0.6)
            tried = _ALIAS.get(provider.lower(), provider.lower()) if provider else None
            return Explanation(model, upstream, self.source, close=tuple(self._index[c][0] for c in close),
                               tried_prefix=tried)  # fmt: skip
        key, entry = hit
        fees = tuple((tool, fee) for tool in SERVER_TOOLS if (fee := tool_fee(tool, entry, provider)) is not None)
        tiers = tuple(sorted(
            (f, _rate(entry[f]) or 0.0) for f in entry
            if f not in _BASES and f.startswith(_BASES) and _rate(entry[f]) is not None
        ))  # fmt: skip
        return Explanation(
            model, upstream, self.source, rates=self._rates(key, entry, 0, None), table_key=key,
            table_provider=str(entry.get("litellm_provider", "?")), mode=str(entry.get("mode", "?")),
            in_table=frozenset(b for b in _BASES if _rate(entry.get(b)) is not None), tiers=tiers, tool_fees=fees,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Explanation:
    """What PriceBook.explain found: a custom price, a table entry, or neither (with close table keys)."""

    model: str
    upstream: str | None
    source: str
    custom: CustomPrice | None = None
    rates: _Rates | None = None
    table_key: str | None = None
    """The table key priced with; for a custom price, the key it beats (None if none)."""
    table_provider: str | None = None
    mode: str | None = None
    in_table: frozenset[str] = frozenset()
    """Base rate fields the entry has (the others fall back)."""
    tiers: tuple[tuple[str, float], ...] = ()
    """Long-context and service-tier rate fields, per token."""
    tool_fees: tuple[tuple[str, ToolFee], ...] = ()
    """Per-call fees of the server tools this entry (or its provider) has one for."""
    close: tuple[str, ...] = ()
    tried_prefix: str | None = None

    @property
    def priced(self) -> bool:
        return self.rates is not None


def _tool_fees(usage: Usage, entry: dict[str, Any] | None, provider: str | None,
               breakdown: dict[str, Any]) -> tuple[float, tuple[str, ...]]:  # fmt: skip
    """Add ``tool_fees`` (null when any is unknown) and ``tool_fee_detail`` to breakdown; return the known
    fees' sum and the tools left unpriced."""
    known = 0.0
    unpriced: list[str] = []
    detail: dict[str, dict[str, Any]] = {}
    for tool, calls in usage.server_tool_calls:
        fee = tool_fee(tool, entry, provider)
        usd = None if fee is None or calls is None else round(min(calls, MAX_SERVER_TOOL_CALLS) * fee.usd_per_call, 10)
        detail[tool] = {"calls": calls, "usd_per_call": fee and fee.usd_per_call, "usd": usd,
                        "rate_source": fee and fee.source}  # fmt: skip
        if usd is None:
            unpriced.append(tool)
        else:
            known += usd
    breakdown["tool_fees"] = None if unpriced else round(known, 10)
    breakdown["tool_fee_detail"] = detail
    return known, tuple(unpriced)


def _breakdown(usage: Usage, rates: _Rates, embedding: bool) -> dict[str, float]:
    """Apply the rates: input_tokens holds cached reads and writes, so split them out first."""
    total_in = _tokens(usage.input_tokens)
    if embedding:
        return {"input": total_in * rates.input, "cached_input": 0.0, "cache_write": 0.0, "output": 0.0}
    cached = min(_tokens(usage.cached_input_tokens), total_in)
    writes = min(_tokens(usage.cache_write_tokens), total_in - cached)
    if usage.cache_write_1h_tokens is not None:
        writes_1h = _tokens(usage.cache_write_1h_tokens)
    elif usage.cache_write_5m_tokens is not None:
        writes_1h = writes - _tokens(usage.cache_write_5m_tokens)
    else:
        writes_1h = 0  # split unknown: 5 minutes is the default cache lifetime
    writes_1h = min(max(writes_1h, 0), writes)
    return {
        "input": (total_in - cached - writes) * rates.input,
        "cached_input": cached * rates.cached_input,
        "cache_write": (writes - writes_1h) * rates.cache_write + writes_1h * rates.cache_write_1h,
        "output": _tokens(usage.output_tokens) * rates.output,
    }
