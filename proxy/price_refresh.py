"""prices.refresh: download the price table in the background of `serve` and price later calls with it.

The download, its check and the parsing of the new table run in a daemon thread (a slow or hanging host
must neither block the event loop nor hold up shutdown); only the swap runs on the loop, as one
synchronous step, so every call is priced wholly with the old table or wholly with the new one. A failed
download or a table that fails its check keeps the table in use and logs one line saying why.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from proxy.config import CustomPrice, price_cache_path, redact_url
from proxy.prices_cmd import DEFAULT_PRICES_URL, update_prices
from proxy.pricing import PriceBook

log = logging.getLogger("metering_proxy.pricing")
T = TypeVar("T")
DOWNLOAD_TIMEOUT_S = 60.0


class PriceRefresher:
    """Every interval, refresh the cached price table and hand the newly loaded PriceBook to install."""

    def __init__(self, interval_s: float, install: Callable[[PriceBook], None], *, url: str | None = None,
                 custom: tuple[CustomPrice, ...] = (), dest: Path | None = None) -> None:  # fmt: skip
        self.interval_s = interval_s
        self.url = url or DEFAULT_PRICES_URL
        self.custom = custom
        self.dest = dest if dest is not None else price_cache_path()
        self._install = install
        self.refreshed = 0
        """Tables installed since start."""
        self.failed = 0
        """Refreshes that kept the table in use."""

    def first_delay(self) -> float:
        """Seconds until the first download: none is due while the cached copy is younger than the interval."""
        try:
            age = time.time() - self.dest.stat().st_mtime
        except OSError:
            return 0.0
        return min(max(self.interval_s - age, 0.0), self.interval_s)

    async def run(self) -> None:
        """Refresh forever (cancelled at shutdown)."""
        delay = self.first_delay()
        while True:
            await asyncio.sleep(delay)
            await self.refresh()
            delay = self.interval_s

    async def refresh(self) -> bool:
        """One refresh: True when a new table is now in use, False when the old one was kept (and logged)."""
        try:
            book, message = await _in_thread(self._fetch)
        except Exception as exc:  # a bug here must not end the refresh loop, nor reach a call
            book, message = None, f"price refresh failed: {type(exc).__name__}: {exc}; kept the table in use"
        # The URL may carry credentials (a private mirror): shown redacted, like every URL the proxy prints.
        message = message.replace(self.url, redact_url(self.url))
        if book is None:
            self.failed += 1
            log.warning("%s", message)
            return False
        self._install(book)
        self.refreshed += 1
        log.info("price refresh: %s; later calls are priced with it", message)
        return True

    def _fetch(self) -> tuple[PriceBook | None, str]:
        """In the thread: download, check and install the file, then load it."""
        ok, message = update_prices(self.url, self.dest, DOWNLOAD_TIMEOUT_S)
        if not ok:
            return None, message.split("; kept ", 1)[0] + "; kept the table in use"
        try:
            return PriceBook.load(self.dest, self.custom), message
        except ValueError as exc:  # replaced on disk between the write and this read
            return None, f"price refresh failed: {exc}; kept the table in use"


def _in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run fn in a daemon thread: unlike the default executor, shutdown does not wait for a hung download."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():  # cancelled at shutdown while the thread ran
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, exc = fn(), None
        except BaseException as caught:  # handed to the awaiting task, not lost in the thread
            result, exc = None, caught
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop closed first: nobody is waiting
            pass

    threading.Thread(target=work, name="metering-proxy-price-refresh", daemon=True).start()
    return future
