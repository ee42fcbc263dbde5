"""W3C Trace Context (traceparent, tracestate) for one call, and the facts a span is built from.

Nothing here imports OpenTelemetry: with OTel off the request path only parses an incoming traceparent
(so the record can carry its trace_id); with it on, the proxy's own span id is made here, before the call
is sent, because the traceparent that goes upstream must name it. See https://www.w3.org/TR/trace-context/.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

# version-traceid-parentid-flags, lower-case hex only (uppercase is invalid per the spec).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_TRACESTATE = 512  # the spec's 32 members of up to 256 bytes; 512 is what vendors must at least pass on


@dataclass(frozen=True, slots=True)
class Parent:
    """A valid incoming traceparent: the client's trace and span."""

    trace_id: str
    span_id: str
    sampled: bool


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace one call belongs to, and (when the proxy traces) the proxy's own span in it."""

    trace_id: str
    """32 lower-case hex digits: the record's trace_id."""
    span_id: str | None
    """The proxy's span (16 hex digits), or None when the proxy does not trace (OTel off)."""
    parent: Parent | None
    """The client's span, from its traceparent, or None when it sent none (or an invalid one)."""
    sampled: bool
    """Whether the trace is recorded: the parent's flag, else True (the proxy starts a sampled trace)."""
    tracestate: str | None
    """The client's tracestate, passed on with the proxy's traceparent."""

    def traceparent(self) -> str:
        """The traceparent the proxy sends upstream (only when it has a span of its own)."""
        assert self.span_id is not None
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse(value: str | None) -> Parent | None:
    """A traceparent header value, or None when absent or invalid (then the trace is not continued)."""
    if value is None:
        return None
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    # Version ff is forbidden; version 00 has exactly four fields; a later version may add fields after
    # a dash, and its first four are read as 00's (the spec's forward compatibility rule).
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id=trace_id, span_id=span_id, sampled=bool(int(flags, 16) & 1))


def _one(headers: Mapping[str, str], name: str) -> str | None:
    getall = getattr(headers, "getall", None)
    if getall is None:
        return headers.get(name)
    values = getall(name, ())
    return values[0] if len(values) == 1 else None  # two traceparents: neither can be trusted


def incoming(headers: Mapping[str, str]) -> TraceContext | None:
    """OTel off: the client's trace, if it sent a valid traceparent; the proxy makes no span of its own."""
    parent = parse(_one(headers, "traceparent"))
    if parent is None:
        return None
    return TraceContext(parent.trace_id, None, parent, parent.sampled, None)


def begin(headers: Mapping[str, str]) -> TraceContext:
    """OTel on: a new span of the proxy's, the child of the client's span or the root of a new trace."""
    parent = parse(_one(headers, "traceparent"))
    span_id = os.urandom(8).hex()
    if parent is None:
        # An invalid traceparent starts a new trace, and its tracestate goes with it (the spec's rule).
        return TraceContext(os.urandom(16).hex(), span_id, None, True, None)
    state = _one(headers, "tracestate")
    if state is not None and len(state) > _MAX_TRACESTATE:
        state = None
    return TraceContext(parent.trace_id, span_id, parent, parent.sampled, state or None)


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What a span needs beyond the call's Record: its trace, its wall-clock times, where it went."""

    trace: TraceContext
    start_ns: int
    """When the call arrived (Unix time in ns)."""
    first_chunk_ns: int | None
    """When a stream's first output arrived; None for buffered calls and streams without output."""
    end_ns: int
    """When the call's record was made."""
    operation: str
    """gen_ai.operation.name: chat, text_completion or embeddings."""
    server_address: str | None
    server_port: int | None
    response_id: str | None
    """The response's own id (chatcmpl-..., msg_..., resp_...), when it had one."""
