"""Reading a request body: bounded in size and in time, and decoded a small step at a time.

aiohttp's own request decoding (turned off in app.py) inflated a compressed body in steps as large as
the size limit without giving the loop back, so 1 MiB of gzip that inflates to 1 GiB held every call in
flight up for seconds before its 413. Here the raw bytes are read as they arrive and inflated at most
_STEP bytes at a time with the loop running in between; the decoded size is checked after every step,
and the whole read has a deadline, so a client trickling its body cannot hold a connection for ever.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator

from aiohttp import StreamReader, web

from proxy import errors

#: Content-Encoding names the proxy decodes, and what each means (RFC 9110 8.4.1: x-gzip is gzip).
_CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
#: Most bytes one decompression step may produce: inflating 64 KiB takes well under a millisecond.
_STEP = 64 * 1024


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """Return the request body, decoded as its Content-Encoding says.

    Raises PayloadTooLarge (413) once the bytes received or the bytes decoded pass max_bytes,
    ClientBodyTimeout (408) when the whole body has not arrived within timeout_s, UnsupportedMediaType
    (415) for a coding other than gzip or deflate, and BadRequest (400) for a corrupt or cut stream.
    """
    if not request.body_exists:
        return b""
    coding = _coding(request)
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes, decoded=False)  # no need to wait for a body that cannot be taken
    content = request.content
    if coding is None and content.is_eof():
        # The usual small call: the whole body came in with the headers. No deadline to arm.
        body = await content.read()
        if len(body) > max_bytes:
            raise _too_large(max_bytes, decoded=False)
        return body
    reader = _Reader(coding, max_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read(content)
    except TimeoutError:
        of = f" of {declared}" if declared is not None else ""
        raise errors.ClientBodyTimeout(
            f"The request body did not arrive within client_body_timeout_s ({timeout_s:g} s): {reader.received}"
            f"{of} bytes came in that time."
        ) from None
    except zlib.error as exc:
        raise errors.BadRequest(f"The request body could not be decoded as its Content-Encoding {coding!r} says: {exc}",
                                param="Content-Encoding") from None  # fmt: skip
    except web.RequestPayloadError as exc:  # broken framing: cut short, bad chunk sizes
        why = str(exc).replace("\n", " ").split("message:")[-1].strip()
        raise errors.BadRequest(f"The request body could not be read: {why}") from None


def _coding(request: web.Request) -> str | None:
    """The one coding to undo, or None for an uncompressed body; 415 for anything else.

    A coding the proxy cannot undo must not be let through: the body would go upstream still compressed,
    without the Content-Encoding header that says so (it is dropped, as the upstream gets the decoded body).
    """
    names = [n.strip().lower() for value in request.headers.getall("Content-Encoding", ()) for n in value.split(",")]
    names = [n for n in names if n and n != "identity"]
    if not names:
        return None
    if len(names) == 1 and names[0] in _CODINGS:
        return _CODINGS[names[0]]
    shown = ", ".join(names)
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    raise errors.UnsupportedMediaType(
        f"Content-Encoding {shown!r} is not supported: send the body uncompressed, or compressed once with gzip"
        " or deflate.",
        param="Content-Encoding", code="unsupported_content_encoding",
    )  # fmt: skip


def _too_large(max_bytes: int, *, decoded: bool) -> errors.PayloadTooLarge:
    what = "decodes to more than" if decoded else "is larger than"
    return errors.PayloadTooLarge(f"Request body {what} the proxy's limit of {max_bytes} bytes (max_body_bytes).")


class _Reader:
    """One body being read; what has arrived so far is kept for the 408's message."""

    def __init__(self, coding: str | None, max_bytes: int) -> None:
        self.coding = coding
        self.max_bytes = max_bytes
        self.received = 0
        self.decoded = 0

    async def read(self, content: StreamReader) -> bytes:
        inflater = _Inflater(self.coding) if self.coding is not None else None
        parts: list[bytes] = []
        while chunk := await content.readany():
            # The bytes on the wire count too: empty gzip members decode to nothing, without end.
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise _too_large(self.max_bytes, decoded=False)
            if inflater is None:
                parts.append(chunk)
                continue
            for piece in inflater.feed(chunk):
                self.decoded += len(piece)
                if self.decoded > self.max_bytes:
                    raise _too_large(self.max_bytes, decoded=True)
                parts.append(piece)
                # A 64 KiB chunk of a bomb inflates to 64 MiB: other calls run between the steps.
                await asyncio.sleep(0)
        if inflater is not None:
            inflater.close()
        return b"".join(parts)


class _Inflater:
    """A gzip stream (any number of members, RFC 1952 2.2) or a deflate stream, inflated in steps."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._z: zlib._Decompress | None = None
        self._ended = 0
        """Members (streams) complete so far."""

    def _start(self, first: bytes) -> zlib._Decompress:
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # deflate is the zlib format (RFC 9110 8.4.1.2), but some clients send raw deflate under that
        # name; a zlib stream opens with compression method 8 and a window of at most 32 KiB.
        wrapped = first[0] & 0x0F == 8 and first[0] >> 4 <= 7
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Inflate data, yielding at most _STEP bytes at a time; zlib.error for a corrupt stream."""
        while True:
            z = self._z
            if z is None:
                if not data:
                    return
                if self._ended and self.coding == "deflate":
                    raise zlib.error("data after the end of the deflate stream")
                z = self._z = self._start(data)
            out = z.decompress(data, _STEP)
            data = z.unconsumed_tail
            if out:
                yield out
            if z.eof:
                # The end of a gzip member: whatever follows must be another member.
                self._z, self._ended = None, self._ended + 1
                data = z.unused_data
            elif not data and len(out) < _STEP:
                return  # all of data consumed and nothing held back: wait for more

    def close(self) -> None:
        """The body has ended: fail if the stream has not."""
        if self._z is not None:
            raise zlib.error("the compressed stream ends before it is complete")
