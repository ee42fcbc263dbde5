"""The record line and the sink: complete lines, never lost over odd values, torn tails healed."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy import records
from proxy.app import SINK
from proxy.errors import Category
from proxy.records import ErrorInfo, JsonlSink
from tests.conftest import FakeUpstream, ProxyFactory, ProxyUnderTest, make_record


def test_line_is_one_complete_json_object() -> None:
    line = make_record(error=ErrorInfo(Category.TIMEOUT, "0123456789ab", "slow")).to_json()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line)["error"] == {"category": "timeout", "id": "0123456789ab", "detail": "slow"}


def test_odd_values_never_lose_the_record() -> None:
    # A header that was not UTF-8 (a lone surrogate) and an integer past 64 bits in usage_raw.
    line = make_record(task="caf\udce9", usage_raw={"prompt_tokens": 10**30}).to_json()
    rec = orjson.loads(line)
    assert rec["task"] == "caf\ufffd" and rec["usage_raw"]["prompt_tokens"] == float(10**30)


async def test_sink_appends_and_starts_after_a_torn_tail(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "runs", flush_interval=0.05)
    await sink.start()
    (tmp_path / "runs" / "r.jsonl").write_bytes(b'{"ts": "torn')
    sink.write("r", make_record().to_json())
    sink.write("r", make_record(request_id="req_2").to_json())
    await sink.close()
    lines = (tmp_path / "runs" / "r.jsonl").read_bytes().split(b"\n")
    assert lines[0] == b'{"ts": "torn' and lines[-1] == b""
    assert [orjson.loads(x)["request_id"] for x in lines[1:-1]] == ["req_1", "req_2"]
    assert sink.written == 2 and sink.healthy


# -- run files are never opened through a symlink, nor as anything but a regular file -------------

REFUSED = "is a symlink (or not a regular file): refusing to write through it"


def _plant(tmp_path: Path, name: str = "planted") -> tuple[Path, Path, bytes]:
    """runs/<name>.jsonl -> outside/victim.txt; return (runs dir, victim, the victim's bytes)."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"precious, not a run file\n")
    (runs / f"{name}.jsonl").symlink_to(victim)
    return runs, victim, victim.read_bytes()


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if REFUSED in r.getMessage()]


async def test_sink_never_writes_through_a_planted_link(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs, victim, before = _plant(tmp_path)
    sink = JsonlSink(runs, flush_interval=60)
    await sink.start()
    sink.write("planted", make_record(run_id="planted").to_json())
    sink.write("other", make_record(run_id="other").to_json())
    await sink.flush()
    await sink.flush()  # the retry of the held record is refused again, without a second log line
    assert victim.read_bytes() == before
    assert (runs / "planted.jsonl").is_symlink()
    # Only that run is held: the sink stays healthy and the other run's record is written.
    assert sink.healthy and sink.pending == 1 and sink.written == 1
    assert sink.run_blocked("planted") and not sink.run_blocked("other")
    assert orjson.loads((runs / "other.jsonl").read_bytes())["run_id"] == "other"
    assert _refusals(caplog) == [f"records: {runs / 'planted.jsonl'} {REFUSED}"]
    # The link is removed: the held record is written to a real run file and the run is unblocked.
    (runs / "planted.jsonl").unlink()
    await sink.close()
    assert orjson.loads((runs / "planted.jsonl").read_bytes())["run_id"] == "planted"
    assert not sink.run_blocked("planted") and sink.pending == 0 and sink.written == 2
    assert victim.read_bytes() == before


async def test_sink_does_not_create_a_dangling_links_target(tmp_path: Path) -> None:
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    (runs / "planted.jsonl").symlink_to(outside / "created.txt")
    sink = JsonlSink(runs, flush_interval=60)
    await sink.start()
    sink.write("planted", make_record(run_id="planted").to_json())
    await sink.flush()
    assert not (outside / "created.txt").exists() and list(outside.iterdir()) == []
    assert sink.run_blocked("planted") and sink.pending == 1 and sink.healthy


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to a directory"])
async def test_sink_refuses_a_run_file_that_is_not_a_regular_file(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    target = runs / "odd.jsonl"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    sink = JsonlSink(runs, flush_interval=60)
    await sink.start()
    sink.write("odd", make_record(run_id="odd").to_json())
    await asyncio.wait_for(sink.flush(), 5)  # a FIFO must not hang the writer
    assert sink.run_blocked("odd") and sink.pending == 1 and sink.healthy
    assert _refusals(caplog) == [f"records: {target} {REFUSED}"]
    if kind != "fifo":
        assert list((tmp_path / ("elsewhere" if kind.startswith("link") else "runs/odd.jsonl")).iterdir()) == []


async def test_probe_never_truncates_through_a_planted_link(tmp_path: Path) -> None:
    runs, victim, before = _plant(tmp_path)
    (runs / f".probe-{os.getpid()}").symlink_to(victim)
    sink = JsonlSink(runs)
    assert sink.check_writable() and sink.healthy
    assert victim.read_bytes() == before


async def test_sink_follows_a_replaced_runs_dir(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sink = JsonlSink(runs, flush_interval=60)
    await sink.start()
    sink.write("r", make_record().to_json())
    await sink.flush()
    # Moved aside and recreated: records go to the new runs dir, not to the directory held open.
    runs.rename(tmp_path / "runs.old")
    runs.mkdir()
    sink.write("r", make_record(request_id="req_2").to_json())
    await sink.flush()
    assert orjson.loads((runs / "r.jsonl").read_bytes())["request_id"] == "req_2"
    # Removed: it is created again.
    shutil.rmtree(runs)
    sink.write("r", make_record(request_id="req_3").to_json())
    await sink.close()
    assert orjson.loads((runs / "r.jsonl").read_bytes())["request_id"] == "req_3"
    assert sink.written == 3 and sink.healthy and (tmp_path / "runs.old" / "r.jsonl").read_bytes().count(b"\n") == 1


def test_open_run_file_reads_regular_files_only(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "ok.jsonl").write_bytes(b"{}\n")
    (tmp_path / "secret.jsonl").write_bytes(b"secret\n")
    (runs / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    (runs / "dangling.jsonl").symlink_to(tmp_path / "nothing.jsonl")
    os.mkfifo(runs / "fifo.jsonl")
    (runs / "dir.jsonl").mkdir()
    with records.open_run_file(runs / "ok.jsonl") as f:
        assert f.read() == b"{}\n"
    for name in ("link", "dangling", "fifo", "dir"):  # a FIFO would block a plain open() for reading
        with pytest.raises(records.UnsafeRunFile, match="is a symlink \\(or not a regular file\\)"):
            records.open_run_file(runs / f"{name}.jsonl")
    with pytest.raises(FileNotFoundError):
        records.open_run_file(runs / "missing.jsonl")
    assert not (tmp_path / "nothing.jsonl").exists()


# -- through the proxy -----------------------------------------------------------------------------


async def _chat(proxy: ProxyUnderTest, run_id: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", headers={"X-Run-Id": run_id},
                          json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}) as r:
            await r.read()
            return r.status


async def test_a_call_to_a_planted_run_never_writes_outside(
    tmp_path: Path, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    runs, victim, before = _plant(tmp_path)
    (runs / "dangling.jsonl").symlink_to(tmp_path / "outside" / "created.txt")
    proxy = await make_proxy()
    sink = proxy.server.app[SINK]
    assert await _chat(proxy, "planted") == 200
    assert await _chat(proxy, "dangling") == 200
    assert await _chat(proxy, "fine") == 200
    assert len(await proxy.wait_records("fine", 1)) == 1  # other runs keep working
    await proxy.settle(3)  # the two planted runs' records are held
    assert victim.read_bytes() == before and not (tmp_path / "outside" / "created.txt").exists()
    assert sink.run_blocked("planted") and sink.run_blocked("dangling") and sink.healthy
    assert sorted(_refusals(caplog)) == [f"records: {runs / n}.jsonl {REFUSED}" for n in ("dangling", "planted")]


async def test_calls_to_a_planted_run_are_refused_as_recording_unavailable(
    tmp_path: Path, make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    runs, victim, before = _plant(tmp_path)
    proxy = await make_proxy()
    assert await _chat(proxy, "planted") == 200  # nothing is known of the file before its first write
    await proxy.settle(1)  # its record's first write is refused: from now on the run is known blocked
    sent = len(fake_upstream.requests)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", headers={"X-Run-Id": "planted"},
                          json={"model": "gpt-4o-mini", "messages": []}) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "recording_unavailable"
    assert len(fake_upstream.requests) == sent  # nothing was sent upstream
    assert await _chat(proxy, "fine") == 200
    assert victim.read_bytes() == before


def test_from_line_gives_back_the_record() -> None:
    for rec in (make_record(), make_record(error=ErrorInfo(Category.TIMEOUT, "0123456789ab", "slow"),
                                           usage_invalid=("input_tokens",), tags={"a": "b"})):  # fmt: skip
        assert records.from_line(rec.to_json()) == rec
