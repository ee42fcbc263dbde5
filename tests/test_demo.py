"""`metering-proxy demo` end to end, as a user runs it: a real process, its records, its report, its dashboard."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.cli import main
from proxy.demo import MODELS, TASKS
from tests.helpers import parse_lines

CALLS_PER_RUN = sum(t.calls for t in TASKS)
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _demo(tmp_path: Path, runs: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "demo", "--port", "0", "--no-wait", "--runs-dir", runs,
                           *extra], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip


def _shape(path: Path) -> list[tuple[object, ...]]:
    """What a seed decides: each call's task, status and tokens (order-free: calls run concurrently)."""
    return sorted((r["task"], r["status"], r["stream"], r["input_tokens"], r["cached_input_tokens"], r["output_tokens"])
                  for r in parse_lines(path))  # fmt: skip


def test_demo_no_wait_records_two_runs_and_prints_their_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    done = _demo(tmp_path, "runs")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 60
    files = sorted((tmp_path / "runs").glob("*.jsonl"))
    assert len(files) == 2
    run_ids = [p.stem for p in files]
    assert all(re.fullmatch(r"demo-\d{8}-\d{6}-.+", r) for r in run_ids)
    for path in files:
        records = parse_lines(path)
        assert len(records) == CALLS_PER_RUN  # one record per call
        assert {r["run_id"] for r in records} == {path.stem}
        assert len({r["model"] for r in records if r["model"]}) == 1
        ok = [r for r in records if r["success"]]
        assert all(r["cost_usd"] and r["cost_usd"] > 0 for r in ok)  # both models are in the bundled table
        assert sorted(r["error"]["category"] for r in records if r["error"]) == ["rate_limit", "server_error"]
        assert any(r["stream"] and r["ttft_ms"] for r in ok) and any(not r["stream"] for r in ok)
        assert any(r["cached_input_tokens"] for r in ok)  # the long shared system prompt hits the cache
        assert {r["task"] for r in records} == {t.name for t in TASKS}
    assert {parse_lines(p)[0]["model"] for p in files} == set(MODELS)
    out = done.stdout
    # The report printed is the report command's text for the same runs.
    order = [next(r for r in run_ids if r.endswith(m)) for m in MODELS]
    monkeypatch.chdir(tmp_path)  # the demo names its run files relative to where it ran, as report does
    assert main(["report", *order, "--runs-dir", "runs", "--by", "task"]) == 0
    assert out.startswith(capsys.readouterr().out)
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/ui\?run=demo-", out, re.M)
    assert f"--price-as {MODELS[0]}" in out
    # Deterministic given the seed: a second demo draws the same calls.
    again = _demo(tmp_path, "again")
    assert again.returncode == 0, again.stderr
    for model in MODELS:
        first = next(p for p in files if p.stem.endswith(model))
        second = next(p for p in (tmp_path / "again").glob("*.jsonl") if p.stem.endswith(model))
        assert _shape(first) == _shape(second)


async def _wait_for_line(path: Path, prefix: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        assert proc.poll() is None, f"demo exited early: {proc.returncode}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line in {path.read_text()!r}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_demo_serves_the_dashboard_until_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--port", "0", "--runs-dir", "r"],
                                cwd=tmp_path, env=ENV, stdout=o, stderr=e)  # fmt: skip
    try:
        line = await _wait_for_line(out, "dashboard: ", proc)
        url = line.split()[1]
        base = url.split("/ui")[0]
        run_ids = [part.removeprefix("run=") for part in url.split("?")[1].split("&")]
        assert len(run_ids) == 2 and all(r.startswith("demo-") for r in run_ids)  # the compare view of both
        run_id = run_ids[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            async with session.get(f"{base}/runs/{run_id}") as resp:
                doc = orjson.loads(await resp.read())
            assert doc["runs"][0]["records"] == CALLS_PER_RUN
            async with session.get(f"{base}/runs/{run_id}", params={"price_as": MODELS[1]}) as resp:
                priced = orjson.loads(await resp.read())
            assert priced["runs"][0]["price_as"]["total"] > doc["runs"][0]["cost_usd"]["total"]  # mini -> 4.1
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "proxy", "demo", "--port", str(port), "--no-wait"],
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port 0" in done.stderr
    assert not (tmp_path / "runs").exists()
