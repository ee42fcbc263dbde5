"""Pricing: matching, the per-wire-format cost formula, custom prices, table loading and updates.

Expected costs are worked out by hand from the bundled proxy/data/model_prices.json (USD per token);
each case's comment shows the arithmetic with the rates read from that key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.config import ConfigError, CustomPrice
from proxy.config import custom_prices as parse_custom_prices
from proxy.config import price_cache_path as cache_path
from proxy.prices_cmd import DEFAULT_PRICES_URL, lookup_text, update_prices
from proxy.pricing import BUNDLED_PRICES, Cost, PriceBook
from proxy.usage import MAX_TOKENS_PER_CALL, Usage, from_anthropic, from_openai
from tests.conftest import make_client

LOGGER = "metering_proxy.pricing"


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load(BUNDLED_PRICES)


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    return orjson.loads(BUNDLED_PRICES.read_bytes())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the real user cache; talk to the local test server directly."""
    monkeypatch.setenv("METERING_PROXY_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _price(book: PriceBook, usage: Usage, model: str | None, **kw: Any) -> Cost:
    args: dict[str, Any] = {"requested_model": None, "upstream": "up", "provider": None, "dialect": "chat"}
    args.update(kw)
    return book.price(usage, model=model, **args)


def approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-9, abs=1e-12)


# (id, usage, price() keywords, expected cost_usd, expected breakdown, expected price_model)
COST_CASES = [
    (
        "openai-gpt-4o-cached",
        # gpt-4o: input 2.5e-06, cache_read 1.25e-06, output 1e-05
        # (2000-1024)*2.5e-6 = 0.00244; 1024*1.25e-6 = 0.00128; 500*1e-5 = 0.005 -> 0.00872
        from_openai(
            {
                "prompt_tokens": 2000,
                "completion_tokens": 500,
                "total_tokens": 2500,
                "prompt_tokens_details": {"cached_tokens": 1024},
            }
        ),
        {"model": "gpt-4o-2024-08-06", "provider": "openai"},
        0.00872,
        {"input": 0.00244, "cached_input": 0.00128, "cache_write": 0.0, "output": 0.005},
        "gpt-4o-2024-08-06",
    ),
    (
        "anthropic-native-5m-and-1h-writes",
        # claude-sonnet-4-5-20250929: input 3e-06, cache_read 3e-07, cache_creation 3.75e-06,
        # cache_creation_above_1hr 6e-06, output 1.5e-05. Native: 12 uncached + 8000 read + 3000 written.
        # 12*3e-6 = 0.000036; 8000*3e-7 = 0.0024; 1000*3.75e-6 + 2000*6e-6 = 0.00375 + 0.012 = 0.01575;
        # 250*1.5e-5 = 0.00375 -> 0.021936
        from_anthropic(
            {
                "input_tokens": 12,
                "cache_read_input_tokens": 8000,
                "cache_creation_input_tokens": 3000,
                "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                "output_tokens": 250,
            }
        ),
        {"model": "claude-sonnet-4-5-20250929", "provider": "anthropic", "dialect": "messages"},
        0.021936,
        {"input": 0.000036, "cached_input": 0.0024, "cache_write": 0.01575, "output": 0.00375},
        "claude-sonnet-4-5-20250929",
    ),
    (
        "anthropic-split-unknown-all-5m",
        # Same rates; no cache_creation split, so all 3000 writes at 3.75e-06 = 0.01125;
        # 0.000036 + 0.0024 + 0.01125 + 0.00375 = 0.017436
        from_anthropic(
            {
                "input_tokens": 12,
                "cache_read_input_tokens": 8000,
                "cache_creation_input_tokens": 3000,
                "output_tokens": 250,
            }
        ),
        {"model": "claude-sonnet-4-5", "dialect": "messages"},
        0.017436,
        {"input": 0.000036, "cached_input": 0.0024, "cache_write": 0.01125, "output": 0.00375},
        "claude-sonnet-4-5",
    ),
    (
        "deepseek-hit-miss",
        # deepseek/deepseek-chat (prefixed key tried first): input 2.8e-07, cache_read 2.8e-08, output 4.2e-07
        # 128 miss*2.8e-7 = 0.00003584; 896 hit*2.8e-8 = 0.000025088; 300*4.2e-7 = 0.000126 -> 0.000186928
        from_openai(
            {
                "prompt_tokens": 1024,
                "completion_tokens": 300,
                "total_tokens": 1324,
                "prompt_cache_hit_tokens": 896,
                "prompt_cache_miss_tokens": 128,
            }
        ),
        {"model": "deepseek-chat", "provider": "deepseek"},
        0.000186928,
        {"input": 0.00003584, "cached_input": 0.000025088, "cache_write": 0.0, "output": 0.000126},
        "deepseek/deepseek-chat",
    ),
    (
        "gemini-over-200k",
        # gemini/gemini-2.5-pro above 200k: input 2.5e-06, cache_read 2.5e-07, output 1.5e-05
        # (250000-50000)*2.5e-6 = 0.5; 50000*2.5e-7 = 0.0125; 2000*1.5e-5 = 0.03 -> 0.5425
        from_openai(
            {
                "prompt_tokens": 250000,
                "completion_tokens": 2000,
                "total_tokens": 252000,
                "prompt_tokens_details": {"cached_tokens": 50000},
            }
        ),
        {"model": "gemini-2.5-pro", "provider": "gemini"},
        0.5425,
        {"input": 0.5, "cached_input": 0.0125, "cache_write": 0.0, "output": 0.03},
        "gemini/gemini-2.5-pro",
    ),
    (
        "gemini-at-200k-is-base-tier",
        # Exactly 200000 is not over the threshold: 200000*1.25e-6 = 0.25; 1000*1e-5 = 0.01 -> 0.26
        Usage(input_tokens=200000, output_tokens=1000, total_tokens=201000),
        {"model": "gemini-2.5-pro", "provider": "gemini"},
        0.26,
        {"input": 0.25, "cached_input": 0.0, "cache_write": 0.0, "output": 0.01},
        "gemini/gemini-2.5-pro",
    ),
    (
        "gemini-thinking-in-total-only",
        # Gemini's OpenAI endpoint: thinking only in total_tokens, output = 103 - 9 = 94 (usage.py).
        # gemini/gemini-2.5-pro: 9*1.25e-6 = 0.00001125; 94*1e-5 = 0.00094 -> 0.00095125
        from_openai({"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 103}),
        {"model": "gemini-2.5-pro", "provider": "gemini"},
        0.00095125,
        {"input": 0.00001125, "cached_input": 0.0, "cache_write": 0.0, "output": 0.00094},
        "gemini/gemini-2.5-pro",
    ),
    (
        "reasoning-o3",
        # o3: input 2e-06, output 8e-06; 1500 output tokens of which 1200 reasoning, all at the output rate
        # 1000*2e-6 = 0.002; 1500*8e-6 = 0.012 -> 0.014
        from_openai(
            {
                "prompt_tokens": 1000,
                "completion_tokens": 1500,
                "total_tokens": 2500,
                "completion_tokens_details": {"reasoning_tokens": 1200},
            }
        ),
        {"model": "o3", "provider": "openai"},
        0.014,
        {"input": 0.002, "cached_input": 0.0, "cache_write": 0.0, "output": 0.012},
        "o3",
    ),
    (
        "embeddings-input-only",
        # text-embedding-3-small: input 2e-08; 10000*2e-8 = 0.0002 (output never billed)
        from_openai({"prompt_tokens": 10000, "total_tokens": 10000}),
        {"model": "text-embedding-3-small", "dialect": "embeddings"},
        0.0002,
        {"input": 0.0002, "cached_input": 0.0, "cache_write": 0.0, "output": 0.0},
        "text-embedding-3-small",
    ),
    (
        "embeddings-ignore-cache-and-output-fields",
        # A server that reports odd fields on /embeddings: all 10000 input tokens at 2e-08 = 0.0002, rest 0
        Usage(input_tokens=10000, cached_input_tokens=2000, output_tokens=5),
        {"model": "text-embedding-3-small", "dialect": "embeddings"},
        0.0002,
        {"input": 0.0002, "cached_input": 0.0, "cache_write": 0.0, "output": 0.0},
        "text-embedding-3-small",
    ),
    (
        "priority-tier",
        # gpt-4o priority: input 4.25e-06, cache_read 2.125e-06, output 1.7e-05
        # 500*4.25e-6 = 0.002125; 500*2.125e-6 = 0.0010625; 100*1.7e-5 = 0.0017 -> 0.0048875
        Usage(input_tokens=1000, cached_input_tokens=500, output_tokens=100, service_tier="priority"),
        {"model": "gpt-4o"},
        0.0048875,
        {"input": 0.002125, "cached_input": 0.0010625, "cache_write": 0.0, "output": 0.0017},
        "gpt-4o",
    ),
    (
        "flex-tier",
        # o3 flex: input 1e-06, output 4e-06; 1000*1e-6 + 1000*4e-6 = 0.005
        Usage(input_tokens=1000, output_tokens=1000, service_tier="flex"),
        {"model": "o3"},
        0.005,
        {"input": 0.001, "cached_input": 0.0, "cache_write": 0.0, "output": 0.004},
        "o3",
    ),
    (
        "batch-tier",
        # claude-sonnet-4-5 batches: input 1.5e-06, output 7.5e-06; 1000*1.5e-6 + 1000*7.5e-6 = 0.009
        Usage(input_tokens=1000, output_tokens=1000, service_tier="batch"),
        {"model": "claude-sonnet-4-5"},
        0.009,
        {"input": 0.0015, "cached_input": 0.0, "cache_write": 0.0, "output": 0.0075},
        "claude-sonnet-4-5",
    ),
    (
        "tier-missing-falls-back",
        # claude-sonnet-4-5 has no *_priority keys: normal rates 1000*3e-6 + 1000*1.5e-5 = 0.018
        Usage(input_tokens=1000, output_tokens=1000, service_tier="priority"),
        {"model": "claude-sonnet-4-5"},
        0.018,
        {"input": 0.003, "cached_input": 0.0, "cache_write": 0.0, "output": 0.015},
        "claude-sonnet-4-5",
    ),
    (
        "provider-prefix-differs",
        # fireworks_ai/deepseek-v4-flash (1.4e-07 / 2.8e-07), not bare deepseek-v4-flash (3e-07 / 1.2e-06):
        # 1000*1.4e-7 = 0.00014; 1000*2.8e-7 = 0.00028 -> 0.00042
        Usage(input_tokens=1000, output_tokens=1000),
        {"model": "deepseek-v4-flash", "provider": "fireworks"},
        0.00042,
        {"input": 0.00014, "cached_input": 0.0, "cache_write": 0.0, "output": 0.00028},
        "fireworks_ai/deepseek-v4-flash",
    ),
    (
        "requested-model-fallback",
        # model unknown, requested_model gpt-4o-mini: 1000*1.5e-7 = 0.00015; 1000*6e-7 = 0.0006 -> 0.00075
        Usage(input_tokens=1000, output_tokens=1000),
        {"model": "my-private-deployment", "requested_model": "gpt-4o-mini"},
        0.00075,
        {"input": 0.00015, "cached_input": 0.0, "cache_write": 0.0, "output": 0.0006},
        "gpt-4o-mini",
    ),
]


@pytest.mark.parametrize(
    ("usage", "kw", "cost", "breakdown", "price_model"),
    [pytest.param(*case[1:], id=case[0]) for case in COST_CASES],
)
def test_cost(
    book: PriceBook, usage: Usage, kw: dict[str, Any], cost: float, breakdown: dict[str, float], price_model: str
) -> None:
    kw = dict(kw)
    got = _price(book, usage, kw.pop("model"), **kw)
    assert got.cost_usd == approx(cost)
    assert got.cost_source == "price_table"
    assert got.price_model == price_model
    assert got.breakdown is not None and got.breakdown.keys() == breakdown.keys()
    for key, value in breakdown.items():
        assert got.breakdown[key] == approx(value), key
    assert got.upstream_cost_usd is None


def test_rates_match_the_table(table: dict[str, Any]) -> None:
    # Guard the hand arithmetic above: these are the rates it used.
    assert table["gpt-4o"]["input_cost_per_token"] == 2.5e-06
    assert table["gpt-4o"]["input_cost_per_token_priority"] == 4.25e-06
    assert table["claude-sonnet-4-5-20250929"]["cache_creation_input_token_cost_above_1hr"] == 6e-06
    assert table["deepseek/deepseek-chat"]["cache_read_input_token_cost"] == 2.8e-08
    assert table["gemini/gemini-2.5-pro"]["input_cost_per_token_above_200k_tokens"] == 2.5e-06
    assert table["text-embedding-3-small"]["input_cost_per_token"] == 2e-08


def test_openrouter_upstream_cost_wins_breakdown_still_ours(book: PriceBook) -> None:
    # OpenRouter says 0.0042. Ours for gpt-4o: 1000*2.5e-6 = 0.0025 input; 100*1e-5 = 0.001 output.
    usage = from_openai(
        {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100, "cost": 0.0042}
    )
    got = _price(book, usage, "openai/gpt-4o", upstream="openrouter", provider="openrouter")
    assert got.cost_usd == 0.0042
    assert got.cost_source == "upstream"
    assert got.upstream_cost_usd == 0.0042
    assert got.price_model == "gpt-4o"
    assert got.breakdown == {
        "input": approx(0.0025),
        "cached_input": 0.0,
        "cache_write": 0.0,
        "output": approx(0.001),
    }


def test_upstream_cost_for_a_model_we_do_not_know(book: PriceBook, caplog: pytest.LogCaptureFixture) -> None:
    usage = Usage(input_tokens=194, output_tokens=2, upstream_cost_usd=0.95)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = _price(book, usage, "anthropic/claude-sonnet-4.5", provider="openrouter")
    assert got == Cost(0.95, "upstream", None, None, 0.95)
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_unknown_model_is_null_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    fresh = PriceBook.load(BUNDLED_PRICES)
    usage = Usage(input_tokens=100, output_tokens=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = _price(fresh, usage, "totally-unknown-model-x")
        second = _price(fresh, usage, "totally-unknown-model-x")
    assert first == second == Cost(None, None, None, None, None)
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert "totally-unknown-model-x" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("model", "provider", "key"),
    [
        ("gpt-4o", None, "gpt-4o"),
        ("GPT-4o", None, "gpt-4o"),
        ("openai/gpt-4o", None, "gpt-4o"),
        ("gpt-4o", "openai", "gpt-4o"),
        ("gpt-4o-2024-08-06", None, "gpt-4o-2024-08-06"),  # the dated key exists itself
        ("gpt-4o-2099-01-01", None, "gpt-4o"),  # -YYYY-MM-DD
        ("claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5-20250929"),
        ("claude-sonnet-4-5-20991231", None, "claude-sonnet-4-5"),  # -YYYYMMDD
        ("claude-sonnet-4-5@20250929", None, "claude-sonnet-4-5"),  # Vertex '@' boundary
        ("claude-sonnet-4-5-latest", None, "claude-sonnet-4-5"),
        ("gpt-4o-mini-0718", None, "gpt-4o-mini"),  # -MMDD
        ("claude-sonnet-4-5-20250929-v9:0", None, "claude-sonnet-4-5-20250929"),  # Bedrock '-vN:M'
        ("claude-sonnet-4-5-20991231-v9:0", None, "claude-sonnet-4-5"),  # both tails, one at a time
        ("gemini-2.5-pro-002", None, "gemini-2.5-pro"),  # Google '-00N' version
        ("openai/gpt-oss-120b", "groq", "groq/openai/gpt-oss-120b"),
        ("models/gemini-2.5-pro", "gemini", "gemini/gemini-2.5-pro"),
        ("deepseek-v4-flash", None, "deepseek-v4-flash"),
        ("deepseek-v4-flash", "fireworks_ai", "fireworks_ai/deepseek-v4-flash"),
    ],
)
def test_match(book: PriceBook, model: str, provider: str | None, key: str | None) -> None:
    hit = book.match(model, provider=provider)
    assert (hit[0] if hit else None) == key


@pytest.mark.parametrize(
    "model",
    ["gpt-4o-minix", "gpt-4oo", "claude-sonnet-4-5x", "xgpt-4o", "gpt-4o-mini-x", "", "sample_spec"],
)
def test_near_misses_do_not_match(book: PriceBook, model: str) -> None:
    assert book.match(model) is None


def test_groq_hint_without_a_groq_key(book: PriceBook) -> None:
    # Table quirk: no groq/llama-3.3-70b-versatile in this snapshot; another host's key must not stand in.
    assert book.match("llama-3.3-70b-versatile", provider="groq") is None


def test_match_is_memoised(book: PriceBook) -> None:
    assert book.match("gpt-4o-2099-01-01") is book.match("gpt-4o-2099-01-01")


CUSTOM = [
    {"model": "llama*", "input": 0, "output": 0},
    {"model": "gpt-4o*", "input": 2, "output": 8},
    {"model": "gpt-4o", "upstream": "azure", "input": 1.5, "cached_input": 0.5, "output": 6},
]


@pytest.mark.parametrize(
    ("model", "upstream", "cost", "breakdown", "price_model"),
    [
        # local model at 0: nothing billed
        (
            "llama3.1:8b",
            "ollama",
            0.0,
            {"input": 0.0, "cached_input": 0.0, "cache_write": 0.0, "output": 0.0},
            "custom:llama*",
        ),
        # azure-scoped beats the earlier unscoped glob: 800000*1.5/1e6 = 1.2; 200000*0.5/1e6 = 0.1;
        # 100000*6/1e6 = 0.6 -> 1.9
        (
            "gpt-4o",
            "azure",
            1.9,
            {"input": 1.2, "cached_input": 0.1, "cache_write": 0.0, "output": 0.6},
            "custom:gpt-4o",
        ),
        # elsewhere the glob applies, cached_input unset = input rate: 800000*2/1e6 = 1.6; 200000*2/1e6 = 0.4;
        # 100000*8/1e6 = 0.8 -> 2.8 (custom beats the table's gpt-4o-2024-08-06)
        (
            "gpt-4o-2024-08-06",
            "openai",
            2.8,
            {"input": 1.6, "cached_input": 0.4, "cache_write": 0.0, "output": 0.8},
            "custom:gpt-4o*",
        ),
    ],
)
def test_custom_prices(model: str, upstream: str, cost: float, breakdown: dict, price_model: str) -> None:
    custom_book = PriceBook.load(BUNDLED_PRICES, custom=parse_custom_prices(CUSTOM))
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=200_000, output_tokens=100_000)
    got = _price(custom_book, usage, model, upstream=upstream)
    assert got.cost_usd == approx(cost)
    assert got.cost_source == "custom"
    assert got.price_model == price_model
    assert got.breakdown == {k: approx(v) for k, v in breakdown.items()}


def test_custom_cache_write_and_requested_model() -> None:
    custom = parse_custom_prices([{"model": "house-*", "input": 1, "cache_write": 1.25, "output": 4}])
    custom_book = PriceBook.load(BUNDLED_PRICES, custom=custom)
    # 100 uncached*1/1e6 = 0.0001; 300 read at input rate = 0.0003; 600 written*1.25/1e6 = 0.00075;
    # 50*4/1e6 = 0.0002 -> 0.00135; matched on requested_model since the answered model is unknown
    usage = Usage(input_tokens=1000, cached_input_tokens=300, cache_write_tokens=600, output_tokens=50)
    got = _price(custom_book, usage, "unknown-model", requested_model="house-large")
    assert got.cost_usd == approx(0.00135)
    assert got.price_model == "custom:house-*"


def test_parse_custom_prices_ok() -> None:
    assert parse_custom_prices(None) == ()
    assert parse_custom_prices(CUSTOM)[2] == CustomPrice("gpt-4o", "azure", 1.5, 0.5, None, 6.0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": "x"}, "prices.custom: must be a list"),
        (["x"], "prices.custom[0]: must be a mapping"),
        (
            [{"model": "a", "input": 1, "output": 1}, {"model": "b", "input": 1, "outptu": 1}],
            "prices.custom[1].outptu: unknown key",
        ),
        ([{"input": 1, "output": 1}], "prices.custom[0].model:"),
        ([{"model": "", "input": 1, "output": 1}], "prices.custom[0].model:"),
        ([{"model": "a", "upstream": 3, "input": 1, "output": 1}], "prices.custom[0].upstream:"),
        ([{"model": "a", "output": 1}], "prices.custom[0].input: must be a number >= 0"),
        ([{"model": "a", "input": 1, "output": -1}], "prices.custom[0].output: must be a number >= 0"),
        ([{"model": "a", "input": 1, "output": "2"}], "prices.custom[0].output: must be a number >= 0"),
        ([{"model": "a", "input": True, "output": 1}], "prices.custom[0].input: must be a number >= 0"),
        ([{"model": "a", "input": 1, "output": 1, "cached_input": "x"}], "prices.custom[0].cached_input:"),
        (
            [{"model": "a", "input": 1, "output": 1, "cache_write": float("nan")}],
            "prices.custom[0].cache_write:",
        ),
    ],
)
def test_parse_custom_prices_errors(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_custom_prices(raw)
    assert str(excinfo.value).startswith(f"config: {message}")


def test_lookup_text(book: PriceBook) -> None:
    text = lookup_text(book, "claude-sonnet-4-5-20991231")
    assert "'claude-sonnet-4-5'" in text
    for line in (
        "input          $3",
        "cached input   $0.3",
        "cache write    $3.75",
        "cache write 1h $6",
        "output         $15",
    ):
        assert line in text
    assert "input_cost_per_token_batches: $1.5" in text
    gemini = lookup_text(book, "gemini-2.5-pro", provider="gemini")
    assert "input_cost_per_token_above_200k_tokens: $2.5" in gemini
    missing = lookup_text(book, "gpt-4o-minix")
    assert "no price" in missing and "gpt-4o-mini" in missing.split("close table keys:")[1]
    custom_book = PriceBook.load(BUNDLED_PRICES, custom=parse_custom_prices(CUSTOM))
    scoped = lookup_text(custom_book, "gpt-4o", upstream="azure")
    assert "custom price 'gpt-4o' for upstream azure" in scoped and "cached input $0.5" in scoped
    assert "beats table key 'gpt-4o'" in scoped


# --- loading order -------------------------------------------------------------------------------


def _small_table(input_rate: float) -> dict[str, Any]:
    """A table update_prices would accept: 101 priced chat models plus a marker model."""
    data: dict[str, Any] = {
        f"model-{i}": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
        for i in range(101)
    }
    data["marker"] = {"mode": "chat", "input_cost_per_token": input_rate, "output_cost_per_token": 0.0}
    return data


def _marker_rate(loaded: PriceBook) -> float | None:
    hit = loaded.match("marker")
    return hit[1]["input_cost_per_token"] if hit else None


def test_cache_path_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_path() == tmp_path / "user-cache" / "model_prices.json"
    monkeypatch.delenv("METERING_PROXY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "metering-proxy" / "model_prices.json"
    assert DEFAULT_PRICES_URL.endswith("/model_prices_and_context_window.json")


def test_load_bundled_when_no_cache() -> None:
    loaded = PriceBook.load()
    assert loaded.source == str(BUNDLED_PRICES)
    assert loaded.match("gpt-4o") is not None


def test_load_newer_cache_wins_older_loses() -> None:
    cached = cache_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(orjson.dumps(_small_table(7e-6)))
    bundled_mtime = BUNDLED_PRICES.stat().st_mtime
    os.utime(cached, (bundled_mtime + 100, bundled_mtime + 100))
    newer = PriceBook.load()
    assert newer.source == str(cached) and _marker_rate(newer) == 7e-6
    os.utime(cached, (bundled_mtime - 100, bundled_mtime - 100))
    older = PriceBook.load()
    assert older.source == str(BUNDLED_PRICES) and _marker_rate(older) is None


def test_load_broken_newer_cache_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    cached = cache_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'{"truncated": ')
    bundled_mtime = BUNDLED_PRICES.stat().st_mtime
    os.utime(cached, (bundled_mtime + 100, bundled_mtime + 100))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = PriceBook.load()
    assert loaded.source == str(BUNDLED_PRICES)
    assert any("ignoring refreshed price table" in r.getMessage() for r in caplog.records)


def test_load_explicit_path_beats_cache(tmp_path: Path) -> None:
    cached = cache_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(orjson.dumps(_small_table(7e-6)))
    mine = tmp_path / "mine.json"
    mine.write_bytes(orjson.dumps({"marker": {"input_cost_per_token": 5e-6, "output_cost_per_token": 0}}))
    loaded = PriceBook.load(mine)
    assert loaded.source == str(mine) and _marker_rate(loaded) == 5e-6


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"sample_spec": {"input_cost_per_token": 0}}', "no model with"),
    ],
)
def test_load_explicit_path_errors_name_the_file(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "prices.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        PriceBook.load(path)
    assert str(path) in str(excinfo.value) and reason in str(excinfo.value)


# --- update against a real local HTTP server --------------------------------------------------------


@pytest.fixture
async def table_server(aiohttp_server: Any) -> Any:
    good = orjson.dumps(_small_table(3e-6))

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "good":
            return web.Response(body=good, content_type="application/json")
        if name == "too-small":
            return web.json_response({"gpt-4o": {"mode": "chat", "input_cost_per_token": 2.5e-6}})
        if name == "html":
            return web.Response(text="<html>rate limited</html>", content_type="text/html")
        return web.Response(status=404, text="no such table")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    return await aiohttp_server(app)


async def test_update_writes_a_valid_table(table_server: Any) -> None:
    ok, message = await asyncio.to_thread(update_prices, str(table_server.make_url("/good")), None, 10.0)
    assert ok, message
    dest = cache_path()
    assert "updated" in message and str(dest) in message
    assert _marker_rate(PriceBook.load(dest)) == 3e-6
    # A fresh download is newer than the bundled table, so the default load now picks it up.
    assert PriceBook.load().source == str(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["model_prices.json"]  # no temp file left


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/too-small", "only 1 priced chat models (need more than 100)"),
        ("/html", "not valid JSON"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_update_failure_keeps_the_old_table(
    table_server: Any, tmp_path: Path, path: str, reason: str
) -> None:
    dest = tmp_path / "custom-dir" / "model_prices.json"
    dest.parent.mkdir()
    dest.write_bytes(b"OLD")
    ok, message = await asyncio.to_thread(update_prices, str(table_server.make_url(path)), dest, 10.0)
    assert not ok
    assert reason in message and f"kept {dest}" in message
    assert dest.read_bytes() == b"OLD"
    assert [p.name for p in dest.parent.iterdir()] == ["model_prices.json"]


async def test_update_unreachable_says_why(tmp_path: Path, unused_tcp_port: int) -> None:
    ok, message = await asyncio.to_thread(update_prices, f"http://127.0.0.1:{unused_tcp_port}/x", None, 5.0)
    assert not ok and "cannot fetch" in message and "kept the bundled table" in message
    assert not cache_path().exists()


# -- end to end: the cost lands in the JSONL record ------------------------------------------------


@pytest.fixture(scope="module")
def bundled_book() -> PriceBook:
    return PriceBook.load(BUNDLED_PRICES)


async def test_e2e_nonstream_and_stream_cost(make_proxy: Any, bundled_book: PriceBook) -> None:
    proxy = await make_proxy(pricebook=bundled_book)
    c = make_client(proxy, run_id="cost")
    await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    stream = await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                             stream=True)  # fmt: skip
    async for _ in stream:
        pass
    recs = await proxy.wait_records("cost", 2)
    # The fake upstream reports 11 prompt tokens (none cached) and 3 completion tokens.
    # gpt-4o: 11 * 2.5e-6 + 3 * 1e-5 = 2.75e-5 + 3e-5 = 5.75e-5 USD.
    for rec in recs:
        assert rec["cost_usd"] == pytest.approx(5.75e-5, rel=1e-9)
        assert rec["cost_source"] == "price_table" and rec["price_model"] == "gpt-4o"
    assert [r["stream"] for r in recs] == [False, True]


async def test_e2e_anthropic_stream_cost(make_proxy: Any, bundled_book: PriceBook) -> None:
    import aiohttp

    proxy = await make_proxy(pricebook=bundled_book)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url("/v1/messages"), json={"model": "claude-sonnet-4-5", "stream": True,
                          "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
                          headers={"X-Run-Id": "anth", "X-Fake": "fixture:anthropic/messages_stream",
                                   "X-Fake-Split": "13"}) as resp:  # fmt: skip
            await resp.read()
    [rec] = await proxy.wait_records("anth", 1)
    # claude-sonnet-4-5-20250929: 12 uncached * 3e-6 + 8000 cache reads * 3e-7 + 1500 5-minute writes
    # * 3.75e-6 + 250 output * 1.5e-5 = 3.6e-5 + 2.4e-3 + 5.625e-3 + 3.75e-3 = 0.011811 USD.
    assert rec["cost_usd"] == pytest.approx(0.011811, rel=1e-9)
    assert rec["cost_breakdown"] == pytest.approx(
        {"input": 3.6e-5, "cached_input": 2.4e-3, "cache_write": 5.625e-3, "output": 3.75e-3}
    )


def test_unknown_model_warnings_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook.load(BUNDLED_PRICES)
    usage = Usage(input_tokens=1, output_tokens=1, total_tokens=2)
    with caplog.at_level(logging.WARNING, logger="metering_proxy.pricing"):
        for i in range(1500):
            assert book.price(usage, model=f"nope-{i}", requested_model=None, upstream=None, provider=None,
                              dialect="chat").cost_usd is None  # fmt: skip
    assert len(caplog.records) == 1000


# -- hostile numbers never give a negative, NaN or infinite cost (issue 11) -------------------------

_BAD_COUNTS = [-1, -(2**70), float("nan"), float("inf"), float("-inf"), 2**70, 1e300]
_COUNT_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_5m_tokens",
                 "cache_write_1h_tokens", "output_tokens")  # fmt: skip


def _sound(cost: Cost) -> None:
    assert cost.cost_usd is not None and math.isfinite(cost.cost_usd) and cost.cost_usd >= 0, cost
    assert cost.breakdown is not None
    assert all(math.isfinite(v) and v >= 0 for v in cost.breakdown.values()), cost.breakdown


@pytest.mark.parametrize("value", _BAD_COUNTS)
@pytest.mark.parametrize("field", _COUNT_FIELDS)
@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet-4-5", "text-embedding-3-small"])
def test_hostile_counts_never_give_a_negative_or_nan_cost(book: PriceBook, field: str, value: float,
                                                          model: str) -> None:  # fmt: skip
    # Usage built by hand (a caller's bug, not the wire: usage.py rejects these before pricing sees them).
    base = {"input_tokens": 1000, "cached_input_tokens": 200, "cache_write_tokens": 100, "output_tokens": 50}
    usage = Usage(**{**base, field: value})  # type: ignore[arg-type]
    endpoint = "embeddings" if model.startswith("text-") else "chat"
    got = _price(book, usage, model, dialect=endpoint)
    _sound(got)
    # An absurd count is priced as the largest believable one: bounded by MAX_TOKENS_PER_CALL input tokens
    # in the priciest input bucket (uncached, 5-minute or 1-hour cache writes) plus as many output tokens.
    top = MAX_TOKENS_PER_CALL
    tops = [Usage(input_tokens=top, output_tokens=top),
            Usage(input_tokens=top, cache_write_tokens=top, output_tokens=top),
            Usage(input_tokens=top, cache_write_tokens=top, cache_write_1h_tokens=top, output_tokens=top)]  # fmt: skip
    bound = max(_price(book, u, model, dialect=endpoint).cost_usd or 0.0 for u in tops)
    assert got.cost_usd is not None and got.cost_usd <= bound


@pytest.mark.parametrize("value", [-100.0, float("nan"), float("inf"), 1e300, -0.5, 10_000.5])
def test_hostile_upstream_cost_never_becomes_cost_usd(book: PriceBook, value: float) -> None:
    usage = Usage(input_tokens=1000, output_tokens=100, total_tokens=1100, upstream_cost_usd=value)
    got = _price(book, usage, "openai/gpt-4o", upstream="openrouter", provider="openrouter")
    # Ours for gpt-4o: 1000 * 2.5e-6 + 100 * 1e-5 = 0.0035; the rejected charge is not reported either.
    assert got.cost_usd == approx(0.0035) and got.cost_source == "price_table" and got.upstream_cost_usd is None
    unknown = _price(book, usage, "no-such-model-anywhere", provider="openrouter")
    assert unknown == Cost(None, None, None, None, None)


def test_price_table_rates_out_of_range_are_ignored() -> None:
    nan, inf = float("nan"), float("inf")
    book = PriceBook({
        "neg-in": {"mode": "chat", "input_cost_per_token": -1e-6, "output_cost_per_token": 2e-6},
        "huge-out": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 1e300},
        "neg-cache": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                      "cache_read_input_token_cost": -5e-7, "cache_creation_input_token_cost": nan},
        "neg-tier": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                     "input_cost_per_token_above_200k_tokens": -1.0, "output_cost_per_token_priority": inf},
        "all-bad": {"mode": "chat", "input_cost_per_token": -1.0, "output_cost_per_token": 2.0},
    }, "test")  # fmt: skip
    usage = Usage(input_tokens=1000, cached_input_tokens=400, cache_write_tokens=100, output_tokens=10,
                  total_tokens=1010)  # fmt: skip
    # A rejected rate is as if the entry did not have it: input 0 when there is no input price at all.
    assert _price(book, usage, "neg-in").cost_usd == approx(10 * 2e-6)
    assert _price(book, usage, "huge-out").cost_usd == approx(1000 * 1e-6)
    # Cache rates fall back to the input rate, as a missing one does: 1010 tokens at input and output rates.
    assert _price(book, usage, "neg-cache").cost_usd == approx(1000 * 1e-6 + 10 * 2e-6)
    tiered = Usage(input_tokens=300_000, output_tokens=10, total_tokens=300_010, service_tier="priority")
    assert _price(book, tiered, "neg-tier").cost_usd == approx(300_000 * 1e-6 + 10 * 2e-6)
    # No rate in range: the model counts as unpriced (null), never as a negative or huge charge.
    assert _price(book, usage, "all-bad").cost_usd is None
    assert book.match("all-bad") is None


def test_custom_price_above_the_rate_bound_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_custom_prices([{"model": "a", "input": 1e300, "output": 1}])
    assert str(excinfo.value) == (
        "config: prices.custom[0].input: must be a number >= 0 and at most 1000000 (USD per million tokens)"
    )
    assert parse_custom_prices([{"model": "a", "input": 1e6, "output": 0}])[0].input == 1e6
