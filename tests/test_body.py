"""Request bodies (issue 11, item 7): bounded in size and in time, decoded without stalling the loop.

Compression bombs must get their 413 while every other call in flight keeps being served; a client
that trickles its body gets 408 after client_body_timeout_s; a compressed body always reaches the
upstream decoded (never still compressed with its Content-Encoding dropped). Real servers on loopback,
raw sockets where the client's timing matters.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from proxy import config as C
from proxy import errors
from tests.conftest import FakeUpstream, ProxyFactory, ProxyUnderTest

CHAT = "/v1/chat/completions"
BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]})
MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------


def bomb(coding: str, inflated_mib: int) -> bytes:
    """A body that inflates to about inflated_mib MiB (JSON-looking, then NUL bytes), 1000:1 or so.

    Built from one compressed 1 MiB block repeated (a full flush makes each block independent), so a
    1 GiB bomb takes a fraction of a second to make rather than the seconds zlib needs to compress it.
    """
    prefix = b'{"model": "gpt-4o-mini", "pad": "'
    zeros = bytes(MiB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    raw = head + block * inflated_mib + c.flush()
    crc, adler = zlib.crc32(prefix), zlib.adler32(prefix)
    for _ in range(inflated_mib):
        crc, adler = zlib.crc32(zeros, crc), zlib.adler32(zeros, adler)
    size = len(prefix) + inflated_mib * MiB
    if coding == "gzip":
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + raw + struct.pack("<II", crc, size & 0xFFFFFFFF)
    if coding == "deflate":  # the zlib format RFC 9110 means by deflate
        return b"\x78\xda" + raw + struct.pack(">I", adler)
    return raw  # the raw deflate some clients send under that name


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def head(path: str, *headers: str, length: int | None = None, close: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    if close:
        lines.append("Connection: close")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, lower-cased headers, body)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def slow_client(port: int, path: str, *extra: str, every: float = 0.2, length: int = 100_000,
                      wait: float = 5.0) -> tuple[float, int, dict[str, str], bytes]:  # fmt: skip
    """Declare Content-Length: length, then send one byte every `every` seconds until answered.

    Returns (seconds from the end of the headers to the answer, status, headers, body).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle() -> None:
        try:
            for _ in range(length):
                await asyncio.sleep(every)
                writer.write(b" ")
                await writer.drain()
        except ConnectionError:
            pass  # answered and closed: what the test is waiting for

    try:
        writer.write(head(path, *extra, length=length))
        await writer.drain()
        t0 = time.monotonic()
        sender = asyncio.create_task(trickle())
        try:
            status, headers, body = await asyncio.wait_for(read_response(reader), wait)
        finally:
            sender.cancel()
        return time.monotonic() - t0, status, headers, body
    finally:
        writer.close()


async def post(url: str, data: Any, headers: dict[str, str] | None = None,
               timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(url, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, dict(r.headers), await r.read()


class LoopWatch:
    """While running: the longest the event loop went without waking a 1 ms sleeper, and the slowest
    /healthz answer. The proxy under test runs on this same loop, so both see any stall it causes."""

    def __init__(self, healthz_url: str) -> None:
        self.url = healthz_url
        self.max_gap = 0.0
        self.max_healthz = 0.0
        self.healthz_calls = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> LoopWatch:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._healthz())]
        await asyncio.sleep(0.05)  # the first healthz call opens its connection outside the window
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _tick(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    async def _healthz(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            async with self._session.get(self.url) as r:
                await r.read()
                assert r.status == 200
            self.max_healthz = max(self.max_healthz, time.perf_counter() - t0)
            self.healthz_calls += 1
            await asyncio.sleep(0.005)


def check_refusal(rec: dict[str, Any], status: int, category: str, headers: dict[str, str]) -> None:
    assert rec["status"] == status and rec["success"] is False, rec
    assert rec["error"]["category"] == category, rec["error"]
    assert rec["error"]["id"] == headers["X-Meter-Error-Id"]
    assert rec["upstream"] is None and rec["usage_source"] == "none"


# -- compression bombs -----------------------------------------------------------------------


async def test_gzip_bomb_gets_413_without_stalling_other_calls(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    """1 MiB of gzip that inflates to 1 GiB (default 32 MiB limit): 413, and meanwhile no other call in
    flight waits. aiohttp 3.14 inflated it in steps of max_body_bytes without yielding: the loop stopped
    for 1.5 s and a /healthz call took 4.5 s (it went on inflating while draining the refused body)."""
    proxy = await make_proxy()
    data = bomb("gzip", 1024)
    assert len(data) < 1.1 * MiB
    async with LoopWatch(proxy.url("/healthz")) as watch:
        t0 = time.perf_counter()
        status, headers, raw = await post(proxy.url(CHAT), data, {"Content-Encoding": "gzip", "X-Run-Id": "bomb"})
        took = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # and while aiohttp drains what the client still sends
    assert status == 413, raw
    err = orjson.loads(raw)["error"]
    assert err["code"] == "payload_too_large" and str(32 * MiB) in err["message"]
    [rec] = await proxy.wait_records("bomb", 1)
    check_refusal(rec, 413, "payload_too_large", headers)
    assert fake_upstream.requests == []
    # Each decompression step is a fraction of a millisecond; 100 ms leaves room for a loaded 2-core
    # machine (GC, other processes) and still catches any stall of the kind seen (1-5 s).
    assert watch.healthz_calls >= 5
    assert watch.max_gap < 0.1 and watch.max_healthz < 0.1, (watch.max_gap, watch.max_healthz)
    assert took < 2.0


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
async def test_bombs_stop_at_the_limit(make_proxy: ProxyFactory, fake_upstream: FakeUpstream, coding: str) -> None:
    """Decoding stops as soon as the decoded size passes max_body_bytes: 413 well before 256 MiB inflate."""
    proxy = await make_proxy(max_body_bytes=MiB)
    name = "deflate" if coding == "raw-deflate" else coding
    t0 = time.perf_counter()
    status, headers, raw = await post(proxy.url(CHAT), bomb(coding, 256), {"Content-Encoding": name, "X-Run-Id": "b"})
    assert status == 413, raw
    assert "decod" in orjson.loads(raw)["error"]["message"]
    assert time.perf_counter() - t0 < 1.0
    [rec] = await proxy.wait_records("b", 1)
    check_refusal(rec, 413, "payload_too_large", headers)
    assert fake_upstream.requests == []


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_limit_counts_the_decoded_body_to_the_byte(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                         coding: str) -> None:  # fmt: skip
    """A body of exactly max_body_bytes (decoded) goes through; one byte more gets 413."""
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 200}]})
    proxy = await make_proxy(max_body_bytes=len(body))
    enc: Callable[[bytes], bytes] = gzip.compress if coding == "gzip" else bytes
    hdrs = {"Content-Encoding": coding, "X-Run-Id": "edge"}
    status, _, raw = await post(proxy.url(CHAT), enc(body), hdrs)
    assert status == 200, raw
    status, _, raw = await post(proxy.url(CHAT), enc(body + b" "), hdrs)
    assert status == 413, raw
    assert len(fake_upstream.requests) == 1 and fake_upstream.requests[0]["body"] == orjson.loads(body)


async def test_compressed_bytes_count_too(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    """Empty gzip members decode to nothing: the bytes on the wire are bounded by the limit as well."""
    proxy = await make_proxy(max_body_bytes=10_000)
    members = gzip.compress(BODY) + gzip.compress(b"") * 1000
    status, headers, raw = await post(proxy.url(CHAT), members, {"Content-Encoding": "gzip", "X-Run-Id": "m"})
    assert status == 413, raw
    [rec] = await proxy.wait_records("m", 1)
    check_refusal(rec, 413, "payload_too_large", headers)


async def test_declared_length_over_the_limit_is_refused_before_the_body(proxy: ProxyUnderTest) -> None:
    """Content-Length over max_body_bytes: 413 at once, without waiting for (or reading) the body."""
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(head(CHAT, "X-Run-Id: declared", length=64 * MiB))
        status, headers, raw = await asyncio.wait_for(read_response(reader), 2)
    finally:
        writer.close()
    assert status == 413, raw
    [rec] = await proxy.wait_records("declared", 1)
    assert rec["status"] == 413 and rec["error"]["category"] == "payload_too_large"


async def test_chunked_body_over_the_limit(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    """No Content-Length (chunked): counted as it arrives, 413 once past the limit."""
    proxy = await make_proxy(max_body_bytes=100_000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b" " * 10_000

    status, _, raw = await post(proxy.url(CHAT), chunks(), {"X-Run-Id": "chunked"})
    assert status == 413, raw
    assert fake_upstream.requests == []


# -- codings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("x-gzip", gzip.compress),  # RFC 9110 8.4.1.3: a recipient should treat it as gzip
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
        ("gzip", lambda b: gzip.compress(b[:10]) + gzip.compress(b[10:])),  # two members (RFC 1952)
        ("identity", bytes),
        ("gzip, identity", gzip.compress),
        ("", bytes),
    ],
)  # fmt: skip
async def test_codings_are_decoded_and_the_upstream_gets_the_plain_body(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    status, _, raw = await post(proxy.url(CHAT), encode(BODY), {"Content-Encoding": coding, "X-Run-Id": "enc"})
    assert status == 200, raw
    [sent] = fake_upstream.requests
    assert "content-encoding" not in {k.lower() for k in sent["headers"]}
    assert sent["body"] == orjson.loads(BODY)
    [rec] = await proxy.wait_records("enc", 1)
    assert rec["success"] is True


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip", "deflate, gzip", "bogus", "gzip;q=1"])
async def test_codings_the_proxy_cannot_decode_get_415(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, coding: str
) -> None:
    """Never forwarded still compressed with the header dropped (aiohttp passed 'gzip, gzip' through raw)."""
    status, headers, raw = await post(proxy.url(CHAT), gzip.compress(gzip.compress(BODY)),
                                      {"Content-Encoding": coding, "X-Run-Id": "enc415"})  # fmt: skip
    assert status == 415, raw
    err = orjson.loads(raw)["error"]
    assert err["param"] == "Content-Encoding" and "gzip" in err["message"] and "deflate" in err["message"]
    assert fake_upstream.requests == []
    [rec] = await proxy.wait_records("enc415", 1)
    check_refusal(rec, 415, "bad_request", headers)


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", b'{"model": "gpt-4o-mini"}'),  # not gzip at all
        ("gzip", gzip.compress(BODY)[:-9]),  # cut short
        ("gzip", gzip.compress(BODY) + b"trailing garbage"),
        ("gzip", gzip.compress(BODY)[:30] + b"\x00" * 20 + gzip.compress(BODY)[50:]),  # corrupt mid-stream
        ("deflate", zlib.compress(BODY)[:-3]),
        ("deflate", zlib.compress(BODY) + b"x"),
    ],
)  # fmt: skip
async def test_corrupt_compressed_bodies_get_400(
    proxy: ProxyUnderTest, fake_upstream: FakeUpstream, coding: str, data: bytes
) -> None:
    status, headers, raw = await post(proxy.url(CHAT), data, {"Content-Encoding": coding, "X-Run-Id": "corrupt"})
    assert status == 400, raw
    err = orjson.loads(raw)["error"]
    assert err["param"] == "Content-Encoding" and coding in err["message"], err
    assert fake_upstream.requests == []
    [rec] = await proxy.wait_records("corrupt", 1)
    check_refusal(rec, 400, "bad_request", headers)


async def test_passthrough_bodies_are_bounded_and_decoded_too(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(passthrough=("POST /v1/files",), max_body_bytes=MiB)
    url = proxy.url("/v1/files")
    status, _, raw = await post(url, gzip.compress(BODY), {"Content-Encoding": "gzip"})
    assert status == 200, raw
    [sent] = fake_upstream.requests
    assert sent["body"] == orjson.loads(BODY) and "content-encoding" not in {k.lower() for k in sent["headers"]}
    status, _, raw = await post(url, bomb("gzip", 64), {"Content-Encoding": "gzip"})
    assert status == 413 and orjson.loads(raw)["error"]["code"] == "payload_too_large", raw
    status, _, raw = await post(url, gzip.compress(BODY), {"Content-Encoding": "br"})
    assert status == 415, raw
    assert len(fake_upstream.requests) == 1


# -- slow clients ----------------------------------------------------------------------------


async def test_a_client_trickling_its_body_gets_408(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    """Content-Length: 100000, then a byte every 0.2 s: 408 after client_body_timeout_s (1 s), recorded;
    other calls are served meanwhile."""
    proxy = await make_proxy(client_body_timeout_s=1)
    assert proxy.server.port is not None
    slow = asyncio.create_task(slow_client(proxy.server.port, CHAT, "X-Run-Id: slow"))
    await asyncio.sleep(0.3)  # a real interval: the slow body is a byte in when the fast call comes
    t0 = time.perf_counter()
    status, _, raw = await post(proxy.url(CHAT), BODY, {"X-Run-Id": "fast"})
    assert status == 200 and time.perf_counter() - t0 < 0.5, raw
    took, status, headers, raw = await slow
    assert status == 408, raw
    assert 0.9 < took < 2.0, took
    assert headers.get("connection", "").lower() == "close"  # RFC 9110 15.5.9
    err = orjson.loads(raw)["error"]
    assert err["code"] == "client_timeout" and "client_body_timeout_s" in err["message"], err
    [rec] = await proxy.wait_records("slow", 1)
    check_refusal(rec, 408, "client_timeout", {"X-Meter-Error-Id": headers["x-meter-error-id"]})
    assert len(fake_upstream.requests) == 1


async def test_a_client_that_never_sends_its_body_gets_408(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(client_body_timeout_s=0.5)
    assert proxy.server.port is not None
    took, status, _, raw = await slow_client(proxy.server.port, CHAT, "X-Run-Id: silent", every=3600)
    assert status == 408 and 0.4 < took < 1.5, (took, raw)
    [rec] = await proxy.wait_records("silent", 1)
    assert rec["error"]["category"] == "client_timeout"


async def test_a_slow_body_inside_the_timeout_is_fine(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(client_body_timeout_s=2)
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(head(CHAT, "X-Run-Id: patient", length=len(BODY)))
        for i in range(0, len(BODY), len(BODY) // 5 + 1):
            await asyncio.sleep(0.1)  # a real interval: the body comes in five parts over 0.5 s
            writer.write(BODY[i : i + len(BODY) // 5 + 1])
        status, _, raw = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert status == 200, raw
    assert fake_upstream.requests[0]["body"] == orjson.loads(BODY)


async def test_50_slow_clients_are_all_dropped_and_healthz_stays_fast(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(client_body_timeout_s=1)
    port = proxy.server.port
    assert port is not None
    async with LoopWatch(proxy.url("/healthz")) as watch:
        results = await asyncio.gather(*(slow_client(port, CHAT, "X-Run-Id: many") for _ in range(50)))
    assert [status for _, status, _, _ in results] == [408] * 50
    assert max(took for took, _, _, _ in results) < 2.5
    assert watch.max_healthz < 0.2, watch.max_healthz
    recs = await proxy.wait_records("many", 50)
    assert len(recs) == 50 and {r["error"]["category"] for r in recs} == {"client_timeout"}
    assert fake_upstream.requests == []


async def test_passthrough_slow_client_gets_408(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(passthrough=("POST /v1/files",), client_body_timeout_s=0.5)
    assert proxy.server.port is not None
    took, status, _, raw = await slow_client(proxy.server.port, "/v1/files")
    assert status == 408 and took < 1.5, raw
    assert orjson.loads(raw)["error"]["code"] == "client_timeout"
    assert fake_upstream.requests == []


# -- config and errors -----------------------------------------------------------------------


def test_client_body_timeout_config() -> None:
    assert C.Config().client_body_timeout_s == 30
    assert C.from_mapping({"client_body_timeout_s": 2.5}).client_body_timeout_s == 2.5
    for bad in (0, -1, "10", True, None, float("inf"), float("nan")):
        with pytest.raises(C.ConfigError, match="client_body_timeout_s: must be"):
            C.from_mapping({"client_body_timeout_s": bad})


def test_client_timeout_category_is_known() -> None:
    exc = errors.ClientBodyTimeout("late")
    assert exc.status == 408 and exc.category == "client_timeout" and exc.category in errors.CATEGORIES
