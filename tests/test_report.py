"""report: figures against hand-computed totals on small fixture runs, comparisons, torn lines, CLI output."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import report
from proxy.cli import main


def rec(ts: str, **kw: Any) -> dict[str, Any]:
    """A record as the proxy writes it: every field, defaults for a successful non-streamed call."""
    base: dict[str, Any] = {
        "ts": f"2026-01-01T00:00:{ts}Z", "run_id": "a", "request_id": f"req_{ts}", "task": None, "tags": {},
        "endpoint": "/v1/chat/completions", "method": "POST", "upstream": "up", "provider": "openai",
        "requested_model": None, "model": None, "stream": False, "status": 200, "success": True,
        "finish_reason": "stop", "input_tokens": 0, "cached_input_tokens": 0, "cache_write_tokens": 0,
        "cache_write_5m_tokens": None, "cache_write_1h_tokens": None, "output_tokens": 0,
        "reasoning_tokens": 0, "total_tokens": 0, "usage_source": "upstream", "usage_raw": None,
        "stream_usage_injected": False, "ttfb_ms": 5.0, "ttft_ms": None, "duration_ms": 0.0,
        "tokens_per_second": None, "server_timing": None, "upstream_request_id": None, "error": None,
        "cost_usd": None, "cost_source": None, "price_model": None, "cost_breakdown": None,
        "upstream_cost_usd": None, "service_tier": None,
    }  # fmt: skip
    base.update(kw)
    base["total_tokens"] = base["input_tokens"] + base["output_tokens"]
    return base


# Run "a": five calls. Hand-computed figures are in test_summary_matches_hand_computed_totals.
RUN_A = [
    rec("00.000", model="m1", task="t1", tags={"variant": "A"}, input_tokens=100, cached_input_tokens=20,
        output_tokens=50, reasoning_tokens=10, cost_usd=0.001, duration_ms=1000.0, ttft_ms=200.0,
        tokens_per_second=60.0, stream=True),
    rec("00.500", model="m2", task="t1", tags={"variant": "B"}, input_tokens=200, cache_write_tokens=5,
        output_tokens=100, cost_usd=0.004, duration_ms=2000.0, tokens_per_second=50.0),
    rec("01.000", requested_model="m1", task="t2", status=429, success=False, usage_source="none",
        error={"category": "rate_limit", "id": "0123456789ab", "detail": "fake error 429"},
        duration_ms=100.0),
    rec("02.000", model="m3", task="t2", input_tokens=300, output_tokens=30, duration_ms=3000.0,
        ttft_ms=400.0, tokens_per_second=10.0, stream=True),
    rec("03.000", model="m1", input_tokens=40, output_tokens=8, usage_source="estimated", cost_usd=0.0002,
        duration_ms=500.0, ttft_ms=100.0, tokens_per_second=20.0, stream=True),
]  # fmt: skip

# Run "b": the same tasks on model m2 only.
RUN_B = [
    rec("00.000", model="m2", task="t1", input_tokens=100, output_tokens=40, cost_usd=0.002,
        duration_ms=1500.0, ttft_ms=300.0, tokens_per_second=40.0, stream=True),
    rec("01.000", model="m2", task="t2", input_tokens=200, output_tokens=60, cost_usd=0.003,
        duration_ms=2500.0, ttft_ms=500.0, tokens_per_second=30.0, stream=True),
    rec("02.000", model="m2", task="t1", input_tokens=50, output_tokens=10, cost_usd=0.001, duration_ms=500.0,
        tokens_per_second=20.0),
]  # fmt: skip

TORN = b'{"ts": "2026-01-01T00:00:09.000Z", "run_id": "a", "request_id": "req_torn", "input_tok'


def write_run(runs: Path, run_id: str, records: list[dict[str, Any]], tail: bytes = b"") -> Path:
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{run_id}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + tail)
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    write_run(d, "a", RUN_A, TORN)
    write_run(d, "b", RUN_B)
    return d


def _summary(runs: Path, run_id: str, *by: str) -> dict[str, Any]:
    return report.summarize(runs / f"{run_id}.jsonl", run_id, by or ("model",)).to_json()


def test_summary_matches_hand_computed_totals(runs: Path) -> None:
    s = _summary(runs, "a", "model", "task", "tag:variant")
    assert s["records"] == 5 and s["skipped_lines"] == 1
    assert s["notes"] == ["line 6: torn last line (no newline at the end: writer stopped mid-write); skipped"]
    assert s["calls"] == {"total": 5, "ok": 4, "failed": 1}
    # input 100+200+0+300+40, output 50+100+0+30+8
    assert s["tokens"] == {"input": 640, "cached_input": 20, "cache_write": 5, "output": 188, "reasoning": 10,
                           "total": 828}  # fmt: skip
    # cost: 0.001 + 0.004 + 0.0002; m3 has tokens but no price; the 429 has neither
    assert s["cost_usd"] == {"total": pytest.approx(0.0052), "priced_calls": 3, "unknown_calls": 1,
                             "estimated": pytest.approx(0.0002), "estimated_calls": 1}  # fmt: skip
    # first start 00:00, last end = 02.000 + 3 s = 00:05; calls 1+2+0.1+3+0.5 s
    assert s["time"] == {"first_start": "2026-01-01T00:00:00.000Z", "last_end": "2026-01-01T00:00:05.000Z",
                         "wall_s": 5.0, "call_time_s": 6.6, "tokens_per_second_mean": 35.0,
                         "output_tokens_per_wall_s": 37.6}  # fmt: skip
    # durations 100, 500, 1000, 2000, 3000: nearest rank p50 = 3rd, p95 = 5th
    assert s["duration_ms"] == {"count": 5, "mean": 1320.0, "max": 3000.0, "p50": 1000.0, "p95": 3000.0}
    # ttft 100, 200, 400: p50 = 2nd, p95 = 3rd
    assert s["ttft_ms"] == {"count": 3, "mean": 233.333, "max": 400.0, "p50": 200.0, "p95": 400.0}
    assert s["errors"] == {"rate_limit": 1}

    by_model = {g["key"]: g for g in s["breakdown"]["model"]}
    assert [g["key"] for g in s["breakdown"]["model"]] == ["m2", "m1", "m3"]  # heaviest cost first
    assert by_model["m1"]["calls"] == {"total": 3, "ok": 2, "failed": 1}  # the 429 counts by requested model
    assert by_model["m1"]["tokens"]["input"] == 140 and by_model["m1"]["tokens"]["output"] == 58
    assert by_model["m1"]["cost_usd"]["total"] == pytest.approx(0.0012)
    assert by_model["m1"]["duration_ms"]["p50"] == 500.0 and by_model["m1"]["errors"] == {"rate_limit": 1}
    assert by_model["m3"]["cost_usd"]["unknown_calls"] == 1 and by_model["m3"]["cost_usd"]["total"] == 0
    assert [(g["key"], g["calls"]["total"]) for g in s["breakdown"]["task"]] == [
        ("t1", 2),
        (None, 1),
        ("t2", 2),
    ]
    assert {g["key"]: g["calls"]["total"] for g in s["breakdown"]["tag:variant"]} == {"A": 1, "B": 1, None: 3}

    assert [c["request_id"] for c in s["slowest"]] == ["req_02.000", "req_00.500", "req_00.000", "req_03.000",
                                                       "req_01.000"]  # fmt: skip
    assert [c["request_id"] for c in s["most_expensive"]] == ["req_00.500", "req_00.000", "req_03.000"]
    assert s["slowest"][0] == {"request_id": "req_02.000", "ts": "2026-01-01T00:00:02.000Z", "model": "m3",
                               "task": "t2", "upstream": "up", "status": 200, "success": True,
                               "duration_ms": 3000.0, "ttft_ms": 400.0, "input_tokens": 300,
                               "output_tokens": 30, "cost_usd": None, "error": None}  # fmt: skip


def test_top_lists_hold_five_and_keep_the_earlier_call_on_ties(tmp_path: Path) -> None:
    recs = [rec(f"{i:02d}.000", duration_ms=100.0 * (i % 4), cost_usd=0.01) for i in range(12)]
    s = _summary(write_run(tmp_path, "t", recs).parent, "t")
    # durations 0,100,200,300 repeating: the 300s are calls 3, 7, 11, then the 200s 2, 6
    assert [c["request_id"] for c in s["slowest"]] == ["req_03.000", "req_07.000", "req_11.000", "req_02.000",
                                                       "req_06.000"]  # fmt: skip
    assert [c["request_id"] for c in s["most_expensive"]] == [f"req_{i:02d}.000" for i in range(5)]


@pytest.mark.parametrize(
    ("values", "p50", "p95"),
    [
        pytest.param([], None, None, id="empty"),
        pytest.param([7.0], 7.0, 7.0, id="one"),
        pytest.param([float(v) for v in range(1, 11)], 5.0, 10.0, id="1-10"),
        pytest.param([float(v) for v in range(1, 21)], 10.0, 19.0, id="1-20"),
        pytest.param([float(v) for v in range(1, 101)], 50.0, 95.0, id="1-100"),
    ],
)
def test_nearest_rank_percentiles(values: list[float], p50: float | None, p95: float | None) -> None:
    assert report.nearest_rank(values, 50) == p50 and report.nearest_rank(values, 95) == p95


def test_bad_lines_are_skipped_with_notes_never_fatal(tmp_path: Path) -> None:
    good = [orjson.dumps(r) + b"\n" for r in RUN_B]
    bad_types = b'{"ts": "2026-01-01T00:00:00Z", "input_tokens": "many"}\n'
    body = (good[0] + b"\n" + b"{not json\n" + b"[1, 2]\n" + b'{"ts": 5}\n' + b'{"ts": "x"}\n' + good[1]
            + bad_types + good[2] + b"\xff\xfe\n" + TORN)  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)
    s = report.summarize(path, "bad").to_json()
    assert s["records"] == 3 and s["skipped_lines"] == 8
    assert s["calls"]["total"] == 3 and s["tokens"]["input"] == 350
    assert s["notes"][0] == "line 2: blank line; skipped"
    assert s["notes"][1].startswith("line 3: not a record")
    assert s["notes"][-1].startswith("line 11: torn last line")


def test_unterminated_last_line_that_parses_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(orjson.dumps(RUN_B[0]) + b"\n" + orjson.dumps(RUN_B[1]))
    s = report.summarize(path, "x").to_json()
    assert s["records"] == 2 and s["skipped_lines"] == 0


def test_notes_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"junk\n" * 1000)
    s = report.summarize(path, "junk").to_json()
    assert s["skipped_lines"] == 1000 and s["records"] == 0 and s["calls"]["total"] == 0
    assert len(s["notes"]) == report.MAX_NOTES + 1 and s["notes"][-1] == "further skipped lines not listed"
    assert s["time"]["wall_s"] is None and s["duration_ms"]["p50"] is None


def test_comparison_deltas_against_the_first_run(runs: Path) -> None:
    doc = report.report_json([report.summarize(runs / f"{r}.jsonl", r) for r in ("a", "b")])
    assert doc["schema"] == "metering-proxy.report/1" and [r["run_id"] for r in doc["runs"]] == ["a", "b"]
    comp = doc["comparison"]
    assert comp["baseline"] == "a" and [r["run_id"] for r in comp["runs"]] == ["b"]
    m = comp["runs"][0]["metrics"]
    assert set(m) == {f"{sec}.{key}" for sec, key in report.COMPARED}
    assert m["calls.total"] == {"baseline": 5, "value": 3, "delta": -2, "pct": -40.0}
    assert m["tokens.input"] == {"baseline": 640, "value": 350, "delta": -290, "pct": -45.31}
    assert m["cost_usd.total"]["delta"] == pytest.approx(0.0008) and m["cost_usd.total"]["pct"] == 15.38
    assert m["duration_ms.p50"] == {"baseline": 1000.0, "value": 1500.0, "delta": 500.0, "pct": 50.0}
    assert m["time.wall_s"] == {"baseline": 5.0, "value": 3.5, "delta": -1.5, "pct": -30.0}  # b ends 01+2.5 s
    assert m["cost_usd.unknown_calls"] == {"baseline": 1, "value": 0, "delta": -1, "pct": -100.0}
    assert m["tokens.cached_input"]["pct"] == -100.0 and m["tokens.cache_write"]["pct"] == -100.0
    assert report.report_json([report.summarize(runs / "b.jsonl", "b")])["comparison"] is None


def test_summary_update_reads_only_what_was_appended(tmp_path: Path) -> None:
    path = write_run(tmp_path, "live", RUN_B[:2])
    totals = report.RunSummary(path, "live", by=(), samples=False)
    totals.update(final=False)
    assert totals.totals_json()["calls"]["total"] == 2
    line = orjson.dumps(RUN_B[2]) + b"\n"
    with open(path, "ab") as f:
        f.write(line[:30])  # a line being written: noted, not judged, read again next time
    totals.update(final=False)
    j = totals.totals_json()
    assert j["calls"]["total"] == 2 and j["skipped_lines"] == 1 and j["size_bytes"] < path.stat().st_size
    with open(path, "ab") as f:
        f.write(line[30:])
    totals.update(final=False)
    j = totals.totals_json()
    assert j["calls"]["total"] == 3 and j["tokens"]["input"] == 350 and j["skipped_lines"] == 0
    assert j["size_bytes"] == path.stat().st_size and j["records"] == 3
    assert "p50" not in j["duration_ms"] and j["duration_ms"]["max"] == 2500.0
    write_run(tmp_path, "live", RUN_B[:1])  # rewritten shorter: start over
    totals.update(final=False)
    assert totals.totals_json()["calls"]["total"] == 1


def test_incremental_summary_equals_a_full_read(runs: Path) -> None:
    path = runs / "a.jsonl"
    data = path.read_bytes()
    path.write_bytes(b"")
    live = report.RunSummary(path, "a", ["model", "task"])
    for cut in (0, 700, 1500, len(data) // 2, len(data) - 40, len(data)):  # arbitrary byte boundaries
        with open(path, "ab") as f:
            f.write(data[path.stat().st_size : cut])
        live.update(final=False)
    expected = report.summarize(path, "a", ["model", "task"]).to_json()
    got = live.to_json()
    # the torn tail is "incomplete" while live, "torn" once read as a finished file
    assert got.pop("notes")[0].startswith("line 6: last line incomplete")
    assert expected.pop("notes")[0].startswith("line 6: torn last line")
    assert got == expected


def test_records_since_counts_records_not_lines(tmp_path: Path) -> None:
    lines = [orjson.dumps(r) + b"\n" for r in RUN_B]
    path = tmp_path / "s.jsonl"
    path.write_bytes(lines[0] + b"garbage\n" + lines[1] + lines[2] + b'{"ts": "2026-01-01T00:00:09')
    assert list(report.records_since(path, 0)) == lines
    assert list(report.records_since(path, 1)) == lines[1:]
    assert list(report.records_since(path, 3)) == []


# -- the command line ------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_text(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "a", "--runs-dir", str(runs))
    assert code == 0 and err == ""
    assert "calls         5 (4 ok, 1 failed)" in out
    assert "input 640 (cached 20, cache write 5)  output 188 (reasoning 10)  total 828" in out
    assert "$0.005200 over 3 priced calls; 1 call with tokens but no price" in out
    assert "$0.000200 of it from estimated usage (1 call)" in out
    assert "duration ms   p50 1,000.0  p95 3,000.0  max 3,000.0  (5 calls)" in out
    assert "errors        rate_limit 1" in out and "line 6: torn last line" in out
    assert "by model" in out and "5 slowest calls" in out and "5 most expensive calls" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("m1 "))
    assert row.split()[:4] == ["m1", "3", "2", "1"]


def test_cli_compares_runs_side_by_side(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "a", "b", "--runs-dir", str(runs), "--by", "task")
    assert code == 0
    assert "compared with the baseline a" in out and "by task, side by side" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("calls.total"))
    assert row.split() == ["calls.total", "5", "3", "-2", "-40.0%"]
    row = next(line for line in out.splitlines() if line.strip().startswith("duration_ms.p50"))
    assert row.split() == ["duration_ms.p50", "1,000.0", "1,500.0", "+500.0", "+50.0%"]


def test_cli_json_is_the_report_document(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "a", "b", "--runs-dir", str(runs), "--json", "--by", "tag:variant")
    assert code == 0
    doc = orjson.loads(out)
    assert set(doc) == {"schema", "runs", "comparison"}
    expected = report.report_json([report.summarize(runs / f"{r}.jsonl", r, ["tag:variant"]) for r in "ab"])
    assert doc == expected
    assert set(doc["runs"][0]) == {"run_id", "file", "records", "skipped_lines", "notes", "calls", "tokens",
                                   "cost_usd", "time", "duration_ms", "ttft_ms", "errors", "breakdown",
                                   "slowest", "most_expensive"}  # fmt: skip


def test_cli_csv(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "a", "--runs-dir", str(runs), "--csv", "--by", "task")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["by"], r["group"]) for r in rows] == [("", "*"), ("task", "t1"), ("task", ""), ("task", "t2")]
    total = rows[0]
    assert total["calls"] == "5" and total["failed"] == "1" and total["input_tokens"] == "640"
    assert float(total["cost_usd"]) == pytest.approx(0.0052) and total["unknown_cost_calls"] == "1"
    assert total["duration_p95_ms"] == "3000.0" and total["ttft_p50_ms"] == "200.0"
    assert total["errors"] == "rate_limit=1" and rows[3]["errors"] == "rate_limit=1"
    assert rows[1]["tokens_per_second_mean"] == "55.0"  # t1: (60 + 50) / 2


def test_cli_exit_codes(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "nope", "--runs-dir", str(runs))
    assert code == 1 and out == "" and "no run 'nope'" in err and "runs there: a, b" in err
    code, _, err = _cli(capsys, "../a", "--runs-dir", str(runs))
    assert code == 1 and "invalid run id" in err
    code, _, err = _cli(capsys, "a", "--runs-dir", str(runs), "--by", "colour")
    assert code == 2 and "--by must be" in err
    code, _, err = _cli(capsys, "a", "b", "--runs-dir", str(runs), "--html", str(tmp_path / "x.html"))
    assert code == 2 and "exactly one run" in err and not (tmp_path / "x.html").exists()
    with pytest.raises(SystemExit) as info:
        main(["report", "a", "--json", "--csv"])
    assert info.value.code == 2
    # the real entry point, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "proxy", "report", "a", "missing", "--runs-dir", str(runs)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 1 and "no run 'missing'" in proc.stderr


def test_cli_html_embeds_the_run(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "a.html"
    code, out, err = _cli(capsys, "a", "--runs-dir", str(runs), "--html", str(out_file), "--by", "upstream")
    assert code == 0 and f"wrote {out_file}" in err and "by upstream" in out
    html = out_file.read_text()
    start = html.index('<script id="embedded" type="application/json">') + len(
        '<script id="embedded" type="application/json">'
    )
    data = orjson.loads(html[start : html.index("</script>", start)])
    run = data["summary"]["runs"][0]
    assert run["records"] == 5 and set(run["breakdown"]) == {"upstream", "model", "task"}
    assert [c["request_id"] for c in data["calls"]] == [r["request_id"] for r in RUN_A]
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # offline


def test_html_embedding_cannot_break_out_of_the_script_tag(tmp_path: Path) -> None:
    from proxy import ui

    path = write_run(tmp_path, "x", [rec("00.000", model="</script><script>alert(1)</script>", task="<!--")])
    html = ui.standalone_html(report.summarize(path, "x", ["model", "task"], view_calls=10))
    assert "alert(1)</script>" not in html and "<!--" not in html
    start = html.index('type="application/json">') + len('type="application/json">')
    data = orjson.loads(html[start : html.index("</script>", start)])
    assert data["calls"][0]["model"] == "</script><script>alert(1)</script>"


# -- links in the runs dir are never followed --------------------------------------------------------

LINK_REFUSED = "is a symlink (or not a regular file): refusing to read through it"


@pytest.fixture
def linked(runs: Path, tmp_path: Path) -> Path:
    """runs/planted.jsonl -> a JSONL file outside the runs dir (a run that would otherwise report fine)."""
    outside = tmp_path / "outside"
    victim = write_run(outside, "victim", [rec("00.000", request_id="req_SECRET", model="m-secret", input_tokens=7)])
    (runs / "planted.jsonl").symlink_to(victim)
    return victim


@pytest.mark.parametrize("fmt", [[], ["--json"], ["--csv"]])
def test_cli_refuses_a_linked_run(runs: Path, linked: Path, capsys: pytest.CaptureFixture[str],
                                  fmt: list[str]) -> None:  # fmt: skip
    code, out, err = _cli(capsys, "planted", "--runs-dir", str(runs), *fmt)
    assert code == 1 and out == ""
    assert f"metering-proxy report: {runs / 'planted.jsonl'} {LINK_REFUSED}" in err
    assert "SECRET" not in err and "m-secret" not in err


def test_cli_refuses_a_linked_run_among_others_and_lists_no_links(
    runs: Path, linked: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(capsys, "a", "planted", "--runs-dir", str(runs))
    assert code == 1 and out == "" and LINK_REFUSED in err
    code, _, err = _cli(capsys, "nope", "--runs-dir", str(runs))
    assert code == 1 and "runs there: a, b)" in err  # the link is no run
    html = tmp_path / "planted.html"
    code, _, err = _cli(capsys, "planted", "--runs-dir", str(runs), "--html", str(html))
    assert code == 1 and LINK_REFUSED in err and not html.exists()
    proc = subprocess.run([sys.executable, "-m", "proxy", "report", "planted", "--runs-dir", str(runs)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "" and LINK_REFUSED in proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_cli_refuses_a_run_that_is_not_a_regular_file(runs: Path, kind: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    if kind == "fifo":
        os.mkfifo(runs / "odd.jsonl")  # a plain open() for reading would wait for a writer forever
    else:
        (runs / "odd.jsonl").mkdir()
    code, out, err = _cli(capsys, "odd", "--runs-dir", str(runs))
    assert code == 1 and out == "" and LINK_REFUSED in err


def test_readers_refuse_a_linked_file(runs: Path, linked: Path) -> None:
    path = runs / "planted.jsonl"
    assert report.list_runs(runs) == ["a", "b"]
    with pytest.raises(OSError, match=r"is a symlink \(or not a regular file\)"):
        report.run_path(runs, "planted")
    with pytest.raises(OSError, match=r"is a symlink \(or not a regular file\)"):
        report.summarize(path, "planted")
    with pytest.raises(OSError, match=r"is a symlink \(or not a regular file\)"):
        list(report.records_since(path, 0))
    # A summary that read the file while it was regular stops at the swap.
    summary = report.RunSummary(runs / "a.jsonl", "a")
    summary.update(final=False)
    (runs / "a.jsonl").rename(runs / "a.moved")
    (runs / "a.jsonl").symlink_to(linked)
    with pytest.raises(OSError, match=r"is a symlink \(or not a regular file\)"):
        summary.update(final=False)


def test_figures_do_not_depend_on_the_order_calls_are_read_in(tmp_path: Path) -> None:
    """Hosts' records reach the database in any order: float sums must not change with it (they did by 1 ulp)."""
    import random

    rnd = random.Random(3)
    recs = [rec(f"{i // 1000:02d}.{i % 1000:03d}", request_id=f"q{i}", model="m1", input_tokens=7, output_tokens=3,
                cost_usd=round(rnd.uniform(0, 0.01), 10), duration_ms=round(rnd.uniform(1, 9000), 3),
                ttft_ms=round(rnd.uniform(1, 900), 3), tokens_per_second=round(rnd.uniform(1, 300), 3))
            for i in range(3000)]  # fmt: skip
    # Ties for the top lists: same cost, same duration, same start; only the request id tells them apart.
    recs += [rec("59.000", request_id=f"tie{i}", model="m1", cost_usd=0.5, duration_ms=9999.0) for i in range(8)]
    docs, sums = [], []
    for n, order in enumerate((recs, list(reversed(recs)), rnd.sample(recs, len(recs)))):
        write_run(tmp_path, f"o{n}", order)
        summary = report.summarize(tmp_path / f"o{n}.jsonl", "o", ("model",))
        doc = summary.to_json()
        del doc["file"]
        docs.append(doc)
        # The sums themselves, before rounding hides most (not all: 1,000,000 calls showed it) differences.
        s = summary.stats
        sums.append((s.cost, s.call_ms, s.ttft_sum, s.tps_sum))
    assert docs[0] == docs[1] == docs[2]
    assert sums[0] == sums[1] == sums[2]
    assert [c["request_id"] for c in docs[0]["most_expensive"]] == [f"tie{i}" for i in range(5)]


# -- the fast paths of a large report read the same values as the plain ones ------------------------------


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 12, 31)))
def test_cached_epoch_of_a_record_ts_is_the_datetime_timestamp(dt: datetime) -> None:
    ts = dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    expected = datetime.fromisoformat(ts).replace(tzinfo=UTC).timestamp()
    assert report._epoch(ts) == expected  # exactly the same float, cached seconds or not
    assert report._epoch(ts) == expected


@pytest.mark.parametrize(
    "ts",
    ["2026-12-01T14:54:10.63Z", "2026-12-01T14:54:10.630+00:00", "2026-12-01T14:54:10.630", "2026-12-01T14:54:10Z"],
)
def test_other_timestamp_spellings_are_read_as_before(ts: str) -> None:
    dt = datetime.fromisoformat(ts)
    expected = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    assert report._epoch(ts) == expected


def test_a_non_ascii_digit_in_the_milliseconds_is_not_taken_as_a_number() -> None:
    with pytest.raises(ValueError):
        report._epoch("2026-12-01T14:54:10.\u0661\u0662\u0663Z")  # Arabic-Indic digits: not an ISO 8601 ts


def test_a_record_missing_fields_reads_them_as_null() -> None:
    call = report.parse_call({"ts": "2026-12-01T14:54:10.630Z"})
    assert call.duration_ms == 0.0 and call.ttft_ms is None and call.model is None and call.tags == {}
    assert call.request_id == "" and call.error is None and call.status == 0 and not call.success


def test_a_line_padded_with_form_feeds_is_read_as_before(tmp_path: Path) -> None:
    rec = orjson.dumps({"ts": "2026-12-01T14:54:10.630Z", "duration_ms": 5, "success": True})
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\x0c" + rec + b"\x0b\n" + b"  \n")  # bytes.strip() drops \f and \v; JSON does not allow them
    s = report.summarize(path, "r")
    assert s.reader.records == 1 and s.reader.skipped == 1 and s.reader.notes == ["line 2: blank line; skipped"]


@pytest.mark.parametrize("by", [(), ("model",), ("model", "task"), ("task", "tag:variant", "model")])
def test_breakdowns_are_the_same_whatever_specs_are_combined(tmp_path: Path, by: tuple[str, ...]) -> None:
    # Calls are folded once into a cell per combination of keys; each breakdown must equal its own fold.
    lines = []
    for i in range(60):
        rec = {"ts": f"2026-12-01T14:54:{i % 60:02d}.{i:03d}Z", "request_id": f"req_{i:03d}",
               "model": ["a", "b", None][i % 3], "task": ["x", "y"][i % 2], "tags": {"variant": str(i % 4)},
               "duration_ms": 10.5 + i, "ttft_ms": (i / 3) if i % 5 else None, "success": i % 7 != 0,
               "input_tokens": i * 11, "output_tokens": i, "cost_usd": i / 1e6 if i % 4 else None,
               "error": {"category": "upstream_error"} if i % 7 == 0 else None}  # fmt: skip
        lines.append(orjson.dumps(rec))
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    together = report.summarize(path, "r", by=by).to_json()
    for spec in by:
        alone = report.summarize(path, "r", by=(spec,)).to_json()
        assert together["breakdown"][spec] == alone["breakdown"][spec]
        assert {k: v for k, v in together.items() if k != "breakdown"} == {
            k: v for k, v in alone.items() if k != "breakdown"
        }
    assert together["calls"]["total"] == 60 and together["tokens"]["input"] == sum(i * 11 for i in range(60))


def _varied_lines(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rec = {"ts": f"2026-12-01T14:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z", "request_id": f"req_{i:05d}",
               "model": ["a", "b", "c"][i % 3], "task": ["x", "y", None][i % 3], "tags": {"v": str(i % 5)},
               "duration_ms": float(i % 97), "ttft_ms": (i % 13) / 3 if i % 4 else None, "success": i % 9 != 0,
               "input_tokens": i, "output_tokens": i % 50, "cost_usd": (i % 31) / 1e7 if i % 6 else None,
               "error": {"category": "timeout"} if i % 9 == 0 else None, "tokens_per_second": i / 7}  # fmt: skip
        out.append(orjson.dumps(rec))
    return out


@pytest.mark.parametrize("jobs", [2, 3, 5])
def test_a_file_read_in_parts_gives_exactly_the_summary_of_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    monkeypatch.setattr(report, "PARALLEL_MIN_BYTES", 1)
    lines = _varied_lines(3000)
    # Lines that are no record, spread over the file (so over the cuts), and a torn last line.
    for at in (5, 700, 1499, 1500, 1501, 2200, 2999):
        lines.insert(at, b"{not json" if at % 2 else b"")
    body = b"\n".join(lines) + b'\n{"ts": "2026-12-01T1'
    path = tmp_path / "r.jsonl"
    path.write_bytes(body)
    one = report.summarize(path, "r", by=("model", "tag:v"), view_calls=40, jobs=1)
    parts = report.summarize(path, "r", by=("model", "tag:v"), view_calls=40, jobs=jobs)
    assert parts.to_json() == one.to_json()
    assert parts.view_calls == one.view_calls
    assert (parts.lineno, parts.offset, parts.reader.skipped) == (one.lineno, one.offset, one.reader.skipped) == (
        3008, len(body), 8,
    )  # fmt: skip
    assert one.to_json()["notes"][:2] == [
        "line 6: not a record (invalid JSON or field); skipped",
        "line 701: blank line; skipped",
    ]


def test_cuts_fall_on_line_starts_and_cover_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    data = b"".join(b"x" * (i % 17) + b"\n" for i in range(500)) + b"tail"
    path.write_bytes(data)
    with open(path, "rb") as f:
        for parts in range(1, 9):
            ranges = report._split(f, len(data), parts)
            assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            assert all(data[a - 1 : a] == b"\n" for a, _ in ranges[1:])


def test_the_report_command_reads_a_large_file_in_parts(tmp_path: Path) -> None:
    # Through the real CLI in a subprocess (the workers are forked from it): same JSON with --jobs 1 and 2.
    lines = _varied_lines(1000)
    (tmp_path / "big.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code = "import sys; from proxy import report, cli; report.PARALLEL_MIN_BYTES = 1; sys.exit(cli.main(sys.argv[1:]))"
    outs = []
    for jobs in ("1", "2"):
        p = subprocess.run(
            [sys.executable, "-c", code, "report", "big", "--runs-dir", str(tmp_path), "--json", "--jobs", jobs],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        outs.append(orjson.loads(p.stdout))
    assert outs[0] == outs[1] and outs[0]["runs"][0]["records"] == 1000


def test_report_jobs_must_be_a_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["report", "r", "--runs-dir", str(tmp_path), "--jobs", "0"])
    assert exc.value.code == 2 and "--jobs: must be 1 to 64" in capsys.readouterr().err


@given(st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=40), min_size=1, max_size=6),
       st.integers(1, 100))  # fmt: skip
def test_kth_smallest_of_sorted_runs_is_that_of_all_values(values: list[list[float]], p: int) -> None:
    from array import array

    runs = [array("d", sorted(v)) for v in values]
    every = sorted(x for v in values for x in v)
    if not every:
        return
    k = max(1, (p * len(every) + 99) // 100)
    assert report.kth_smallest(runs, k) == every[k - 1] == report.nearest_rank(every, p)


def test_samples_kept_in_short_sorted_runs_give_the_same_percentiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs of 7 values, samples sorted between updates of a file that grows: the same figures as one sort.
    lines = _varied_lines(500)
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines[:123]) + b"\n")
    whole = tmp_path / "w.jsonl"
    whole.write_bytes(b"\n".join(lines) + b"\n")
    expected = report.summarize(whole, "r", by=("model", "task")).to_json()
    monkeypatch.setattr(report, "SORTED_RUN", 7)
    live = report.RunSummary(path, "r", by=("model", "task"))
    live.update()
    live.to_json()  # sorts what it has so far into runs
    with open(path, "ab") as f:
        f.write(b"\n".join(lines[123:]) + b"\n")
    live.update()
    got = live.to_json()
    for doc in (got, expected):
        doc.pop("file")
    assert got == expected
    assert max(len(r) for r in live.stats.dur_runs) <= 7


def test_the_server_does_not_load_multiprocessing() -> None:
    # Only report's one-shot parallel read uses it; serve's processes need not carry it.
    code = "import sys, proxy.app, proxy.cli; print('multiprocessing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
