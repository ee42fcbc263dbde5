"""Cost in USD for one call: a LiteLLM-format price table plus custom per-million overrides."""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson

from proxy.usage import MAX_TOKENS_PER_CALL, Usage, valid_cost

log = logging.getLogger("metering_proxy.pricing")

# Package data, so an installed wheel has it too (config/ beside the package exists only in a source tree).
BUNDLED_PRICES: Path = Path(__file__).resolve().parent / "data" / "model_prices.json"
DEFAULT_PRICES_URL: str = (
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json"
)

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
_CUSTOM_KEYS = ("model", "upstream", "input", "cached_input", "cache_write", "output")
_WARN_LIMIT = 1000  # distinct unknown model names warned about; names can come from clients
_MEMO_LIMIT = 4096  # model names can come from clients; keep the memo from growing without bound
_MAX_DOWNLOAD = 64 * 1024 * 1024
MAX_RATE_PER_TOKEN = 1.0
"""The largest price believed, in USD per token ($1M per million): about 100x the priciest rate in the
table ($0.0097). A larger (or negative, or NaN) table rate is ignored as if the entry lacked it; a custom
price above it is a config error. With counts held to MAX_TOKENS_PER_CALL, every cost is then finite."""


def cache_path() -> Path:
    """Where `prices update` keeps the refreshed table."""
    if override := os.environ.get("METERING_PROXY_CACHE_DIR"):
        return Path(override).expanduser() / "model_prices.json"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "metering-proxy" / "model_prices.json"


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


@dataclass(frozen=True, slots=True)
class CustomPrice:
    """A price from the YAML config, in USD per million tokens."""

    model: str
    upstream: str | None
    input: float
    cached_input: float | None
    cache_write: float | None
    output: float

    def rates(self) -> _Rates:
        """Per-token rates, unset cache prices taking the input price."""
        read = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        return _Rates(self.input / 1e6, read / 1e6, write / 1e6, write / 1e6, self.output / 1e6)


def parse_custom_prices(raw: object) -> tuple[CustomPrice, ...]:
    """Validate the `prices.custom` config value; errors name the offending key."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError("prices.custom: must be a list of mappings")
    out: list[CustomPrice] = []
    for i, item in enumerate(raw):
        where = f"prices.custom[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be a mapping with keys {', '.join(_CUSTOM_KEYS)}")
        for key in item:
            if key not in _CUSTOM_KEYS:
                raise ValueError(f"{where}.{key}: unknown key (allowed: {', '.join(_CUSTOM_KEYS)})")
        model, upstream = item.get("model"), item.get("upstream")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{where}.model: required, a non-empty string (a glob such as 'llama*')")
        if upstream is not None and (not isinstance(upstream, str) or not upstream.strip()):
            raise ValueError(f"{where}.upstream: must be an upstream name (a non-empty string)")
        rates: dict[str, float | None] = {}
        for key in ("input", "cached_input", "cache_write", "output"):
            rates[key] = number = _num(item.get(key))
            optional_and_unset = key in ("cached_input", "cache_write") and item.get(key) is None
            if not optional_and_unset and (number is None or not 0 <= number <= MAX_RATE_PER_TOKEN * 1e6):
                raise ValueError(f"{where}.{key}: must be a number >= 0 and at most {MAX_RATE_PER_TOKEN * 1e6:.0f}"
                                 " (USD per million tokens)")  # fmt: skip
        scope = upstream.strip() if upstream else None
        inp, read, write, outp = rates.values()
        out.append(CustomPrice(model.strip(), scope, inp or 0.0, read, write, outp or 0.0))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Cost:
    """What one call cost, where that figure came from, and our own breakdown of it."""

    cost_usd: float | None
    cost_source: str | None
    price_model: str | None
    breakdown: dict[str, float] | None
    upstream_cost_usd: float | None


def _priced(key: str, entry: Any) -> bool:
    """An entry is a model price when it has a per-token input or output price (sample_spec is docs)."""
    return (
        key != "sample_spec"
        and isinstance(entry, dict)
        and (_rate(entry.get(_IN)) is not None or _rate(entry.get(_OUT)) is not None)
    )


def _check_table(data: Any) -> str | None:
    """Return why data is not a usable full price table, or None when it is."""
    if not isinstance(data, dict):
        return "not a JSON object"
    chat = sum(
        1
        for key, entry in data.items()
        if _priced(key, entry) and entry.get("mode") == "chat" and _rate(entry.get(_IN)) is not None
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
    if not any(_priced(key, entry) for key, entry in data.items()):
        raise ValueError(f"price table {path}: no model with input_cost_per_token or output_cost_per_token")
    return data


class PriceBook:
    """The loaded price table and custom prices, with memoised matching."""

    __slots__ = ("source", "_index", "_custom", "_matches", "_rates_memo", "_thresholds", "_warned")

    def __init__(self, table: dict[str, Any], source: str, custom: tuple[CustomPrice, ...] = ()) -> None:
        self.source = source
        # Lower-cased key -> (table key, entry), for case-insensitive matching in one dict lookup.
        self._index = {key.lower(): (key, entry) for key, entry in table.items() if _priced(key, entry)}
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
        cached = cache_path()
        try:
            newer = cached.is_file() and cached.stat().st_mtime > BUNDLED_PRICES.stat().st_mtime
        except OSError:
            newer = cached.is_file()
        if newer:
            try:
                data = _read_table(cached)
                if (problem := _check_table(data)) is None:
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
        embedding = dialect == "embeddings"
        for name in (model, requested_model):
            if (custom := self._custom_for(name, upstream)) is not None:
                rates, price_model, source = custom.rates(), f"custom:{custom.model}", "custom"
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
        breakdown = {k: round(v, 10) for k, v in parts.items()}
        if upstream_cost is not None:
            return Cost(upstream_cost, "upstream", price_model, breakdown, upstream_cost)
        return Cost(round(sum(parts.values()), 10), source, price_model, breakdown, None)

    def lookup_text(self, model: str, upstream: str | None = None, provider: str | None = None) -> str:
        """Explain, for `prices lookup`, which price applies to a model and at what rates."""
        lines = [f"model {model!r}" + (f" (upstream {upstream})" if upstream else "")]
        custom, hit = self._custom_for(model, upstream), self.match(model, provider=provider)
        if custom is not None:
            r = custom.rates()
            scope = f" for upstream {custom.upstream}" if custom.upstream else ""
            lines.append(f"  custom price {custom.model!r}{scope} from prices.custom, USD per 1M tokens:")
            lines.append(
                f"    input {_pm(r.input)}, cached input {_pm(r.cached_input)}, "
                f"cache write {_pm(r.cache_write)}, output {_pm(r.output)}"
            )
            if hit is not None:
                lines.append(f"  (beats table key {hit[0]!r} from {self.source})")
            return "\n".join(lines)
        if hit is None:
            hint = f"'{_ALIAS.get(provider.lower(), provider.lower())}/' prefix, " if provider else ""
            lines.append(
                f"  no price: not in {self.source} (tried the exact name, {hint}provider prefix removed, "
                "dated/versioned suffix removed) and no prices.custom glob matches; cost_usd stays null"
            )
            close = difflib.get_close_matches(model.lower(), list(self._index), n=5, cutoff=0.6)
            shown = ", ".join(self._index[c][0] for c in close)
            lines.append(f"  close table keys: {shown}" if close else "  no close table keys")
            return "\n".join(lines)
        key, entry = hit
        r = self._rates(key, entry, 0, None)
        provider_name, mode = entry.get("litellm_provider", "?"), entry.get("mode", "?")
        lines.append(f"  table key {key!r} (provider {provider_name}, mode {mode}) from {self.source}")
        lines.append("  USD per 1M tokens:")
        for label, base, value in (
            ("input", _IN, r.input),
            ("cached input", _READ, r.cached_input),
            ("cache write", _WRITE, r.cache_write),
            ("cache write 1h", _WRITE_1H, r.cache_write_1h),
            ("output", _OUT, r.output),
        ):
            note = "" if _rate(entry.get(base)) is not None else " (not in table; falls back)"
            lines.append(f"    {label:<15}{_pm(value)}{note}")
        tiers = sorted(
            f for f in entry if f not in _BASES and f.startswith(_BASES) and _rate(entry[f]) is not None
        )
        if tiers:
            lines.append("  tiers (long context, service tier), USD per 1M tokens:")
            lines.extend(f"    {f}: {_pm(_rate(entry[f]) or 0.0)}" for f in tiers)
        return "\n".join(lines)


def _pm(rate: float) -> str:
    """Format a per-token rate as USD per million tokens."""
    return f"${rate * 1e6:.6g}"


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


def update_prices(
    url: str = DEFAULT_PRICES_URL, dest: Path | None = None, timeout: float = 60.0
) -> tuple[bool, str]:
    """Download, validate and atomically install a fresh price table; a failure keeps the old one."""
    dest = Path(dest) if dest is not None else cache_path()
    kept = f"kept {dest}" if dest.exists() else "kept the bundled table"

    def fail(reason: str) -> tuple[bool, str]:
        return False, f"price update from {url} failed: {reason}; {kept}"

    request = urllib.request.Request(url, headers={"User-Agent": "metering-proxy"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(_MAX_DOWNLOAD + 1)
    except urllib.error.HTTPError as exc:
        return fail(f"HTTP {exc.code} {exc.reason}")
    except urllib.error.URLError as exc:
        return fail(f"cannot fetch: {exc.reason}")
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        return fail(f"cannot fetch: {exc}")
    if len(body) > _MAX_DOWNLOAD:
        return fail(f"response larger than {_MAX_DOWNLOAD >> 20} MB")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return fail(f"not valid JSON ({exc})")
    if (problem := _check_table(data)) is not None:
        return fail(problem)
    tmp_name: str | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".model_prices.", suffix=".tmp")
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(body)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, dest)  # readers see the old file or the new one, never half of it
    except OSError as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        return fail(f"cannot write {dest}: {exc.strerror or exc}")
    priced = sum(1 for key, entry in data.items() if _priced(key, entry))
    return True, f"updated {dest}: {len(data)} entries, {priced} with token prices (from {url})"
