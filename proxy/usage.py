"""Token usage in one meaning across providers, read from each provider's dialect.

The normalised fields follow the OpenTelemetry GenAI convention: ``input_tokens`` counts every
input token (cached reads and cache writes included) and ``output_tokens`` counts every output
token (reasoning included). Each wire shape is translated in exactly one function below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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
    """The charge the upstream reported itself (OpenRouter ``usage.cost``), if any."""
    service_tier: str | None = None
    """The service tier the upstream says it used (priority, flex, batch, ...)."""


_MAX_COUNT = 2**53


def _int(value: Any) -> int:
    """Return value as a non-negative int; anything that is not a number counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0  # NaN/inf: int() would raise; garbage counts as 0
    out = int(value)
    # No real count comes near 2**53; a larger one is garbage, and past 2**64 orjson could not
    # even write the record.
    return out if 0 <= out <= _MAX_COUNT else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _opt_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return out if math.isfinite(out) else None  # a NaN/inf cost is garbage, not a charge


def _opt_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf: int() would raise
    out = max(int(value), 0)
    return out if out <= _MAX_COUNT else None


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
    uncached = _int(raw.get("input_tokens"))
    cache_read = _int(raw.get("cache_read_input_tokens"))
    cache_write = _int(raw.get("cache_creation_input_tokens"))
    split = _dict(raw.get("cache_creation"))
    w5m = _opt_int(split.get("ephemeral_5m_input_tokens")) if split else None
    w1h = _opt_int(split.get("ephemeral_1h_input_tokens")) if split else None
    output = _int(raw.get("output_tokens"))
    details = _dict(raw.get("output_tokens_details"))
    reasoning = _int(details.get("thinking_tokens") or details.get("reasoning_tokens"))
    total_in = uncached + cache_read + cache_write
    tier = raw.get("service_tier") if isinstance(raw.get("service_tier"), str) else service_tier
    return Usage(
        input_tokens=total_in,
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_5m_tokens=w5m,
        cache_write_1h_tokens=w1h,
        output_tokens=output,
        reasoning_tokens=reasoning,
        total_tokens=total_in + output,
        service_tier=tier,
    )


def from_responses(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """OpenAI Responses API: input_tokens already includes cached tokens."""
    inp = _int(raw.get("input_tokens"))
    out = _int(raw.get("output_tokens"))
    in_details = _dict(raw.get("input_tokens_details"))
    out_details = _dict(raw.get("output_tokens_details"))
    return Usage(
        input_tokens=inp,
        cached_input_tokens=_int(in_details.get("cached_tokens")),
        cache_write_tokens=_int(in_details.get("cache_write_tokens")),
        output_tokens=out,
        reasoning_tokens=_int(out_details.get("reasoning_tokens")),
        total_tokens=inp + out,
        service_tier=service_tier,
    )


def from_openai(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """OpenAI Chat/Completions/Embeddings and every server that copies its shape.

    prompt_tokens includes cached tokens (OpenAI, vLLM, llama.cpp, OpenRouter, xAI); DeepSeek
    reports hit + miss = prompt_tokens. Gemini leaves thinking tokens out of completion_tokens
    but counts them in total_tokens, so output is taken as total - prompt when that is larger.
    """
    prompt = _int(raw.get("prompt_tokens"))
    completion = _int(raw.get("completion_tokens"))
    reported_total = _int(raw.get("total_tokens"))
    p_details = _dict(raw.get("prompt_tokens_details"))
    c_details = _dict(raw.get("completion_tokens_details"))
    cached = _int(p_details.get("cached_tokens"))
    if "prompt_cache_hit_tokens" in raw:
        cached = _int(raw.get("prompt_cache_hit_tokens"))
        if not prompt:
            prompt = cached + _int(raw.get("prompt_cache_miss_tokens"))
    reasoning = _int(c_details.get("reasoning_tokens"))
    output = completion
    hidden = reported_total - prompt - completion
    if hidden > 0:
        # Thinking tokens counted only in the total (Gemini): they are billed as output.
        output = completion + hidden
        reasoning = max(reasoning, hidden)
    upstream_cost = _opt_float(raw.get("cost"))
    if upstream_cost is not None and raw.get("is_byok") is True:
        # OpenRouter BYOK: `cost` is only OpenRouter's fee; the provider billed the rest to your key.
        byok = _opt_float(_dict(raw.get("cost_details")).get("upstream_inference_cost"))
        if byok is not None:
            upstream_cost += byok
    return Usage(
        input_tokens=prompt,
        cached_input_tokens=cached,
        cache_write_tokens=_int(p_details.get("cache_write_tokens")),
        output_tokens=output,
        reasoning_tokens=min(reasoning, output) if output else reasoning,
        total_tokens=prompt + output,
        upstream_cost_usd=upstream_cost,
        service_tier=service_tier,
    )


def from_ollama_native(body: dict[str, Any]) -> Usage:
    """Ollama's native /api/chat and /api/generate final object."""
    inp = _int(body.get("prompt_eval_count"))
    out = _int(body.get("eval_count"))
    return Usage(
        input_tokens=inp,
        cached_input_tokens=_int(body.get("prompt_eval_cached_count")),
        output_tokens=out,
        total_tokens=inp + out,
    )


def from_raw(raw: dict[str, Any], service_tier: str | None = None) -> Usage:
    """Normalise a usage block of any known dialect, telling them apart by their keys."""
    if "prompt_tokens" in raw or "prompt_cache_hit_tokens" in raw:
        return from_openai(raw, service_tier)
    if "input_tokens" in raw or "output_tokens" in raw:
        if is_anthropic_usage(raw):
            return from_anthropic(raw, service_tier)
        return from_responses(raw, service_tier)
    return Usage(service_tier=service_tier)


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
