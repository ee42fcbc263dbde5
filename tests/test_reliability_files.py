"""Record files under stress: torn tails, a runs dir that goes away, a disk that fills up."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import FakeUpstream, ProxyUnderTest, health, make_client, wait_health
from tests.helpers import CHAT, MSG, parse_lines, post, serve, wait_lines

# -- torn tails ------------------------------------------------------------------------------------


async def test_restart_after_a_torn_tail_starts_on_a_fresh_line(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A file left ending mid-line (writer killed mid-write): the next writer starts on a fresh line, so the
    torn fragment stays one bad line and every other line parses."""
    runs = tmp_path / "runs"
    body = {"model": "gpt-4o-mini", "messages": MSG}
    served = await serve(fake_upstream, runs)
    try:
        for _ in range(3):
            assert (await post(served.base + CHAT, body, {"X-Run-Id": "torn"}))[0] == 200
        await wait_lines(runs / "torn.jsonl", 3)
        served.proc.kill()
        await served.proc.wait()
    finally:
        await served.kill()
    path = runs / "torn.jsonl"
    first = path.read_bytes().split(b"\n")[0]
    torn = first[: len(first) // 2]
    with path.open("ab") as f:
        f.write(torn)  # what a SIGKILL in the middle of a write leaves
    served = await serve(fake_upstream, runs)
    try:
        status, headers, _ = await post(served.base + CHAT, body, {"X-Run-Id": "torn"})
        assert status == 200
        assert await served.stop() == 0
    finally:
        await served.kill()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[3] == torn and len(lines) == 6
    recs = [orjson.loads(line) for i, line in enumerate(lines[:-1]) if i != 3]
    assert len(recs) == 4 and recs[-1]["request_id"] == headers["X-Meter-Request-Id"] and recs[-1]["success"]


async def test_torn_tail_left_by_another_writer_mid_run(proxy: ProxyUnderTest) -> None:
    """Another worker killed mid-write tears the end of a file this process already writes: the next
    batch still starts on a fresh line."""
    c = make_client(proxy, run_id="shared")
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.wait_records("shared", 1)
    path = proxy.runs_dir / "shared.jsonl"
    with path.open("ab") as f:
        f.write(b'{"ts":"2026-01-01T00:00:00.000Z","run_id":"shar')
    await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    await proxy.settle(2)
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[1].endswith(b'"run_id":"shar') and lines[3] == b""
    assert [orjson.loads(lines[i])["success"] for i in (0, 2)] == [True, True]


# -- the runs dir cannot be written ----------------------------------------------------------------


async def test_runs_dir_replaced_by_a_file_mid_run(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """The runs dir goes away (a file in its place): a loud error, /healthz 503, calls refused with 503,
    and once it can be written again the held records land, each once."""
    runs = tmp_path / "runs"
    body = {"model": "gpt-4o-mini", "messages": MSG}
    served = await serve(fake_upstream, runs)
    try:
        assert (await post(served.base + CHAT, body, {"X-Run-Id": "gone"}))[0] == 200
        await wait_lines(runs / "gone.jsonl", 1)
        shutil.rmtree(runs)
        runs.write_bytes(b"not a directory\n")  # mkdir and open fail even for root
        status, h2, _ = await post(served.base + CHAT, body, {"X-Run-Id": "gone"})
        assert status == 200  # nothing could know yet; its record is held
        unhealthy = await wait_health(served.base, 503)
        assert unhealthy["status"] == "unhealthy" and str(runs) in unhealthy["error"]
        status, h3, raw = await post(served.base + CHAT, body, {"X-Run-Id": "gone"})
        assert status == 503 and orjson.loads(raw)["error"]["code"] == "recording_unavailable"
        assert len(fake_upstream.requests) == 2  # refused before forwarding
        assert "CANNOT WRITE RECORDS" in served.err_text() and str(runs) in served.err_text()
        runs.unlink()
        await wait_health(served.base, 200)
        recs = await wait_lines(runs / "gone.jsonl", 2)
        assert [r["request_id"] for r in recs] == [h2["X-Meter-Request-Id"], h3["X-Meter-Request-Id"]]
        assert recs[0]["success"] is True and recs[1]["error"]["category"] == "recording_unavailable"
        assert "recording resumed" in served.err_text()
        assert (await post(served.base + CHAT, body, {"X-Run-Id": "gone"}))[0] == 200
        assert await served.stop() == 0
    finally:
        await served.kill()
    assert len(parse_lines(runs / "gone.jsonl")) == 3


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test, or a skip saying why it cannot be."""
    where = tmp_path / "runs"
    where.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root in a sandbox): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


async def test_disk_full_then_space_again(fake_upstream: FakeUpstream, tiny_fs: Path) -> None:
    """The disk fills: a loud error, /healthz 503, calls refused; space comes back: every held record is
    written exactly once, no line torn or doubled."""
    runs = tiny_fs
    filler = runs / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill it up, then leave three pages free
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size // 4096 - 3) * 4096)
    served = await serve(fake_upstream, runs)
    body = {"model": "gpt-4o-mini", "messages": MSG}
    ids: list[str] = []
    statuses: list[int] = []
    try:
        for i in range(100):
            status, headers, raw = await post(
                served.base + CHAT, body, {"X-Run-Id": "full", "X-Meter-Tag-I": str(i)}
            )
            ids.append(headers["X-Meter-Request-Id"])
            statuses.append(status)
            if status == 503:
                assert orjson.loads(raw)["error"]["code"] == "recording_unavailable"
                break
            await asyncio.sleep(0.07)  # a real interval: over one flush (50 ms), so each record is its own batch
        assert statuses[-1] == 503 and statuses.count(200) >= 3, statuses
        assert (await health(served.base))[0] == 503
        assert "CANNOT WRITE RECORDS" in served.err_text() and "No space left on device" in served.err_text()
        filler.unlink()
        await wait_health(served.base, 200)
        recs = await wait_lines(runs / "full.jsonl", len(ids))
        assert [r["request_id"] for r in recs] == ids  # each once, in order
        assert [r["status"] for r in recs] == statuses
        assert await served.stop() == 0
    finally:
        await served.kill()
    assert len(parse_lines(runs / "full.jsonl")) == len(ids)
