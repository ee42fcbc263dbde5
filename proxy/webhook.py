"""The webhook destination: each batch POSTed as signed JSON; at-least-once, 2xx or it is sent again.

Body: ``{"schema": "metering-proxy.records/1", "batch_id": ..., "sent_at": ..., "records": [...]}``.
Headers: ``X-Meter-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``,
``Idempotency-Key`` (= batch_id, the same on every retry of the batch) and ``X-Meter-Batch-Id``.
Redirects are never followed (the next host would get the records): a 3xx is a failure.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime

import aiohttp
import orjson
from yarl import URL

from proxy.config import ShipWebhook
from proxy.shipper import Batch, DeliveryError, jsonable

SCHEMA = "metering-proxy.records/1"
SIGNATURE_HEADER = "X-Meter-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Meter-Signature value for body sent at timestamp."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether header is a valid signature of body made within tolerance_s of now (for receivers)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - t) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, t, body), f"t={t},v1={parts.get('v1', '')}")


def body(batch: Batch, sent_at: datetime) -> bytes:
    """The JSON body for a batch."""
    doc = {"schema": SCHEMA, "batch_id": batch.batch_id,
           "sent_at": sent_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "records": batch.records}
    try:
        return orjson.dumps(doc)
    except TypeError:  # a record from a foreign file with an integer past 64 bits or a lone surrogate
        return orjson.dumps(jsonable({**doc, "records": [jsonable(r) for r in batch.records]}))


class WebhookDestination:
    """POSTs each batch to the configured URL."""

    name = "webhook"

    def __init__(self, cfg: ShipWebhook) -> None:
        self.cfg = cfg
        self.session: aiohttp.ClientSession | None = None
        host = URL(cfg.url)
        self.shown = f"{host.scheme}://{host.host}:{host.port}"  # the path may hold a token: never shown

    async def deliver(self, batch: Batch) -> None:
        """POST the batch; anything but a 2xx (a redirect included) raises DeliveryError."""
        if self.session is None:
            self.session = aiohttp.ClientSession(trust_env=False)
        now = datetime.now(UTC)
        data = body(batch, now)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.cfg.secret, int(now.timestamp()), data),
            "Idempotency-Key": batch.batch_id,
            "X-Meter-Batch-Id": batch.batch_id,
        }
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        try:
            async with self.session.post(self.cfg.url, data=data, headers=headers, allow_redirects=False,
                                         timeout=timeout) as resp:  # fmt: skip
                await resp.content.read(64 * 1024)  # let the connection be reused; the body is not needed
                if not 200 <= resp.status < 300:
                    raise DeliveryError(f"{self.shown} answered HTTP {resp.status}")
        except TimeoutError:
            raise DeliveryError(f"{self.shown} did not answer within {self.cfg.timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"{self.shown}: {type(exc).__name__}") from None

    async def close(self) -> None:
        """Close the HTTP session."""
        if self.session is not None:
            await self.session.close()
            self.session = None
