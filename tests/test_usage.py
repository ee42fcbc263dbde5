"""Usage in one meaning across dialects: every number below is worked out by hand from the wire shape."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import usage as U
from proxy.usage import Usage

# -- OpenAI Chat / Completions / Embeddings and everything that copies the shape ---------------

OPENAI_CASES = [
    pytest.param(
        {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
         "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0}},
        Usage(input_tokens=2006, cached_input_tokens=1920, output_tokens=300, reasoning_tokens=192, total_tokens=2306),
        id="openai-cached-and-reasoning",
    ),
    pytest.param(
        {"prompt_tokens": 8, "total_tokens": 8},
        Usage(input_tokens=8, total_tokens=8),
        id="embeddings",
    ),
    pytest.param(
        {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        Usage(input_tokens=5, output_tokens=7, total_tokens=12),
        id="completions-no-details",
    ),
    pytest.param(
        # DeepSeek: hit + miss = prompt; cached comes from the hit count.
        {"prompt_tokens": 1024, "completion_tokens": 300, "total_tokens": 1324,
         "prompt_cache_hit_tokens": 896, "prompt_cache_miss_tokens": 128,
         "completion_tokens_details": {"reasoning_tokens": 180}},
        Usage(input_tokens=1024, cached_input_tokens=896, output_tokens=300, reasoning_tokens=180, total_tokens=1324),
        id="deepseek-hit-miss",
    ),
    pytest.param(
        # DeepSeek-like without prompt_tokens: input is rebuilt as hit + miss = 10 + 5.
        {"prompt_cache_hit_tokens": 10, "prompt_cache_miss_tokens": 5, "completion_tokens": 3},
        Usage(input_tokens=15, cached_input_tokens=10, output_tokens=3, total_tokens=18),
        id="deepseek-hit-miss-without-prompt",
    ),
    pytest.param(
        # Hit count wins over prompt_tokens_details when both are present.
        {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101, "prompt_cache_hit_tokens": 64,
         "prompt_cache_miss_tokens": 36, "prompt_tokens_details": {"cached_tokens": 0}},
        Usage(input_tokens=100, cached_input_tokens=64, output_tokens=1, total_tokens=101),
        id="deepseek-hit-over-details",
    ),
    pytest.param(
        # Gemini: 42 + 85 = 127 < 1151, the 1024 thinking tokens are only in the total.
        {"prompt_tokens": 42, "completion_tokens": 85, "total_tokens": 1151},
        Usage(input_tokens=42, output_tokens=1109, reasoning_tokens=1024, total_tokens=1151),
        id="gemini-thinking-in-total",
    ),
    pytest.param(
        # Gemini stream's last chunk: 9 + 12 = 21 < 140, so 119 hidden thinking tokens.
        {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 140},
        Usage(input_tokens=9, output_tokens=131, reasoning_tokens=119, total_tokens=140),
        id="gemini-stream-final",
    ),
    pytest.param(
        # Reasoning details (45) larger than the output (0 + 30 hidden): capped at the output.
        {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 40,
         "completion_tokens_details": {"reasoning_tokens": 45}},
        Usage(input_tokens=10, output_tokens=30, reasoning_tokens=30, total_tokens=40),
        id="reasoning-capped-at-output",
    ),
    pytest.param(
        # A total below prompt + completion is not trusted: total is recomputed as 10 + 5.
        {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 12},
        Usage(input_tokens=10, output_tokens=5, total_tokens=15),
        id="total-too-small-recomputed",
    ),
    pytest.param(
        {"prompt_tokens": 1540, "completion_tokens": 380, "total_tokens": 1920,
         "prompt_tokens_details": {"cached_tokens": 1280}, "completion_tokens_details": {"reasoning_tokens": 256},
         "cost": 0.00231, "is_byok": False},
        Usage(input_tokens=1540, cached_input_tokens=1280, output_tokens=380, reasoning_tokens=256,
              total_tokens=1920, upstream_cost_usd=0.00231),
        id="openrouter-cost",
    ),
    pytest.param(
        {"prompt_tokens": 194, "completion_tokens": 2, "total_tokens": 196, "cost": 0.95,
         "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 100}},
        Usage(input_tokens=194, cache_write_tokens=100, output_tokens=2, total_tokens=196, upstream_cost_usd=0.95),
        id="openrouter-cache-write",
    ),
    pytest.param(
        # OpenRouter BYOK: cost is only OpenRouter's fee, the provider's charge is added (0.5 + 0.25).
        {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cost": 0.5, "is_byok": True,
         "cost_details": {"upstream_inference_cost": 0.25}},
        Usage(input_tokens=10, output_tokens=2, total_tokens=12, upstream_cost_usd=0.75),
        id="openrouter-byok",
    ),
    pytest.param(
        {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cost": 0.5, "is_byok": True,
         "cost_details": {"upstream_inference_cost": "?"}},
        # With part of the charge garbage the whole is unknown: the fee alone would undercount it.
        Usage(input_tokens=10, output_tokens=2, total_tokens=12, invalid=("upstream_cost_usd",)),
        id="openrouter-byok-garbage-details",
    ),
    pytest.param(
        {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cost": 0.5, "is_byok": False,
         "cost_details": {"upstream_inference_cost": 0.25}},
        Usage(input_tokens=10, output_tokens=2, total_tokens=12, upstream_cost_usd=0.5),
        id="openrouter-not-byok",
    ),
    pytest.param(
        {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 10**400},
        Usage(input_tokens=3, output_tokens=1, total_tokens=4, invalid=("upstream_cost_usd",)),
        id="cost-too-large-ignored",
    ),
    pytest.param(
        {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0},
        Usage(input_tokens=3, output_tokens=1, total_tokens=4, upstream_cost_usd=0.0),
        id="cost-zero-int",
    ),
    pytest.param(
        {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": "0.5"},
        Usage(input_tokens=3, output_tokens=1, total_tokens=4, invalid=("upstream_cost_usd",)),
        id="cost-string-ignored",
    ),
    pytest.param(
        {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": True},
        Usage(input_tokens=3, output_tokens=1, total_tokens=4, invalid=("upstream_cost_usd",)),
        id="cost-bool-ignored",
    ),
    pytest.param(
        # xAI: cached inside prompt, total as reported.
        {"prompt_tokens": 712, "completion_tokens": 45, "total_tokens": 757,
         "prompt_tokens_details": {"text_tokens": 712, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 512},
         "completion_tokens_details": {"reasoning_tokens": 0}, "num_sources_used": 0},
        Usage(input_tokens=712, cached_input_tokens=512, output_tokens=45, total_tokens=757),
        id="xai",
    ),
    pytest.param(
        {"prompt_tokens": 10.0, "completion_tokens": 2.0, "total_tokens": 12.0},
        Usage(input_tokens=10, output_tokens=2, total_tokens=12),
        id="whole-floats",
    ),
    pytest.param(
        {"prompt_tokens": "12", "completion_tokens": None, "total_tokens": [1],
         "prompt_tokens_details": "x", "completion_tokens_details": 5},
        Usage(invalid=("input_tokens", "total_tokens")),
        id="garbage-counts-zero",
    ),
    pytest.param(
        {"prompt_tokens": True, "completion_tokens": False, "total_tokens": True},
        Usage(invalid=("input_tokens", "output_tokens", "total_tokens")),
        id="bools-count-zero",
    ),
    pytest.param(
        {"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": -2},
        Usage(output_tokens=3, total_tokens=3, invalid=("input_tokens", "total_tokens")),
        id="negative-counts-zero",
    ),
    pytest.param(
        {"prompt_tokens": math.nan, "completion_tokens": math.inf, "total_tokens": -math.inf,
         "prompt_tokens_details": {"cached_tokens": math.nan}, "cost": math.nan},
        Usage(invalid=("input_tokens", "cached_input_tokens", "output_tokens", "total_tokens", "upstream_cost_usd")),
        id="non-finite-floats-count-zero",
    ),
    pytest.param(
        {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None,
         "prompt_tokens_details": None, "completion_tokens_details": None},
        Usage(),
        id="all-null",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), OPENAI_CASES)
def test_from_openai(raw: dict[str, Any], expected: Usage) -> None:
    assert U.from_openai(raw) == expected
    # from_raw sends every OpenAI-shaped block here.
    assert U.from_raw(raw) == expected


def test_from_openai_service_tier_passes_through() -> None:
    got = U.from_openai({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "priority")
    assert got.service_tier == "priority" and got.total_tokens == 2


def test_groq_x_usage_is_openai_shaped() -> None:
    raw = {"queue_time": 0.037494, "prompt_tokens": 18, "prompt_time": 0.000681, "completion_tokens": 556,
           "completion_time": 0.463333, "total_tokens": 574, "total_time": 0.464014}  # fmt: skip
    assert U.from_raw(raw) == Usage(input_tokens=18, output_tokens=556, total_tokens=574)


def test_ollama_native() -> None:
    body = {"prompt_eval_count": 26, "eval_count": 282, "prompt_eval_cached_count": 10}
    assert U.from_ollama_native(body) == Usage(input_tokens=26, cached_input_tokens=10, output_tokens=282,
                                               total_tokens=308)  # fmt: skip
    assert U.from_ollama_native({"eval_count": "x"}) == Usage(invalid=("output_tokens",))


# -- Anthropic Messages -------------------------------------------------------------------------

ANTHROPIC_CASES = [
    pytest.param(
        # 12 uncached + 8000 read + 1500 written = 9512 input.
        {"input_tokens": 12, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 8000,
         "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
         "output_tokens": 250, "service_tier": "standard"},
        Usage(input_tokens=9512, cached_input_tokens=8000, cache_write_tokens=1500, cache_write_5m_tokens=1500,
              cache_write_1h_tokens=0, output_tokens=250, total_tokens=9762, service_tier="standard"),
        id="cache-read-and-write-with-split",
    ),
    pytest.param(
        # 8 uncached + 4096 written (1024 5m + 3072 1h) = 4104.
        {"input_tokens": 8, "cache_creation_input_tokens": 4096, "cache_read_input_tokens": 0,
         "cache_creation": {"ephemeral_5m_input_tokens": 1024, "ephemeral_1h_input_tokens": 3072},
         "output_tokens": 57},
        Usage(input_tokens=4104, cache_write_tokens=4096, cache_write_5m_tokens=1024, cache_write_1h_tokens=3072,
              output_tokens=57, total_tokens=4161),
        id="one-hour-split",
    ),
    pytest.param(
        {"input_tokens": 20, "output_tokens": 1},
        Usage(input_tokens=20, output_tokens=1, total_tokens=21),
        id="no-cache-no-split",
    ),
    pytest.param(
        {"input_tokens": 5, "cache_read_input_tokens": None, "cache_creation_input_tokens": None,
         "output_tokens": 3},
        Usage(input_tokens=5, output_tokens=3, total_tokens=8),
        id="null-cache-fields",
    ),
    pytest.param(
        {"input_tokens": 5, "cache_creation_input_tokens": 7, "cache_creation": {}, "output_tokens": 3},
        Usage(input_tokens=12, cache_write_tokens=7, output_tokens=3, total_tokens=15),
        id="empty-split-is-no-split",
    ),
    pytest.param(
        {"input_tokens": 5, "output_tokens": 100, "output_tokens_details": {"thinking_tokens": 40}},
        Usage(input_tokens=5, output_tokens=100, reasoning_tokens=40, total_tokens=105),
        id="thinking-details",
    ),
    pytest.param(
        {"input_tokens": "5", "cache_read_input_tokens": [3], "cache_creation": "x", "output_tokens": {},
         "output_tokens_details": 7, "service_tier": 3},
        Usage(invalid=("input_tokens", "cached_input_tokens", "output_tokens")),
        id="garbage-counts-zero",
    ),
    pytest.param(
        {"input_tokens": 5, "cache_creation_input_tokens": 2,
         "cache_creation": {"ephemeral_5m_input_tokens": "2", "ephemeral_1h_input_tokens": None},
         "output_tokens": 1},
        Usage(input_tokens=7, cache_write_tokens=2, output_tokens=1, total_tokens=8,
              invalid=("cache_write_5m_tokens",)),
        id="garbage-split-is-none",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), ANTHROPIC_CASES)
def test_from_anthropic(raw: dict[str, Any], expected: Usage) -> None:
    assert U.from_anthropic(raw) == expected


def test_from_anthropic_tier_argument_used_when_raw_has_none() -> None:
    assert U.from_anthropic({"input_tokens": 1, "output_tokens": 1}, "batch").service_tier == "batch"
    assert (
        U.from_anthropic({"input_tokens": 1, "service_tier": "priority"}, "batch").service_tier == "priority"
    )


# -- OpenAI Responses ---------------------------------------------------------------------------

RESPONSES_CASES = [
    pytest.param(
        {"input_tokens": 1850, "input_tokens_details": {"cached_tokens": 1536}, "output_tokens": 412,
         "output_tokens_details": {"reasoning_tokens": 320}, "total_tokens": 2262},
        Usage(input_tokens=1850, cached_input_tokens=1536, output_tokens=412, reasoning_tokens=320, total_tokens=2262),
        id="cached-inside-input",
    ),
    pytest.param(
        {"input_tokens": 2210, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1024},
         "output_tokens": 256, "output_tokens_details": {"reasoning_tokens": 256}, "total_tokens": 2466},
        Usage(input_tokens=2210, cache_write_tokens=1024, output_tokens=256, reasoning_tokens=256, total_tokens=2466),
        id="cache-write-all-reasoning",
    ),
    pytest.param(
        {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123},
        Usage(input_tokens=36, output_tokens=87, total_tokens=123),
        id="no-details",
    ),
    pytest.param(
        {"input_tokens": None, "input_tokens_details": None, "output_tokens": "9", "output_tokens_details": []},
        Usage(invalid=("output_tokens",)),
        id="garbage-counts-zero",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), RESPONSES_CASES)
def test_from_responses(raw: dict[str, Any], expected: Usage) -> None:
    assert U.from_responses(raw) == expected
    assert U.from_responses(raw, "flex").service_tier == "flex"


# -- telling dialects apart ---------------------------------------------------------------------

RAW_CASES = [
    pytest.param({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                 Usage(input_tokens=3, output_tokens=2, total_tokens=5), id="openai"),
    pytest.param({"prompt_cache_hit_tokens": 4, "prompt_cache_miss_tokens": 1},
                 Usage(input_tokens=5, cached_input_tokens=4, total_tokens=5), id="deepseek-only-hit-miss"),
    # Anthropic: input excludes cache, so 10 + 5 read = 15 (the Responses reading would say 10).
    pytest.param({"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 2},
                 Usage(input_tokens=15, cached_input_tokens=5, output_tokens=2, total_tokens=17), id="anthropic"),
    pytest.param({"input_tokens": 10, "cache_creation_input_tokens": 5, "output_tokens": 2},
                 Usage(input_tokens=15, cache_write_tokens=5, output_tokens=2, total_tokens=17),
                 id="anthropic-cache-write"),
    pytest.param({"input_tokens": 10, "output_tokens": 2},
                 Usage(input_tokens=10, output_tokens=2, total_tokens=12), id="anthropic-plain"),
    # Responses: details present, cached inside input.
    pytest.param({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 2,
                  "total_tokens": 12},
                 Usage(input_tokens=10, cached_input_tokens=5, output_tokens=2, total_tokens=12), id="responses"),
    pytest.param({"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
                 Usage(input_tokens=10, output_tokens=2, total_tokens=12), id="responses-total-only"),
    pytest.param({"output_tokens": 7}, Usage(output_tokens=7, total_tokens=7), id="output-only"),
    pytest.param({}, Usage(), id="empty"),
    pytest.param({"foo": 1, "bar": "x"}, Usage(), id="unknown-keys"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), RAW_CASES)
def test_from_raw(raw: dict[str, Any], expected: Usage) -> None:
    assert U.from_raw(raw) == expected


def test_from_raw_keeps_service_tier_when_nothing_is_known() -> None:
    assert U.from_raw({}, "flex") == Usage(service_tier="flex")


@pytest.mark.parametrize(
    ("raw", "anthropic"),
    [
        ({"input_tokens": 1, "cache_read_input_tokens": 0}, True),
        ({"input_tokens": 1, "cache_creation_input_tokens": 0}, True),
        ({"input_tokens": 1, "cache_creation": {}}, True),
        ({"input_tokens": 1, "output_tokens": 1}, True),
        ({"input_tokens": 1, "input_tokens_details": {}}, False),
        ({"input_tokens": 1, "total_tokens": 1}, False),
        ({"output_tokens": 1}, False),
    ],
)
def test_is_anthropic_usage(raw: dict[str, Any], anthropic: bool) -> None:
    assert U.is_anthropic_usage(raw) is anthropic


# -- Anthropic message_start + cumulative message_delta ---------------------------------------


def test_merge_anthropic_output_is_replaced_not_added() -> None:
    start = {
        "input_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    merged = U.merge_anthropic(start, {"output_tokens": 250})
    assert merged == {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": 250}  # fmt: skip
    assert U.from_anthropic(merged).output_tokens == 250  # not 251
    assert start["output_tokens"] == 1, "the message_start dict must not be mutated"


def test_merge_anthropic_null_inputs_keep_start_values() -> None:
    start = {"input_tokens": 12, "cache_read_input_tokens": 8000, "cache_creation_input_tokens": 1500,
             "output_tokens": 1}  # fmt: skip
    delta = {"input_tokens": None, "cache_read_input_tokens": None, "cache_creation_input_tokens": None,
             "output_tokens": 250}  # fmt: skip
    assert U.from_anthropic(U.merge_anthropic(start, delta)) == Usage(
        input_tokens=9512,
        cached_input_tokens=8000,
        cache_write_tokens=1500,
        output_tokens=250,
        total_tokens=9762,
    )


def test_merge_anthropic_repeated_fields_overwrite_and_split_survives() -> None:
    start = {"input_tokens": 8, "cache_creation_input_tokens": 4096, "cache_read_input_tokens": 0,
             "cache_creation": {"ephemeral_5m_input_tokens": 1024, "ephemeral_1h_input_tokens": 3072},
             "output_tokens": 3}  # fmt: skip
    delta = {
        "input_tokens": 8,
        "cache_creation_input_tokens": 4096,
        "cache_read_input_tokens": 0,
        "output_tokens": 57,
    }
    got = U.from_anthropic(U.merge_anthropic(start, delta))
    assert got == Usage(input_tokens=4104, cache_write_tokens=4096, cache_write_5m_tokens=1024,
                        cache_write_1h_tokens=3072, output_tokens=57, total_tokens=4161)  # fmt: skip


def test_merge_anthropic_delta_with_new_input_overwrites() -> None:
    merged = U.merge_anthropic(
        {"input_tokens": 5, "output_tokens": 1}, {"input_tokens": 9, "output_tokens": 4}
    )
    assert merged == {"input_tokens": 9, "output_tokens": 4}


def test_merge_anthropic_without_start() -> None:
    assert U.merge_anthropic(None, {"input_tokens": None, "output_tokens": 7}) == {"output_tokens": 7}


# -- what the upstream says about its own time -------------------------------------------------

TIMING_CASES = [
    pytest.param(
        {"timings": {"prompt_n": 24, "prompt_ms": 52.318, "prompt_per_token_ms": 2.18, "predicted_n": 48,
                     "predicted_ms": 1402.775, "predicted_per_second": 34.21789, "cache_n": 96}},
        {"prompt_ms": 52.318, "generation_ms": 1402.775, "total_ms": 1455.093, "cached_prompt_tokens": 96,
         "prompt_tokens": 24, "generation_tokens": 48, "generation_tokens_per_second": 34.218},
        id="llamacpp",
    ),
    pytest.param(
        {"timings": {"prompt_n": 24.0, "predicted_n": 48, "cache_n": 64.0}},
        {"cached_prompt_tokens": 64, "prompt_tokens": 24, "generation_tokens": 48},
        id="llamacpp-float-counts",
    ),
    pytest.param(
        {"timings": {"prompt_ms": 10.5}},
        {"prompt_ms": 10.5},
        id="llamacpp-partial-no-total",
    ),
    pytest.param(
        {"x_groq": {"id": "req_1", "usage": {"queue_time": 0.037494, "prompt_tokens": 18, "prompt_time": 0.000681,
                                             "completion_tokens": 556, "completion_time": 0.463333,
                                             "total_tokens": 574, "total_time": 0.464014}}},
        {"queue_ms": 37.494, "prompt_ms": 0.681, "generation_ms": 463.333, "total_ms": 464.014},
        id="groq-x_groq-seconds",
    ),
    pytest.param(
        {"usage": {"queue_time": 0.052891, "prompt_tokens": 45, "prompt_time": 0.004128, "completion_tokens": 120,
                   "completion_time": 0.218182, "total_tokens": 165, "total_time": 0.222309}},
        {"queue_ms": 52.891, "prompt_ms": 4.128, "generation_ms": 218.182, "total_ms": 222.309},
        id="groq-body-usage",
    ),
    pytest.param(
        {"total_duration": 5191566416, "load_duration": 2154458, "prompt_eval_count": 26,
         "prompt_eval_duration": 383809000, "eval_count": 298, "eval_duration": 4799921000},
        {"total_ms": 5191.566, "load_ms": 2.154, "prompt_ms": 383.809, "generation_ms": 4799.921},
        id="ollama-native-nanoseconds",
    ),
    pytest.param(
        {"stats": {"tokens_per_second": 51.43709529007664, "time_to_first_token": 0.111, "generation_time": 0.954,
                   "stop_reason": "eosFound"}},
        {"ttft_ms": 111.0, "generation_ms": 954.0, "generation_tokens_per_second": 51.437},
        id="lmstudio-seconds",
    ),
    pytest.param(
        {"stats": {"time_to_first_token_seconds": 0.25}},
        {"ttft_ms": 250.0},
        id="lmstudio-seconds-key",
    ),
    pytest.param({}, None, id="nothing"),
    pytest.param({"usage": {"prompt_tokens": 3, "completion_tokens": 1}}, None, id="plain-usage"),
    pytest.param({"timings": "fast", "stats": [1], "x_groq": "x"}, None, id="wrong-types"),
    pytest.param({"timings": {"prompt_ms": "12", "predicted_ms": None, "cache_n": True}}, None, id="garbage-values"),
    pytest.param({"x_groq": {"usage": {"queue_time": "soon", "total_time": None}}}, None, id="groq-garbage"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), TIMING_CASES)
def test_server_timing(body: dict[str, Any], expected: dict[str, float] | None) -> None:
    got = U.server_timing(body)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got == pytest.approx(expected)
        assert set(got) == set(expected)
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}


# -- nothing raises on anything ---------------------------------------------------------------

_KEYS = [
    "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details",
    "cached_tokens", "reasoning_tokens", "cache_write_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens",
    "cost", "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details",
    "cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation", "ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens", "thinking_tokens", "service_tier", "timings", "prompt_ms", "predicted_ms",
    "cache_n", "predicted_per_second", "x_groq", "usage", "queue_time", "prompt_time", "completion_time",
    "total_time", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "stats",
    "time_to_first_token", "generation_time", "tokens_per_second", "eval_count", "prompt_eval_count",
]  # fmt: skip

_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)  # fmt: skip
_KEY = st.sampled_from(_KEYS) | st.text(max_size=4)
JSONISH = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEY, inner, max_size=6),
    max_leaves=30,
)
DICTS = st.dictionaries(_KEY, JSONISH, max_size=10)


def _sane(u: Usage) -> None:
    for name in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
                 "total_tokens"):  # fmt: skip
        value = getattr(u, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, name
    for name in ("cache_write_5m_tokens", "cache_write_1h_tokens"):
        value = getattr(u, name)
        assert value is None or (isinstance(value, int) and value >= 0), name
    assert u.total_tokens == u.input_tokens + u.output_tokens
    # Input may add three counts (Anthropic: uncached + cache reads + cache writes), each within the bound.
    assert u.input_tokens <= 3 * U.MAX_TOKENS_PER_CALL and u.output_tokens <= 2 * U.MAX_TOKENS_PER_CALL
    cost = u.upstream_cost_usd
    assert cost is None or (math.isfinite(cost) and 0 <= cost <= 2 * U.MAX_UPSTREAM_COST_USD), cost
    assert set(u.invalid) <= set(U.FIELDS) and len(set(u.invalid)) == len(u.invalid)


@pytest.mark.slow
@settings(max_examples=50, deadline=None)
@given(raw=DICTS, other=DICTS)
def test_random_dicts_never_raise(raw: dict[str, Any], other: dict[str, Any]) -> None:
    for fn in (U.from_openai, U.from_anthropic, U.from_responses, U.from_raw):
        _sane(fn(raw))
    _sane(U.from_ollama_native(raw))
    merged = U.merge_anthropic(raw, other)
    _sane(U.from_anthropic(merged))
    assert U.merge_anthropic(None, other) is not None
    U.is_anthropic_usage(raw)
    timing = U.server_timing(raw)
    assert timing is None or all(isinstance(v, float) for v in timing.values())


def test_absurd_counts_are_garbage_not_records_lost() -> None:
    from proxy.usage import from_openai

    u = from_openai({"prompt_tokens": 1e20, "completion_tokens": 2**60, "total_tokens": 1e25})
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (0, 0, 0)
    assert u.invalid == ("input_tokens", "output_tokens", "total_tokens")


# -- hostile usage (issue 11): counts and costs an upstream reports are validated, never trusted ----

#: Values no count or charge may be believed to be: negative, non-finite, absurd, or not a number at all.
HOSTILE = [
    pytest.param(-1, id="negative"),
    pytest.param(-100.0, id="negative-float"),
    pytest.param(1e300, id="1e300"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param(math.nan, id="nan"),
    pytest.param(2**70, id="2**70"),
    pytest.param(10**400, id="10**400"),
    pytest.param("11", id="string"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param([1], id="list"),
    pytest.param({"n": 1}, id="object"),
]

# Per dialect: the path of one count in a valid block, the normalised fields it feeds (flagged when it
# is rejected), and the field that then reads 0 (None for the optional 5m/1h split).
FIELD_CASES = [
    ("openai", ("prompt_tokens",), ("input_tokens",), "input_tokens"),
    ("openai", ("completion_tokens",), ("output_tokens",), "output_tokens"),
    ("openai", ("total_tokens",), ("total_tokens",), None),
    ("openai", ("prompt_tokens_details", "cached_tokens"), ("cached_input_tokens",), "cached_input_tokens"),
    ("openai", ("prompt_tokens_details", "cache_write_tokens"), ("cache_write_tokens",), "cache_write_tokens"),
    ("openai", ("completion_tokens_details", "reasoning_tokens"), ("reasoning_tokens",), "reasoning_tokens"),
    ("deepseek", ("prompt_cache_hit_tokens",), ("cached_input_tokens",), "cached_input_tokens"),
    ("deepseek", ("prompt_cache_miss_tokens",), ("input_tokens",), None),
    ("anthropic", ("input_tokens",), ("input_tokens",), None),
    # A cache count is part of Anthropic's input total too: that total is then unknown as well.
    ("anthropic", ("cache_read_input_tokens",), ("input_tokens", "cached_input_tokens"), "cached_input_tokens"),
    ("anthropic", ("cache_creation_input_tokens",), ("input_tokens", "cache_write_tokens"), "cache_write_tokens"),
    ("anthropic", ("cache_creation", "ephemeral_5m_input_tokens"), ("cache_write_5m_tokens",),
     "cache_write_5m_tokens"),
    ("anthropic", ("cache_creation", "ephemeral_1h_input_tokens"), ("cache_write_1h_tokens",),
     "cache_write_1h_tokens"),
    ("anthropic", ("output_tokens",), ("output_tokens",), "output_tokens"),
    ("responses", ("input_tokens",), ("input_tokens",), "input_tokens"),
    ("responses", ("output_tokens",), ("output_tokens",), "output_tokens"),
    ("responses", ("input_tokens_details", "cached_tokens"), ("cached_input_tokens",), "cached_input_tokens"),
    ("responses", ("output_tokens_details", "reasoning_tokens"), ("reasoning_tokens",), "reasoning_tokens"),
    ("ollama", ("prompt_eval_count",), ("input_tokens",), "input_tokens"),
    ("ollama", ("prompt_eval_cached_count",), ("cached_input_tokens",), "cached_input_tokens"),
    ("ollama", ("eval_count",), ("output_tokens",), "output_tokens"),
]  # fmt: skip


def _valid_block(dialect: str) -> dict[str, Any]:
    if dialect == "openai":
        return {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 10},
                "completion_tokens_details": {"reasoning_tokens": 5}}  # fmt: skip
    if dialect == "deepseek":
        return {"completion_tokens": 20, "prompt_cache_hit_tokens": 40, "prompt_cache_miss_tokens": 60}
    if dialect == "anthropic":
        return {"input_tokens": 50, "cache_read_input_tokens": 40, "cache_creation_input_tokens": 10,
                "cache_creation": {"ephemeral_5m_input_tokens": 6, "ephemeral_1h_input_tokens": 4},
                "output_tokens": 20}  # fmt: skip
    if dialect == "responses":
        return {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 20,
                "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 120}  # fmt: skip
    return {"prompt_eval_count": 100, "prompt_eval_cached_count": 40, "eval_count": 20}


_PARSERS: dict[str, Callable[[dict[str, Any]], U.Usage]] = {
    "openai": U.from_openai, "deepseek": U.from_openai, "anthropic": U.from_anthropic,
    "responses": U.from_responses, "ollama": U.from_ollama_native,
}  # fmt: skip


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(("dialect", "path", "fields", "zeroed"), FIELD_CASES)
def test_hostile_count_is_flagged_and_never_trusted(dialect: str, path: tuple[str, ...], fields: tuple[str, ...],
                                                    zeroed: str | None, value: Any) -> None:  # fmt: skip
    parse = _PARSERS[dialect]
    assert parse(_valid_block(dialect)).invalid == ()
    raw = _valid_block(dialect)
    holder = raw
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    got = parse(raw)
    _sane(got)
    assert got.invalid == tuple(f for f in U.FIELDS if f in fields)
    if zeroed in ("cache_write_5m_tokens", "cache_write_1h_tokens"):
        assert getattr(got, zeroed) is None
    elif zeroed is not None:
        assert getattr(got, zeroed) == 0


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_upstream_cost_is_flagged_and_ignored(value: Any) -> None:
    base = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    got = U.from_openai({**base, "cost": value})
    assert got.upstream_cost_usd is None and got.invalid == ("upstream_cost_usd",)
    assert (got.input_tokens, got.output_tokens) == (11, 3)  # the counts beside a bad cost still hold
    # BYOK: a rejected provider part makes the whole charge unknown (the fee alone would undercount).
    byok = U.from_openai({**base, "cost": 0.5, "is_byok": True, "cost_details": {"upstream_inference_cost": value}})
    assert byok.upstream_cost_usd is None and byok.invalid == ("upstream_cost_usd",)


def test_bounds_are_inclusive_and_documented_values() -> None:
    assert U.MAX_TOKENS_PER_CALL == 100_000_000 and U.MAX_UPSTREAM_COST_USD == 10_000.0
    top = U.MAX_TOKENS_PER_CALL
    assert U.from_openai({"prompt_tokens": top, "completion_tokens": top}).invalid == ()
    assert U.from_openai({"prompt_tokens": top + 1}).invalid == ("input_tokens",)
    assert U.from_openai({"prompt_tokens": float(top) + 1.0}).invalid == ("input_tokens",)
    assert U.from_openai({"prompt_tokens": 1, "cost": 10_000}).upstream_cost_usd == 10_000.0
    assert U.from_openai({"prompt_tokens": 1, "cost": 10_000.01}).invalid == ("upstream_cost_usd",)
    # OpenRouter BYOK: fee + provider part, and the sum is held to the same bound.
    over = {"prompt_tokens": 1, "cost": 6000, "is_byok": True, "cost_details": {"upstream_inference_cost": 6000}}
    assert U.from_openai(over).invalid == ("upstream_cost_usd",)
    # A free call is a valid charge; a negative zero is written as a plain 0.
    zero = U.from_openai({"prompt_tokens": 1, "cost": -0.0})
    assert zero.upstream_cost_usd == 0.0 and math.copysign(1, zero.upstream_cost_usd) == 1.0 and not zero.invalid
    assert U.valid_count(7.0) == 7 and U.valid_count(7.9) == 7 and U.valid_count(-0.0) == 0
    assert U.valid_cost(0) == 0.0 and isinstance(U.valid_cost(0), float)


def test_absent_or_null_fields_are_not_invalid() -> None:
    raw = {"prompt_tokens": 5, "completion_tokens": None, "total_tokens": None, "cost": None,
           "prompt_tokens_details": None, "completion_tokens_details": {"reasoning_tokens": None}}  # fmt: skip
    assert U.from_openai(raw) == Usage(input_tokens=5, total_tokens=5)
    assert U.from_anthropic({"input_tokens": 5, "cache_read_input_tokens": None, "cache_creation": None}).invalid == ()


def test_thinking_tokens_are_not_derived_from_a_rejected_count() -> None:
    # Gemini's hidden thinking tokens are total - prompt - completion: with prompt rejected as -5 that
    # difference means nothing, so output stays the reported completion count.
    got = U.from_openai({"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": 1000})
    assert (got.output_tokens, got.reasoning_tokens, got.invalid) == (3, 0, ("input_tokens",))


def test_service_tier_is_bounded() -> None:
    # A tier is a short word; a huge string would otherwise be copied into every record.
    assert U.from_anthropic({"input_tokens": 1, "service_tier": "x" * 4_000_000}).service_tier is None
    assert U.from_openai({"prompt_tokens": 1}, "y" * 1000).service_tier is None
    assert U.from_openai({"prompt_tokens": 1}, "priority").service_tier == "priority"


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(raw=DICTS)
def test_random_blocks_never_yield_untrusted_numbers(raw: dict[str, Any]) -> None:
    for fn in (U.from_openai, U.from_anthropic, U.from_responses, U.from_raw, U.from_ollama_native):
        got = fn(raw)
        _sane(got)
        fixed = U.with_estimates(got, 9, 3)
        _sane(fixed)
        assert not ({"input_tokens", "output_tokens"} & set(got.invalid)) or fixed.total_tokens > 0


# -- replacing rejected counts by the proxy's estimate --------------------------------------------


def test_with_estimates_replaces_rejected_input_and_output() -> None:
    got = U.with_estimates(U.from_openai({"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": 14}), 9, 4)
    assert (got.input_tokens, got.output_tokens, got.total_tokens) == (9, 3, 12)
    assert got.invalid == ("input_tokens",)  # still says what the upstream got wrong
    got = U.with_estimates(U.from_openai({"prompt_tokens": 11, "completion_tokens": 1e300}), 9, 4)
    assert (got.input_tokens, got.output_tokens, got.total_tokens) == (11, 4, 15)


def test_with_estimates_keeps_valid_usage_as_it_is() -> None:
    valid = U.from_openai({"prompt_tokens": 11, "completion_tokens": 3, "cost": -1})
    assert U.with_estimates(valid, 9, 4) is valid  # only a rejected cost: no count to replace
    clean = U.from_openai({"prompt_tokens": 11, "completion_tokens": 3})
    assert U.with_estimates(clean, 9, 4) is clean


def test_with_estimates_never_goes_below_the_valid_parts() -> None:
    # Anthropic: the uncached count is garbage but 5000 cache reads are known, so input is at least that.
    raw = {"input_tokens": -1, "cache_read_input_tokens": 5000, "output_tokens": "x",
           "output_tokens_details": {"reasoning_tokens": 40}}  # fmt: skip
    got = U.with_estimates(U.from_anthropic(raw), 9, 4)
    assert (got.input_tokens, got.cached_input_tokens, got.output_tokens, got.reasoning_tokens) == (5000, 5000, 40, 40)
    assert got.total_tokens == 5040
    assert U.with_estimates(U.from_anthropic({"input_tokens": -1}), -3, -3).input_tokens == 0


# -- usage_raw in the record: bounded -----------------------------------------------------------


def test_bounded_raw_keeps_small_blocks_verbatim() -> None:
    assert U.bounded_raw(None) is None
    raw = {"prompt_tokens": 11, "completion_tokens": 3, "note": "n" * 1000, "cost": -100}
    assert U.bounded_raw(raw) is raw
    at_cap = {"pad": ""}
    at_cap["pad"] = "x" * (U.USAGE_RAW_MAX_BYTES - len(orjson.dumps(at_cap)))
    assert len(orjson.dumps(at_cap)) == U.USAGE_RAW_MAX_BYTES and U.bounded_raw(at_cap) is at_cap


def test_bounded_raw_cuts_a_4mb_string_and_keeps_the_counts() -> None:
    raw: dict[str, Any] = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14, "pad": "x" * (4 << 20)}
    size = len(orjson.dumps(raw))
    got = U.bounded_raw(raw)
    assert got is not None and len(orjson.dumps(got)) <= U.USAGE_RAW_MAX_BYTES
    assert got["_truncated"] is True and got["bytes"] == size
    assert (got["prompt_tokens"], got["completion_tokens"], got["total_tokens"]) == (11, 3, 14)
    assert got["pad"].startswith("x" * U.USAGE_RAW_MAX_STRING) and got["pad"].endswith(f"...({4 << 20} chars)")
    assert len(raw["pad"]) == 4 << 20  # the meter's copy is not touched


def test_bounded_raw_one_byte_over_is_truncated() -> None:
    raw = {"pad": ""}
    raw["pad"] = "x" * (U.USAGE_RAW_MAX_BYTES - len(orjson.dumps(raw)) + 1)
    got = U.bounded_raw(raw)
    assert got is not None and got["_truncated"] is True and got["bytes"] == U.USAGE_RAW_MAX_BYTES + 1


def test_bounded_raw_too_many_keys_leaves_only_the_note() -> None:
    raw = {f"k{i}": i for i in range(5000)}
    assert U.bounded_raw(raw) == {"_truncated": True, "bytes": len(orjson.dumps(raw))}
    huge_key = {"k" * (1 << 20): 1, "prompt_tokens": 2}
    got = U.bounded_raw(huge_key)
    assert got is not None and got["prompt_tokens"] == 2 and len(orjson.dumps(got)) <= U.USAGE_RAW_MAX_BYTES


def test_bounded_raw_of_what_orjson_cannot_write() -> None:
    # orjson reads 1024 levels but writes 255: a record holding such a block could not be written at all.
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    got = U.bounded_raw({"prompt_tokens": 11, "deep": deep, "big": 2**70})
    assert got is not None and got["_truncated"] is True and got["bytes"] is None and got["prompt_tokens"] == 11
    assert got["big"] == float(2**70)
    assert len(orjson.dumps(got)) <= U.USAGE_RAW_MAX_BYTES


# -- settle: the usage a record shows -------------------------------------------------------------


@pytest.mark.parametrize(
    ("reported", "final", "billed", "expected", "source"),
    [
        (U.Usage(input_tokens=10, output_tokens=2, total_tokens=12), True, True, (10, 2), "upstream"),
        # A stream cut before its final usage: input as reported, output from the 40 characters seen.
        (U.Usage(input_tokens=10, output_tokens=1, total_tokens=11), False, True, (10, 10), "estimated"),
        (None, True, True, (9, 10), "estimated"),  # billed, nothing reported: both estimated
        (None, True, False, (0, 0), "none"),  # refused or failed before the upstream answered
    ],
)
def test_settle(reported: U.Usage | None, final: bool, billed: bool, expected: tuple[int, int], source: str) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}]}
    usage, got_source = U.settle(reported, final=final, output_chars=40, request=request, billed=billed)
    assert (usage.input_tokens, usage.output_tokens) == expected and got_source == source
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens or got_source == "upstream"


def test_bounded_raw_drops_nesting_past_eight_levels() -> None:
    """The documented depth bound of a shortened block (its own constant, not the text walker's 32)."""
    deep: dict[str, Any] = {"pad": "x" * (U.USAGE_RAW_MAX_BYTES + 1)}
    cur = deep
    for _ in range(12):
        cur["n"] = {}
        cur = cur["n"]
    out = U.bounded_raw(deep)
    assert out is not None and out["_truncated"] is True
    levels = 0
    node_any: Any = out
    while isinstance(node_any, dict) and "n" in node_any:
        node_any, levels = node_any["n"], levels + 1
    assert levels == 8 and node_any == "...(nested too deep)"
