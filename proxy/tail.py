"""Follow a run file that other processes append to: the complete lines added since the last look.

The workers of ``serve --workers N`` append whole batches of lines to the same run files (O_APPEND,
under a lock), so the file is the one place where every worker's records meet, in one order. A Tail
reads it from an offset on, returns only complete lines (a batch may be half written when we look),
and never goes through a link: it opens the file the way the sink and the /runs API do.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from proxy.records import UnsafeRunFile, open_run_fd

MAX_READ = 256 * 1024
"""Bytes read per look: a burst of records reaches subscribers in slices their queues can take."""


def size(path: Path) -> int:
    """The file's size now, without following a link (blocking)."""
    return os.lstat(path).st_size


def is_record(line: bytes) -> bool:
    """Whether a line is a record (a JSON object), not the fragment a killed writer left."""
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


class Tail:
    """One run file followed from a byte offset on; read() returns the complete lines appended since.

    Blocking (call it in a worker thread). Each line comes with the offset it starts at, so that a
    subscriber who joined at offset N is given only what was written from N on.
    """

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.offset = start  # where the next line starts
        self._pos = start  # how far the file has been read
        self._buf = b""
        self._fd: int | None = None
        self._ino = 0
        # Started mid-line (a batch being written when the subscriber came): that line began before, skip it.
        self._skip = False
        self.more = False
        """The last read stopped at MAX_READ: there is more to read at once."""

    def _open(self, start: int) -> bool:
        try:
            fd = open_run_fd(self.path, os.O_RDONLY, self.path, "read")
        except (FileNotFoundError, UnsafeRunFile):
            return False  # gone, or a link now: nothing is read until a regular file is back
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        self._pos = self.offset = start
        self._buf = b""
        self._skip = start > 0 and os.pread(fd, 1, start - 1) != b"\n"
        return True

    def _check_file(self) -> bool:
        """Reopen from the start when the name now holds another file (removed and written anew)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return self._fd is not None  # removed: what the held file still has is read to its end
        if self._fd is not None and st.st_ino == self._ino:
            return True
        first = self._fd is None and self._ino == 0
        self.close()
        return self._open(self.offset if first else 0)

    def read(self) -> list[tuple[int, bytes]]:
        """Return (offset, line) for each complete line appended since the last read, newline included."""
        self.more = False
        if not self._check_file():
            return []
        assert self._fd is not None
        end = os.fstat(self._fd).st_size
        if end < self._pos:  # truncated: what it holds now is new
            self._pos = self.offset = 0
            self._buf = b""
            self._skip = False
        if end == self._pos:
            return []
        data = os.pread(self._fd, min(end - self._pos, MAX_READ), self._pos)
        self._pos += len(data)
        self.more = self._pos < end
        data = self._buf + data
        cut = data.rfind(b"\n") + 1
        self._buf = data[cut:]
        lines: list[tuple[int, bytes]] = []
        at = 0
        while at < cut:
            nl = data.index(b"\n", at) + 1
            if self._skip:
                self._skip = False
            else:
                lines.append((self.offset + at, data[at:nl]))
            at = nl
        self.offset += cut
        return lines

    def close(self) -> None:
        """Let go of the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
