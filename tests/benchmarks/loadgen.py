"""The benchmark's Python load generator: a small HTTP/1.1 keep-alive client, run in its own process.

    python tests/benchmarks/loadgen.py MODE --port P [options]

Modes (each prints progress lines and ends with one line ``RESULT {json}`` on stdout):
  throughput  C connections, each sending requests back to back until --duration is over or --calls
              have been issued; requests in flight at the deadline are finished, never abandoned, so
              calls made = completed + errors exactly. Used when wrk is absent, and for the soak.
  latency     one connection, --calls sequential requests, each timed (blocking socket, no event loop).
  ttft        one connection, --calls sequential streams; per call the time to the first content
              chunk and to the end.
  slow        --calls connections opened first, then all requests sent at once: that many streams in
              flight together (reports how many were open at the same time).

Loopback only; every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
import time

import orjson

HOST = "127.0.0.1"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in five words."},
    ],
    "max_tokens": 64,
}
_CONTENT = re.compile(rb'"content":"[^"]')


def build_request(
    path: str, port: int, stream: bool, run_id: str, headers: dict[str, str], auth: str = "sk-bench-not-a-key"
) -> bytes:
    """One complete HTTP/1.1 request, as bytes."""
    body = orjson.dumps({**BODY, "stream": True} if stream else BODY)
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Content-Type: application/json",
        f"Authorization: Bearer {auth}",
        f"X-Run-Id: {run_id}",
        *(f"{k}: {v}" for k, v in headers.items()),
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _head(raw: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = raw.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    return status, headers


# -- asyncio client --------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader, on_data: object = None) -> tuple[int, bool]:
    """Read one response; return (status, keep_alive). on_data(bytes) sees each body piece."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = _head(head[:-4])
    keep = headers.get(b"connection") != b"close"
    if headers.get(b"transfer-encoding") == b"chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from our servers
                break
            data = await reader.readexactly(size + 2)
            if on_data is not None:
                on_data(data)  # type: ignore[operator]
    elif b"content-length" in headers:
        data = await reader.readexactly(int(headers[b"content-length"]))
        if on_data is not None:
            on_data(data)  # type: ignore[operator]
    else:
        await reader.read()
        keep = False
    return status, keep


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def throughput(
    port: int,
    requests: list[bytes],
    concurrency: int,
    duration: float,
    calls: int,
    progress_every: int,
    hard_limit: float,
) -> dict:
    state = {"issued": 0, "completed": 0, "ok": 0, "errors": 0, "non2xx": 0}
    t0 = time.perf_counter()
    deadline = t0 + duration
    next_progress = progress_every

    async def worker() -> None:
        nonlocal next_progress
        conn = None
        while True:
            now = time.perf_counter()
            if now >= deadline or (calls and state["issued"] >= calls):
                break
            i = state["issued"]
            state["issued"] += 1
            try:
                if conn is None:
                    conn = await _connect(port)
                reader, writer = conn
                writer.write(requests[i % len(requests)])
                status, keep = await asyncio.wait_for(read_response(reader), 60)
                state["completed"] += 1
                if 200 <= status < 300:
                    state["ok"] += 1
                else:
                    state["non2xx"] += 1
                if not keep:
                    writer.close()
                    conn = None
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
                ValueError,
            ):
                state["errors"] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
            done = state["completed"] + state["errors"]
            if progress_every and done >= next_progress:
                next_progress += progress_every
                print(f"PROGRESS {done} {time.perf_counter() - t0:.3f}", flush=True)
        if conn is not None:
            conn[1].close()

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), hard_limit)
        timed_out = False
    except TimeoutError:
        timed_out = True
    elapsed = time.perf_counter() - t0
    return {
        **state,
        "elapsed_s": elapsed,
        "rps": state["completed"] / elapsed if elapsed else 0.0,
        "hard_limit_hit": timed_out,
    }


async def slow(port: int, request: bytes, n: int, hard_limit: float) -> dict:
    """Open n connections, then send n streaming requests at once and read them to the end."""
    state = {"connected": 0, "completed": 0, "ok": 0, "errors": 0, "open": 0, "max_open": 0}
    gate = asyncio.Event()
    connect_sem = asyncio.Semaphore(100)  # the proxy's listen backlog is small: connect in waves
    t0 = time.perf_counter()

    async def one() -> None:
        writer = None
        opened = False
        try:
            async with connect_sem:
                reader, writer = await asyncio.wait_for(_connect(port), 30)
            state["connected"] += 1
            if state["connected"] == n:
                gate.set()
            await asyncio.wait_for(gate.wait(), 60)
            writer.write(request)
            head_seen = False

            def on_data(_: bytes) -> None:
                nonlocal head_seen, opened
                if not head_seen:
                    head_seen = opened = True
                    state["open"] += 1
                    state["max_open"] = max(state["max_open"], state["open"])

            status, _ = await asyncio.wait_for(read_response(reader, on_data), 120)
            state["completed"] += 1
            state["ok"] += 200 <= status < 300
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            state["errors"] += 1
            gate.set()  # a failed connect must not hold the others back
        finally:
            if opened:
                state["open"] -= 1
            if writer is not None:
                writer.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), hard_limit)
        timed_out = False
    except TimeoutError:
        timed_out = True
    return {**state, "elapsed_s": time.perf_counter() - t0, "hard_limit_hit": timed_out}


# -- blocking client (latency, ttft) ---------------------------------------------------------


class Blocking:
    """A keep-alive connection with a blocking socket: the least client overhead per request."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def _until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self._fill()
        out, self.buf = self.buf[:i], self.buf[i + len(sep) :]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def call(self, request: bytes) -> tuple[int, float, float | None]:
        """Send one request; return (status, seconds to the end, seconds to the first content chunk)."""
        t0 = time.perf_counter()
        self.sock.sendall(request)
        status, headers = _head(self._until(b"\r\n\r\n"))
        first = None
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int(self._until(b"\r\n").split(b";", 1)[0], 16)
                if size == 0:
                    self._until(b"\r\n")
                    break
                data = self._exactly(size + 2)
                if first is None and _CONTENT.search(data):
                    first = time.perf_counter() - t0
        else:
            self._exactly(int(headers.get(b"content-length", b"0")))
        return status, time.perf_counter() - t0, first


def sequential(port: int, request: bytes, calls: int, hard_limit: float, seq_tag: str | None = None) -> dict:
    """Sequential calls on one connection. seq_tag: add X-Meter-Tag-Bench-Seq and X-Fake-Seq headers
    with the value <seq_tag><i> to call i, so that each call's record (tags.bench-seq) can be matched
    to this client's timing of it and to the upstream's (GET /_bench/stats)."""
    lat: list[float] = []
    ttft: list[float | None] = []
    errors = non2xx = 0
    seqs: list[int] = []
    conn: Blocking | None = None
    deadline = time.perf_counter() + hard_limit
    head, sep, body = request.partition(b"\r\n\r\n")
    for i in range(calls):
        if time.perf_counter() > deadline:
            break
        if seq_tag is not None:
            tag = f"{seq_tag}{i}".encode()
            req = head + b"\r\nX-Meter-Tag-Bench-Seq: " + tag + b"\r\nX-Fake-Seq: " + tag + sep + body
        else:
            req = request
        try:
            if conn is None:
                conn = Blocking(port)
            status, total, first = conn.call(req)
        except (OSError, ValueError):
            errors += 1
            if conn is not None:
                conn.sock.close()
            conn = None
            continue
        non2xx += not 200 <= status < 300
        lat.append(round(total * 1e6, 1))
        ttft.append(None if first is None else round(first * 1e3, 4))
        seqs.append(i)
    if conn is not None:
        conn.sock.close()
    return {
        "completed": len(lat),
        "errors": errors,
        "non2xx": non2xx,
        "latency_us": lat,
        "ttft_ms": ttft,
        "seq": seqs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("throughput", "latency", "ttft", "slow"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--stream", action="store_true", help="streaming requests")
    parser.add_argument(
        "--stream-every", type=int, default=0, help="throughput: make every Nth request a stream (mixed load)"
    )
    parser.add_argument("--run-id", default="bench")
    parser.add_argument("--header", action="append", default=[], help="extra 'Name: value' header")
    parser.add_argument("--seq-tag", metavar="PREFIX", help="latency/ttft: tag call i with PREFIX<i>")
    parser.add_argument("--auth", default="sk-bench-not-a-key", help="API key sent as Authorization: Bearer")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=0, help="stop after this many calls (0: duration only)")
    parser.add_argument("--progress-every", type=int, default=0)
    parser.add_argument("--hard-limit", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        import os

        os.sched_setaffinity(0, {args.cpu})
    headers = dict(h.split(": ", 1) for h in args.header)
    req = build_request(args.path, args.port, args.stream, args.run_id, headers, args.auth)
    if args.mode == "throughput":
        requests = [req]
        if args.stream_every > 1:
            stream_req = build_request(args.path, args.port, True, args.run_id, headers, args.auth)
            requests = [req] * (args.stream_every - 1) + [stream_req]
        duration = args.duration if not args.calls else args.hard_limit
        result = asyncio.run(
            throughput(
                args.port,
                requests,
                args.concurrency,
                duration,
                args.calls,
                args.progress_every,
                args.hard_limit + 30,
            )
        )
    elif args.mode == "slow":
        result = asyncio.run(slow(args.port, req, args.calls, args.hard_limit))
    else:
        result = sequential(args.port, req, args.calls, args.hard_limit, args.seq_tag)
    sys.stdout.write("RESULT " + orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
