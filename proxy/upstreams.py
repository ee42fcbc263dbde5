"""Where a call goes and how: model routing, header and auth policy, upstream URLs, provider facts.

Everything here is known from the configuration or learned from an upstream's answers; none of it
depends on one call, so the handler in forward.py asks and this module answers.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import providers, routes
from proxy.config import Config, ConfigError, Upstream
from proxy.tracecontext import TraceContext

log = logging.getLogger("metering_proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes; never forwarded either way.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect"}
)  # fmt: skip
# Responses are decompressed on the way in (so usage can be read) and sent on uncompressed.
_RESPONSE_DROP = _HOP_BY_HOP | {"content-encoding"}
# Request bodies are decoded by proxy.body (gzip/deflate), and the decoded body is what goes upstream.
# accept-encoding too: the client's list may name codings aiohttp cannot decode (br, zstd), and
# usage must be read; aiohttp advertises what it can decode, and the client gets identity anyway.
_REQUEST_DROP = _HOP_BY_HOP | {"content-encoding", "accept-encoding"}
TAG_PREFIX = "x-meter-tag-"
# Providers whose API refuses stream_options (and sends stream usage unasked).
_NO_STREAM_OPTIONS = frozenset({"mistral"})
_MAX_CACHED_URLS = 4096  # a flood of distinct pass-through paths is just not cached


class Router:
    """Pick the upstream for a model: the first upstream with a matching glob wins."""

    def __init__(self, upstreams: tuple[Upstream, ...]) -> None:
        self.upstreams = upstreams
        self._rules = [(re.compile(fnmatch.translate(p)), u) for u in upstreams for p in u.models]
        self._cache: dict[str, Upstream | None] = {}

    def pick(self, model: str) -> Upstream | None:
        """Return the upstream serving model, or None."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = next((u for rx, u in self._rules if rx.match(model)), None)
        if len(self._cache) < 10_000:
            self._cache[model] = found
        return found

    def patterns(self) -> str:
        """Describe the routes for an error message."""
        return "; ".join(f"{u.name}: {', '.join(u.models)}" for u in self.upstreams)


class Upstreams:
    """What the proxy knows about each upstream, from its config and from its answers."""

    def __init__(self, cfg: Config) -> None:
        self.router = Router(cfg.upstreams)
        self._by_url = {u.name: u.provider or providers.from_url(u.base_url) for u in cfg.upstreams}
        self._local = {u.name: providers.is_local(u.base_url) for u in cfg.upstreams}
        self._bases = {u.name: URL(u.base_url) for u in cfg.upstreams}
        self._urls: dict[tuple[str, str], URL] = {}
        self._learned: dict[str, str] = {}
        """Providers told by an upstream's answers (its URL said nothing): they hold for all its endpoints."""
        self._forwarded: dict[str, bool] = {}
        """Whether a request header name, as a client spelt it, goes upstream (for _forwarded_for's set)."""
        self._forwarded_for: AbstractSet[str] | None = None
        # Anthropic's API takes its key as x-api-key; everyone else as a Bearer token.
        unresolved = [u.name for u in cfg.upstreams if u.api_key_env and u.api_key is None]
        if unresolved:  # a Config built by hand: sending no key would look like the upstream's auth failing
            raise ConfigError(f"config: upstream {unresolved[0]}: api_key_env not read (config.resolve_env)")
        self._auth = {
            u.name: (("x-api-key", u.api_key) if self._by_url[u.name] == "anthropic"
                     else ("Authorization", f"Bearer {u.api_key}"))
            for u in cfg.upstreams
            if u.api_key is not None
        }  # fmt: skip
        self._no_stream_options = {u.name for u in cfg.upstreams if self._by_url[u.name] in _NO_STREAM_OPTIONS}
        """Upstreams that answer a request carrying stream_options with an error (configured or learned)."""

    # -- providers -------------------------------------------------------------------------

    def provider(self, upstream: Upstream, headers: Mapping[str, str] | None, hint: str | None,
                 usage_raw: dict[str, Any] | None) -> str | None:  # fmt: skip
        """The configured provider, else the one learned from the upstream's answers, else this answer's."""
        known = self._by_url[upstream.name] or self._learned.get(upstream.name)
        if known is not None or headers is None:
            return known
        found = providers.from_response(headers, hint, usage_raw, local=self._local[upstream.name])
        if found is not None:
            self._learned[upstream.name] = found
        return found

    # -- stream_options ----------------------------------------------------------------------

    def refuses_stream_options(self, upstream: Upstream) -> bool:
        return upstream.name in self._no_stream_options

    def learn_refuses_stream_options(self, upstream: Upstream, status: int) -> None:
        """Remember (and log once) that an upstream refuses stream_options."""
        if upstream.name not in self._no_stream_options:
            self._no_stream_options.add(upstream.name)
            log.warning("upstream %s rejects stream_options (HTTP %s): its streams are sent without it"
                        " from now on; their usage comes from the stream itself or is estimated",
                        upstream.name, status)  # fmt: skip

    # -- the request sent upstream --------------------------------------------------------

    def url(self, upstream: Upstream, route: routes.Route, raw_query: str) -> URL:
        """The upstream URL: exactly the canonical path under base_url, built so nothing re-resolves it."""
        key = (upstream.name, route.path)
        url = self._urls.get(key)
        if url is None:
            base = self._bases[upstream.name]
            if route.native and base.path.endswith("/v1"):
                base = base.with_path(base.path[:-3])  # Ollama's native API lives beside /v1, at the root
            url = URL(str(base.origin()) + base.raw_path.rstrip("/") + route.upstream_tail(), encoded=True)
            if len(self._urls) < _MAX_CACHED_URLS:
                self._urls[key] = url
        return URL(f"{url}?{raw_query}", encoded=True) if raw_query else url

    def request_headers(self, headers: CIMultiDictProxy[str], upstream: Upstream, consumed: AbstractSet[str],
                        trace: TraceContext | None = None) -> CIMultiDict[str]:  # fmt: skip
        """The headers sent upstream: the client's, less hop-by-hop and the proxy's own, plus auth.

        trace: the call's span when the proxy traces (OTel on): its traceparent replaces the client's, so an
        upstream that traces (vLLM) joins the trace as the proxy's child. Without one (OTel off, or a
        pass-through path) the client's traceparent and tracestate go on unchanged.
        """
        # RFC 9110 7.6.1: headers the client names in Connection are hop-by-hop too; drop them.
        named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
        if consumed is not self._forwarded_for:
            self._forwarded, self._forwarded_for = {}, consumed
        known = self._forwarded
        if named <= _REQUEST_DROP:  # the usual case ("keep-alive"): a header's fate depends on its name only
            # A client sends the same names call after call: each is judged once (a bounded number of names).
            pairs = []
            for key, value in headers.items():
                keep = known.get(key)
                if keep is None:
                    keep = _forwarded(key.lower(), consumed, named)
                    if len(known) < _MAX_KNOWN_HEADERS:
                        known[key] = keep
                if keep:
                    pairs.append((key, value))
        else:
            pairs = [(k, v) for k, v in headers.items() if _forwarded(k.lower(), consumed, named)]
        out: CIMultiDict[str] = CIMultiDict(pairs)
        auth = self._auth.get(upstream.name)
        if auth is not None:
            # The injected key replaces whatever credentials the client sent, in either header.
            out.popall("Authorization", None)
            out.popall("x-api-key", None)
            out[auth[0]] = auth[1]
        for key, value in upstream.headers:
            out[key] = value
        if trace is not None and trace.span_id is not None:
            out.popall("traceparent", None)
            out.popall("tracestate", None)  # a new trace (no valid parent) drops it too, as the spec says
            out["traceparent"] = trace.traceparent()
            if trace.tracestate:
                out["tracestate"] = trace.tracestate
        return out

    def address(self, upstream: Upstream) -> tuple[str | None, int | None]:
        """server.address and server.port of an upstream, from its base URL."""
        base = self._bases[upstream.name]
        return base.host, base.port


_MAX_KNOWN_HEADERS = 1024


def _forwarded(low: str, consumed: AbstractSet[str], named: AbstractSet[str]) -> bool:
    """Whether a request header (its lower-cased name) goes upstream."""
    return not (low in _REQUEST_DROP or low in consumed or low.startswith(TAG_PREFIX) or low in named)


def client_headers(headers: Mapping[str, str], mask: Callable[[str, tuple[str, ...]], str],
                   credentials: tuple[str, ...]) -> CIMultiDict[str]:  # fmt: skip
    """The upstream's response headers as the client gets them: hop-by-hop dropped, secrets masked."""
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in _RESPONSE_DROP:
            out.add(key, mask(value, credentials))
    return out


def shown_url(url: URL) -> str:
    """An upstream URL fit for an error message: no userinfo, no query."""
    return str(url.with_user(None).with_query(None)) if url.user or url.password else str(url.with_query(None))


async def rejects_stream_options(up: aiohttp.ClientResponse) -> bool:
    """Whether an upstream's 400/422 names stream_options (its body stays readable for the record)."""
    if up.status not in (400, 422):
        return False
    try:
        return b"stream_options" in await up.read()
    except (aiohttp.ClientError, TimeoutError):
        return False


def error_detail(body: bytes, status: int) -> str:
    """Pull the message out of an upstream error body of any dialect (JSON, HTML or empty)."""
    if not body:
        return f"upstream answered {status} with no body"
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = re.sub(rb"<[^>]*>|\s+", b" ", body[:2000]).decode("utf-8", "replace").strip()
        return f"upstream answered {status}: {text}"
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        # The structured fields first: they say what went wrong without quoting anything, and survive
        # the cut of a message that starts echoing the request.
        fields = " ".join(f"{k}={v}" for k in ("type", "code", "param")
                          if isinstance(v := err.get(k), str | int) and not isinstance(v, bool)
                          and len(str(v)) <= 64 and str(v).replace("_", "").replace(".", "").isalnum())  # fmt: skip
        message = err.get("message") or ""
        return f"upstream answered {status}" + (f" ({fields})" if fields else "") + f": {message}"
    return f"upstream answered {status}: {err}"
