"""Access control: proxy keys for the API, an admin token for /runs, /ui and /metrics, no open relay.

With proxy keys configured every path but /healthz and the admin paths needs one, sent as
``X-Proxy-Key: <key>`` or ``Authorization: Bearer <key>``; it never goes upstream. A metered call
refused for its key still yields one record, in ``runs/.rejected.jsonl`` with ``run_id: null``, so an
unauthenticated client can never write into a run's file. The admin paths need the admin token
when the proxy listens beyond loopback, or whenever one is configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import errors, routes
from proxy.config import Config, ConfigError

if TYPE_CHECKING:
    from proxy.forward import Forwarder

ADMIN_PREFIXES = ("/runs", "/ui", "/metrics")
"""Paths (by prefix) that show recorded data and need the admin token."""
OPEN_PATHS = frozenset({"/healthz"})
KEY_HEADER, ADMIN_HEADER = "X-Proxy-Key", "X-Admin-Token"
_BASIC_CHALLENGE = 'Basic realm="metering-proxy admin"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (IPv4-mapped too); any other name or address is not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False  # a host name could resolve to anything, "" and 0.0.0.0 mean every interface
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_exposure(cfg: Config) -> None:
    """Refuse an open relay: a non-loopback bind while injecting upstream keys and without proxy keys."""
    injecting = [u.name for u in cfg.upstreams if u.api_key_env]
    if injecting and not is_loopback(cfg.host) and not cfg.access.proxy_keys:
        raise ConfigError(
            f"config: access.proxy_keys: refusing to listen on {cfg.host or 'all interfaces'} (not loopback)"
            f" while upstream {', '.join(injecting)} sends its API key (api_key_env) and no proxy keys are"
            " set: anyone who reaches the port would spend that key. Set access.proxy_keys or"
            " access.proxy_keys_env, or bind 127.0.0.1."
        )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _matches(presented: str, digests: tuple[bytes, ...]) -> bool:
    """Constant-time check against every configured secret (hashing hides their lengths too)."""
    mine = _digest(presented)
    found = False
    for ref in digests:
        found |= hmac.compare_digest(mine, ref)
    return found


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is None or auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip()


def _admin_presented(request: web.Request) -> str | None:
    """The admin token as sent: X-Admin-Token, Bearer, or the password of Basic auth (any user name)."""
    token = request.headers.get(ADMIN_HEADER) or _bearer(request)
    if token is not None:
        return token
    auth = request.headers.get("Authorization", "")
    if auth[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def _unauthorized(message: str, code: str) -> errors.Unauthorized:
    return errors.Unauthorized(message, code=code, param="Authorization")


def _admin_error(path: str, presented: str | None, configured: bool) -> errors.Unauthorized:
    if not configured:
        why = ("no admin token is configured (access.admin_token or access.admin_token_env), so they are"
               " closed on a non-loopback bind")  # fmt: skip
    else:
        why = (f"send it as 'Authorization: Bearer <token>' or '{ADMIN_HEADER}: <token>', or as the password"
               " when a browser asks")  # fmt: skip
    what = "Missing" if presented is None else "Invalid"
    return _unauthorized(f"{what} admin token: {path} needs the admin token; {why}.", "invalid_admin_token")


def middleware(cfg: Config, forwarder: Forwarder) -> Callable[..., Awaitable[web.StreamResponse]] | None:
    """The access middleware for cfg, or None when nothing is restricted (loopback, no keys, no token)."""
    keys = tuple(_digest(k) for k in cfg.access.proxy_keys)
    token = cfg.access.admin_token
    admin = (_digest(token),) if token else ()
    guard_admin = bool(admin) or not is_loopback(cfg.host)
    if not keys and not guard_admin:
        return None

    def refuse(request: web.Request, exc: errors.ProxyError, challenge: str = "Bearer") -> web.StreamResponse:
        route = request.get(routes.ROUTE)
        if route is not None and route.endpoint is not None:
            resp = forwarder.refuse(request, exc)  # a metered call: one record, in .rejected.jsonl
        else:
            resp = errors.render(exc, errors.new_error_id())
        resp.headers["WWW-Authenticate"] = challenge
        return resp

    @web.middleware
    async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.get(routes.ROUTE)
        path = route.canonical if route is not None else request.path
        if path.startswith(ADMIN_PREFIXES):
            if not guard_admin:
                return await handler(request)
            presented = _admin_presented(request)
            if presented is None or not _matches(presented, admin):
                # A Basic challenge makes a browser ask once and send it on every /ui, /runs fetch after.
                return refuse(request, _admin_error(path, presented, bool(admin)), _BASIC_CHALLENGE)
            return await handler(request)
        if not keys or path in OPEN_PATHS:
            return await handler(request)
        key = request.headers.get(KEY_HEADER)
        if key is not None:  # X-Proxy-Key is a consumed header: the forwarder never sends it upstream
            if _matches(key, keys):
                return await handler(request)
            return refuse(
                request, _unauthorized(f"Invalid proxy key (sent in {KEY_HEADER}).", "invalid_proxy_key")
            )
        key = _bearer(request)
        if key is None:
            return refuse(request, _unauthorized(
                f"Missing proxy key: this proxy needs one, sent as '{KEY_HEADER}: <key>' or"
                " 'Authorization: Bearer <key>'.", "missing_proxy_key"))  # fmt: skip
        if not _matches(key, keys):
            return refuse(request, _unauthorized(
                f"Invalid proxy key (sent in Authorization). If Authorization carries your upstream API key,"
                f" send the proxy key in {KEY_HEADER}.", "invalid_proxy_key"))  # fmt: skip
        # The key rode in Authorization: drop it so it never reaches the upstream.
        headers = request.headers.copy()
        del headers["Authorization"]
        return await handler(request.clone(headers=headers))

    return access_middleware


#: Request headers access control reads; never sent upstream.
HEADERS = frozenset({KEY_HEADER.lower()})
