"""Read what a response says about itself: usage, model, finish reason, first output, errors.

A ``Meter`` sees a copy of the traffic. For streams it is fed chunk by chunk and decodes SSE
incrementally; for buffered responses it reads the body once. It never changes what the client
gets, except for dropping the usage-only chunk the proxy itself asked for (``strip_usage``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import usage as U
from proxy.errors import Category, category_for_stream_error, scrub
from proxy.sse import Event, SSEDecoder

_MAX_LINE = 16 * 1024 * 1024
_MAX_ID = 256
# Ollama's final object: the fields kept as usage_raw (its counts and durations, never text).
_OLLAMA_METRICS = ("prompt_eval_count", "prompt_eval_cached_count", "eval_count", "total_duration",
                   "load_duration", "prompt_eval_duration", "eval_duration")  # fmt: skip

# Anthropic content_block_delta types that carry generated output.
_ANTHROPIC_OUTPUT = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
# Chat delta fields that carry generated output (reasoning_content: DeepSeek/vLLM; reasoning: others).
_CHAT_OUTPUT = frozenset({"content", "reasoning_content", "reasoning", "refusal"})


_MARKER = re.compile(rb'"(?:usage|finish_reason)"\s*+:\s*+(?!null)|"(?:error|tool_calls|timings|stats|x_groq)"')


_NON_ASCII = re.compile(rb"[\x80-\xff]")


def _suspect_at(chunk: bytes, start: int = 0) -> int:
    """Where, from start, the first byte is that an unparsed count must stop at: a marker, [DONE], CR, a
    backslash or non-ASCII; -1 when there is none. Separate searches: one regex of them all tried its
    alternatives at every byte, some 170 instructions a byte."""
    cut = len(chunk)
    for needle in (b"[DONE]", b"\\", b"\r"):
        at = chunk.find(needle, start, cut)
        if at >= 0:
            cut = at
    if not chunk.isascii() and (m := _NON_ASCII.search(chunk, start, cut)) is not None:
        cut = m.start()
    if (m := _MARKER.search(chunk, start)) is not None and m.start() < cut:
        cut = m.start()
    return cut if cut < len(chunk) else -1


def _plain(data: bytes) -> bool:
    """ASCII JSON without escapes: its byte length equals its character count."""
    return data.isascii() and b"\\" not in data


def _routine_chunk(data: bytes) -> bool:
    """Tell a plain content delta (skippable) from a chunk that carries usage, an end or an error.

    A JSON string cannot hold an unescaped quote, so generated text never forges a marker; usage and
    finish_reason only count as absent in their null form, any other spelling is parsed to be safe.
    """
    return _MARKER.search(data) is None


#: Dialects whose content chunks teach the meter a template (_overhead, _template), and how many events of a
#: read it meters one by one looking for the first of them.
_LEARNING = frozenset({"chat", "completions"})
_LEARN_EVENTS = 4


class Meter:
    """Collects what one response reveals about usage, timing and errors."""

    __slots__ = (
        "dialect", "spec", "strip_usage", "decoder", "usage_raw", "model", "finish_reason", "first_output_at",
        "output_chars", "error_category", "error_detail", "server_timing", "events", "done", "provider_hint",
        "service_tier", "response_id", "usage_final", "tool_counts", "_anthropic_usage", "_overhead", "_line",
        "_template",
    )  # fmt: skip

    def __init__(self, dialect: str, strip_usage: bool = False) -> None:
        self.dialect = dialect
        self.spec = DIALECTS[dialect]
        self.strip_usage = strip_usage
        self.decoder = SSEDecoder()
        self.usage_raw: dict[str, Any] | None = None
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.first_output_at: float | None = None
        self.output_chars = 0
        self.error_category: Category | None = None
        self.error_detail: str | None = None
        self.server_timing: dict[str, float] | None = None
        self.events = 0
        self.done = False
        """The dialect's final event was seen ([DONE], message_stop, response.completed, done: true)."""
        self.provider_hint: str | None = None
        self.service_tier: str | None = None
        self.response_id: str | None = None
        """The response's own id (chatcmpl-..., msg_..., resp_...): gen_ai.response.id on the call's span."""
        self.tool_counts: dict[str, int] = {}
        """Server-side tool calls counted from the response's items (Responses ``web_search_call``...,
        Anthropic ``server_tool_use`` blocks): what usage() falls back on when the usage block has none."""
        self._anthropic_usage: dict[str, Any] | None = None
        self.usage_final = True
        self._overhead = -1
        self._line = b""
        """Chat/completions: bytes of a content chunk that are not text; -1 until measured."""
        self._template: tuple[bytes, bytes] | None = None
        """Chat/completions: the read of the first content chunk around its text (see _templated_head)."""

    # -- streams ---------------------------------------------------------------------------

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Meter one stream chunk; return the bytes to pass on (the chunk itself unless stripping)."""
        if self.spec.ndjson:
            self._ndjson(chunk, now)
            return chunk
        if self._overhead < 0 and self.dialect in _LEARNING and not self.decoder.pending:
            return self._feed_learning(chunk, now)
        return self._feed(chunk, now)

    def _feed_learning(self, chunk: bytes, now: float) -> bytes:
        """Meter a read from before the first content event an event at a time, until that event has taught
        the fast paths their template; then the rest of the read at once.

        A fast upstream's whole stream can come in one or two reads; decoded at once, every event of it
        would be. The decoder reads any split of a stream the same (tests split every stream at every
        byte), so cutting the read at event ends changes nothing but the work.
        """
        parts = []
        start = 0
        for _ in range(_LEARN_EVENTS):
            end = chunk.find(b"\n\n", start) + 2
            if end < 2 or end >= len(chunk):
                break
            parts.append(self._feed(chunk[start:end], now))
            start = end
            if self._overhead >= 0 or self.decoder.pending:
                break
        if not parts:
            return self._feed(chunk, now)
        parts.append(self._feed(chunk[start:], now))
        return b"".join(parts)

    def _feed(self, chunk: bytes, now: float) -> bytes:
        aligned = not self.decoder.pending
        head = 0
        if aligned and self._overhead >= 0:
            head = self._routine_events(chunk, self._templated_head(chunk))
            if head == len(chunk):
                return chunk
        events = self.decoder.feed(chunk[head:] if head else chunk)
        if not self.strip_usage:
            for ev in events:
                self._event(ev, now)
            return chunk
        kept = [ev.raw for ev in events if self._event(ev, now)]
        if aligned and len(kept) == len(events) and not self.decoder.pending:
            return chunk  # the chunk was whole events and none was dropped: no copy needed
        return chunk[:head] + b"".join(kept)

    def _templated_head(self, chunk: bytes) -> int:
        """Count the events a read starts with that are the first content chunk with other text (no search, no
        decoding); return their length. Most reads are one such event; a fast upstream's hold many, then its
        final events.

        An upstream writes every content delta of a stream from one template (same id, created, model); an
        event that starts and ends as the first one did, with only ASCII between them and no quote, backslash
        or LF, is that same JSON with another string: the string is its output.
        """
        template = self._template
        if template is None:
            return 0
        head, tail = template
        least = len(head) + len(tail)
        start = chars = n = 0
        while (end := chunk.find(b"\n\n", start) + 2) >= 2:
            if end - start < least or not chunk.startswith(head, start) or not chunk.endswith(tail, start, end):
                break
            text = chunk[start + len(head) : end - len(tail)]
            if not text.isascii() or b'"' in text or b"\\" in text or b"\n" in text:
                break
            n += 1
            chars += len(text)
            start = end
        self.events += n
        self.output_chars += chars
        return start

    def _learn_template(self, data: bytes, text: Any) -> None:
        """Keep the first content chunk's bytes around its text, if it is plain and has no marker."""
        if not isinstance(text, str) or not text or b"\n" in data or b"\r" in data:
            return  # a multi-line data field is not one line on the wire: no template to match reads with
        for key in (b'"content":"', b'"content": "'):
            needle = key + text.encode() + b'"'
            at = data.find(needle)
            if at >= 0 and data.find(needle, at + 1) < 0:
                head, tail = b"data: " + data[: at + len(key)], data[at + len(needle) - 1 :] + b"\n\n"
                if _MARKER.search(head + tail) is None:
                    self._template = (head, tail)
                return

    def _routine_events(self, chunk: bytes, start: int) -> int:
        """Count, without decoding, the whole routine content events from start (an event's start) up to the
        event holding the first byte that needs a parse, or to the end; return where they stop (start: none).

        What is counted is exactly what _event would count unparsed: one-line ``data: `` events, ASCII
        without escapes, no marker (a JSON string cannot forge one), no [DONE], no empty data. The read a
        stream ends with often holds its last deltas together with the finish, usage and [DONE] events:
        only from the first of those on is decoded.
        """
        suspect = _suspect_at(chunk, start)
        end = len(chunk) if suspect < 0 else chunk.rfind(b"\n\n", start, suspect) + 2
        if end < start + 2 or not chunk.endswith(b"\n\n", start, end):
            return start
        n = chunk.count(b"\n\n", start, end)
        if chunk.count(b"\n", start, end) != 2 * n:
            return start  # a multi-line event (event:, comments...) or stray blank lines: the decoder reads it
        overhead = self._overhead + 8  # b"data: " before the JSON, the blank line after it
        chars = 0
        at = start
        while at < end:
            stop = chunk.find(b"\n\n", at, end) + 2
            if stop - at <= 8 or not chunk.startswith(b"data: ", at):
                return start
            chars += max(stop - at - overhead, 0)
            at = stop
        self.events += n
        self.output_chars += chars
        return end

    def finish(self, now: float) -> bytes:
        """Meter what is left when the stream ends; return any bytes still owed to the client."""
        if self.spec.ndjson:
            self._ndjson(b"\n", now)
            return b""
        events = self.decoder.flush()
        kept = [ev.raw for ev in events if self._event(ev, now)]
        return b"".join(kept) if self.strip_usage else b""

    def _event(self, ev: Event, now: float) -> bool:
        """Meter one event; return False when it is the injected usage-only chunk to drop."""
        data = ev.data
        if not data:
            return True
        self.events += 1
        if data == b"[DONE]":
            self.done = True
            return True
        if self._overhead >= 0 and not ev.is_error_field and _plain(data) and _routine_chunk(data):
            # A plain content delta after the first output: nothing in it changes the record but
            # its length, so skip the JSON parse (most of a stream's metering cost) and count it.
            # Only ASCII without escapes is skipped, so its byte length is its character count.
            self.output_chars += max(len(data) - self._overhead, 0)
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if ev.is_error_field:
                self._error(Category.SERVER_ERROR, data.decode("utf-8", "replace"))
            return True
        if not isinstance(obj, dict):
            return True
        if ev.is_error_field:
            self._error_from(obj)
            return True
        return self.spec.event(self, ev.event or obj.get("type"), obj, now, data)

    def _ndjson(self, chunk: bytes, now: float) -> None:
        """Ollama's native streams: one JSON object per line; the last has done: true and metrics."""
        buf = self._line + chunk
        *lines, rest = buf.split(b"\n")
        self._line = rest if len(rest) <= _MAX_LINE else b""  # a runaway line is not buffered forever
        for line in lines:
            if not line.strip():
                continue
            self.events += 1
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                self._ollama_object(obj, now)

    def _ollama_object(self, obj: dict[str, Any], now: float) -> None:
        if "error" in obj:
            self._error_from(obj)
            return
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        chars = _text_len(obj.get("response")) + _text_len(obj.get("thinking"))
        message = _as_dict(obj.get("message"))
        chars += _text_len(message.get("content")) + _text_len(message.get("thinking"))
        if message.get("tool_calls"):
            chars += max(1, _text_len(message.get("tool_calls")))
        if chars:
            self.output_chars += chars
            if self.first_output_at is None:
                self.first_output_at = now
        if obj.get("done") is True or "prompt_eval_count" in obj or "eval_count" in obj:
            self.done = obj.get("done") is True or self.done
            if isinstance(obj.get("done_reason"), str):
                self.finish_reason = obj["done_reason"]
            self.usage_raw = {k: obj[k] for k in _OLLAMA_METRICS if k in obj}
            self.server_timing = U.server_timing(obj)
            self.provider_hint = "ollama"

    def _chat_chunk(self, obj: dict[str, Any], now: float, data: bytes = b"") -> bool:
        err = obj.get("error")
        if err:
            self._error_from(obj)
            return True
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if self.response_id is None:
            self._id(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            had_output = self.first_output_at is not None
            before = self.output_chars
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice, now)
            if not had_output and self.first_output_at is not None and len(choices) == 1 and _plain(data):
                # The wire bytes around the text of the first content chunk: later plain content
                # chunks are counted as their length minus this, unparsed (see _routine_chunk).
                self._overhead = len(data) - (self.output_chars - before)
                delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
                if isinstance(delta, dict) and len(delta) <= 2 and set(delta) <= {"role", "content"}:
                    self._learn_template(data, delta.get("content"))
        usage = obj.get("usage")
        keep = True
        if isinstance(usage, dict):
            self.usage_raw = usage
            if self.strip_usage and choices == []:
                keep = False
        else:
            groq = obj.get("x_groq")
            if isinstance(groq, dict) and isinstance(groq.get("usage"), dict):
                self.usage_raw = groq["usage"]
                self.provider_hint = "groq"
        self._extras(obj)
        return keep

    def _choice(self, choice: dict[str, Any], now: float) -> None:
        chars = 0
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():  # deltas hold one or two keys: cheaper than probing four
                if key in _CHAT_OUTPUT and isinstance(value, str):
                    chars += len(value)
            calls = delta.get("tool_calls")
            if isinstance(calls, list) and calls:
                # A tool-call delta is output even when its arguments fragment is still empty.
                chars += max(1, _text_len(calls))
        text = choice.get("text")
        if isinstance(text, str):
            chars += len(text)
        if chars:
            self.output_chars += chars
            if self.first_output_at is None:
                self.first_output_at = now
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason

    def _anthropic_event(self, kind: Any, obj: dict[str, Any], now: float) -> None:
        if kind == "content_block_delta":
            # Wire values of the wrong type (a string delta, a list type, a numeric text) must not raise.
            delta = _as_dict(obj.get("delta"))
            dtype = delta.get("type")
            field = _ANTHROPIC_OUTPUT.get(dtype) if isinstance(dtype, str) else None
            if field:
                self.output_chars += _text_len(delta.get(field))
                if self.first_output_at is None:
                    self.first_output_at = now
        elif kind == "content_block_start":
            self._count_anthropic_block(obj.get("content_block"))
        elif kind == "message_start":
            message = _as_dict(obj.get("message"))  # not `or {}`: a non-dict must not raise
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            self._id(message)
            if isinstance(message.get("usage"), dict):
                self._anthropic_usage = dict(message["usage"])
                self.usage_raw = self._anthropic_usage
                # message_start's output_tokens is a placeholder until message_delta arrives.
                self.usage_final = False
        elif kind == "message_delta":
            delta = _as_dict(obj.get("delta"))  # not `or {}`: a non-dict must not raise
            if isinstance(delta.get("stop_reason"), str):
                self.finish_reason = delta["stop_reason"]
            if isinstance(obj.get("usage"), dict):
                self._anthropic_usage = U.merge_anthropic(self._anthropic_usage, obj["usage"])
                self.usage_raw = self._anthropic_usage
                self.usage_final = True
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self._error_from(obj)

    def _count_anthropic_block(self, block: Any) -> None:
        block = _as_dict(block)
        name = block.get("name")
        if block.get("type") == "server_tool_use" and isinstance(name, str) and name in U.ANTHROPIC_SERVER_TOOLS:
            self.tool_counts[name] = self.tool_counts.get(name, 0) + 1

    def _responses_event(self, kind: Any, obj: dict[str, Any], now: float) -> None:
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            delta = obj.get("delta")
            if delta:
                self.output_chars += len(delta) if isinstance(delta, str) else 1
                if self.first_output_at is None:
                    self.first_output_at = now
        elif kind == "response.output_item.done":
            # Counted as they finish, so a stream cut before response.completed still shows its searches.
            for name, n in U.responses_tool_calls([obj.get("item")]).items():
                self.tool_counts[name] = self.tool_counts.get(name, 0) + n
        elif kind in ("response.completed", "response.incomplete", "response.failed", "response.created"):
            response = _as_dict(obj.get("response"))  # not `or {}`: a non-dict must not raise
            self._responses_object(response)
            if kind != "response.created" and isinstance(response.get("output"), list):
                self.tool_counts = U.responses_tool_calls(response["output"])  # the whole list: it wins
            self.done = kind != "response.created"
            if kind == "response.failed":
                err = _as_dict(response.get("error"))
                self._error(category_for_stream_error(str(err.get("code") or "server_error")),
                            str(err.get("message") or "response.failed"))  # fmt: skip
        elif kind == "error":
            self._error_from(obj)

    def _responses_object(self, response: dict[str, Any]) -> None:
        if isinstance(response.get("model"), str):
            self.model = response["model"]
        self._id(response)
        if isinstance(response.get("usage"), dict):
            self.usage_raw = response["usage"]
        status = response.get("status")
        if isinstance(status, str) and status not in ("in_progress", "queued"):
            self.finish_reason = status
        if isinstance(response.get("service_tier"), str):
            self.service_tier = response["service_tier"]

    def _extras(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("service_tier"), str):
            self.service_tier = obj["service_tier"]
        if "timings" in obj or "x_groq" in obj or "stats" in obj:
            timing = U.server_timing(obj)
            if timing:
                self.server_timing = timing
        if obj.get("system_fingerprint") == "fp_ollama":
            self.provider_hint = "ollama"
        elif "timings" in obj:
            self.provider_hint = self.provider_hint or "llamacpp"
        elif "stats" in obj:
            self.provider_hint = self.provider_hint or "lmstudio"

    def _id(self, obj: dict[str, Any]) -> None:
        rid = obj.get("id")
        if isinstance(rid, str) and rid:
            self.response_id = rid[:_MAX_ID]  # an upstream's id is shown, not trusted: bounded

    def _error_from(self, obj: dict[str, Any]) -> None:
        """Record an in-band error of any dialect: nested, flat, or Ollama's plain string."""
        err = obj.get("error", obj)
        if isinstance(err, str):
            self._error(Category.SERVER_ERROR, err)
            return
        if not isinstance(err, dict):
            err = obj
        kind = str(err.get("type") or err.get("code") or "server_error")
        if kind == "error" and "code" in err:
            kind = str(err["code"])
        self._error(category_for_stream_error(kind), str(err.get("message") or kind))

    def _error(self, category: Category, detail: str) -> None:
        if self.error_category is None:
            self.error_category = category
            self.error_detail = scrub(detail)

    # -- buffered bodies -------------------------------------------------------------------

    def read_body(self, body: bytes) -> bool:
        """Meter a complete JSON body; return False when it is not a JSON object."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        self.spec.body(self, obj)
        return True

    def _responses_body(self, obj: dict[str, Any]) -> None:
        self._responses_object(obj)
        self.output_chars += _text_len(obj.get("output"))
        self.tool_counts = U.responses_tool_calls(obj.get("output"))

    def _anthropic_body(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        self._id(obj)
        if isinstance(obj.get("usage"), dict):
            self.usage_raw = obj["usage"]
        if isinstance(obj.get("stop_reason"), str):
            self.finish_reason = obj["stop_reason"]
        content = obj.get("content")
        self.output_chars += _text_len(content)
        for block in content if isinstance(content, list) else ():
            self._count_anthropic_block(block)

    def _chat_body(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        self._id(obj)
        if isinstance(obj.get("usage"), dict):
            self.usage_raw = obj["usage"]
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():  # a non-list must not raise
            if isinstance(choice, dict):
                if isinstance(choice.get("finish_reason"), str):
                    self.finish_reason = choice["finish_reason"]
                self.output_chars += _text_len(choice.get("message")) + _text_len(choice.get("text"))
        if self.usage_raw is None and isinstance(_as_dict(obj.get("x_groq")).get("usage"), dict):
            self.usage_raw = obj["x_groq"]["usage"]
        self._extras(obj)

    def usage(self) -> U.Usage | None:
        """Return the normalised usage the upstream reported, or None if it reported none."""
        raw = self.usage_raw
        if raw is None:
            return None
        return U.with_tool_calls(self.spec.usage(raw, self.service_tier), self.tool_counts)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one API family's responses are read and how its streams end in error: the only dialect switch."""

    ndjson: bool
    """Streams are JSON lines (Ollama's native API), not Server-Sent Events."""
    event: Callable[[Meter, Any, dict[str, Any], float, bytes], bool]
    """Meter one parsed stream event (meter, event type, object, time, raw data); False drops it."""
    body: Callable[[Meter, dict[str, Any]], None]
    """Meter a complete (buffered) JSON body."""
    usage: Callable[[dict[str, Any], str | None], U.Usage]
    """Normalise the reported usage block (raw, service tier)."""
    error_event: Callable[[str, str], bytes]
    """The event that ends a broken stream, in the client's own protocol (category, message)."""


def _chat_error(category: str, message: str) -> bytes:
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": category}}
    return b"\n\ndata: " + orjson.dumps(payload) + b"\n\n"


def _anthropic_error(category: str, message: str) -> bytes:
    payload = {"type": "error", "error": {"type": "timeout_error" if category == "timeout" else "api_error",
                                          "message": message}}  # fmt: skip
    return b"\n\nevent: error\ndata: " + orjson.dumps(payload) + b"\n\n"


def _responses_error(category: str, message: str) -> bytes:
    payload = {"type": "error", "code": category, "message": message, "param": None}
    return b"\n\nevent: error\ndata: " + orjson.dumps(payload) + b"\n\n"


def _ollama_error(category: str, message: str) -> bytes:
    return b"\n" + orjson.dumps({"error": message}) + b"\n"  # Ollama's own mid-stream error: an NDJSON line


def _anthropic_event(m: Meter, kind: Any, obj: dict[str, Any], now: float, data: bytes) -> bool:
    m._anthropic_event(kind, obj, now)
    return True


def _responses_event(m: Meter, kind: Any, obj: dict[str, Any], now: float, data: bytes) -> bool:
    m._responses_event(kind, obj, now)
    return True


def _no_event(m: Meter, kind: Any, obj: dict[str, Any], now: float, data: bytes) -> bool:
    return True  # NDJSON streams are read line by line (Meter._ndjson), not as events


_CHAT = Dialect(ndjson=False, event=lambda m, kind, obj, now, data: m._chat_chunk(obj, now, data),
                body=Meter._chat_body, usage=U.from_raw, error_event=_chat_error)  # fmt: skip
#: Every dialect the meter reads, by the name the endpoint table gives it (routes.ENDPOINTS).
DIALECTS: dict[str, Dialect] = {
    "chat": _CHAT,
    "completions": _CHAT,
    "embeddings": _CHAT,
    "messages": Dialect(ndjson=False, event=_anthropic_event, body=Meter._anthropic_body, usage=U.from_anthropic,
                        error_event=_anthropic_error),
    "responses": Dialect(ndjson=False, event=_responses_event, body=Meter._responses_body,
                         usage=U.from_responses, error_event=_responses_error),
    "ollama": Dialect(ndjson=True, event=_no_event, body=lambda m, obj: m._ollama_object(obj, 0.0),
                      usage=lambda raw, tier: U.from_ollama_native(raw), error_event=_ollama_error),
}  # fmt: skip


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


#: How deep _text_len looks: real payloads nest a few levels; orjson accepts 1024, which
#: would overflow Python's recursion limit (RecursionError out of read_body or the record).
_MAX_DEPTH = 32


def _text_len(value: Any, depth: int = 0) -> int:
    """Count the characters of generated text in a response fragment, without keeping it."""
    if isinstance(value, str):
        return len(value)
    if depth >= _MAX_DEPTH:
        return 0
    if isinstance(value, list):
        return sum(_text_len(v, depth + 1) for v in value)
    if isinstance(value, dict):
        total = 0
        for key in ("content", "text", "reasoning_content", "reasoning", "refusal", "arguments", "thinking"):
            if key in value:
                total += _text_len(value[key], depth + 1)
        for key in ("tool_calls", "function", "output", "summary"):
            if key in value:
                total += _text_len(value[key], depth + 1)
        return total
    return 0
