"""The upstream read timeout of streams, kept by one periodic check instead of a timer reset on every read.

aiohttp's ``sock_read`` timeout cancels and re-arms a loop timer each time data arrives: about 2.5 us per
read on this machine's uvloop, once per streamed chunk. Streams are where reads are many, so once a stream's
headers are in, its connection's timer is turned off and the stream is handed to a ReadWatch: the relay
loop notes the time of each read (a dict store), and a single task looks every ``tick`` seconds for streams
quiet for longer than the timeout. Such a stream gets the exception aiohttp's own timer would have raised,
so the handler's timeout path is the same either way. Buffered bodies (one or two reads) keep aiohttp's.

It fires between ``timeout`` and ``timeout + tick`` after the last read; aiohttp itself rounds timeouts of
5 s and more up to the next whole second.
"""

from __future__ import annotations

import asyncio
import contextlib
from time import perf_counter

import aiohttp

MAX_TICK_S = 1.0


class ReadWatch:
    """Streams being relayed, by their content reader, with the time of their last read."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout or None
        self.tick = min(MAX_TICK_S, self.timeout / 4) if self.timeout else MAX_TICK_S
        self.last_read: dict[aiohttp.StreamReader, float] = {}
        """Relay loops store perf_counter() here after each read: the hot path's whole share of the work."""
        self.fired = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic check (on the running loop); nothing to do without a read timeout."""
        if self.timeout is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metering-proxy read watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def watch(self, up: aiohttp.ClientResponse) -> bool:
        """Take over the read timeout of a response whose body is about to be streamed; False when there is
        none to take over (no timeout configured, or not running), and aiohttp keeps its own."""
        conn = up.connection
        if self.timeout is None or self._task is None or conn is None or conn.protocol is None:
            return False
        conn.protocol.read_timeout = None  # data_received stops re-arming it...
        conn.protocol.start_timeout()  # ...and, with no timeout set, this cancels the one armed by the last read
        self.last_read[up.content] = perf_counter()
        return True

    def unwatch(self, up: aiohttp.ClientResponse) -> None:
        self.last_read.pop(up.content, None)

    async def _run(self) -> None:
        assert self.timeout is not None
        while True:
            await asyncio.sleep(self.tick)
            deadline = perf_counter() - self.timeout
            late = [content for content, at in self.last_read.items() if at < deadline]
            for content in late:
                del self.last_read[content]
                self.fired += 1
                # What aiohttp's own timer raises (a TimeoutError), in the reader the relay loop awaits.
                content.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
