"""The Meter against every provider fixture, cut at every byte, plus strip_usage and robustness."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.meter import Meter
from proxy.sse import Event, SSEDecoder
from proxy.usage import estimate_input_tokens
from tests.conftest import load_case, payload_cases

USAGE_FIELDS = (
    "input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
    "output_tokens", "reasoning_tokens", "total_tokens", "upstream_cost_usd",
)  # fmt: skip


def _params(kind: str | None = None) -> list[Any]:
    out = []
    for provider, case in payload_cases():
        if kind is None or load_case(provider, case)[1] == kind:
            out.append(pytest.param(provider, case, id=f"{provider}/{case}"))
    return out


ALL_CASES = _params()
JSON_CASES = _params("json")
SSE_CASES = _params("sse")
STRIP_CASES = [
    p for p in SSE_CASES if load_case(*p.values)[2]["endpoint"] in ("chat", "completions")
]  # chat and completions streams are the ones the proxy injects include_usage into


def _slow_if_big(params: list[Any]) -> list[Any]:
    """Mark slow the cases of a cut-at-every-byte test whose fixture is over 6 KiB: its time grows with the
    square of the size (vllm/chat_stream_continuous, 6.8 KB, takes 2-3 s)."""
    return [pytest.param(*p.values, id=p.id, marks=pytest.mark.slow) if len(load_case(*p.values)[0]) > 6144 else p
            for p in params]  # fmt: skip


def usage_of(meter: Meter) -> dict[str, Any] | None:
    u = meter.usage()
    return None if u is None else {f: getattr(u, f) for f in USAGE_FIELDS}


def check(meter: Meter, expected: dict[str, Any], where: str = "") -> None:
    assert usage_of(meter) == expected["usage"], where
    assert meter.model == expected["model"], where
    assert meter.finish_reason == expected["finish_reason"], where
    assert (meter.error_category is not None) == expected["stream_error"], (where, meter.error_category)
    if expected["server_timing"] is None:
        assert meter.server_timing is None, where
    else:
        assert meter.server_timing is not None, where
        assert set(meter.server_timing) == set(expected["server_timing"]), where
        assert meter.server_timing == pytest.approx(expected["server_timing"]), where
        for key, value in meter.server_timing.items():  # counts stay integers (64, not 64.0)
            assert isinstance(value, int) is isinstance(expected["server_timing"][key], int), (where, key, value)


def events_of(data: bytes) -> list[Event]:
    dec = SSEDecoder()
    return dec.feed(data) + dec.flush()


def counted(ev: Event) -> bool:
    """The events the fixtures' first_output_event counts: with data, not llama.cpp's 'error:' line."""
    return bool(ev.data) and not ev.is_error_field


def first_output_end(data: bytes, index: int | None) -> int | None:
    """Byte offset just past the fixture's first-output event (where a decoder completes it)."""
    if index is None:
        return None
    offset, seen = 0, 0
    for ev in events_of(data):
        offset += len(ev.raw)
        if counted(ev):
            if seen == index:
                return offset
            seen += 1
    raise AssertionError(f"fixture has no counted event {index}")


def usage_only_events(data: bytes) -> list[Event]:
    """Events that are a usage-only chunk: 'choices': [] with a usage object (judged independently)."""
    out = []
    for ev in events_of(data):
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            out.append(ev)
    return out


def run(endpoint: str, pieces: list[bytes], strip: bool = False) -> tuple[Meter, bytes]:
    """Feed pieces with now = piece index; return the meter and the bytes it passed on."""
    meter = Meter(endpoint, strip_usage=strip)
    out = [meter.feed(piece, float(i)) for i, piece in enumerate(pieces)]
    out.append(meter.finish(float(len(pieces))))
    return meter, b"".join(out)


def sevens(data: bytes) -> list[bytes]:
    return [data[i : i + 7] for i in range(0, len(data), 7)]


# -- JSON bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "case"), JSON_CASES)
def test_json_fixture(provider: str, case: str) -> None:
    data, _, expected = load_case(provider, case)
    meter = Meter(expected["endpoint"])
    assert meter.read_body(data) is True
    check(meter, expected)
    assert meter.first_output_at is None
    assert expected["first_output_event"] is None


# -- streams, cut at every byte -----------------------------------------------------------------


@pytest.mark.parametrize(("provider", "case"), _slow_if_big(SSE_CASES))
def test_stream_fixture_every_split(provider: str, case: str) -> None:
    data, _, expected = load_case(provider, case)
    endpoint = expected["endpoint"]
    end = first_output_end(data, expected["first_output_event"])
    for cut in range(len(data) + 1):
        meter, out = run(endpoint, [data[:cut], data[cut:]])
        where = f"split at byte {cut}"
        check(meter, expected, where)
        assert out == data, where
        # The first output event completes in the piece holding its last byte.
        assert meter.first_output_at == (None if end is None else float(end > cut)), where
    meter, out = run(endpoint, sevens(data))
    check(meter, expected, "7-byte pieces")
    assert out == data
    assert meter.first_output_at == (None if end is None else float((end - 1) // 7))
    # done: the dialect's final event was seen ([DONE], Anthropic's message_stop, Responses' terminal events).
    finals = (b"data: [DONE]", b"event: message_stop", b"event: response.completed", b"event: response.incomplete",
              b"event: response.failed")  # fmt: skip
    assert meter.done == any(f in data for f in finals)


@pytest.mark.parametrize(("provider", "case"), SSE_CASES)
def test_stream_fixture_ttft_event(provider: str, case: str) -> None:
    """One event per feed; event i (counting only events with data) is fed at now=i, others at now=-1."""
    data, _, expected = load_case(provider, case)
    meter = Meter(expected["endpoint"])
    i = 0
    for ev in events_of(data):
        if counted(ev):
            assert meter.feed(ev.raw, float(i)) == ev.raw
            i += 1
        else:
            assert meter.feed(ev.raw, -1.0) == ev.raw
    assert meter.finish(float(i)) == b""
    index = expected["first_output_event"]
    assert meter.first_output_at == (None if index is None else float(index))
    check(meter, expected)


@pytest.mark.parametrize(("provider", "case"), _slow_if_big(STRIP_CASES))
def test_strip_usage_every_split(provider: str, case: str) -> None:
    data, _, expected = load_case(provider, case)
    only = usage_only_events(data)
    if expected["usage_only_chunk"]:
        assert len(only) == 1, "the fixture should hold exactly one usage-only chunk"
        wanted = data.replace(only[0].raw, b"", 1)
        assert len(wanted) == len(data) - len(only[0].raw)
    else:
        assert only == [], "usage_only_chunk is false but the fixture holds a usage-only chunk"
        wanted = data
    endpoint = expected["endpoint"]
    for cut in range(len(data) + 1):
        meter, out = run(endpoint, [data[:cut], data[cut:]], strip=True)
        where = f"split at byte {cut}"
        assert out == wanted, where
        check(meter, expected, where)  # usage is still read from the chunk that was dropped
    meter, out = run(endpoint, sevens(data), strip=True)
    assert out == wanted
    check(meter, expected, "7-byte pieces")
    meter, out = run(endpoint, [bytes([b]) for b in data], strip=True)
    assert out == wanted
    check(meter, expected, "1-byte pieces")


def test_strip_usage_keeps_a_stray_trailing_newline() -> None:
    data, _, expected = load_case("openai", "chat_stream_usage")
    [only] = usage_only_events(data)
    meter, out = run("chat", sevens(data + b"\n"), strip=True)
    assert out == data.replace(only.raw, b"") + b"\n"
    check(meter, expected)


def test_strip_usage_keeps_a_final_event_without_blank_line() -> None:
    data, _, expected = load_case("openai", "chat_stream_usage")
    [only] = usage_only_events(data)
    cut = data.removesuffix(b"\n\n")  # the stream ends right after "data: [DONE]"
    meter, out = run("chat", sevens(cut), strip=True)
    assert out == data.replace(only.raw, b"").removesuffix(b"\n\n")
    assert meter.done
    check(meter, expected)


def test_strip_usage_passes_a_runaway_event_on() -> None:
    """An event larger than the decoder's bound is not metered, but its bytes still reach the client."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x" * 3000}, "finish_reason": None}]}  # fmt: skip
    usage = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}  # fmt: skip
    first = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    big = b"data: " + orjson.dumps(chunk) + b"\n\n"
    only = b"data: " + orjson.dumps(usage) + b"\n\n"
    data = first + big + only + b"data: [DONE]\n\n"
    meter = Meter("chat", strip_usage=True)
    meter.decoder = SSEDecoder(max_event_bytes=512)
    out = b"".join(meter.feed(data[i : i + 100], float(i)) for i in range(0, len(data), 100))
    out += meter.finish(1e9)
    assert out == first + big + b"data: [DONE]\n\n"
    read = meter.usage()
    assert read is not None and read.total_tokens == 8
    assert meter.done


def test_strip_usage_only_drops_choices_empty_with_usage() -> None:
    # xAI's trailing empty chunk (choices [] and no usage) is not the injected chunk: kept.
    empty = b'data: {"id":"x","model":"grok-3","choices":[]}\n\n'
    meter, out = run("chat", [empty], strip=True)
    assert out == empty
    # A Gemini/Mistral-style finish chunk that carries usage with choices is kept, usage read.
    final = (b'data: {"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n\n')  # fmt: skip
    meter, out = run("chat", [final], strip=True)
    usage = meter.usage()
    assert out == final and usage is not None and usage.total_tokens == 3


def test_no_strip_passes_chunks_through_unchanged() -> None:
    data, _, expected = load_case("openai", "chat_stream_usage")
    meter = Meter("chat")
    pieces = sevens(data)
    assert [meter.feed(p, 0.0) for p in pieces] == pieces
    assert meter.finish(1.0) == b""
    check(meter, expected)


# -- robustness: nothing the upstream sends may raise out of the meter -------------------------

ENDPOINTS = ("chat", "completions", "embeddings", "responses", "messages")

HOSTILE_EVENTS = [
    # Anthropic shapes with the wrong types.
    ("messages", None, {"type": "content_block_delta", "delta": "x"}),
    ("messages", None, {"type": "content_block_delta", "delta": [1]}),
    ("messages", None, {"type": "content_block_delta", "delta": {"type": ["text_delta"]}}),
    ("messages", None, {"type": "content_block_delta", "delta": {"type": {"a": 1}}}),
    ("messages", None, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": 5}}),
    ("messages", None, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": ["a"]}}),
    ("messages", None, {"type": "message_start", "message": "x"}),
    ("messages", None, {"type": "message_start", "message": [1, 2]}),
    ("messages", None, {"type": "message_delta", "delta": [1]}),
    ("messages", None, {"type": "message_delta", "delta": "end_turn", "usage": {"output_tokens": 3}}),
    ("messages", None, {"type": "error", "error": ["x"]}),
    ("messages", None, {"type": "error", "error": None}),
    ("messages", "content_block_delta", {"delta": True}),
    ("messages", ["not", "a", "name"], {"type": ["content_block_delta"]}),
    ("messages", None, {"type": {"k": "v"}}),
    # Responses shapes with the wrong types.
    ("responses", None, {"type": "response.completed", "response": "x"}),
    ("responses", None, {"type": "response.completed", "response": [1]}),
    ("responses", None, {"type": "response.failed", "response": {"error": "boom"}}),
    ("responses", None, {"type": "response.failed", "response": {"error": [1]}}),
    ("responses", None, {"type": "response.output_text.delta", "delta": {"a": 1}}),
    ("responses", None, {"type": "error", "code": ["x"], "message": {"m": 1}}),
    ("responses", None, {"type": ["response.completed"]}),
    # Chat / completions shapes with the wrong types.
    ("chat", None, {"choices": "abc"}),
    ("chat", None, {"choices": [1, "x", None, {"delta": "x", "text": 5, "finish_reason": 3}]}),
    ("chat", None, {"choices": [{"delta": {"content": 5, "tool_calls": "x"}}]}),
    ("chat", None, {"choices": [{"delta": {"tool_calls": [1, {"function": "x"}]}}]}),
    ("chat", None, {"error": ["x"]}),
    ("chat", None, {"error": {"type": ["x"], "code": {"a": 1}, "message": 5}}),
    ("chat", None, {"x_groq": "x", "timings": [1], "stats": "s", "usage": 5}),
    ("chat", None, {"x_groq": {"usage": "x"}, "system_fingerprint": ["fp_ollama"]}),
    ("completions", None, {"choices": [{"text": ["a"]}], "model": 5}),
]


@pytest.mark.parametrize(("endpoint", "event", "obj"), HOSTILE_EVENTS)
def test_hostile_event_does_not_raise(endpoint: str, event: Any, obj: dict[str, Any]) -> None:
    head = b"" if event is None else b"event: " + str(event).encode() + b"\n"
    wire = head + b"data: " + orjson.dumps(obj) + b"\n\n"
    for ep in {endpoint, *ENDPOINTS}:
        for strip in (False, True):
            meter = Meter(ep, strip_usage=strip)
            meter.feed(wire, 1.0)
            meter.finish(2.0)
            meter.usage()
            Meter(ep).read_body(orjson.dumps(obj))


HOSTILE_BODIES = [
    {"choices": 5},
    {"choices": [{"message": "x", "finish_reason": 1, "text": 3}]},
    {"choices": [], "x_groq": "s"},
    {"choices": [], "x_groq": {"usage": 5}},
    {"choices": [], "x_groq": [1]},
    {"usage": "x", "model": 3, "stop_reason": ["a"], "content": {"text": 5}},
    {"output": "x", "status": 5, "usage": [1]},
    {"timings": {"prompt_ms": "x"}, "stats": {"generation_time": None}},
]


@pytest.mark.parametrize("body", HOSTILE_BODIES)
def test_hostile_body_does_not_raise(body: dict[str, Any]) -> None:
    for ep in ENDPOINTS:
        meter = Meter(ep)
        assert meter.read_body(orjson.dumps(body)) is True
        meter.usage()


@pytest.mark.parametrize("depth", [50, 600, 1000])
def test_deeply_nested_json_does_not_raise(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    body = (
        b'{"choices":[{"message":{"content":'
        + nested
        + b'}}],"output":'
        + nested
        + b',"content":'
        + nested
        + b"}"
    )
    for ep in ENDPOINTS:
        Meter(ep).read_body(body)
    request = orjson.loads(b'{"messages":' + nested + b',"input":' + nested + b"}")
    assert estimate_input_tokens(request) >= 0


def test_not_json_bodies() -> None:
    meter = Meter("chat")
    assert meter.read_body(b"") is False
    assert meter.read_body(b"<html>502</html>") is False
    assert meter.read_body(b"[1, 2]") is False
    assert meter.usage() is None


@settings(max_examples=50, deadline=None)
@given(endpoint=st.sampled_from(ENDPOINTS), chunks=st.lists(st.binary(max_size=80), max_size=10),
       strip=st.booleans())  # fmt: skip
def test_random_bytes_never_raise(endpoint: str, chunks: list[bytes], strip: bool) -> None:
    meter = Meter(endpoint, strip_usage=strip)
    out = b"".join(meter.feed(c, float(i)) for i, c in enumerate(chunks)) + meter.finish(99.0)
    if not strip or not usage_only_events(b"".join(chunks)):
        assert out == b"".join(chunks)
    meter.usage()
    Meter(endpoint).read_body(b"".join(chunks))


_KEYS = [
    "type", "delta", "message", "usage", "response", "choices", "error", "model", "x_groq", "timings", "stats",
    "service_tier", "system_fingerprint", "output", "content", "stop_reason", "text", "finish_reason",
    "tool_calls", "code", "status", "input_tokens", "output_tokens", "prompt_tokens", "completion_tokens",
    "total_tokens", "cache_creation", "reasoning_content", "function", "arguments",
]  # fmt: skip
_TYPES = [
    "message_start", "message_delta", "content_block_delta", "content_block_start", "error", "ping",
    "text_delta", "thinking_delta", "input_json_delta", "response.created", "response.completed",
    "response.failed", "response.incomplete", "response.output_text.delta", "stop", "fp_ollama",
]  # fmt: skip
_SCALAR = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(_TYPES) | st.text(max_size=4)
)  # fmt: skip
_JSON = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5),
    max_leaves=25,
)
_OBJ = st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=8)


@pytest.mark.slow
@settings(max_examples=50, deadline=None)
@given(endpoint=st.sampled_from(ENDPOINTS), strip=st.booleans(),
       events=st.lists(st.tuples(st.none() | st.sampled_from(_TYPES), _OBJ), max_size=8),
       size=st.integers(1, 64))  # fmt: skip
def test_random_events_never_raise(endpoint: str, strip: bool, events: list[tuple[str | None, dict[str, Any]]],
                                   size: int) -> None:  # fmt: skip
    wire = b"".join(
        (b"" if name is None else b"event: " + name.encode() + b"\n")
        + b"data: "
        + orjson.dumps(obj)
        + b"\n\n"
        for name, obj in events
    )
    meter = Meter(endpoint, strip_usage=strip)
    pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
    out = b"".join(meter.feed(p, float(i)) for i, p in enumerate(pieces)) + meter.finish(1e6)
    if not strip or not usage_only_events(wire):
        assert out == wire
    u = meter.usage()
    assert u is None or u.total_tokens == u.input_tokens + u.output_tokens
    for _, obj in events:
        Meter(endpoint).read_body(orjson.dumps(obj))


# -- the unparsed content chunks after the first output still count towards the estimate ----------


def _content_chunk(text: str, finish: str | None = None, spaced: bool = False) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], "usage": None}  # fmt: skip
    # spaced: Python's json.dumps style (", " and ": "), as llama-cpp-python writes it.
    body = json.dumps(chunk).encode() if spaced else orjson.dumps(chunk)
    return b"data: " + body + b"\n\n"


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
@pytest.mark.parametrize(
    "texts",
    [
        pytest.param([f" word{i}" for i in range(30)], id="ascii"),
        pytest.param(["Hello", " wörld", " 天气很好", " ok"] * 5, id="non-ascii"),
        pytest.param(["line\n", 'quote "x"', "tab\t", " plain"] * 5, id="escapes"),
    ],
)
def test_skipped_content_chunks_count_exactly(texts: list[str], spaced: bool) -> None:
    meter = Meter("chat")
    for text in texts:
        meter.feed(_content_chunk(text, spaced=spaced), 1.0)
    meter.feed(_content_chunk("", "stop", spaced=spaced) + b"data: [DONE]\n\n", 2.0)
    assert meter.output_chars == sum(len(t) for t in texts)
    assert meter.finish_reason == "stop" and meter.first_output_at == 1.0 and meter.done


_SHORT = b'data: {"choices":[]}\n\n'  # shorter than the first content chunk: counts 0, not negative
_HEAD, _TAIL = _content_chunk("Q").split(b"Q")  # a content chunk around its text, as the meter learns it
_READS = {
    "one-per-read": [_content_chunk(" a"), _content_chunk(" bb"), _content_chunk(" ccc")],
    "several-per-read": [_content_chunk(" a") + _content_chunk(" bb") + _content_chunk(" ccc")],
    "short-events": [_SHORT + _content_chunk(" x"), _SHORT],
    "comment-between": [_content_chunk(" a") + b": keep-alive\n\n" + _content_chunk(" b")],
    "empty-data": [b"data: \n\n" + _content_chunk(" a")],
    "event-line": [b"event: message\n" + _content_chunk(" a")],
    "forged-finish": [_HEAD + b'a"},"finish_reason":"stop"},{"index":1,"delta":{"content":"b' + _TAIL],
    "two-events-in-template": [_HEAD + b"a\n\ndata: b" + _TAIL],
    "quote-in-text": [_content_chunk(' a"b'), _content_chunk('", "finish_reason": "stop'), _content_chunk(" c")],
    "other-id": [_content_chunk(" a").replace(b'"id":"c"', b'"id":"d"'), _content_chunk(" b")],
    "text-across-events": [_content_chunk(" a")[:-3] + b'"}]}\n\ndata: {"x":"' + _content_chunk(" b")[-20:]],
    "done-after-content": [_content_chunk(" a") + b"data: [DONE]\n\n"],
    "done-in-text": [_content_chunk(" [DONE] ") + _content_chunk(" a")],
    "crlf": [_content_chunk(" a").replace(b"\n\n", b"\r\n\r\n")],
    "extra-blank-line": [_content_chunk(" a") + b"\n" + _content_chunk(" b")],
    "no-space-after-colon": [_content_chunk(" a").replace(b"data: ", b"data:")],
    "finish-mid-read": [_content_chunk(" a") + _content_chunk("", "stop") + b"data: [DONE]\n\n"],
    "usage-mid-read": [_content_chunk(" a") + b'data: {"choices":[],"usage":{"prompt_tokens":1,'
                       b'"completion_tokens":2,"total_tokens":3}}\n\n'],
    # A fast upstream's stream in one read: the deltas are counted unparsed, the rest decoded.
    "whole-stream-in-one-read": [b"".join(_content_chunk(f" w{i}") for i in range(6)) + _content_chunk("", "stop")
                                 + b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":6,'
                                 b'"total_tokens":7}}\n\ndata: [DONE]\n\n'],
    "non-ascii-after-content": [_content_chunk(" a") + _content_chunk(" b") + _content_chunk(" wörld")
                                + _content_chunk(" c")],
    "escape-after-content": [_content_chunk(" a") + _content_chunk("line\n") + _content_chunk(" c")],
    "crlf-after-content": [_content_chunk(" a") + _content_chunk(" b").replace(b"\n\n", b"\r\n\r\n")],
    "error-after-content": [_content_chunk(" a") + b'data: {"error":{"message":"overloaded","type":"x"}}\n\n'],
    "event-line-after-content": [_content_chunk(" a") + b"event: message\n" + _content_chunk(" b")
                                 + b"data: [DONE]\n\n"],
    "template-other-template": [_content_chunk(" a") + _content_chunk(" b")
                                + _content_chunk(" c").replace(b'"id":"c"', b'"id":"d"') + _content_chunk(" d")
                                + b"data: [DONE]\n\n"],
    # Deltas not of the first one's template (another id): counted by the routine checks, up to [DONE].
    "untemplated-then-done": [_content_chunk(" a").replace(b'"id":"c"', b'"id":"d"')
                              + _content_chunk(" b").replace(b'"id":"c"', b'"id":"d"') + b"data: [DONE]\n\n"],
    "template-then-quote": [_content_chunk(" a") + _content_chunk(' say "hi"') + _content_chunk(" b")],
    "template-then-newline-text": [_content_chunk(" a") + _HEAD + b"x\n\ny" + _TAIL + _content_chunk(" b")],
    "torn-after-content": [_content_chunk(" a") + _content_chunk(" b")[:9], _content_chunk(" b")[9:]
                           + b"data: [DONE]\n\n"],
}  # fmt: skip


@pytest.mark.parametrize("strip", [False, True], ids=["pass", "strip"])
@pytest.mark.parametrize("case", sorted(_READS))
def test_whole_reads_counted_unparsed_as_event_by_event(case: str, strip: bool) -> None:
    """Reads of whole events after the first output are counted without decoding: the meter must end in
    the same state, and pass on the same bytes, as when every byte arrives on its own (always decoded)."""
    first = _content_chunk("Hello")
    wire = b"".join(_READS[case])

    def run(reads: list[bytes]) -> tuple[object, ...]:
        meter = Meter("chat", strip_usage=strip)
        out = meter.feed(first, 1.0) + b"".join(meter.feed(r, 2.0) for r in reads) + meter.finish(3.0)
        return (out, meter.events, meter.output_chars, meter.finish_reason, meter.done, meter.first_output_at,
                meter.usage_raw)  # fmt: skip

    assert run(_READS[case]) == run([wire[i : i + 1] for i in range(len(wire))])


# -- Ollama's native NDJSON streams ---------------------------------------------------------------


def test_ollama_ndjson_split_anywhere() -> None:
    lines = [{"model": "llama3.2", "message": {"role": "assistant", "content": ""}, "done": False},
             {"model": "llama3.2", "message": {"role": "assistant", "content": "Hel"}, "done": False},
             {"model": "llama3.2", "message": {"role": "assistant", "content": "lo"}, "done": False},
             {"model": "llama3.2", "message": {"role": "assistant", "content": ""}, "done": True,
              "done_reason": "stop", "total_duration": 2_000_000, "prompt_eval_count": 26, "eval_count": 282,
              "eval_duration": 1_500_000}]  # fmt: skip
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    first_output_end = data.index(b"Hel")
    for cut in range(len(data) + 1):
        meter = Meter("ollama")
        assert meter.feed(data[:cut], 1.0) == data[:cut]
        meter.feed(data[cut:], 2.0)
        meter.finish(3.0)
        usage = meter.usage()
        assert usage is not None and (usage.input_tokens, usage.output_tokens) == (26, 282)
        assert meter.done and meter.finish_reason == "stop" and meter.model == "llama3.2"
        assert meter.output_chars == 5
        assert meter.first_output_at == (1.0 if cut > data.index(b"\n", first_output_end) else 2.0)
        assert meter.server_timing == {"total_ms": 2.0, "generation_ms": 1.5}


def test_ollama_ndjson_error_line() -> None:
    meter = Meter("ollama")
    meter.feed(b'{"model":"m","response":"a","done":false}\n{"error":"model runner crashed"}\n', 1.0)
    assert meter.error_category == "server_error" and "crashed" in (meter.error_detail or "")


# -- the dialect registry ----------------------------------------------------------------------


def test_every_endpoint_has_a_dialect() -> None:
    from proxy.meter import DIALECTS
    from proxy.routes import ENDPOINTS as TABLE

    assert {e.dialect for e in TABLE} == set(DIALECTS)


@pytest.mark.parametrize("dialect", sorted(__import__("proxy.meter", fromlist=["DIALECTS"]).DIALECTS))
def test_the_error_event_of_each_dialect_reads_back_as_an_error(dialect: str) -> None:
    """The event a broken stream ends with is one its own clients (and our meter) see as an error."""
    from proxy.meter import DIALECTS

    event = DIALECTS[dialect].error_event("timeout", "metering-proxy: gone (error id abc)")
    meter = Meter(dialect)
    meter.feed(event, 1.0)
    meter.finish(2.0)
    assert meter.error_category is not None, (dialect, event)
    assert "gone" in (meter.error_detail or "")
