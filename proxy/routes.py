"""What a request path means: the endpoint table, canonical paths, and the pass-through allow-list.

Every request path is canonicalised once, before anything else reads it (access, metering, the upstream
URL), so a path means the same thing to every part of the proxy and to the upstream: a metered endpoint
is metered whatever its spelling, and nothing can climb out of an upstream's ``base_url``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from aiohttp import web

from proxy import errors


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One metered API endpoint."""

    path: str
    """Canonical path as the client sends it, and as the record's ``endpoint`` shows it."""
    dialect: str
    """How the meter reads its responses: chat, completions, embeddings, responses, messages, ollama."""
    operation: str
    """OpenTelemetry ``gen_ai.operation.name``; Responses and Anthropic Messages are chat turns."""
    streams_by_default: bool = False
    """Whether a request without ``stream`` streams (Ollama's native chat and generate do)."""


#: The metered endpoints (all POST). Routing, access refusals, metrics, the upstream URL and the stream
#: error event all read this table; there is no second list.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", "chat", "chat"),
    Endpoint("/v1/completions", "completions", "text_completion"),
    Endpoint("/v1/embeddings", "embeddings", "embeddings"),
    Endpoint("/v1/responses", "responses", "chat"),
    Endpoint("/v1/messages", "messages", "chat"),
    Endpoint("/api/chat", "ollama", "chat", streams_by_default=True),
    Endpoint("/api/generate", "ollama", "text_completion", streams_by_default=True),
    Endpoint("/api/embed", "ollama", "embeddings"),
    Endpoint("/api/embeddings", "ollama", "embeddings"),
)
BY_PATH: dict[str, Endpoint] = {e.path: e for e in ENDPOINTS}

#: First path segments of the proxy's API (anything under them that it does not serve is refused, recorded).
_API_ROOTS = frozenset({"v1", "api", "run"})
_MAX_SHOWN = 200
# An encoded separator or dot, a backslash or NUL: servers and client libraries disagree on what they mean.
_AMBIGUOUS = frozenset(b"/\\.\x00")
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"


class InvalidPath(errors.BadRequest):
    category = errors.Category.INVALID_PATH


class UnknownPath(errors.ProxyError):
    status = 404
    type = "invalid_request_error"
    category = errors.Category.UNKNOWN_PATH


@dataclass(frozen=True, slots=True)
class Route:
    """What one request asks for, read from its canonical path."""

    canonical: str
    """The whole canonical path, /run/<id> prefix included."""
    path: str
    """The canonical API path, without any /run/<id> prefix, e.g. /v1/chat/completions."""
    run_id: str | None
    """The run id of a /run/<id>/... path (validated later, with the header's)."""
    endpoint: Endpoint | None
    """The metered endpoint, when the path is one and the method is POST."""

    @property
    def native(self) -> bool:
        """Under /api (Ollama's native API): served at the upstream's root, not under its ``base_url``."""
        return self.path.startswith("/api/")

    @property
    def lacks_v1(self) -> bool:
        """A metered endpoint's path without its /v1: a client whose base URL should end in /v1."""
        return ("/v1" + self.path) in BY_PATH

    @property
    def is_api(self) -> bool:
        """Under /v1, /api or /run: the proxy's API, not one of its own pages."""
        return self.canonical.split("/", 2)[1] in _API_ROOTS

    def upstream_tail(self) -> str:
        """The path to append to an upstream's base URL (or to its root, for /api paths), percent-encoded."""
        tail = self.path.removeprefix("/v1")
        return "/".join(quote(seg, safe=_SEGMENT_SAFE) for seg in tail.split("/"))


#: The canonical route of a request, set by the app's first middleware before anything reads the path.
ROUTE = web.RequestKey("route", Route)


def canonical_path(raw: str) -> str:
    """RFC 3986 section 5.2.4 dot-segment removal on the percent-decoded path, empty segments collapsed.

    raw is the request target's path as sent (still percent-encoded). Refused with 400 invalid_path: an
    encoded '/', '\\' or '.', a NUL, a backslash, invalid UTF-8, or a path that climbs above its root.
    """
    segments: list[str] = []
    for part in raw.split("/"):
        if "%" in part:
            decoded = unquote_to_bytes(part)
            if any(b in _AMBIGUOUS for b in _encoded_bytes(part)):
                raise InvalidPath(f"Invalid path {_shown(raw)!r}: an encoded '/', '\\', '.' or NUL in a path segment.",
                                  code="invalid_path")  # fmt: skip
        else:
            decoded = part.encode("utf-8", "surrogateescape")
        if b"\\" in decoded or b"\x00" in decoded:
            raise InvalidPath(f"Invalid path {_shown(raw)!r}: a backslash or NUL in a path segment.",
                              code="invalid_path")  # fmt: skip
        try:
            segment = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPath(f"Invalid path {_shown(raw)!r}: not UTF-8 once percent-decoded.",
                              code="invalid_path") from None  # fmt: skip
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise InvalidPath(f"Invalid path {_shown(raw)!r}: it climbs above the root.", code="invalid_path")
            segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def _encoded_bytes(part: str) -> bytes:
    """The bytes a segment spells with %XX escapes (malformed escapes are literal, as RFC 3986 has them)."""
    return bytes(int(m.group(1), 16) for m in re.finditer(r"%([0-9A-Fa-f]{2})", part))


def _shown(raw: str) -> str:
    return raw if len(raw) <= _MAX_SHOWN else raw[:_MAX_SHOWN] + "..."


_RESOLVED: dict[tuple[str, str], Route] = {}
_MAX_RESOLVED = 4096  # clients use a handful of paths; a flood of distinct ones just is not cached


def resolve(raw_path: str, method: str) -> Route:
    """Read a request's path: its canonical API path, run id and metered endpoint (InvalidPath if unsafe)."""
    key = (raw_path, method)
    route = _RESOLVED.get(key)
    if route is None:
        route = _resolve(raw_path, method)
        if len(_RESOLVED) < _MAX_RESOLVED:
            _RESOLVED[key] = route
    return route


def _resolve(raw_path: str, method: str) -> Route:
    canonical = path = canonical_path(raw_path)
    run_id = None
    if path.startswith("/run/"):
        _, _, run_id, rest = (path.split("/", 3) + [""])[:4]
        path = "/" + rest
    endpoint = BY_PATH.get(path) if method == "POST" else None
    return Route(canonical=canonical, path=path, run_id=run_id, endpoint=endpoint)


class Passthrough:
    """The unmetered allow-list: ``METHOD GLOB`` rules on the canonical path (``*`` stays in one segment)."""

    def __init__(self, rules: tuple[str, ...]) -> None:
        self._compiled = [(m.upper(), _glob(g)) for m, _, g in (r.partition(" ") for r in rules)]

    def allows(self, method: str, path: str) -> bool:
        """Whether method + canonical path may be forwarded unmetered."""
        return any((m in ("*", method)) and rx.fullmatch(path) is not None for m, rx in self._compiled)


def _glob(pattern: str) -> re.Pattern[str]:
    out = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        out.append(".*" if piece == "**" else "[^/]*" if piece == "*" else re.escape(piece))
    return re.compile("".join(out))


def unknown(route: Route, method: str) -> UnknownPath:
    """The 404 (or 405) for a path the proxy does not serve, with a hint at the likely mistake."""
    shown = _shown(route.path)
    if route.path in BY_PATH:
        return UnknownPath(f"{method} {shown} is not served: this endpoint takes POST.", status=405,
                           code="method_not_allowed")  # fmt: skip
    if route.lacks_v1:
        return UnknownPath(f"Unknown path {shown}: the base URL should end in /v1 (e.g. http://127.0.0.1:8787/v1).",
                           code="unknown_path")  # fmt: skip
    return UnknownPath(f"Unknown path {method} {shown}: metered endpoints are POST "
                       f"{', '.join(e.path for e in ENDPOINTS)}; other paths are forwarded only when the"
                       " passthrough allow-list names them.", code="unknown_path")  # fmt: skip
