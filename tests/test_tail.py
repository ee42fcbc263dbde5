"""Tail: a run file followed from an offset, complete lines only, never through a link."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from proxy import tail
from proxy.tail import Tail


def line(n: int) -> bytes:
    return orjson.dumps({"request_id": f"req_{n}"}) + b"\n"


def test_complete_lines_only_with_their_offsets(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(line(0))
    t = Tail(path, tail.size(path))
    assert t.read() == []
    with path.open("ab") as f:
        f.write(line(1) + line(2)[:5])  # a batch caught half written
        f.flush()
        assert t.read() == [(len(line(0)), line(1))]
        f.write(line(2)[5:])
        f.flush()
    assert t.read() == [(len(line(0) + line(1)), line(2))]
    assert t.read() == []
    t.close()


def test_a_start_mid_line_skips_that_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(line(0) + line(1)[:4])
    t = Tail(path, tail.size(path))
    with path.open("ab") as f:
        f.write(line(1)[4:] + line(2))
    assert [got for _, got in t.read()] == [line(2)]  # line 1 began before the tail did
    t.close()


def test_a_torn_fragment_is_no_record() -> None:
    assert tail.is_record(line(1))
    assert not tail.is_record(b'{"request_id": "req_\n')  # what a writer killed mid-line leaves
    assert not tail.is_record(b"[1, 2]\n")


def test_a_replaced_file_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(line(0) + line(1))
    t = Tail(path, tail.size(path))
    assert t.read() == []
    path.unlink()
    path.write_bytes(line(7))
    assert t.read() == [(0, line(7))]
    t.close()


def test_a_link_is_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(orjson.dumps({"request_id": "req_SECRET"}) + b"\n")
    path = tmp_path / "r.jsonl"
    path.write_bytes(line(0))
    t = Tail(path, 0)
    assert t.read() == [(0, line(0))]
    path.unlink()
    path.symlink_to(secret)
    assert t.read() == []  # the old file's inode is gone from the name: no reading through the link
    assert t.read() == []
    t.close()


def test_a_large_backlog_comes_in_slices(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"")
    t = Tail(path, 0)
    lines = [line(n) for n in range(tail.MAX_READ // len(line(0)) * 3)]
    path.write_bytes(b"".join(lines))
    got: list[bytes] = []
    slices = 0
    while True:
        part = t.read()
        got += [text for _, text in part]
        slices += 1
        if not t.more:
            break
    assert got == lines and slices >= 3
    assert os.path.getsize(path) == t.offset
    t.close()
