"""Provider detection: the URL decides first; a response only speaks when the URL said nothing."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import providers
from tests.conftest import FakeUpstream, ProxyFactory


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.openai.com/v1", "openai"),
        ("https://api.mistral.ai/v1", "mistral"),
        ("https://x.openai.azure.com/openai", "azure"),
        ("http://127.0.0.1:11434/v1", "ollama"),
        ("http://127.0.0.1:8080/v1", None),
        ("https://gateway.example.com/v1", None),
    ],
)
def test_from_url(url: str, expected: str | None) -> None:
    assert providers.from_url(url) == expected


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8080/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://192.168.1.20:8000/v1", True),
        ("http://10.0.0.5/v1", True),
        ("http://vllm:8000/v1", True),
        ("http://gpu-box.local:8000/v1", True),
        ("https://api.openai.com/v1", False),
        ("https://8.8.8.8/v1", False),
        ("https://gateway.example.com/v1", False),
    ],
)
def test_is_local(url: str, local: bool) -> None:
    assert providers.is_local(url) is local


OPENAI_HEADERS = {"openai-processing-ms": "12"}


@pytest.mark.parametrize(
    ("headers", "hint", "usage", "local", "expected"),
    [
        (OPENAI_HEADERS, None, None, False, "openai"),
        # llama-cpp-python sends OpenAI's header: on a local host it proves nothing.
        (OPENAI_HEADERS, None, None, True, None),
        (OPENAI_HEADERS, "llamacpp", None, True, "llamacpp"),
        (OPENAI_HEADERS, "llamacpp", None, False, "llamacpp"),
        ({}, None, {"prompt_cache_hit_tokens": 1}, False, "deepseek"),
        ({}, None, {"prompt_cache_hit_tokens": 1}, True, None),
        ({}, "groq", None, True, None),
        ({"x-groq-region": "us"}, None, None, False, "groq"),
        ({}, None, None, False, None),
    ],
)
def test_from_response(headers: dict[str, str], hint: str | None, usage: dict[str, Any] | None, local: bool,
                       expected: str | None) -> None:  # fmt: skip
    assert providers.from_response(headers, hint, usage, local=local) == expected


async def test_a_local_server_sending_openai_headers_is_not_openai(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    """llama-cpp-python sends openai-processing-ms: its records must not say openai (nor price as it)."""
    import aiohttp

    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            async with s.post(proxy.url(path), json={"model": "qwen", "messages": [], "input": "x"},
                              headers={"X-Run-Id": "lcp", "X-Fake-Header": "openai-processing-ms=7"}) as r:  # fmt: skip
                assert r.status == 200 and r.headers["openai-processing-ms"] == "7"
    recs = await proxy.wait_records("lcp", 2)
    assert [r["provider"] for r in recs] == [None, None]


async def test_a_provider_told_by_one_endpoint_holds_for_all(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    """llama.cpp shows itself by the timings of chat answers; its embeddings are llama.cpp's too."""
    import aiohttp

    proxy = await make_proxy()
    async with aiohttp.ClientSession() as s:
        for path, fake in (("/v1/chat/completions", "fixture:llamacpp/chat_nonstream"), ("/v1/embeddings", "")):
            async with s.post(proxy.url(path), json={"model": "gemma", "messages": [], "input": "x"},
                              headers={"X-Run-Id": "lc", "X-Fake": fake}) as r:  # fmt: skip
                assert r.status == 200
    recs = await proxy.wait_records("lc", 2)
    assert [r["provider"] for r in recs] == ["llamacpp", "llamacpp"]
    assert recs[0]["server_timing"]["cached_prompt_tokens"] == 96
