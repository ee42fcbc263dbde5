"""The incremental SSE decoder: hand-written edge cases, and every fixture split at every byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import Event, SSEDecoder
from tests.conftest import load_case, payload_cases

SSE_CASES = [
    pytest.param(provider, case, id=f"{provider}/{case}")
    for provider, case in payload_cases()
    if load_case(provider, case)[1] == "sse"
]


def decode(pieces: list[bytes], max_event_bytes: int | None = None) -> list[Event]:
    """Feed the pieces in order, then flush; return every event."""
    dec = SSEDecoder() if max_event_bytes is None else SSEDecoder(max_event_bytes)
    events: list[Event] = []
    for piece in pieces:
        events += dec.feed(piece)
    events += dec.flush()
    return events


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def raw_of(events: list[Event]) -> bytes:
    return b"".join(ev.raw for ev in events)


# -- hand-written edge cases -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        pytest.param(b"data: a\n\n", [(None, b"a", False)], id="lf"),
        pytest.param(b"data: a\r\n\r\n", [(None, b"a", False)], id="crlf"),
        pytest.param(b"data: a\n\r\n", [(None, b"a", False)], id="lf-then-crlf-blank"),
        pytest.param(b"data: a\r\n\n", [(None, b"a", False)], id="crlf-then-lf-blank"),
        pytest.param(b"data:a\n\n", [(None, b"a", False)], id="no-space-after-colon"),
        pytest.param(b"data:  a\n\n", [(None, b" a", False)], id="only-one-space-stripped"),
        pytest.param(b"data\n\n", [(None, b"", False)], id="field-without-colon"),
        pytest.param(b"data:\ndata: x\n\n", [(None, b"\nx", False)], id="empty-first-data-line"),
        pytest.param(b"data: a\ndata: b\ndata: c\n\n", [(None, b"a\nb\nc", False)], id="multi-line-data"),
        pytest.param(b"data: a\r\ndata: b\r\n\r\n", [(None, b"a\nb", False)], id="multi-line-data-crlf"),
        pytest.param(b": OPENROUTER PROCESSING\n\n", [(None, b"", False)], id="comment-only"),
        pytest.param(b":\n\n", [(None, b"", False)], id="bare-colon-comment"),
        pytest.param(b": ping\ndata: x\n: pong\n\n", [(None, b"x", False)], id="comments-inside-event"),
        pytest.param(b"event: message_start\ndata: {}\n\n", [("message_start", b"{}", False)], id="event-field"),
        pytest.param(b"data: {}\nevent: ping\n\n", [("ping", b"{}", False)], id="event-after-data"),
        pytest.param(b"event: ping\n\n", [("ping", b"", False)], id="event-without-data"),
        pytest.param(b"id: 7\nretry: 1000\ndata: x\n\n", [(None, b"x", False)], id="id-and-retry-ignored"),
        pytest.param(b"foo: bar\ndata: x\n\n", [(None, b"x", False)], id="unknown-field-ignored"),
        pytest.param(b'error: {"code":400,"message":"too long"}\n\n',
                     [(None, b'{"code":400,"message":"too long"}', True)], id="llamacpp-error-field"),
        pytest.param(b"data: a\n\ndata: b\n\n", [(None, b"a", False), (None, b"b", False)], id="two-events"),
        pytest.param(b"data: a\r\n\r\ndata: b\n\n", [(None, b"a", False), (None, b"b", False)], id="crlf-then-lf"),
        pytest.param(b"data: a\n\n\n\ndata: b\n\n",
                     [(None, b"a", False), (None, b"", False), (None, b"b", False)], id="extra-blank-lines"),
        pytest.param(b'data: {"x": "\xc3\xa9\xe2\x82\xac"}\n\n', [(None, b'{"x": "\xc3\xa9\xe2\x82\xac"}', False)],
                     id="utf8-multibyte"),
    ],
)  # fmt: skip
def test_edge_cases(wire: bytes, expected: list[tuple[str | None, bytes, bool]]) -> None:
    events = decode([wire])
    assert [(ev.event, ev.data, ev.is_error_field) for ev in events] == expected
    assert raw_of(events) == wire
    # The same events however the bytes are cut: two pieces at every offset, and byte by byte.
    for cut in range(len(wire) + 1):
        assert decode([wire[:cut], wire[cut:]]) == events, cut
    assert decode(pieces_of(wire, 1)) == events


def test_raw_keeps_exact_bytes_per_event() -> None:
    wire = b": hi\n\nevent: a\r\ndata: 1\r\n\r\ndata: 2\n\n"
    events = decode([wire])
    assert [ev.raw for ev in events] == [b": hi\n\n", b"event: a\r\ndata: 1\r\n\r\n", b"data: 2\n\n"]


def test_incomplete_event_is_pending_until_its_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"a":') == []
    assert dec.pending == b'data: {"a":'
    assert dec.feed(b" 1}\n") == []
    [ev] = dec.feed(b"\ndata: nex")
    assert ev.data == b'{"a": 1}' and ev.raw == b'data: {"a": 1}\n\n'
    assert dec.pending == b"data: nex"


def test_empty_chunk_is_harmless() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"") == []
    assert dec.feed(b"data: x") == []
    assert dec.feed(b"") == []
    assert dec.pending == b"data: x"
    [ev] = dec.feed(b"\n\n")
    assert ev.data == b"x"


def test_flush_returns_final_event_without_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: 1\n\ndata: [DONE]") == [Event(None, b"1", b"data: 1\n\n")]
    assert dec.flush() == [Event(None, b"[DONE]", b"data: [DONE]")]
    assert dec.pending == b""
    assert dec.flush() == []


def test_flush_single_newline_terminated_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: [DONE]\n") == []
    assert dec.flush() == [Event(None, b"[DONE]", b"data: [DONE]\n")]


def test_flush_of_nothing() -> None:
    assert SSEDecoder().flush() == []


def test_flush_keeps_a_trailing_stray_newline() -> None:
    # A stream ending with one newline too many: that byte is still part of the stream, and a caller
    # that rebuilds the stream from Event.raw (Meter with strip_usage) must be able to pass it on.
    events = decode([b"data: [DONE]\n\n\n"])
    assert [ev.data for ev in events] == [b"[DONE]", b""]
    assert raw_of(events) == b"data: [DONE]\n\n\n"


def test_lone_cr_is_not_a_line_end() -> None:
    # Documented: no LLM server uses a bare CR, so it stays inside the line.
    [ev] = decode([b"data: a\rb\n\n"])
    assert ev.data == b"a\rb"


def test_runaway_event_is_bounded() -> None:
    limit = 1024
    dec = SSEDecoder(max_event_bytes=limit)
    fed = b""
    out: list[Event] = []
    for _ in range(40):  # 40 x 500 bytes of one event that never ends
        piece = b"data: " + b"x" * 494
        fed += piece
        out += dec.feed(piece)
        assert len(dec.pending) <= limit
    # The decoder recovers: the next complete event after the runaway one is decoded normally.
    tail = b"\n\ndata: ok\n\n"
    fed += tail
    out += dec.feed(tail)
    out += dec.flush()
    assert out[-1].data == b"ok"
    assert all(ev.data in (b"", b"ok") or ev.data.strip(b"x") == b"" for ev in out)
    # No byte is silently lost: a caller re-emitting Event.raw still passes the stream on unchanged.
    assert raw_of(out) == fed


def test_event_just_under_the_limit_is_kept_whole() -> None:
    body = b"data: " + b"y" * 900 + b"\n\n"
    dec = SSEDecoder(max_event_bytes=len(body))
    events = []
    for piece in pieces_of(body, 100):
        events += dec.feed(piece)
    assert [ev.data for ev in events] == [b"y" * 900]


# -- every fixture, cut everywhere --------------------------------------------------------------


@pytest.mark.parametrize(("provider", "case"), SSE_CASES)
def test_fixture_whole(provider: str, case: str) -> None:
    data, _, expected = load_case(provider, case)
    events = decode([data])
    assert raw_of(events) == data
    assert b"\r" not in data and b"\n\n\n" not in data  # so the naive split below is a valid oracle
    assert [ev.raw for ev in events] == [part + b"\n\n" for part in data.split(b"\n\n")[:-1]]
    counted = [ev for ev in events if ev.data and not ev.is_error_field]
    if expected["first_output_event"] is not None:
        assert expected["first_output_event"] < len(counted)
    if case == "chat_stream_old_error":
        assert sum(ev.is_error_field for ev in events) == 1


@pytest.mark.parametrize(("provider", "case"), SSE_CASES)
def test_fixture_every_split(provider: str, case: str) -> None:
    data, _, _ = load_case(provider, case)
    whole = decode([data])
    for cut in range(len(data) + 1):
        events = decode([data[:cut], data[cut:]])
        assert events == whole, f"split at byte {cut}"
    assert decode(pieces_of(data, 1)) == whole
    assert raw_of(decode(pieces_of(data, 1))) == data


@pytest.mark.parametrize(("provider", "case"), SSE_CASES)
def test_fixture_crlf_variant(provider: str, case: str) -> None:
    # The same stream with CRLF line ends decodes to the same fields, in pieces of any size.
    data, _, _ = load_case(provider, case)
    crlf = data.replace(b"\n", b"\r\n")
    lf_events = decode([data])
    for size in (1, 3, 7, 64, len(crlf)):
        events = decode(pieces_of(crlf, size))
        assert [(e.event, e.data, e.is_error_field) for e in events] == [
            (e.event, e.data, e.is_error_field) for e in lf_events
        ]
        assert raw_of(events) == crlf


_FIXTURE_DATA = [load_case(p, c)[0] for p, c in payload_cases() if load_case(p, c)[1] == "sse"]


@settings(max_examples=50, deadline=None)
@given(index=st.integers(0, len(_FIXTURE_DATA) - 1), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_fixture_arbitrary_splits(index: int, cuts: list[int]) -> None:
    data = _FIXTURE_DATA[index]
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert decode(pieces) == decode([data])


@settings(max_examples=50, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=12))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    events = decode(chunks)
    assert raw_of(events) == b"".join(chunks)


_SSE_ALPHABET = st.sampled_from([b"data: ", b"data:", b"event: ", b"error: ", b": ", b"\n", b"\r\n", b"\r",
                                 b"x", b"{}", b"[DONE]", b"\xff", b" "])  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(tokens=st.lists(_SSE_ALPHABET, max_size=40), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_sse_like_bytes_split_anywhere(tokens: list[bytes], cuts: list[int]) -> None:
    data = b"".join(tokens)
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole = decode([data])
    assert raw_of(whole) == data
    assert decode(pieces) == whole
