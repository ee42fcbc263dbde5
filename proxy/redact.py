"""Keep secrets and request text out of everything that leaves the proxy, by value.

Pattern-based scrubbing (``errors.scrub``) only catches what looks like a key; an upstream that echoes
``gsk_...``, an Azure ``api-key`` or a proxy key in its error would get past it. So every secret the
proxy knows is masked literally: the keys it injects, configured header values, proxy keys, the admin
token, ``base_url`` passwords, and for each call the credentials the client sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from yarl import URL

from proxy.config import Config

MASK = "[redacted]"
_MASK_BYTES = MASK.encode()
#: Shorter values are not masked: they are placeholders, not keys ("ollama", "EMPTY", "sk-test"), and
#: masking them would deface records ("provider": "ollama").
MIN_SECRET_LEN = 10
#: Request headers whose values are client credentials, masked for that call.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-proxy-key", "x-admin-token")
#: Request values an upstream may echo that are recorded anyway, or too generic to mean an echo.
_NOT_REQUEST_TEXT = frozenset(
    {"content-type", "content-length", "host", "accept", "accept-encoding", "connection", "expect",
     "transfer-encoding", "x-run-id", "x-task-name"}
)  # fmt: skip
_CUT = "[request content removed]"
_NEEDLE_LEN = 24  # an echo of a long value is found by its start
_MAX_NEEDLES = 512


class Secrets:
    """A set of secret values and the masking of text, bytes and JSON lines that might carry them."""

    __slots__ = ("values", "_forms")

    def __init__(self, values: Iterable[str]) -> None:
        self.values = frozenset(v for v in values if len(v) >= MIN_SECRET_LEN)
        forms: set[bytes] = set()
        for value in self.values:
            forms.add(value.encode("utf-8", "surrogateescape"))
            forms.add(orjson.dumps(value)[1:-1])  # as it appears inside a JSON string
        # Longest first: a secret that contains another is masked whole.
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    def mask_bytes(self, data: bytes, extra: tuple[str, ...] = ()) -> bytes:
        """data with every secret masked, and the extra values (a call's credentials) too."""
        for form in self._forms:
            if form in data:
                data = data.replace(form, _MASK_BYTES)
        for value in extra:
            raw = value.encode("utf-8", "surrogateescape")
            if raw in data:
                data = data.replace(raw, _MASK_BYTES)
            escaped = orjson.dumps(value)[1:-1]
            if escaped != raw and escaped in data:
                data = data.replace(escaped, _MASK_BYTES)
        return data

    def mask(self, text: str, extra: tuple[str, ...] = ()) -> str:
        """text with every secret masked, and the extra values (a call's credentials) too."""
        for value in (*self.values, *extra):
            if value in text:
                text = text.replace(value, MASK)
        return text


def credentials(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The credentials a client sent with one call (header values, and the token of a Bearer/Basic one)."""
    found: list[str] = []
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if value:
            found.append(value)
            scheme, _, token = value.partition(" ")
            if token and scheme.lower() in ("bearer", "basic"):
                found.append(token.strip())
    # Longest first: "Bearer <key>" is masked whole, then a bare "<key>".
    return tuple(sorted((v for v in found if len(v) >= MIN_SECRET_LEN), key=len, reverse=True))


def from_config(cfg: Config) -> Secrets:
    """Every secret the configuration names (the environment's resolved by config.resolve_env)."""
    values: list[str] = []

    def password(raw_url: str | None) -> None:
        if not raw_url:
            return
        try:
            url = URL(raw_url)
        except ValueError:
            return
        if url.password:
            values.extend((url.password, url.raw_password or ""))

    for up in cfg.upstreams:
        if up.api_key:
            values.append(up.api_key)
        values.extend(v for _, v in up.headers)
        password(up.base_url)
    values.extend(cfg.access.proxy_keys)
    if cfg.access.admin_token:
        values.append(cfg.access.admin_token)
    # The fleet's and the exporter's credentials: never in a record or a log line either.
    if cfg.budgets.store is not None:
        password(cfg.budgets.store.url)
    if cfg.ship.postgres is not None:
        password(cfg.ship.postgres.url)
    if cfg.ship.webhook is not None:
        values.append(cfg.ship.webhook.secret)
        password(cfg.ship.webhook.url)
    values.extend(v for _, v in cfg.otel.headers)
    return Secrets(values)


def request_text(headers: Mapping[str, str], body: Any) -> list[str]:
    """What of a request an upstream might echo in an error: header values and body strings, as needles.

    The model name, run id and task are left out: they are recorded anyway.
    """
    needles: list[str] = []
    for name, value in headers.items():
        low = name.lower()
        if low not in _NOT_REQUEST_TEXT and not low.startswith("x-meter-tag-") and len(value) >= 8:
            needles.append(value[:_NEEDLE_LEN])
    _body_strings(body, needles, 0)
    return needles[:_MAX_NEEDLES]


def _body_strings(value: Any, out: list[str], depth: int) -> None:
    if len(out) >= _MAX_NEEDLES or depth > 32:
        return
    if isinstance(value, str):
        if len(value) >= 8:
            out.append(value[:_NEEDLE_LEN])
    elif isinstance(value, list):
        for item in value:
            _body_strings(item, out, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "model":
                _body_strings(item, out, depth + 1)


def cut_echo(text: str, needles: Iterable[str]) -> str:
    """Cut text where it starts quoting the request (the earliest needle found)."""
    cut = min((i for i in (text.find(n) for n in needles) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut] + _CUT
