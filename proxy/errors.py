"""Exceptions that carry their HTTP status, and the one renderer for OpenAI-shaped errors."""

from __future__ import annotations

import os
import re
from enum import StrEnum

import orjson
from aiohttp import web


class Category(StrEnum):
    """The fixed set of error categories a record can carry (documented in the README).

    A StrEnum: each member is its documented string, so records serialise it as that string, and
    a misspelt member is an AttributeError (and a mypy error) rather than a new category.
    """

    INVALID_JSON = "invalid_json"  # the client's request body is not a JSON object
    BAD_REQUEST = "bad_request"  # the request is malformed otherwise, or the upstream said 4xx
    PAYLOAD_TOO_LARGE = "payload_too_large"  # request body over max_body_bytes, or upstream 413
    INVALID_RUN_ID = "invalid_run_id"  # X-Run-Id or /run/<id>/ is not a valid run id
    MODEL_NOT_FOUND = "model_not_found"  # no upstream route for the model, or upstream 404
    AUTH_ERROR = "auth_error"  # upstream 401/403
    BILLING_ERROR = "billing_error"  # upstream 402
    RATE_LIMIT = "rate_limit"  # upstream 429, or a rate-limit error inside a stream
    SERVER_ERROR = "server_error"  # upstream 5xx, or an error event inside a stream
    TIMEOUT = "timeout"  # upstream connect/read/total timeout, or upstream 408/504
    CONNECTION_ERROR = "connection_error"  # upstream refused, reset or unreachable before answering
    EMPTY_RESPONSE = "empty_response"  # upstream answered 2xx with no body / no events
    INVALID_RESPONSE = "invalid_response"  # upstream answered 2xx with a body that is not the expected JSON
    UPSTREAM_REDIRECT = "upstream_redirect"  # upstream answered 3xx: passed to the client as is, never followed
    INVALID_PATH = "invalid_path"  # the request path is ambiguous (encoded '/', '\', '.', NUL) or climbs above its root
    UNKNOWN_PATH = "unknown_path"  # a path (or method) under /v1, /api or /run that the proxy does not serve
    STREAM_INTERRUPTED = "stream_interrupted"  # upstream closed the stream before it was complete
    CLIENT_ABORTED = "client_aborted"  # the client went away before the response was complete
    CLIENT_TIMEOUT = "client_timeout"  # the client did not send its whole request body within client_body_timeout_s
    RECORDING_UNAVAILABLE = "recording_unavailable"  # the runs dir cannot be written and calls are refused
    PROXY_SHUTDOWN = "proxy_shutdown"  # the proxy stopped before the call finished (grace period ran out)
    BUDGET_EXCEEDED = "budget_exceeded"  # the run's USD/token budget is spent, or this call's reserve would cross it
    BUDGET_STORE_UNAVAILABLE = "budget_store_unavailable"  # the shared budget store (Redis) is unreachable: refused
    UNAUTHORIZED = "unauthorized"  # missing or wrong proxy key (record in .rejected.jsonl)
    UNKNOWN = "unknown"


#: Every category, for membership tests.
CATEGORIES: frozenset[Category] = frozenset(Category)


def new_error_id() -> str:
    """Return a fresh 12-hex-character error id."""
    return os.urandom(6).hex()


class ProxyError(Exception):
    """An error the proxy answers itself, with its HTTP status and OpenAI error type."""

    status: int = 500
    type: str = "server_error"
    category: Category = Category.UNKNOWN
    close_connection: bool = False
    """Answer with Connection: close: the rest of the request will not be read (RFC 9110 15.5.9)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        category: Category | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if category is not None:
            self.category = category
        self.code = code
        self.param = param


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    category = Category.BAD_REQUEST


class InvalidJSON(BadRequest):
    category = Category.INVALID_JSON


class InvalidRunId(BadRequest):
    category = Category.INVALID_RUN_ID


class NoRoute(ProxyError):
    status = 404
    type = "invalid_request_error"
    category = Category.MODEL_NOT_FOUND


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    category = Category.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(BadRequest):
    status = 415


class ClientBodyTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    category = Category.CLIENT_TIMEOUT
    close_connection = True


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    category = Category.CONNECTION_ERROR


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    category = Category.TIMEOUT


class RecordingUnavailable(ProxyError):
    status = 503
    type = "server_error"
    category = Category.RECORDING_UNAVAILABLE


class BudgetExceeded(ProxyError):
    status = 429
    type = "budget_exceeded"
    category = Category.BUDGET_EXCEEDED


class BudgetStoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    category = Category.BUDGET_STORE_UNAVAILABLE


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    category = Category.UNAUTHORIZED


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """Return OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def render(exc: ProxyError, error_id: str, request_id: str | None = None) -> web.Response:
    """Turn a ProxyError into the OpenAI-shaped JSON response the client sees."""
    headers = {"X-Meter-Error-Id": error_id}
    if request_id:
        headers["X-Meter-Request-Id"] = request_id
    resp = web.Response(
        status=exc.status,
        body=error_body(exc.message, exc.type, exc.code or exc.category, exc.param),
        content_type="application/json",
        headers=headers,
    )
    if exc.close_connection:
        resp.force_close()
    return resp


def category_for_status(status: int) -> Category:
    """Map an upstream HTTP error status to a record error category."""
    if status in (401, 403):
        return Category.AUTH_ERROR
    if status == 402:
        return Category.BILLING_ERROR
    if status == 404:
        return Category.MODEL_NOT_FOUND
    if status in (408, 504):
        return Category.TIMEOUT
    if status == 413:
        return Category.PAYLOAD_TOO_LARGE
    if status == 429:
        return Category.RATE_LIMIT
    if status >= 500:
        return Category.SERVER_ERROR
    if status >= 400:
        return Category.BAD_REQUEST
    return Category.UNKNOWN


def category_for_stream_error(kind: str) -> Category:
    """Map the type/code of an error event inside a 200 stream to a category."""
    k = kind.lower()
    if "rate" in k or "429" in k or "too_many" in k or "quota" in k:
        return Category.RATE_LIMIT
    if "overload" in k or "server" in k or "api_error" in k or k.startswith("5"):
        return Category.SERVER_ERROR
    if "context" in k or "invalid" in k or k.startswith("4"):
        return Category.BAD_REQUEST
    return Category.SERVER_ERROR


_SECRET = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{6,}|(?i:bearer)\s+[A-Za-z0-9._\-~+/]+=*|(?:api[_-]?key|key)[=:]\s*[A-Za-z0-9._\-]{8,})"
)


# Where an upstream's error message starts echoing the request ('input': [...] in a pydantic
# validation error, "content": ... in a JSON dump): prompt text must never reach a record or log.
_ECHO = re.compile(r"""['"](?:input|input_value|text|content|prompt|messages|system)['"]\s*:""")


def scrub(text: str, limit: int = 200) -> str:
    """Return text with anything key-shaped masked and any echoed request cut, in limit characters."""
    text = _SECRET.sub("[redacted]", text)
    echo = _ECHO.search(text)
    if echo is not None:
        text = text[: echo.start()] + "[request content removed]"
    return text[:limit]
