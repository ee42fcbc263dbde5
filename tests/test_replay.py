"""Every fixture replayed through the real proxy: the client gets the exact bytes, the record is right."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import FakeUpstream, ProxyUnderTest, load_case, payload_cases

CASES: list[Any] = [pytest.param(provider, case, id=f"{provider}/{case}") for provider, case in payload_cases()]

PATHS = {
    "chat": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
    "messages": "messages",
}

USAGE_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "upstream_cost_usd",
)


def request_body(endpoint: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if endpoint in ("chat", "messages"):
        body["messages"] = [{"role": "user", "content": "Say hello."}]
    if endpoint == "messages":
        body["max_tokens"] = 64
    if endpoint == "completions":
        body["prompt"] = "Say hello."
    if endpoint in ("embeddings", "responses"):
        body["input"] = "Say hello."
    if endpoint != "embeddings":
        body["stream"] = stream
    if stream and endpoint in ("chat", "completions"):
        # The client asks for usage itself, so the proxy injects and strips nothing.
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.mark.parametrize(("provider", "case"), CASES)
async def test_replay_through_proxy(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, provider: str, case: str
) -> None:
    data, kind, expected = load_case(provider, case)
    stream = kind == "sse"
    endpoint = expected["endpoint"]
    run_id = f"replay-{provider}-{case}"
    headers = {"X-Fake": f"fixture:{provider}/{case}", "X-Run-Id": run_id}
    if stream:
        headers["X-Fake-Split"] = "5"
    body = request_body(endpoint, expected["model"] or "m", stream)
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url("/v1/" + PATHS[endpoint]), json=body, headers=headers) as resp,
    ):
        got = await resp.read()
        status = resp.status
        ctype = resp.headers.get("Content-Type", "")

    assert status == 200
    assert ctype.startswith(expected["content_type"])
    sent = fake_upstream.requests[-1]
    assert sent["path"] == "/v1/" + PATHS[endpoint]
    assert sent["body"] == body, "the request must reach the upstream unchanged"
    if stream and expected["stream_error"]:
        # A broken stream may be closed by the proxy with one error event of its own after the fixture.
        assert got[: len(data)] == data
        extra = got[len(data) :]
        assert extra == b"" or extra.startswith((b"\n\ndata: ", b"\n\nevent: error\n")), extra[:80]
    else:
        assert got == data

    records = await proxy.wait_records(run_id, 1)
    assert len(records) == 1
    [rec] = records
    assert rec["run_id"] == run_id and rec["endpoint"] == "/v1/" + PATHS[endpoint] and rec["stream"] is stream
    assert rec["status"] == 200
    assert rec["model"] == expected["model"]
    assert rec["finish_reason"] == expected["finish_reason"]
    assert rec["success"] is (not expected["stream_error"])
    assert (rec["error"] is not None) is expected["stream_error"]
    if expected["usage"] is not None and endpoint == "messages" and stream and expected["stream_error"]:
        # Anthropic broke off before message_delta: message_start's output_tokens is only a
        # placeholder, so output is estimated from the text seen; the input side stays as reported.
        assert rec["usage_source"] == "estimated"
        assert rec["input_tokens"] == expected["usage"]["input_tokens"]
        assert rec["output_tokens"] > expected["usage"]["output_tokens"]
    elif expected["usage"] is not None:
        assert rec["usage_source"] == "upstream"
        assert {f: rec[f] for f in USAGE_FIELDS} == expected["usage"]
    else:
        # Nothing reported: the proxy estimates from the request and the text seen, and says so.
        assert rec["usage_source"] == "estimated"
        assert rec["input_tokens"] > 0
    if expected["server_timing"] is None:
        assert rec["server_timing"] is None
    else:
        assert rec["server_timing"] == pytest.approx(expected["server_timing"])
        assert set(rec["server_timing"]) == set(expected["server_timing"])
    if stream and expected["first_output_event"] is not None:
        assert rec["ttft_ms"] is not None
        assert rec["ttfb_ms"] <= rec["ttft_ms"] <= rec["duration_ms"]
    else:
        assert rec["ttft_ms"] is None
    assert rec["stream_usage_injected"] is False


def _usage_only_raw(data: bytes) -> list[bytes]:
    """The raw bytes of each usage-only event ('choices': [] with a usage object) in a fixture stream."""
    out = []
    for part in data.split(b"\n\n")[:-1]:
        if part.startswith(b"data: {"):
            obj = orjson.loads(part.removeprefix(b"data: "))
            if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
                out.append(part + b"\n\n")
    return out


STRIP_CASES = [
    p
    for p in CASES
    if load_case(*p.values)[1] == "sse" and load_case(*p.values)[2]["endpoint"] in ("chat", "completions")
]


@pytest.mark.parametrize(("provider", "case"), STRIP_CASES)
async def test_replay_without_include_usage(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, provider: str, case: str
) -> None:
    """The proxy asks for usage upstream and hides the usage-only chunk: the client sees the rest exactly."""
    data, _, expected = load_case(provider, case)
    endpoint = expected["endpoint"]
    run_id = f"strip-{provider}-{case}"
    headers = {"X-Fake": f"fixture:{provider}/{case}", "X-Fake-Split": "5", "X-Run-Id": run_id}
    body = request_body(endpoint, expected["model"] or "m", True)
    del body["stream_options"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url("/v1/" + PATHS[endpoint]), json=body, headers=headers) as resp,
    ):
        got = await resp.read()
    assert fake_upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    only = _usage_only_raw(data)
    assert len(only) == (1 if expected["usage_only_chunk"] else 0)
    wanted = data.replace(only[0], b"", 1) if only else data
    if expected["stream_error"]:
        assert got[: len(wanted)] == wanted
    else:
        assert got == wanted
    [rec] = await proxy.wait_records(run_id, 1)
    assert rec["stream_usage_injected"] is True
    assert rec["success"] is (not expected["stream_error"])
    if expected["usage"] is not None:
        assert rec["usage_source"] == "upstream"
        assert {f: rec[f] for f in USAGE_FIELDS} == expected["usage"]
