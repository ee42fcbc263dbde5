"""The record line and the sink: complete lines, never lost over odd values, torn tails healed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson

from proxy.records import ErrorInfo, JsonlSink, Record


def _record(**changes: object) -> Record:
    base = Record(
        ts="2026-01-01T00:00:00.000Z", run_id="r", request_id="req_1", task=None, tags={},
        endpoint="/v1/chat/completions", method="POST", upstream="u", provider=None, requested_model="m",
        model="m", stream=False, status=200,
        success=True, finish_reason="stop", input_tokens=1, cached_input_tokens=0, cache_write_tokens=0,
        cache_write_5m_tokens=None, cache_write_1h_tokens=None, output_tokens=2, reasoning_tokens=0, total_tokens=3,
        usage_source="upstream", usage_raw=None, stream_usage_injected=False, ttfb_ms=1.0, ttft_ms=None,
        duration_ms=2.0, tokens_per_second=None, server_timing=None, upstream_request_id=None, error=None,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_line_is_one_complete_json_object() -> None:
    line = _record(error=ErrorInfo("timeout", "0123456789ab", "slow")).to_json()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line)["error"] == {"category": "timeout", "id": "0123456789ab", "detail": "slow"}


def test_odd_values_never_lose_the_record() -> None:
    # A header that was not UTF-8 (a lone surrogate) and an integer past 64 bits in usage_raw.
    line = _record(task="caf\udce9", usage_raw={"prompt_tokens": 10**30}).to_json()
    rec = orjson.loads(line)
    assert rec["task"] == "caf\ufffd" and rec["usage_raw"]["prompt_tokens"] == float(10**30)


async def test_sink_appends_and_starts_after_a_torn_tail(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "runs", flush_interval=0.05)
    await sink.start()
    (tmp_path / "runs" / "r.jsonl").write_bytes(b'{"ts": "torn')
    sink.write("r", _record().to_json())
    sink.write("r", _record(request_id="req_2").to_json())
    await sink.close()
    lines = (tmp_path / "runs" / "r.jsonl").read_bytes().split(b"\n")
    assert lines[0] == b'{"ts": "torn' and lines[-1] == b""
    assert [orjson.loads(x)["request_id"] for x in lines[1:-1]] == ["req_1", "req_2"]
    assert sink.written == 2 and sink.healthy
