"""Token usage in one meaning across providers, read from each provider's dialect.

The normalised fields follow the OpenTelemetry GenAI convention: ``input_tokens`` counts every
input token (cached reads and cache writes included) and ``output_tokens`` counts every output
token (reasoning included). Each wire shape is translated in exactly one function below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson

MAX_TOKENS_PER_CALL = 100_000_000
"""The largest token count believed for one field of one call. The largest context window in the price
table is about 10.5M tokens (Llama 4 Scout), so a real count stays 10x below this; a larger one is garbage
or an attack, and believing it would price one call at up to $1M (at the table's priciest rates)."""
MAX_UPSTREAM_COST_USD = 10_000.0
"""The largest charge believed from an upstream for one call (OpenRouter ``usage.cost``). A full context
window plus full output of the priciest model in the price table costs about $200; this is 50x that."""
MAX_RATE_PER_TOKEN = 1.0
"""The largest price believed, in USD per token ($1M per million): about 100x the priciest rate in the
table ($0.0097). A larger (or negative, or NaN) table rate is ignored as if the entry lacked it; a custom
price above it is a config error. With counts held to MAX_TOKENS_PER_CALL, every cost is then finite."""
MAX_SERVER_TOOL_CALLS = 10_000
"""The largest count of one server-side tool's calls (web searches, fetches...) believed for one call. Anthropic
stops a request's searches at the tool's ``max_uses`` and real agent turns run tens; at the table's priciest
per-call fee ($0.035) this bound is $350, so a garbage count cannot price one call like a year of searching."""
MAX_SERVER_TOOLS = 16
"""Distinct server-side tools kept per call (Anthropic reports two today); more is garbage that would bloat the
record."""
_MAX_TOOL_NAME = 64
USAGE_RAW_MAX_BYTES = 8 * 1024
"""A record's ``usage_raw`` at most this many bytes of JSON (real usage blocks are well under 1 KiB)."""
USAGE_RAW_MAX_STRING = 256
"""Strings longer than this are cut when a usage block has to be shortened to fit USAGE_RAW_MAX_BYTES."""
_MAX_TIER = 64  # service tiers are short words; anything longer is not one (and would bloat every record)
_MAX_DEPTH = 8  # a usage block nests 2-3 levels; orjson writes at most 255, so deeper is cut when shortening

FIELDS = (
    "input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
    "output_tokens", "reasoning_tokens", "total_tokens", "upstream_cost_usd", "server_tool_calls",
)  # fmt: skip
"""The fields of Usage an upstream's value can be rejected for, in the order ``Usage.invalid`` lists them."""

ToolCalls = tuple[tuple[str, int | None], ...]
"""Server-side tool calls by tool name (``web_search``, ``web_fetch``, ``file_search``...), in the order
reported; a count of None was reported but not believable (see Usage.invalid)."""
#: OpenAI Responses output items that are billed per call, and the tool name each is counted under.
#: code_interpreter_call is left out: it is billed per container session, not per call.
RESPONSES_BILLED_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search"}
#: Anthropic ``server_tool_use`` content-block names counted when no usage block says how many ran.
ANTHROPIC_SERVER_TOOLS = frozenset({"web_search", "web_fetch"})


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage information for one call."""

    input_tokens: int = 0
    """All input tokens: uncached, cached reads and cache writes."""
    cached_input_tokens: int = 0
    """Input tokens read from the provider's prompt cache (subset of input_tokens)."""
    cache_write_tokens: int = 0
    """Input tokens written to the prompt cache (subset of input_tokens)."""
    cache_write_5m_tokens: int | None = None
    """Anthropic: cache writes with the 5-minute lifetime, when the split is given."""
    cache_write_1h_tokens: int | None = None
    """Anthropic: cache writes with the 1-hour lifetime, when the split is given."""
    output_tokens: int = 0
    """All output tokens, reasoning included."""
    reasoning_tokens: int = 0
    """Reasoning or thinking tokens (subset of output_tokens)."""
    total_tokens: int = 0
    """input_tokens + output_tokens."""
    upstream_cost_usd: float | None = None
    """The charge the upstream reported itself (OpenRouter ``usage.cost``), if any and believable."""
    service_tier: str | None = None
    """The service tier the upstream says it used (priority, flex, batch, ...)."""
    server_tool_calls: ToolCalls = ()
    """Server-side tool calls the upstream ran and bills per call (Anthropic ``server_tool_use``, OpenAI
    Responses ``web_search_call``/``file_search_call`` items); tools with a count of 0 are left out."""
    invalid: tuple[str, ...] = ()
    """Fields (names from FIELDS) whose upstream value was present but rejected: negative, not finite, not a
    number (strings and bools included) or over MAX_TOKENS_PER_CALL / MAX_UPSTREAM_COST_USD. A rejected count
    reads 0 here (the forwarder puts its estimate in for input and output: with_estimates), a rejected
    cost None (the price table prices the call)."""


def valid_count(value: Any) -> int | None:
    """A token count as an upstream may send it (an int, or a float such as 12.0), or None if not believable."""
    if isinstance(value, bool):
        return None  # a bool is an int to Python, never a count
    if isinstance(value, int):
        return value if 0 <= value <= MAX_TOKENS_PER_CALL else None
    if isinstance(value, float) and 0 <= value <= MAX_TOKENS_PER_CALL:  # NaN fails the comparison
        return int(value)
    return None


def valid_cost(value: Any) -> float | None:
    """An upstream-reported charge in USD, or None if not believable (negative, NaN, inf, over the bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= MAX_UPSTREAM_COST_USD:  # NaN fails it too; an int past float range compares exactly
        return None
    return float(value) or 0.0  # -0.0 would be written as a negative-looking charge


class _Reader:
    """Reads one usage block's numbers, noting the fields whose value was present but not believable."""

    __slots__ = ("bad",)

    def __init__(self) -> None:
        self.bad: set[str] = set()

    def count(self, value: Any, *fields: str) -> int:
        """A count, 0 when absent; a value that is there but not a count flags fields and reads 0."""
        if value is None:
            return 0
        out = valid_count(value)
        if out is None:
            self.bad.update(fields)
            return 0
        return out

    def opt_count(self, value: Any, field: str) -> int | None:
        """A count that may be absent (None), flagged like count()."""
        out = None if value is None else valid_count(value)
        if out is None and value is not None:
            self.bad.add(field)
        return out

    def cost(self, value: Any) -> float | None:
        out = None if value is None else valid_cost(value)
        if out is None and value is not None:
            self.bad.add("upstream_cost_usd")
        return out

    def invalid(self) -> tuple[str, ...]:
        return tuple(f for f in FIELDS if f in self.bad)


def valid_tool_count(value: Any) -> int | None:
    """A server-side tool call count, believed like a token count but bounded by MAX_SERVER_TOOL_CALLS."""
    out = valid_count(value)
    return out if out is not None and out <= MAX_SERVER_TOOL_CALLS else None


def tool_calls(counts: dict[str, Any]) -> tuple[ToolCalls, bool]:
    """Server-side tool counts as Usage keeps them, and whether one was present but not believable.

    Zero counts are dropped (no call, no fee); a rejected count is kept as None, so the record shows the
    tool ran an unknown number of times and its fee is unknown, never 0.
    """
    out: list[tuple[str, int | None]] = []
    bad = False
    for name, value in counts.items():
        if len(out) >= MAX_SERVER_TOOLS:
            bad = True  # more tools than any upstream reports: the rest is garbage
            break
        if not isinstance(name, str) or not name or len(name) > _MAX_TOOL_NAME or value is None:
            continue
        count = valid_tool_count(value)
        if count is None:
            bad = True
            out.append((name, None))
        elif count:
            out.append((name, count))
    return tuple(out), bad


def _anthropic_tools(raw: dict[str, Any], r: _Reader) -> ToolCalls:
    """``server_tool_use``: ``web_search_requests``, ``web_fetch_requests``, and any later ``<tool>_requests``."""
    block = _dict(raw.get("server_tool_use"))
    counts = {k.removesuffix("_requests"): v for k, v in block.items()
              if isinstance(k, str) and k.endswith("_requests")}  # fmt: skip
    found, bad = tool_calls(counts)
    if bad:
        r.bad.add("server_tool_calls")
    return found


def responses_tool_calls(output: Any) -> dict[str, int]:
    """Count a Responses ``output`` list's items that are billed per call, by tool name."""
    counts: dict[str, int] = {}
    for item in output if isinstance(output, list) else ():
        name = RESPONSES_BILLED_ITEMS.get(item.get("type")) if isinstance(item, dict) else None  # type: ignore[arg-type]
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def with_tool_calls(usage: Usage, counts: dict[str, int]) -> Usage:
    """Usage with counted tool calls filled in, unless its own usage block already reported some."""
    if usage.server_tool_calls or not counts:
        return usage
    found, bad = tool_calls(counts)
    invalid = set(usage.invalid) | ({"server_tool_calls"} if bad else set())
    return dataclasses.replace(usage, server_tool_calls=found, invalid=tuple(f for f in FIELDS if f in invalid))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tier(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= _MAX_TIER else None


def is_anthropic_usage(raw: dict[str, Any]) -> bool:
    """Tell Anthropic's usage block (input excludes cache) from the Responses API's."""
    return (
        "cache_read_input_tokens" in raw
        or "cache_creation_input_tokens" in raw
        or "cache_creation" in raw
        or ("input_tokens" in raw and "input_tokens_details" not in raw and "total_tokens" not in raw)
    )


def from_anthropic(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """Anthropic Messages: input_tokens excludes cache reads and writes, so add them back."""
    r = _Reader()
    uncached = r.count(raw.get("input_tokens"), "input_tokens")
    # The cache counts are parts of the input total too: a rejected one leaves that total unknown.
    cache_read = r.count(raw.get("cache_read_input_tokens"), "cached_input_tokens", "input_tokens")
    cache_write = r.count(raw.get("cache_creation_input_tokens"), "cache_write_tokens", "input_tokens")
    split = _dict(raw.get("cache_creation"))
    w5m = r.opt_count(split.get("ephemeral_5m_input_tokens"), "cache_write_5m_tokens") if split else None
    w1h = r.opt_count(split.get("ephemeral_1h_input_tokens"), "cache_write_1h_tokens") if split else None
    output = r.count(raw.get("output_tokens"), "output_tokens")
    details = _dict(raw.get("output_tokens_details"))
    reasoning = r.count(details.get("thinking_tokens") or details.get("reasoning_tokens"), "reasoning_tokens")
    total_in = uncached + cache_read + cache_write
    tier = raw.get("service_tier") if isinstance(raw.get("service_tier"), str) else service_tier
    tools = _anthropic_tools(raw, r)
    return Usage(
        input_tokens=total_in,
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_5m_tokens=w5m,
        cache_write_1h_tokens=w1h,
        output_tokens=output,
        reasoning_tokens=reasoning,
        total_tokens=total_in + output,
        service_tier=_tier(tier),
        server_tool_calls=tools,
        invalid=r.invalid(),
    )


def from_responses(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """OpenAI Responses API: input_tokens already includes cached tokens."""
    r = _Reader()
    inp = r.count(raw.get("input_tokens"), "input_tokens")
    out = r.count(raw.get("output_tokens"), "output_tokens")
    in_details = _dict(raw.get("input_tokens_details"))
    out_details = _dict(raw.get("output_tokens_details"))
    return Usage(
        input_tokens=inp,
        cached_input_tokens=r.count(in_details.get("cached_tokens"), "cached_input_tokens"),
        cache_write_tokens=r.count(in_details.get("cache_write_tokens"), "cache_write_tokens"),
        output_tokens=out,
        reasoning_tokens=r.count(out_details.get("reasoning_tokens"), "reasoning_tokens"),
        total_tokens=inp + out,
        service_tier=_tier(service_tier),
        invalid=r.invalid(),
    )


def from_openai(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """OpenAI Chat/Completions/Embeddings and every server that copies its shape.

    prompt_tokens includes cached tokens (OpenAI, vLLM, llama.cpp, OpenRouter, xAI); DeepSeek
    reports hit + miss = prompt_tokens. Gemini leaves thinking tokens out of completion_tokens
    but counts them in total_tokens, so output is taken as total - prompt when that is larger.
    """
    r = _Reader()
    prompt = r.count(raw.get("prompt_tokens"), "input_tokens")
    completion = r.count(raw.get("completion_tokens"), "output_tokens")
    reported_total = r.count(raw.get("total_tokens"), "total_tokens")
    p_details = _dict(raw.get("prompt_tokens_details"))
    c_details = _dict(raw.get("completion_tokens_details"))
    if "prompt_cache_hit_tokens" in raw:  # DeepSeek: its hit count wins over any details
        cached = r.count(raw.get("prompt_cache_hit_tokens"), "cached_input_tokens")
        if not prompt:
            prompt = cached + r.count(raw.get("prompt_cache_miss_tokens"), "input_tokens")
    else:
        cached = r.count(p_details.get("cached_tokens"), "cached_input_tokens")
    reasoning = r.count(c_details.get("reasoning_tokens"), "reasoning_tokens")
    output = completion
    hidden = reported_total - prompt - completion
    # The difference means nothing when one of its terms was rejected (read as 0): -5 prompt tokens would
    # otherwise turn the whole total into output.
    if hidden > 0 and not r.bad & {"input_tokens", "output_tokens", "total_tokens"}:
        # Thinking tokens counted only in the total (Gemini): they are billed as output.
        output = completion + hidden
        reasoning = max(reasoning, hidden)
    upstream_cost = r.cost(raw.get("cost"))
    if upstream_cost is not None and raw.get("is_byok") is True:
        # OpenRouter BYOK: `cost` is only OpenRouter's fee; the provider billed the rest to your key.
        byok_raw = _dict(raw.get("cost_details")).get("upstream_inference_cost")
        byok = r.cost(byok_raw)
        if byok is not None:
            upstream_cost = r.cost(upstream_cost + byok)
        elif byok_raw is not None:
            upstream_cost = None  # part of the charge is garbage, so the whole is unknown (the fee undercounts)
    return Usage(
        input_tokens=prompt,
        cached_input_tokens=cached,
        cache_write_tokens=r.count(p_details.get("cache_write_tokens"), "cache_write_tokens"),
        output_tokens=output,
        reasoning_tokens=min(reasoning, output) if output else reasoning,
        total_tokens=prompt + output,
        upstream_cost_usd=upstream_cost,
        service_tier=_tier(service_tier),
        invalid=r.invalid(),
    )


def from_ollama_native(body: dict[str, Any]) -> Usage:
    """Ollama's native /api/chat and /api/generate final object."""
    r = _Reader()
    inp = r.count(body.get("prompt_eval_count"), "input_tokens")
    out = r.count(body.get("eval_count"), "output_tokens")
    return Usage(
        input_tokens=inp,
        cached_input_tokens=r.count(body.get("prompt_eval_cached_count"), "cached_input_tokens"),
        output_tokens=out,
        total_tokens=inp + out,
        invalid=r.invalid(),
    )


def from_raw(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """Normalise a usage block of any known dialect, telling them apart by their keys."""
    if "prompt_tokens" in raw or "prompt_cache_hit_tokens" in raw:
        return from_openai(raw, service_tier)
    if "input_tokens" in raw or "output_tokens" in raw:
        if is_anthropic_usage(raw):
            return from_anthropic(raw, service_tier)
        return from_responses(raw, service_tier)
    return Usage(service_tier=_tier(service_tier))


def with_estimates(usage: Usage, input_estimate: int, output_estimate: int) -> Usage:
    """Usage with the proxy's estimates in place of the input/output counts the upstream got wrong.

    An estimate rather than 0, so a budget still counts something for a call that was billed; never below
    the valid parts the upstream did report (Anthropic cache reads are input too; reasoning is output).
    Rejected subsets (cached, cache writes, reasoning) stay 0: all input is then priced uncached. ``invalid``
    is kept, so the record still says what the upstream sent wrong. Returns usage itself when it has no
    rejected count to replace.
    """
    bad_in, bad_out = "input_tokens" in usage.invalid, "output_tokens" in usage.invalid
    if not (bad_in or bad_out):
        return usage
    inp = max(input_estimate, usage.cached_input_tokens + usage.cache_write_tokens, 0) if bad_in else usage.input_tokens
    out = max(output_estimate, usage.reasoning_tokens, 0) if bad_out else usage.output_tokens
    return dataclasses.replace(usage, input_tokens=inp, output_tokens=out, total_tokens=inp + out)


def bounded_raw(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The usage block as a record keeps it: verbatim when its JSON is at most USAGE_RAW_MAX_BYTES.

    A larger block (or one orjson cannot write: nested deeper than 255 levels) is shortened: strings over
    USAGE_RAW_MAX_STRING characters are cut (the cut says how long they were), nesting past 8 levels is
    dropped, integers past 64 bits become floats, and ``"_truncated": true, "bytes": <its size>`` is added
    (``bytes`` null when it could not be written at all). When even that does not fit, only those two keys
    are kept. raw itself is never changed (the meter and provider detection still read it).
    """
    if raw is None:
        return None
    try:
        size: int | None = len(orjson.dumps(raw))
    except TypeError:  # orjson.JSONEncodeError: too deep, or an integer past 64 bits
        size = None
    if size is not None and size <= USAGE_RAW_MAX_BYTES:
        return raw
    note: dict[str, Any] = {"_truncated": True, "bytes": size}
    short = _shorten(raw, 0)
    assert isinstance(short, dict)
    cut = {**short, **note}
    try:
        if len(orjson.dumps(cut)) <= USAGE_RAW_MAX_BYTES:
            return cut
    except TypeError:
        pass  # e.g. a lone surrogate in a key; the note alone is always writable
    return note


def _shorten(value: Any, depth: int) -> Any:
    """A copy of a JSON value that fits a record: long strings cut, deep nesting dropped, big ints as floats."""
    if isinstance(value, str):
        if len(value) <= USAGE_RAW_MAX_STRING:
            return value
        return f"{value[:USAGE_RAW_MAX_STRING]}...({len(value)} chars)"
    if isinstance(value, dict | list):
        if depth >= _MAX_DEPTH:
            return "...(nested too deep)"
        if isinstance(value, list):
            return [_shorten(v, depth + 1) for v in value]
        return {_shorten(k, depth + 1): _shorten(v, depth + 1) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value) if abs(value) < 2**1023 else None  # orjson writes 64-bit integers only
    return value


def merge_anthropic(current: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """Fold a cumulative message_delta usage into message_start's, as Anthropic's SDK does.

    output_tokens is replaced (it is cumulative, never added); input and cache fields are
    overwritten only when the delta carries a non-null value.
    """
    merged = dict(current or {})
    for key, value in delta.items():
        if key == "output_tokens" or value is not None:
            merged[key] = value
    return merged


def server_timing(body: dict[str, Any]) -> dict[str, float] | None:
    """What the upstream says about its own time, in milliseconds, from any known dialect."""
    out: dict[str, float] = {}
    timings = body.get("timings")
    if isinstance(timings, dict):  # llama.cpp, already in ms
        _put(out, "prompt_ms", timings.get("prompt_ms"), 1.0)
        _put(out, "generation_ms", timings.get("predicted_ms"), 1.0)
        if "prompt_ms" in out and "generation_ms" in out:
            out["total_ms"] = round(out["prompt_ms"] + out["generation_ms"], 3)
        _count(out, "cached_prompt_tokens", timings.get("cache_n"))
        _count(out, "prompt_tokens", timings.get("prompt_n"))  # prompt tokens evaluated (not from cache)
        _count(out, "generation_tokens", timings.get("predicted_n"))
        _put(out, "generation_tokens_per_second", timings.get("predicted_per_second"), 1.0)
    groq = _dict(_dict(body.get("x_groq")).get("usage")) or _dict(body.get("usage"))
    if "queue_time" in groq or "total_time" in groq:  # Groq, seconds
        _put(out, "queue_ms", groq.get("queue_time"), 1000.0)
        _put(out, "prompt_ms", groq.get("prompt_time"), 1000.0)
        _put(out, "generation_ms", groq.get("completion_time"), 1000.0)
        _put(out, "total_ms", groq.get("total_time"), 1000.0)
    if "total_duration" in body or "eval_duration" in body:  # Ollama native, nanoseconds
        _put(out, "total_ms", body.get("total_duration"), 1e-6)
        _put(out, "load_ms", body.get("load_duration"), 1e-6)
        _put(out, "prompt_ms", body.get("prompt_eval_duration"), 1e-6)
        _put(out, "generation_ms", body.get("eval_duration"), 1e-6)
    stats = body.get("stats")
    if isinstance(stats, dict):  # LM Studio, seconds
        _put(out, "ttft_ms", stats.get("time_to_first_token", stats.get("time_to_first_token_seconds")), 1000.0)
        _put(out, "generation_ms", stats.get("generation_time"), 1000.0)
        _put(out, "generation_tokens_per_second", stats.get("tokens_per_second"), 1.0)
    return out or None


def _count(out: dict[str, float], key: str, value: Any) -> None:
    """A token count: kept an integer (a float that is a whole number becomes one)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        out[key] = value


def _put(out: dict[str, float], key: str, value: Any, scale: float) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        out[key] = round(float(value) * scale, 3)


# -- estimation: when the upstream reports no usage (or usage that cannot be believed) -------------

#: How deep _all_text looks: real payloads nest a few levels; orjson accepts 1024, which would
#: overflow Python's recursion limit. (Not _MAX_DEPTH: that bounds a shortened usage_raw.)
_MAX_TEXT_DEPTH = 32


def estimate_input_tokens(request: dict[str, Any]) -> int:
    """Estimate prompt tokens from the request: 1 token per 4 characters, plus 4 per message."""
    chars = 0
    messages = 0
    for key in ("messages", "prompt", "input", "system", "instructions", "tools"):
        value = request.get(key)
        if value is not None:
            chars += _all_text(value)
            if key == "messages" and isinstance(value, list):
                messages += len(value)
    return (chars + 3) // 4 + 4 * messages + (3 if messages else 0)


def estimate_output_tokens(chars: int) -> int:
    """Estimate completion tokens from generated characters: 1 token per 4 characters."""
    return (chars + 3) // 4


def _all_text(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth >= _MAX_TEXT_DEPTH:  # a deeply nested request must not overflow the recursion limit
        return 0
    if isinstance(value, list):
        return sum(_all_text(v, depth + 1) for v in value)
    if isinstance(value, dict):
        # Inline images and audio are base64: their length says nothing about tokens.
        skip = ("image_url", "data", "input_audio")
        return sum(_all_text(v, depth + 1) for k, v in value.items() if k not in skip)
    return 0


def settle(reported: Usage | None, *, final: bool, output_chars: int, request: dict[str, Any] | None,
           billed: bool, tool_counts: dict[str, int] | None = None) -> tuple[Usage, str]:  # fmt: skip
    """The usage a record shows, and its source: upstream, estimated or none.

    reported: what the upstream said (None: nothing); final: False for a stream cut before its final
    usage; output_chars: generated characters seen; billed: the upstream answered and did not fail
    before any output, so the call costs something even when nothing was reported; tool_counts: server
    tool calls counted from the response's items, kept when no usage block reported any (a stream cut
    after its searches but before its usage still ran, and is billed for, those searches).
    """
    if reported is not None and not final:
        # A stream cut before its final usage: keep the reported input side, estimate output.
        out = max(reported.output_tokens, estimate_output_tokens(output_chars))
        usage = dataclasses.replace(reported, output_tokens=out, total_tokens=reported.input_tokens + out)
        source = "estimated"
    elif reported is not None:
        usage, source = reported, "upstream"
    elif billed and request is not None:
        out = estimate_output_tokens(output_chars)
        inp = estimate_input_tokens(request)
        usage, source = Usage(input_tokens=inp, output_tokens=out, total_tokens=inp + out), "estimated"
    else:
        return Usage(), "none"
    if usage.invalid:
        # Counts the upstream got wrong (negative, not finite, absurd) are not believed: estimate them.
        fixed = with_estimates(usage, estimate_input_tokens(request or {}), estimate_output_tokens(output_chars))
        if fixed is not usage:
            usage, source = fixed, "estimated"
    if tool_counts:
        usage = with_tool_calls(usage, tool_counts)
    return usage, source
