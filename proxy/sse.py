"""A pure, incremental Server-Sent Events decoder over bytes.

Network chunks split events anywhere, so bytes are buffered until an event is complete (a blank
line). Each event keeps the exact bytes it arrived as, so a caller can drop one event from a stream
without touching the others. Lines end with LF or CRLF; a lone CR is not treated as a line end
(no LLM server sends one). Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations


class Event:
    """One complete SSE event.

    A plain slotted class rather than a frozen dataclass: one is built per streamed event, and a
    frozen dataclass's __init__ (object.__setattr__ per field) costs several times as much.
    """

    __slots__ = ("event", "data", "raw", "is_error_field")

    def __init__(self, event: str | None, data: bytes, raw: bytes, is_error_field: bool = False) -> None:
        self.event = event
        """The ``event:`` field (Anthropic, Responses API), or None."""
        self.data = data
        """The ``data:`` lines joined with LF, or the payload of a non-standard ``error:`` line.

        Empty for comment-only events, which are still returned so their bytes can be passed on."""
        self.raw = raw
        """The event's bytes exactly as received, its terminating blank line included."""
        self.is_error_field = is_error_field
        """True for llama.cpp's old non-standard ``error: {...}`` line."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.event, self.data, self.raw, self.is_error_field) == (
            other.event, other.data, other.raw, other.is_error_field,
        )  # fmt: skip

    def __repr__(self) -> str:
        fields = f"event={self.event!r}, data={self.data!r}, raw={self.raw!r}, is_error_field={self.is_error_field}"
        return f"Event({fields})"


class SSEDecoder:
    """Feed byte chunks, get complete events back; keeps the incomplete tail for the next chunk."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buf = b""
        self._max = max_event_bytes

    @property
    def pending(self) -> bytes:
        """Bytes received that do not yet form a complete event."""
        return self._buf

    def feed(self, chunk: bytes) -> list[Event]:
        """Return the events completed by this chunk, in order."""
        buf = self._buf + chunk if self._buf else chunk
        events: list[Event] = []
        start = 0
        has_cr = b"\r" in buf
        while True:
            end = _event_end(buf, start) if has_cr else buf.find(b"\n\n", start)
            if end >= 0 and not has_cr:
                end += 2
            if end < 0:
                break
            events.append(_parse(buf[start:end]))
            start = end
        rest = buf[start:]
        if len(rest) > self._max:
            # A runaway "event" with no blank line: stop buffering it rather than grow without bound.
            # Its bytes are still handed back, unparsed, as an opaque event with no data, so a caller
            # that rebuilds the stream from Event.raw (Meter with strip_usage) loses none of them.
            events.append(Event(event=None, data=b"", raw=rest))
            rest = b""
        self._buf = rest
        return events

    def flush(self) -> list[Event]:
        """Return a last event left without its blank line when the stream ended."""
        buf, self._buf = self._buf, b""
        # Whitespace-only leftovers (a stray trailing newline) are still returned, as an event without
        # data: their bytes belong to the stream and a caller re-emitting Event.raw must pass them on.
        if not buf:
            return []
        return [_parse(buf)]


def _event_end(buf: bytes, start: int) -> int:
    """Return the index just past the next blank line at or after start, or -1."""
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\r\n\r\n", start)
    mixed = buf.find(b"\n\r\n", start)
    best = -1
    for pos, width in ((lf, 2), (crlf, 4), (mixed, 3)):
        if pos >= 0 and (best < 0 or pos + width < best):
            best = pos + width
    return best


def _parse(raw: bytes) -> Event:
    # Fast path for the usual one-line event, b"data: {...}\n\n": its only LF pair is the end.
    if raw[:6] == b"data: " and raw.find(b"\n") == len(raw) - 2 and raw[-3:-2] != b"\r":
        return Event(None, raw[6:-2], raw)
    event: str | None = None
    data: list[bytes] = []
    is_error = False
    for line in raw.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line or line[0] == 0x3A:  # blank, or ':' comment (OpenRouter keep-alives)
            continue
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"error":
            data.append(value)
            is_error = True
    return Event(event=event, data=b"\n".join(data), raw=raw, is_error_field=is_error)
