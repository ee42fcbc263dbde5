"""End to end through the proxy with the real openai SDK against a fake upstream on loopback."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import FakeUpstream, Messages, ProxyUnderTest, make_client


async def test_chat_nonstream_record(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    c = make_client(proxy, run_id="r1", headers={"X-Task-Name": "summarise", "X-Meter-Tag-Variant": "A"})
    resp = await c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "Hello there!"
    [rec] = await proxy.wait_records("r1", 1)
    assert rec["input_tokens"] == 11 and rec["output_tokens"] == 3 and rec["total_tokens"] == 14
    assert rec["task"] == "summarise" and rec["tags"] == {"variant": "A"}
    assert rec["success"] is True and rec["status"] == 200 and rec["usage_source"] == "upstream"
    assert rec["stream"] is False and rec["ttft_ms"] is None and rec["duration_ms"] >= rec["ttfb_ms"] > 0
    sent = fake_upstream.requests[-1]["headers"]
    assert "X-Run-Id" not in sent and "X-Task-Name" not in sent and "X-Meter-Tag-Variant" not in sent
    assert sent["Authorization"] == "Bearer sk-test-secret-key-123456"


async def test_chat_stream_injects_and_strips_usage(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    c = make_client(proxy, run_id="r1")
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             stream=True)  # fmt: skip
    chunks = [ch async for ch in stream]
    assert all(ch.choices for ch in chunks), "the injected usage-only chunk must not reach the client"
    assert all(ch.usage is None for ch in chunks)
    assert fake_upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    [rec] = await proxy.wait_records("r1", 1)
    assert rec["stream_usage_injected"] is True
    assert rec["output_tokens"] == 3 and rec["finish_reason"] == "stop"
    assert rec["ttft_ms"] is not None and rec["ttfb_ms"] <= rec["ttft_ms"] <= rec["duration_ms"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "x" * 200, ".x"])
async def test_invalid_run_id(proxy: ProxyUnderTest, bad: str) -> None:
    c = make_client(proxy, run_id=bad)
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert "not starting with '.'" in info.value.message
    await proxy.settle(1)
    assert sorted(p.name for p in proxy.runs_dir.iterdir()) == [".rejected.jsonl"]


# -- what the client sees through the proxy equals a direct call -----------------------------------

# (SDK call, X-Fake mode, stream?) for each metered endpoint; fixtures mode replays a payload file.
MSGS: Messages = [{"role": "user", "content": "hi"}]
CASES = [
    pytest.param("chat", "", False, id="chat"),
    pytest.param("chat", "", True, id="chat-stream-no-include-usage"),
    pytest.param("chat_usage", "", True, id="chat-stream-include-usage"),
    pytest.param("completions", "fixture:openai/completions_nonstream", False, id="completions"),
    # The fixture always carries its usage chunk, so this client asks for it (nothing is stripped).
    pytest.param("completions", "fixture:openai/completions_stream_usage", True, id="completions-stream"),
    pytest.param("embeddings", "", False, id="embeddings"),
    pytest.param("responses", "fixture:openai/responses_nonstream", False, id="responses"),
    pytest.param("responses", "fixture:openai/responses_stream", True, id="responses-stream"),
]


def _call(c: openai.OpenAI, kind: str, stream: bool, fake: str) -> list[dict[str, object]]:
    """Make one SDK call and return what the client saw, as plain dicts (ids included)."""
    h = {"X-Fake": fake} if fake else {}
    if kind == "embeddings":
        return [c.embeddings.create(model="text-embedding-3-small", input="hi", extra_headers=h).model_dump()]
    if kind == "completions":
        opts = {"stream_options": {"include_usage": True}} if stream else {}
        out = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=stream,  # type: ignore[call-overload]
                                   extra_headers=h, **opts)  # fmt: skip
    elif kind == "responses":
        out = c.responses.create(model="o4-mini", input="hi", stream=stream, extra_headers=h)
    else:
        usage_opts = {"include_usage": True} if kind == "chat_usage" else None
        out = c.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=stream,  # type: ignore[call-overload]
                                        extra_headers=h,
                                        **({"stream_options": usage_opts} if usage_opts else {}))  # fmt: skip
    if not stream:
        return [out.model_dump()]
    return [event.model_dump() for event in out]


async def _acall(c: openai.AsyncOpenAI, kind: str, stream: bool, fake: str) -> list[dict[str, object]]:
    h = {"X-Fake": fake} if fake else {}
    if kind == "embeddings":
        return [(await c.embeddings.create(model="text-embedding-3-small", input="hi", extra_headers=h)).model_dump()]
    if kind == "completions":
        opts = {"stream_options": {"include_usage": True}} if stream else {}
        out = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=stream,  # type: ignore[call-overload]
                                         extra_headers=h, **opts)  # fmt: skip
    elif kind == "responses":
        out = await c.responses.create(model="o4-mini", input="hi", stream=stream, extra_headers=h)
    else:
        usage_opts = {"include_usage": True} if kind == "chat_usage" else None
        out = await c.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=stream,  # type: ignore[call-overload]
                                              extra_headers=h,
                                              **({"stream_options": usage_opts} if usage_opts else {}))  # fmt: skip
    if not stream:
        return [out.model_dump()]
    return [event.model_dump() async for event in out]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize(("kind", "fake", "stream"), CASES)
async def test_client_sees_what_a_direct_call_sees(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, kind: str, fake: str, stream: bool, sync: bool
) -> None:
    import asyncio

    async def run(base_url: str, headers: dict[str, str]) -> list[dict[str, object]]:
        if sync:
            c = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, default_headers=headers)
            return await asyncio.to_thread(_call, c, kind, stream, fake)
        ac = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, default_headers=headers)
        return await _acall(ac, kind, stream, fake)

    direct = await run(fake_upstream.base_url, {})
    via = await run(proxy.base_url, {"X-Run-Id": "same"})
    assert via == direct
    [rec] = await proxy.wait_records("same", 1)
    assert rec["success"] is True and rec["stream"] is stream and rec["usage_source"] == "upstream"
    assert rec["input_tokens"] > 0 and rec["total_tokens"] == rec["input_tokens"] + rec["output_tokens"]
    if kind == "embeddings":
        assert rec["output_tokens"] == 0
    else:
        assert rec["output_tokens"] > 0 and rec["finish_reason"] is not None
    assert (rec["ttft_ms"] is not None) is stream
    assert rec["stream_usage_injected"] is (stream and kind == "chat")


async def test_client_accept_encoding_is_not_forwarded(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    """A client asking for br/zstd must not get an answer the proxy cannot decode to read usage."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url("/v1/chat/completions"), json={"model": "m", "messages": MSGS},
                          headers={"X-Run-Id": "enc", "Accept-Encoding": "br, zstd"}) as resp:  # fmt: skip
            assert resp.status == 200 and "Content-Encoding" not in resp.headers
            await resp.read()
    sent = fake_upstream.requests[-1]["headers"].get("Accept-Encoding", "")
    assert "br" not in sent and "zstd" not in sent
    [rec] = await proxy.wait_records("enc", 1)
    assert rec["success"] and rec["output_tokens"] == 3


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1//chat/completions", "/run/slash/v1/chat/completions/"])
async def test_stray_slashes_are_still_metered(proxy: ProxyUnderTest, fake_upstream: FakeUpstream, path: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url(path), json={"model": "m", "messages": MSGS},
                          headers={"X-Run-Id": "slash"}) as resp:  # fmt: skip
            assert resp.status == 200 and resp.headers["X-Meter-Request-Id"].startswith("req_")
    assert fake_upstream.requests[-1]["path"] == "/v1/chat/completions"
    [rec] = await proxy.wait_records("slash", 1)
    assert rec["endpoint"] == "/v1/chat/completions" and rec["output_tokens"] == 3


@pytest.mark.parametrize(("provider", "header", "value"), [
    ("anthropic", "x-api-key", "sk-ant-injected"), (None, "Authorization", "Bearer sk-ant-injected")])  # fmt: skip
async def test_api_key_env_uses_the_providers_header(
    make_proxy: Any, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, provider: str | None,
    header: str, value: str,
) -> None:  # fmt: skip
    import aiohttp

    from proxy.config import Upstream

    monkeypatch.setenv("MP_TEST_UPSTREAM_KEY", "sk-ant-injected")
    proxy = await make_proxy(upstreams=(Upstream(name="u", base_url=fake_upstream.base_url, provider=provider,
                                                 api_key_env="MP_TEST_UPSTREAM_KEY"),))  # fmt: skip
    client_creds = {"Authorization": "Bearer client-key", "x-api-key": "client-key"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url("/v1/chat/completions"), json={"model": "m", "messages": MSGS},
                          headers=client_creds) as resp:  # fmt: skip
            assert resp.status == 200
    sent = {k.lower(): v for k, v in fake_upstream.requests[-1]["headers"].items()}
    assert sent[header.lower()] == value
    assert "client-key" not in " ".join(sent.values())


# -- Ollama's native API: /api/chat, /api/generate (NDJSON), /api/embed ------------------------------


@pytest.mark.parametrize(("path", "stream"), [("/api/chat", None), ("/api/chat", False), ("/api/generate", None),
                                              ("/api/generate", False), ("/run/native/api/chat", None)])  # fmt: skip
async def test_ollama_native(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, path: str, stream: bool | None
) -> None:
    import aiohttp

    body: dict[str, Any] = {"model": "llama3.2", "messages": MSGS, "prompt": "hi"}
    if stream is not None:
        body["stream"] = stream
    upstream_root = fake_upstream.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s:
        async with s.post(upstream_root + path.removeprefix("/run/native"), json=body) as resp:
            direct = await resp.read()
        headers = {} if path.startswith("/run/") else {"X-Run-Id": "native"}
        async with s.post(proxy.url(path), json=body, headers=headers) as resp:
            assert resp.status == 200
            via = await resp.read()
    assert via == direct
    assert fake_upstream.requests[-1]["path"] == path.removeprefix("/run/native")
    [rec] = await proxy.wait_records("native", 1)
    assert rec["endpoint"] == path.removeprefix("/run/native") and rec["stream"] is (stream is None)
    # From the final object: prompt_eval_count 26, eval_count 282; durations in ns -> ms.
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (26, 282, 308)
    assert rec["usage_source"] == "upstream" and rec["finish_reason"] == "stop" and rec["success"]
    assert rec["provider"] == "ollama" and rec["model"] == "llama3.2"
    assert rec["server_timing"] == {"total_ms": 4883.583, "load_ms": 1.335, "prompt_ms": 342.546,
                                    "generation_ms": 4535.599}  # fmt: skip
    assert (rec["ttft_ms"] is not None) is (stream is None)


async def test_ollama_native_embed(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url("/api/embed"), json={"model": "all-minilm", "input": "hi"},
                          headers={"X-Run-Id": "emb"}) as resp:  # fmt: skip
            assert resp.status == 200
    [rec] = await proxy.wait_records("emb", 1)
    assert (rec["input_tokens"], rec["output_tokens"], rec["stream"]) == (8, 0, False)


# -- servers that reject stream_options (Mistral: 422 extra_forbidden) ---------------------------

HI: Messages = [{"role": "user", "content": "hi"}]


async def test_upstream_rejecting_stream_options_is_retried_once_and_remembered(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    c = make_client(proxy, run_id="strict", headers={"X-Fake": "strict"})
    for _ in range(3):
        stream = await c.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
        assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices]) == "Hello there!"
    sent = [r["body"] for r in fake_upstream.requests]
    # The first call is refused with the injected field, then sent without it; later calls never carry it.
    assert [("stream_options" in b) for b in sent] == [True, False, False, False]
    recs = await proxy.wait_records("strict", 3)
    for rec in recs:
        assert rec["success"] is True and rec["status"] == 200 and rec["error"] is None, rec
        assert rec["stream_usage_injected"] is False and rec["usage_source"] == "estimated"
        assert rec["output_tokens"] > 0
    assert sum("stream_options" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("known", [True, False], ids=["provider-mistral", "detected-by-422"])
@pytest.mark.parametrize("asks", [False, True], ids=["unasked", "client-asks-usage"])
async def test_mistral_streams_with_and_without_the_client_asking_for_usage(
    make_proxy: Any, fake_upstream: FakeUpstream, known: bool, asks: bool
) -> None:
    from proxy.config import Upstream

    up = Upstream(name="mistral", base_url=fake_upstream.base_url, provider="mistral" if known else None)
    proxy = await make_proxy(upstreams=(up,))
    c = make_client(proxy, run_id="mistral", headers={"X-Fake": "mistral"})
    opts: dict[str, Any] = {"stream_options": {"include_usage": True}} if asks else {}
    stream = await c.chat.completions.create(model="mistral-small-latest", messages=HI, stream=True, **opts)
    chunks = [ch async for ch in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Bonjour ! Comment puis-je vous aider ?"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15  # Mistral's own, unasked
    [rec] = await proxy.wait_records("mistral", 1)
    assert rec["success"] is True and rec["usage_source"] == "upstream" and rec["output_tokens"] == 15
    assert rec["stream_usage_injected"] is False
    retried = not known and (asks or up.inject_stream_usage)
    assert len(fake_upstream.requests) == (2 if retried else 1)
    assert "stream_options" not in fake_upstream.requests[-1]["body"]


@pytest.mark.parametrize("fake", ["", "status:429"])
async def test_upstream_request_id_reaches_the_client_untouched(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, fake: str
) -> None:
    """The SDK reports x-request-id as the id to quote to the provider: it must be the provider's."""
    c = make_client(proxy, run_id="ids", headers={"X-Fake": fake, "X-Fake-Request-Id": "abc123"})
    if fake:
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="gpt-4o-mini", messages=HI)
        seen_id, headers = info.value.request_id, info.value.response.headers
    else:
        raw = await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
        seen_id, headers = raw.parse()._request_id, raw.headers
    assert seen_id == "req_up_abc123"
    [rec] = await proxy.wait_records("ids", 1)
    assert rec["upstream_request_id"] == "req_up_abc123"
    assert headers["X-Meter-Request-Id"] == rec["request_id"] and rec["request_id"].startswith("req_")
    assert "X-Upstream-Request-Id" not in headers
