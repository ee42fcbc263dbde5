"""`metering-proxy prices`: refresh the price table from LiteLLM's published copy, and explain a lookup.

Kept apart from proxy.pricing, which prices calls on the hot path: this module holds the command's text
and its HTTP download, neither of which a running proxy needs.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from proxy.config import price_cache_path
from proxy.pricing import SERVER_TOOLS, Explanation, PriceBook, check_table, priced_entry

DEFAULT_PRICES_URL: str = (
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json"
)
_MAX_DOWNLOAD = 64 * 1024 * 1024
_BASE_LABELS = (
    ("input", "input_cost_per_token", "input"),
    ("cached input", "cache_read_input_token_cost", "cached_input"),
    ("cache write", "cache_creation_input_token_cost", "cache_write"),
    ("cache write 1h", "cache_creation_input_token_cost_above_1hr", "cache_write_1h"),
    ("output", "output_cost_per_token", "output"),
)



def update_prices(
    url: str = DEFAULT_PRICES_URL, dest: Path | None = None, timeout: float = 60.0
) -> tuple[bool, str]:
    """Download, validate and atomically install a fresh price table; a failure keeps the old one."""
    dest = Path(dest) if dest is not None else price_cache_path()
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
    if (problem := check_table(data)) is not None:
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
    priced = sum(1 for key, entry in data.items() if priced_entry(key, entry))
    return True, f"updated {dest}: {len(data)} entries, {priced} with token prices (from {url})"


def _pm(rate: float) -> str:
    """A per-token rate as USD per million tokens."""
    return f"${rate * 1e6:.6g}"


def lookup_text(book: PriceBook, model: str, upstream: str | None = None, provider: str | None = None) -> str:
    """The `prices lookup` answer: which price applies to a model and at what rates."""
    return explanation_text(book.explain(model, upstream=upstream, provider=provider))


def explanation_text(e: Explanation) -> str:
    lines = [f"model {e.model!r}" + (f" (upstream {e.upstream})" if e.upstream else "")]
    if e.custom is not None and e.rates is not None:
        r = e.rates
        scope = f" for upstream {e.custom.upstream}" if e.custom.upstream else ""
        lines.append(f"  custom price {e.custom.model!r}{scope} from prices.custom, USD per 1M tokens:")
        lines.append(
            f"    input {_pm(r.input)}, cached input {_pm(r.cached_input)}, "
            f"cache write {_pm(r.cache_write)}, output {_pm(r.output)}"
        )
        if e.table_key is not None:
            lines.append(f"  (beats table key {e.table_key!r} from {e.source})")
        return "\n".join(lines)
    if e.rates is None:
        hint = f"'{e.tried_prefix}/' prefix, " if e.tried_prefix else ""
        lines.append(
            f"  no price: not in {e.source} (tried the exact name, {hint}provider prefix removed, "
            "dated/versioned suffix removed) and no prices.custom glob matches; cost_usd stays null"
        )
        lines.append(f"  close table keys: {', '.join(e.close)}" if e.close else "  no close table keys")
        return "\n".join(lines)
    lines.append(f"  table key {e.table_key!r} (provider {e.table_provider}, mode {e.mode}) from {e.source}")
    lines.append("  USD per 1M tokens:")
    for label, field, attr in _BASE_LABELS:
        note = "" if field in e.in_table else " (not in table; falls back)"
        lines.append(f"    {label:<15}{_pm(getattr(e.rates, attr))}{note}")
    if e.tiers:
        lines.append("  tiers (long context, service tier), USD per 1M tokens:")
        lines.extend(f"    {f}: {_pm(rate)}" for f, rate in e.tiers)
    if e.tool_fees:
        lines.append("  server tool fees, USD per call:")
        lines.extend(f"    {tool:<15}${fee.usd_per_call:.6g} ({fee.source})" for tool, fee in e.tool_fees)
    if unknown := [tool for tool in SERVER_TOOLS if tool not in dict(e.tool_fees)]:
        lines.append(f"  no fee known for {', '.join(unknown)}: their calls stay out of cost_usd (see cost_unpriced)")
    return "\n".join(lines)
