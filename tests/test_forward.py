"""End to end through the proxy with the real openai SDK against a fake upstream on loopback."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import FakeUpstream, ProxyUnderTest


def client(proxy: ProxyUnderTest, run_id: str | None = "r1", **headers: str) -> openai.AsyncOpenAI:
    extra = dict(headers)
    if run_id is not None:
        extra["X-Run-Id"] = run_id
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-test-secret-key-123456", max_retries=0,
                              default_headers=extra)  # fmt: skip


async def test_chat_nonstream_record(proxy: ProxyUnderTest, fake_upstream: FakeUpstream) -> None:
    c = client(proxy, **{"X-Task-Name": "summarise", "X-Meter-Tag-Variant": "A"})
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
    c = client(proxy)
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
    c = client(proxy, run_id=bad)
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert "not starting with '.'" in info.value.message
    await proxy.flush()
    assert sorted(p.name for p in proxy.runs_dir.iterdir()) == [".rejected.jsonl"]
