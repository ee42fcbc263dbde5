"""The proxy's configuration: frozen dataclasses read from YAML, checked key by key."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from proxy.usage import MAX_RATE_PER_TOKEN

DEFAULT_UPSTREAM = "https://api.openai.com/v1"
#: Unmetered paths forwarded by default ("METHOD GLOB" on the canonical path): SDKs list models.
DEFAULT_PASSTHROUGH: tuple[str, ...] = ("GET /v1/models", "GET /v1/models/*")
_METHODS = frozenset({"*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RUN_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}")
PROVIDERS = frozenset(
    {
        "openai", "anthropic", "ollama", "llamacpp", "vllm", "lmstudio", "jan", "groq", "openrouter",
        "deepseek", "gemini", "together", "xai", "mistral", "fireworks", "azure", "openai-compatible",
    }
)  # fmt: skip


class ConfigError(Exception):
    """A bad configuration value; the message names the key."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream server and the models routed to it."""

    name: str
    """Shown as ``upstream`` in records."""
    base_url: str
    """Base URL including the version prefix, e.g. http://127.0.0.1:11434/v1 (no trailing slash)."""
    provider: str | None = None
    """Provider hint; None means detect it from the URL and the responses."""
    api_key_env: str | None = None
    """Environment variable whose value the proxy sends as the upstream's API key."""
    api_key: str | None = field(default=None, repr=False)
    """That variable's value, read by resolve_env at load; never shown."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers added to every request to this upstream."""
    models: tuple[str, ...] = ("*",)
    """Glob patterns of request models routed here; first matching upstream wins."""
    inject_stream_usage: bool = True
    """Add stream_options.include_usage upstream when the client did not ask for usage."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds; None disables one."""

    connect_s: float | None = 10.0
    """Establishing the TCP/TLS connection."""
    read_s: float | None = 300.0
    """Longest silence between two bytes of a response (a stream's gaps included)."""
    total_s: float | None = 900.0
    """The whole call, from sending the request to the last byte."""


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """Spending limits for the runs whose id matches a glob; None means no limit."""

    match: str = "*"
    """Glob on the run id (case-sensitive)."""
    usd: float | None = None
    """Most a run may spend in USD."""
    tokens: int | None = None
    """Most tokens (input + output) a run may use."""


@dataclass(frozen=True, slots=True)
class BudgetStoreConfig:
    """Where run budgets keep their state: this process (default) or a Redis shared by a fleet."""

    url: str | None = field(default=None, repr=False)
    """redis://[user:password@]host:port/db; None keeps budgets in each process (or one host's SQLite file)."""
    url_env: str | None = None
    """Environment variable holding the URL instead (resolve_env reads it into url)."""
    on_unavailable: str = "refuse"
    """refuse: 503 budget_store_unavailable while Redis is unreachable; local: judge by this process's view."""
    reservation_ttl_s: float = 1800.0
    """How long a reservation holds if its call never settles (a crashed process); longer than total_s."""
    key_prefix: str = "metering-proxy:"
    """Prefix of every Redis key (several fleets may share one Redis)."""


@dataclass(frozen=True, slots=True)
class Budgets:
    """Run budgets: the default applies to every run, plus the first matching rule; stricter wins."""

    default: BudgetRule = BudgetRule()
    runs: tuple[BudgetRule, ...] = ()
    store: BudgetStoreConfig = BudgetStoreConfig()
    """The budget store (budgets.store); off (per process) by default."""

    @property
    def configured(self) -> bool:
        """Whether any config rule sets a limit (header limits aside)."""
        rules = (self.default, *self.runs)
        return any(r.usd is not None or r.tokens is not None for r in rules)


@dataclass(frozen=True, slots=True)
class CustomPrice:
    """One prices.custom rule, in USD per million tokens; it beats the price table for what it matches."""

    model: str
    """Glob on the model name (the response's, else the request's), case-sensitive."""
    upstream: str | None
    """Only for calls to this upstream (by name); None for any."""
    input: float
    """Uncached input tokens."""
    cached_input: float | None
    """Cache reads; None means the input price."""
    cache_write: float | None
    """Cache writes; None means the input price."""
    output: float
    """Output tokens (reasoning included)."""


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use the proxy: proxy keys for /v1, an admin token for /runs, /ui and /metrics."""

    proxy_keys: tuple[str, ...] = field(default=(), repr=False)
    """Keys clients send as their Bearer token (after resolve_env, also those from proxy_keys_env)."""
    proxy_keys_env: str | None = None
    """Environment variable holding comma-separated proxy keys (added to proxy_keys)."""
    admin_token: str | None = field(default=None, repr=False)
    """Token for /runs, /ui and /metrics (after resolve_env, admin_token_env's value when this is unset)."""
    admin_token_env: str | None = None
    """Environment variable holding the admin token."""


@dataclass(frozen=True, slots=True)
class ShipPostgres:
    """Records copied from the run files into a PostgreSQL ``calls`` table (see proxy/pg.py)."""

    url: str = field(default="", repr=False)
    """The connection URL (postgresql://user:password@host:port/db), or url_env's value; never shown."""
    url_env: str | None = None
    """Environment variable holding the URL (read at load; keeps the password out of the file)."""
    batch_size: int = 1000
    """Most records per COPY transaction."""
    interval_s: float = 1.0
    """How often the run files are looked at when the backlog is empty (interval_ms in the file)."""
    serve_reads: bool = False
    """/runs, /runs/{id}, its records and events and /ui read the calls table (the whole fleet), not the files."""


@dataclass(frozen=True, slots=True)
class ShipWebhook:
    """Records POSTed in signed JSON batches to a URL (see proxy/webhook.py)."""

    url: str = field(default="", repr=False)
    """Where batches are POSTed (http or https); may hold a token, so never shown whole."""
    secret: str = field(default="", repr=False)
    """The HMAC-SHA256 key, secret_env's value; never shown."""
    secret_env: str = ""
    """Environment variable holding the signing secret (required)."""
    batch_size: int = 100
    """Most records per POST."""
    interval_s: float = 1.0
    """How often the run files are looked at when the backlog is empty (interval_ms in the file)."""
    timeout_s: float = 10.0
    """A POST that has not answered in this long failed (and is retried)."""


@dataclass(frozen=True, slots=True)
class Ship:
    """Where records are copied to from the run files (off by default: no destination)."""

    postgres: ShipPostgres | None = None
    """The PostgreSQL destination, when configured."""
    webhook: ShipWebhook | None = None
    """The webhook destination, when configured."""
    degraded_after_s: float = 60.0
    """/healthz says degraded once the oldest unshipped record is older than this."""
    retry_max_s: float = 30.0
    """Longest wait between two delivery attempts while a destination fails (backoff doubles up to it)."""


#: The OTLP protocols the otel extra speaks (its exporter is opentelemetry-exporter-otlp-proto-http).
OTLP_PROTOCOLS = ("http/protobuf",)


@dataclass(frozen=True, slots=True)
class Otel:
    """OpenTelemetry export over OTLP (the otel extra); off by default. Unset values: the SDK's OTEL_* variables."""

    enabled: bool = False
    """Export a span per call, the GenAI metrics and (with logs) each record; needs the otel extra."""
    endpoint: str | None = None
    """OTLP/HTTP base URL (http://collector:4318; /v1/traces etc. are added); None: OTEL_EXPORTER_OTLP_ENDPOINT."""
    protocol: str = "http/protobuf"
    """The OTLP protocol (from OTEL_EXPORTER_OTLP_PROTOCOL when the key is unset); only http/protobuf."""
    service_name: str | None = None
    """service.name; None: OTEL_SERVICE_NAME, else metering-proxy."""
    headers_env: str | None = None
    """Environment variable holding export headers as k=v,k2=v2 (an API key for a hosted backend)."""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """headers_env's headers, read at load; never shown. Empty: OTEL_EXPORTER_OTLP_HEADERS, read by the SDK."""
    logs: bool = False
    """Also export every record as an OTLP log record."""
    metrics_interval_s: float = 60.0
    """How often the GenAI metrics are exported."""
    queue_size: int = 2048
    """Spans (and log records) held for export; past it new ones are dropped, and counted."""
    export_timeout_s: float = 10.0
    """Longest one export may take, retries included (a collector that hangs costs this, off the request path)."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the proxy needs to run; CLI flags override the YAML file."""

    host: str = "127.0.0.1"
    """Address to bind; loopback unless clients on other machines must reach the proxy."""
    port: int = 8787
    """Port to listen on, 1-65535, or 0 for any free port (the start line names it)."""
    runs_dir: Path = Path("runs")
    """Where runs/<run-id>.jsonl files go (created on first use)."""
    default_run_id: str = "default"
    """Run id of calls that carry neither X-Run-Id nor a /run/<id>/v1 base URL."""
    upstreams: tuple[Upstream, ...] = (Upstream(name="default", base_url=DEFAULT_UPSTREAM),)
    """Where calls go: the first upstream whose models glob matches the request's model."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    """Upstream connect, read (silence between bytes) and total timeouts."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body, as sent or decoded; larger gets 413."""
    client_body_timeout_s: float = 30.0
    """How long a client may take to send its whole request body before it gets 408."""
    max_header_bytes: int = 16 * 1024
    """Longest request line or header; longer is refused by the HTTP parser."""
    max_connections: int = 1000
    """Most upstream connections open at once (pooled, keep-alive)."""
    flush_interval_s: float = 0.2
    """How often queued records are written (flush_interval_ms in the file)."""
    fsync: str = "never"
    """never (leave it to the OS) or batch (fsync each run file after each batch)."""
    on_record_failure: str = "refuse"
    """While records cannot be written: refuse calls with 503, or pass them and hold records in memory."""
    shutdown_grace_s: float = 30.0
    """How long calls in flight may finish after SIGINT/SIGTERM."""
    prices_file: Path | None = None
    """A LiteLLM-format price table to use instead of the bundled one."""
    custom_prices: tuple[CustomPrice, ...] = ()
    """prices.custom rules, first match wins, before the table."""
    prices_refresh_s: float | None = None
    """prices.refresh: how often serve downloads the price table in the background; None (the default): never."""
    prices_refresh_url: str | None = None
    """prices.refresh_url: where the refresh downloads from; None: LiteLLM's published table."""
    log_level: str = "info"
    """debug, info, warning or error; successful calls are never logged (records are the log)."""
    event_loop: str = "auto"
    """auto (uvloop when installed, else asyncio), asyncio or uvloop."""
    budgets: Budgets = field(default_factory=Budgets)
    """Run budgets in USD and tokens (none by default)."""
    access: Access = field(default_factory=Access)
    """Proxy keys and the admin token (off by default: fine on 127.0.0.1)."""
    passthrough: tuple[str, ...] = DEFAULT_PASSTHROUGH
    """Unmetered paths forwarded as they are, as "METHOD GLOB" rules on the canonical path (``*`` stays
    within one segment, ``**`` crosses them); every other path but the metered endpoints gets a 404."""
    ship: Ship = field(default_factory=Ship)
    """Destinations the run files' records are shipped to (none by default)."""
    otel: Otel = field(default_factory=Otel)
    """OpenTelemetry spans, metrics and logs over OTLP (off by default)."""


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"config: {key}: {why}")


def _str(raw: dict[str, Any], key: str, path: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(f"{path}{key}", "must be a non-empty string")
    return value


def _num(raw: dict[str, Any], key: str, path: str, default: float | None, *, allow_none: bool = False,
         integer: bool = False, minimum: float = 0) -> Any:  # fmt: skip
    value = raw.get(key, default)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _fail(f"{path}{key}", f"must be {'an integer' if integer else 'a number'}")
    if value < minimum:
        raise _fail(f"{path}{key}", f"must be >= {minimum}")
    return value


def _choice(raw: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise _fail(key, f"must be one of {', '.join(choices)} (got {value!r})")
    return str(value)


def _check_keys(raw: dict[str, Any], allowed: frozenset[str], path: str) -> None:
    for key in raw:
        if key not in allowed:
            raise _fail(f"{path}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _section(raw: Any, name: str, what: str = "a mapping", keys: str | None = None) -> dict[str, Any]:
    """raw when it is a mapping of the keys KEYS[keys or name] allows; else fail naming the key."""
    if not isinstance(raw, dict):
        raise _fail(name, f"must be {what}")
    _check_keys(raw, KEYS[keys or name], f"{name}.")
    return raw


def check_port(value: Any, key: str) -> int:
    """Return value when it is a port to listen on (0: the OS picks a free one); else fail naming key."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _fail(key, f"must be a port from 1 to 65535, or 0 for any free port (got {value!r})")
    return value


def redact_url(url: str) -> str:
    """url with its userinfo (user:password@) shown as ***@, for start lines and error messages.

    Done by hand rather than with urlsplit, which raises on some of the very URLs an error message
    must show; masking a little too much of a malformed URL is the safe side.
    """
    head, sep, rest = url.partition("//")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{head}//***@{authority.rpartition('@')[2]}{rest[end:]}"


def normalise_base_url(url: str, key: str) -> str:
    """Return url without a trailing slash, or fail naming key unless it is http(s) with a host and a valid port."""
    shown = redact_url(url)
    example = "an http(s) URL such as http://127.0.0.1:11434/v1"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number or is out of range
    except ValueError as exc:
        raise _fail(key, f"must be {example} ({exc}; got {shown!r})") from None
    if parts.scheme not in ("http", "https"):
        raise _fail(key, f"must be {example} (got {shown!r})")
    if not parts.hostname:
        raise _fail(key, f"must be {example}, with a host (got {shown!r})")
    if port == 0:  # parses, but nothing can be reached on port 0: every call would fail at connect
        raise _fail(key, f"must be {example}, with a port from 1 to 65535 (got {shown!r})")
    return url.rstrip("/")


def _positive(raw: dict[str, Any], key: str, default: float, path: str = "") -> float:
    value = raw.get(key, default)
    # Zero would refuse every body; infinity (or NaN) would bring back clients that never finish.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise _fail(f"{path}{key}", f"must be a number > 0 (got {value!r})")
    return float(value)


def _upstream(raw: Any, i: int) -> Upstream:
    path = f"upstreams[{i}]."
    raw = _section(raw, f"upstreams[{i}]", keys="upstreams[]")
    name = _str(raw, "name", path, None)
    if name is None:
        raise _fail(f"{path}name", "is required")
    base = _str(raw, "base_url", path, None)
    if base is None:
        raise _fail(f"{path}base_url", "is required")
    provider = _str(raw, "provider", path, None)
    if provider is not None and provider not in PROVIDERS:
        raise _fail(f"{path}provider", f"must be one of {', '.join(sorted(PROVIDERS))}")
    key_env = _str(raw, "api_key_env", path, None)
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str | int) for v in headers.values()):
        raise _fail(f"{path}headers", "must be a mapping of header name to string value")
    models = raw.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise _fail(f"{path}models", "must be a non-empty list of glob patterns")
    inject = raw.get("inject_stream_usage", True)
    if not isinstance(inject, bool):
        raise _fail(f"{path}inject_stream_usage", "must be true or false")
    return Upstream(
        name=name,
        base_url=normalise_base_url(base, f"{path}base_url"),
        provider=provider,
        api_key_env=key_env,
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
        models=tuple(models),
        inject_stream_usage=inject,
    )


#: Every config key, by section ("" is the top level): the parser, the docs test and nothing else read it.
KEYS: dict[str, frozenset[str]] = {
    "": frozenset({
        "host", "port", "runs_dir", "default_run_id", "upstreams", "timeouts", "max_body_bytes",
        "client_body_timeout_s", "max_header_bytes", "max_connections", "flush_interval_ms", "fsync",
        "on_record_failure", "shutdown_grace_s", "prices", "log_level", "event_loop", "budgets", "access",
        "passthrough", "ship", "otel",
    }),
    "upstreams[]": frozenset({"name", "base_url", "provider", "api_key_env", "headers", "models",
                              "inject_stream_usage"}),
    "timeouts": frozenset({"connect_s", "read_s", "total_s"}),
    "prices": frozenset({"file", "custom", "refresh", "refresh_url"}),
    "prices.custom[]": frozenset({"model", "upstream", "input", "cached_input", "cache_write", "output"}),
    "budgets": frozenset({"default", "runs", "store"}),
    "budgets.store": frozenset({"url", "url_env", "on_unavailable", "reservation_ttl_s", "key_prefix"}),
    "budgets.runs[]": frozenset({"match", "usd", "tokens"}),
    "access": frozenset({"proxy_keys", "proxy_keys_env", "admin_token", "admin_token_env"}),
    "ship": frozenset({"postgres", "webhook", "degraded_after_s", "retry_max_s"}),
    "ship.postgres": frozenset({"url", "url_env", "batch_size", "interval_ms", "serve_reads"}),
    "ship.webhook": frozenset({"url", "secret_env", "batch_size", "interval_ms", "timeout_s"}),
    "otel": frozenset({"enabled", "endpoint", "protocol", "service_name", "headers_env", "logs",
                       "metrics_interval_s", "queue_size", "export_timeout_s"}),
}  # fmt: skip


def _passthrough(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_PASSTHROUGH
    if not isinstance(raw, list):
        raise _fail("passthrough", 'must be a list of "METHOD /path/glob" rules, e.g. "GET /v1/models"')
    rules = []
    for i, rule in enumerate(raw):
        parts = rule.split() if isinstance(rule, str) else []
        if len(parts) != 2 or parts[0].upper() not in _METHODS or not parts[1].startswith("/"):
            raise _fail(f"passthrough[{i}]", f'must be "METHOD /path/glob", e.g. "GET /v1/models/*" (got {rule!r})')
        if "/." in parts[1] or "\\" in parts[1] or "%" in parts[1]:
            raise _fail(f"passthrough[{i}]", "must be a canonical path: no dot segments, backslashes or escapes")
        rules.append(f"{parts[0].upper()} {parts[1]}")
    return tuple(rules)


def _limits(raw: Any, path: str, match: str | None) -> BudgetRule:
    if not isinstance(raw, dict):
        raise _fail(path.rstrip("."), "must be a mapping with usd and/or tokens")
    _check_keys(raw, KEYS["budgets.runs[]"] - {"match"} if match is None else KEYS["budgets.runs[]"], path)
    usd = _num(raw, "usd", path, None, allow_none=True)
    if usd is not None and (not math.isfinite(usd) or usd > 1e12):
        raise _fail(f"{path}usd", "must be a finite number up to 1e12 (omit it for no limit)")
    tokens = _num(raw, "tokens", path, None, allow_none=True, integer=True)
    if tokens is not None and tokens > 10**12:
        raise _fail(f"{path}tokens", "must be at most 1e12 (omit it for no limit)")
    return BudgetRule(match=match or "*", usd=usd, tokens=tokens)


def _budgets(raw: Any) -> Budgets:
    if raw is None:
        return Budgets()
    raw = _section(raw, "budgets", "a mapping with default and/or runs")
    default_raw = raw.get("default")
    default = BudgetRule() if default_raw is None else _limits(default_raw, "budgets.default.", None)
    runs_raw = raw.get("runs") or []
    if not isinstance(runs_raw, list):
        raise _fail("budgets.runs", "must be a list of {match, usd, tokens}")
    runs = []
    for i, rule in enumerate(runs_raw):
        match = _str(rule, "match", f"budgets.runs[{i}].", None) if isinstance(rule, dict) else None
        if match is None:
            raise _fail(f"budgets.runs[{i}].match", "is required: a glob on the run id, e.g. 'eval-*'")
        runs.append(_limits(rule, f"budgets.runs[{i}].", match))
    return Budgets(default=default, runs=tuple(runs), store=_budget_store(raw.get("store")))


def _check_redis_url(url: str, key: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise _fail(key, f"must be a redis://host:port/db URL (got {redact_url(url)!r})")
    return url


def _budget_store(raw: Any) -> BudgetStoreConfig:
    if raw is None:
        return BudgetStoreConfig()
    raw = _section(raw, "budgets.store", "a mapping with url or url_env")
    path = "budgets.store."
    url, url_env = _str(raw, "url", path, None), _str(raw, "url_env", path, None)
    if url is not None and url_env is not None:
        raise _fail(f"{path}url_env", "give url or url_env, not both")
    if url is not None:
        _check_redis_url(url, f"{path}url")
    d = BudgetStoreConfig()
    ttl = _num(raw, "reservation_ttl_s", path, d.reservation_ttl_s, minimum=1)
    if not math.isfinite(ttl):
        raise _fail(f"{path}reservation_ttl_s", "must be a finite number of seconds")
    mode = raw.get("on_unavailable", d.on_unavailable)
    if mode not in ("refuse", "local"):
        raise _fail(f"{path}on_unavailable", f"must be one of refuse, local (got {mode!r})")
    return BudgetStoreConfig(
        url=url,
        url_env=url_env,
        on_unavailable=mode,
        reservation_ttl_s=float(ttl),
        key_prefix=_str(raw, "key_prefix", path, d.key_prefix) or d.key_prefix,
    )


def _access(raw: Any) -> Access:
    if raw is None:
        return Access()
    raw = _section(raw, "access")
    keys = raw.get("proxy_keys") or []
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(k, str) and k and k.split() == [k] for k in keys):
        raise _fail("access.proxy_keys", "must be a list of non-empty strings without spaces")
    admin = _str(raw, "admin_token", "access.", None)
    if admin is not None and admin.split() != [admin]:
        raise _fail("access.admin_token", "must not contain spaces")
    return Access(proxy_keys=tuple(keys), proxy_keys_env=_str(raw, "proxy_keys_env", "access.", None),
                  admin_token=admin, admin_token_env=_str(raw, "admin_token_env", "access.", None))  # fmt: skip


def _upstreams(raw: Any, default: tuple[Upstream, ...]) -> tuple[Upstream, ...]:
    if raw is None:
        return default
    if not isinstance(raw, list) or not raw:
        raise _fail("upstreams", "must be a non-empty list")
    upstreams = tuple(_upstream(u, i) for i, u in enumerate(raw))
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise _fail("upstreams", "names must be unique")
    return upstreams


def _timeouts(raw: Any, d: Timeouts) -> Timeouts:
    raw = raw or {}
    raw = _section(raw, "timeouts")
    return Timeouts(
        connect_s=_num(raw, "connect_s", "timeouts.", d.connect_s, allow_none=True),
        read_s=_num(raw, "read_s", "timeouts.", d.read_s, allow_none=True),
        total_s=_num(raw, "total_s", "timeouts.", d.total_s, allow_none=True),
    )


def custom_prices(raw: Any) -> tuple[CustomPrice, ...]:
    """The prices.custom rules, checked; errors name the offending key."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail("prices.custom", "must be a list of mappings")
    allowed = KEYS["prices.custom[]"]
    out: list[CustomPrice] = []
    for i, item in enumerate(raw):
        where = f"prices.custom[{i}]"
        if not isinstance(item, dict):
            raise _fail(where, f"must be a mapping with keys {', '.join(sorted(allowed))}")
        _check_keys(item, allowed, f"{where}.")
        model, upstream = item.get("model"), item.get("upstream")
        if not isinstance(model, str) or not model.strip():
            raise _fail(f"{where}.model", "required, a non-empty string (a glob such as 'llama*')")
        if upstream is not None and (not isinstance(upstream, str) or not upstream.strip()):
            raise _fail(f"{where}.upstream", "must be an upstream name (a non-empty string)")
        rates: dict[str, float | None] = {}
        for key in ("input", "cached_input", "cache_write", "output"):
            value: Any = item.get(key)
            if value is None and key in ("cached_input", "cache_write"):
                rates[key] = None
                continue
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or not 0 <= value <= MAX_RATE_PER_TOKEN * 1e6):  # fmt: skip
                raise _fail(f"{where}.{key}", f"must be a number >= 0 and at most {MAX_RATE_PER_TOKEN * 1e6:.0f}"
                                              " (USD per million tokens)")  # fmt: skip
            rates[key] = float(value)
        out.append(CustomPrice(model.strip(), upstream.strip() if upstream else None, rates["input"] or 0.0,
                               rates["cached_input"], rates["cache_write"], rates["output"] or 0.0))  # fmt: skip
    return tuple(out)


def _prices(raw: Any) -> tuple[Path | None, tuple[CustomPrice, ...]]:
    """prices.file (relative to the working directory) and the prices.custom rules."""
    raw = raw or {}
    raw = _section(raw, "prices")
    file = _str(raw, "file", "prices.", None)
    return (Path(file) if file else None), custom_prices(raw.get("custom"))


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _prices_refresh(raw: Any, prices_file: Path | None) -> tuple[float | None, str | None]:
    """prices.refresh (`24h`, `30m`, `90s`, `1d` or seconds) and prices.refresh_url; off unless set."""
    raw = raw if isinstance(raw, dict) else {}
    url = _str(raw, "refresh_url", "prices.", None)
    if url is not None and not url.startswith(("http://", "https://")):
        raise _fail("prices.refresh_url", "must be an http(s) URL")
    value = raw.get("refresh")
    if value is None:
        return None, url
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(m[1]) * _DURATION_UNITS[m[2]]
    else:
        raise _fail("prices.refresh", f"must be a duration such as 24h, 30m or 90s (got {value!r})")
    if seconds < 1:
        raise _fail("prices.refresh", f"must be at least 1s (got {value!r})")
    if prices_file is not None:
        # The refresh replaces the cached copy of the published table, which prices.file overrides.
        raise _fail("prices.refresh", "refreshes the published table, but prices.file is set and would be used instead")
    return seconds, url


def _ship_env(raw: dict[str, Any], key: str, path: str) -> tuple[str | None, str]:
    """(the variable's name, its value) for a *_env key of ship; read here, at load, like every setting."""
    name = _str(raw, key, path, None)
    return (None, "") if name is None else (name, _from_env(name, f"{path}{key}"))


def _ship_common(raw: dict[str, Any], path: str, batch_default: int) -> tuple[int, float]:
    batch = _num(raw, "batch_size", path, batch_default, integer=True, minimum=1)
    if batch > 100_000:
        raise _fail(f"{path}batch_size", "must be at most 100000 (a batch is held in memory)")
    return batch, _num(raw, "interval_ms", path, 1000, minimum=10) / 1000


def _ship_postgres(raw: Any) -> ShipPostgres:
    path = "ship.postgres."
    raw = _section(raw, "ship.postgres", "a mapping with url or url_env")
    env, url = _ship_env(raw, "url_env", path)
    url = url or _str(raw, "url", path, None) or ""
    if not url.startswith(("postgresql://", "postgres://")):
        raise _fail(f"{path}url", f"must be a postgresql:// URL, or url_env must name one (got {redact_url(url)!r})")
    batch, interval = _ship_common(raw, path, 1000)
    serve_reads = raw.get("serve_reads", False)
    if not isinstance(serve_reads, bool):
        raise _fail(f"{path}serve_reads", "must be true or false")
    return ShipPostgres(url=url, url_env=env, batch_size=batch, interval_s=interval, serve_reads=serve_reads)


def _ship_webhook(raw: Any) -> ShipWebhook:
    path = "ship.webhook."
    raw = _section(raw, "ship.webhook", "a mapping with url and secret_env")
    url = _str(raw, "url", path, None)
    if url is None:
        raise _fail(f"{path}url", "is required")
    url = normalise_base_url(url, f"{path}url")
    env, secret = _ship_env(raw, "secret_env", path)
    if env is None:
        raise _fail(f"{path}secret_env", "is required: the environment variable holding the signing secret")
    batch, interval = _ship_common(raw, path, 100)
    return ShipWebhook(url=url, secret=secret, secret_env=env, batch_size=batch, interval_s=interval,
                       timeout_s=_num(raw, "timeout_s", path, 10.0, minimum=0.1))  # fmt: skip


def _ship(raw: Any) -> Ship:
    if raw is None:
        return Ship()
    raw = _section(raw, "ship", "a mapping with postgres and/or webhook")
    return Ship(
        postgres=None if raw.get("postgres") is None else _ship_postgres(raw["postgres"]),
        webhook=None if raw.get("webhook") is None else _ship_webhook(raw["webhook"]),
        degraded_after_s=_num(raw, "degraded_after_s", "ship.", 60.0, minimum=1),
        retry_max_s=_num(raw, "retry_max_s", "ship.", 30.0, minimum=0.01),
    )


def _otel_headers(name: str, key: str) -> tuple[tuple[str, str], ...]:
    """The headers in an OTEL_EXPORTER_OTLP_HEADERS-style variable: k=v pairs, comma-separated, %-encoded."""
    out = []
    for item in _from_env(name, key).split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise _fail(key, f"environment variable {name} must hold name=value pairs separated by commas")
        out.append((unquote(k.strip()), unquote(v.strip())))
    return tuple(out)


def _otel(raw: Any) -> Otel:
    if raw is None:
        return Otel()
    raw = _section(raw, "otel")
    for key in ("enabled", "logs"):
        if not isinstance(raw.get(key, False), bool):
            raise _fail(f"otel.{key}", "must be true or false")
    endpoint = _str(raw, "endpoint", "otel.", None)
    # The standard variable, read here like every setting; only when the file does not say.
    protocol = raw.get("protocol") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or OTLP_PROTOCOLS[0]
    if protocol not in OTLP_PROTOCOLS:
        raise _fail("otel.protocol", f"must be {', '.join(OTLP_PROTOCOLS)} (got {protocol!r}; a collector takes"
                    " it on port 4318)")  # fmt: skip
    headers_env = _str(raw, "headers_env", "otel.", None)
    return Otel(
        enabled=raw.get("enabled", False),
        endpoint=None if endpoint is None else normalise_base_url(endpoint, "otel.endpoint"),
        protocol=protocol,
        service_name=_str(raw, "service_name", "otel.", None),
        headers_env=headers_env,
        headers=() if headers_env is None else _otel_headers(headers_env, "otel.headers_env"),
        logs=raw.get("logs", False),
        metrics_interval_s=_positive(raw, "metrics_interval_s", 60.0, "otel."),
        queue_size=_num(raw, "queue_size", "otel.", 2048, integer=True, minimum=1),
        export_timeout_s=_positive(raw, "export_timeout_s", 10.0, "otel."),
    )


def from_mapping(raw: dict[str, Any]) -> Config:
    """Build a Config from a parsed YAML mapping, failing on the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of keys")
    _check_keys(raw, KEYS[""], "")
    d = Config()
    run_id = _str(raw, "default_run_id", "", d.default_run_id)
    if not RUN_ID_RE.fullmatch(run_id or ""):
        raise _fail("default_run_id", "must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'")
    prices_file, custom = _prices(raw.get("prices"))
    refresh_s, refresh_url = _prices_refresh(raw.get("prices"), prices_file)
    cfg = Config(
        host=_str(raw, "host", "", d.host) or d.host,
        port=check_port(raw.get("port", d.port), "port"),
        runs_dir=Path(_str(raw, "runs_dir", "", str(d.runs_dir)) or d.runs_dir),
        default_run_id=run_id or d.default_run_id,
        upstreams=_upstreams(raw.get("upstreams"), d.upstreams),
        timeouts=_timeouts(raw.get("timeouts"), d.timeouts),
        max_body_bytes=_num(raw, "max_body_bytes", "", d.max_body_bytes, integer=True, minimum=1),
        client_body_timeout_s=_positive(raw, "client_body_timeout_s", d.client_body_timeout_s),
        max_header_bytes=_num(raw, "max_header_bytes", "", d.max_header_bytes, integer=True, minimum=1024),
        max_connections=_num(raw, "max_connections", "", d.max_connections, integer=True),
        flush_interval_s=_num(raw, "flush_interval_ms", "", d.flush_interval_s * 1000, minimum=1) / 1000,
        fsync=_choice(raw, "fsync", d.fsync, ("never", "batch")),
        on_record_failure=_choice(raw, "on_record_failure", d.on_record_failure, ("refuse", "pass")),
        shutdown_grace_s=_num(raw, "shutdown_grace_s", "", d.shutdown_grace_s),
        prices_file=prices_file,
        custom_prices=custom,
        prices_refresh_s=refresh_s,
        prices_refresh_url=refresh_url,
        log_level=_choice(raw, "log_level", d.log_level, ("debug", "info", "warning", "error")),
        event_loop=_choice(raw, "event_loop", d.event_loop, ("auto", "asyncio", "uvloop")),
        budgets=_budgets(raw.get("budgets")),
        access=_access(raw.get("access")),
        passthrough=_passthrough(raw.get("passthrough")),
        ship=_ship(raw.get("ship")),
        otel=_otel(raw.get("otel")),
    )
    return resolve_env(cfg)


def _from_env(name: str, key: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise _fail(key, f"environment variable {name} is not set")
    return value


def resolve_env(cfg: Config) -> Config:
    """cfg with the value of every environment variable its *_env keys name; fails naming the key of one unset.

    The one place the proxy reads its environment for settings (load calls it; code that builds a Config
    by hand calls it too), so what a process uses is fixed at start-up and shown nowhere. Idempotent.
    """
    ups = tuple(
        replace(u, api_key=_from_env(u.api_key_env, f"upstreams[{i}].api_key_env"))
        if u.api_key_env is not None and u.api_key is None else u
        for i, u in enumerate(cfg.upstreams)
    )  # fmt: skip
    a = cfg.access
    keys = a.proxy_keys
    if a.proxy_keys_env is not None:
        listed = _from_env(a.proxy_keys_env, "access.proxy_keys_env").split(",")
        keys = tuple(dict.fromkeys(keys + tuple(k.strip() for k in listed if k.strip())))
    token = a.admin_token
    if token is None and a.admin_token_env is not None:
        token = _from_env(a.admin_token_env, "access.admin_token_env")
    store = cfg.budgets.store
    if store.url is None and store.url_env is not None:
        key = "budgets.store.url_env"
        store = replace(store, url=_check_redis_url(_from_env(store.url_env, key), key))
    return replace(cfg, upstreams=ups, access=replace(a, proxy_keys=keys, admin_token=token),
                   budgets=replace(cfg.budgets, store=store))  # fmt: skip


def price_cache_path() -> Path:
    """Where `prices update` keeps the refreshed table: $METERING_PROXY_CACHE_DIR, else the XDG cache dir."""
    if override := os.environ.get("METERING_PROXY_CACHE_DIR"):
        return Path(override).expanduser() / "model_prices.json"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "metering-proxy" / "model_prices.json"


def load(path: Path | None) -> Config:
    """Read the YAML config at path (or the defaults when None)."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_mapping(raw or {})


def with_overrides(
    cfg: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    upstream: str | None = None,
    runs_dir: str | None = None,
) -> Config:
    """Apply CLI flags on top of the file's values."""
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = check_port(port, "--port")
    if runs_dir is not None:
        changes["runs_dir"] = Path(runs_dir)
    if upstream is not None:
        base = normalise_base_url(upstream, "--upstream")
        changes["upstreams"] = (Upstream(name="default", base_url=base),)
    return replace(cfg, **changes)
