"""The report command: run summaries rendered as a text table, CSV or JSON, or a standalone HTML view."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from pathlib import Path
from typing import Any

import orjson

from proxy import config, report, whatif
from proxy.config import Config
from proxy.records import UnsafeRunFile
from proxy.report import RunNotFound

NONE_KEY = "(none)"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.6f}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _cost(cost: dict[str, Any]) -> str:
    """A group's cost; '-' rather than 0 when none of its calls could be priced."""
    return "-" if cost["unknown_calls"] and not cost["priced_calls"] else _num(cost["total"], 6)


def _table(head: list[str], rows: list[list[str]], left: int = 1, indent: str = "  ") -> list[str]:
    """Align columns: the first `left` to the left (text), the rest to the right (numbers)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    return [line(head), *(line(r) for r in rows)]


def _run_lines(run: dict[str, Any]) -> list[str]:
    c, t, cost, tm = run["calls"], run["tokens"], run["cost_usd"], run["time"]
    d, f = run["duration_ms"], run["ttft_ms"]
    cost_line = f"{_usd(cost['total'])} over {_plural(cost['priced_calls'], 'priced call')}"
    if cost["unknown_calls"]:
        cost_line += (
            f"; {_plural(cost['unknown_calls'], 'call')} with tokens but no price (unknown, not in the total)"
        )
    if cost["estimated_calls"]:
        estimated = _plural(cost["estimated_calls"], "call")
        cost_line += f"; {_usd(cost['estimated'])} of it from estimated usage ({estimated})"
    out = [
        f"run {run['run_id']}  ({run['file']})",
        f"  calls         {c['total']:,} ({c['ok']:,} ok, {c['failed']:,} failed)",
        f"  tokens        input {t['input']:,} (cached {t['cached_input']:,},"
        f" cache write {t['cache_write']:,})  output {t['output']:,} (reasoning {t['reasoning']:,})"
        f"  total {t['total']:,}",
        f"  cost          {cost_line}",
        f"  time          wall {_num(tm['wall_s'], 3)} s"
        f" ({tm['first_start'] or '-'} -> {tm['last_end'] or '-'})"
        f"  summed call time {_num(tm['call_time_s'], 3)} s",
        f"  speed         mean {_num(tm['tokens_per_second_mean'])} output tok/s per call,"
        f" {_num(tm['output_tokens_per_wall_s'])} output tok/s over the wall time",
        f"  duration ms   p50 {_num(d['p50'])}  p95 {_num(d['p95'])}  max {_num(d['max'])}"
        f"  ({d['count']:,} calls)",
        f"  ttft ms       p50 {_num(f['p50'])}  p95 {_num(f['p95'])}  max {_num(f['max'])}"
        f"  ({f['count']:,} calls with a first token)",
        "  errors        " + (", ".join(f"{k} {v:,}" for k, v in run["errors"].items()) or "none"),
    ]
    if "price_as" in run:
        out.insert(4, f"  price as      {_price_as_line(run['price_as'])}")
    if run["skipped_lines"]:
        out.append(f"  skipped       {run['skipped_lines']:,} line(s) that are not records:")
        out += [f"                {note}" for note in run["notes"]]
    return out


def _price_as_line(p: dict[str, Any]) -> str:
    """The what-if total next to the recorded one, and which calls it covers."""
    sign = "+" if p["delta"] > 0 else ("-" if p["delta"] < 0 else "")
    pct = "" if p["pct"] is None else f", {p['pct']:+.1f}%"
    line = (f"{_usd(p['total'])} (recorded {_usd(p['recorded'])}; {sign}{_usd(abs(p['delta']))}{pct});"
            f" {_plural(p['repriced_calls'], 'call')} re-priced")  # fmt: skip
    if p["no_usage_calls"]:
        line += f", {_plural(p['no_usage_calls'], 'call')} without usage (failed or none reported: not re-priced)"
    if p["unpriced_recorded_calls"]:
        line += f", {_plural(p['unpriced_recorded_calls'], 'call')} unpriced when recorded (re-priced all the same)"
    if p["kept_calls"]:
        line += f", {_plural(p['kept_calls'], 'call')} of unmapped models at their recorded cost"
    return line


def _price_as_head(doc: dict[str, Any]) -> list[str]:
    models = doc["price_as"]["models"]
    shown = ", ".join(new if old == whatif.ANY else f"{old} -> {new}" for old, new in models.items())
    return [f"what-if prices: {shown}", f"  note: {doc['price_as']['note']}", ""]


def _breakdown_lines(run: dict[str, Any], spec: str) -> list[str]:
    head = [spec, "calls", "ok", "failed", "input", "cached", "output", "reasoning", "cost $", "unpriced",
            "p50 ms", "p95 ms", "max ms", "ttft p50", "tok/s"]  # fmt: skip
    whatif_col = "price_as" in run
    if whatif_col:
        head.insert(9, "as $")
    rows = [
        [g["key"] if g["key"] is not None else NONE_KEY, _num(g["calls"]["total"]), _num(g["calls"]["ok"]),
         _num(g["calls"]["failed"]), _num(g["tokens"]["input"]), _num(g["tokens"]["cached_input"]),
         _num(g["tokens"]["output"]), _num(g["tokens"]["reasoning"]), _cost(g["cost_usd"]),
         _num(g["cost_usd"]["unknown_calls"]), _num(g["duration_ms"]["p50"]), _num(g["duration_ms"]["p95"]),
         _num(g["duration_ms"]["max"]), _num(g["ttft_ms"]["p50"]), _num(g["time"]["tokens_per_second_mean"])]
        for g in run["breakdown"][spec]
    ]  # fmt: skip
    if whatif_col:
        for row, g in zip(rows, run["breakdown"][spec], strict=True):
            row.insert(9, _num(g["price_as"]["total"], 6))
    return [f"by {spec}", *_table(head, rows)]


def _calls_lines(title: str, calls: list[dict[str, Any]]) -> list[str]:
    if not calls:
        return [f"{title}: none"]
    head = ["request_id", "ts", "model", "task", "status", "duration ms", "ttft ms", "in", "out", "cost $"]
    rows = [
        [c["request_id"], c["ts"], c["model"] or NONE_KEY, c["task"] or NONE_KEY,
         str(c["status"]) + ("" if c["error"] is None else f" {c['error']}"), _num(c["duration_ms"]),
         _num(c["ttft_ms"]), _num(c["input_tokens"]), _num(c["output_tokens"]), _num(c["cost_usd"], 6)]
        for c in calls
    ]  # fmt: skip
    return [title, *_table(head, rows, left=5)]


def _comparison_lines(doc: dict[str, Any]) -> list[str]:
    runs, comp = doc["runs"], doc["comparison"]
    head = ["metric", *(r["run_id"] for r in runs)]
    for other in comp["runs"]:
        head += [f"delta {other['run_id']}", "%"]
    rows = []
    for sec, key in report.COMPARED:
        name = f"{sec}.{key}"
        digits = 6 if sec == "cost_usd" and key != "unknown_calls" else (3 if sec == "time" else 1)
        row = [name, *(_num(r[sec][key], digits) for r in runs)]
        for other in comp["runs"]:
            m = other["metrics"][name]
            delta = m["delta"]
            sign = "+" if isinstance(delta, (int, float)) and delta > 0 else ""
            row += [sign + _num(delta, digits), "-" if m["pct"] is None else f"{m['pct']:+.1f}%"]
        rows.append(row)
    return [f"compared with the baseline {comp['baseline']} (deltas: run - baseline)", *_table(head, rows)]


def _side_by_side_lines(doc: dict[str, Any], spec: str) -> list[str]:
    """One row per group key across all runs: calls, p50 duration and cost in each run."""
    runs = doc["runs"]
    keys: dict[str | None, None] = {}
    for run in runs:
        for g in run["breakdown"][spec]:
            keys.setdefault(g["key"], None)
    head = [spec]
    for run in runs:
        head += [f"{run['run_id']} calls", "p50 ms", "cost $"]
    rows = []
    for key in keys:
        row = [key if key is not None else NONE_KEY]
        for run in runs:
            g = next((g for g in run["breakdown"][spec] if g["key"] == key), None)
            row += (
                ["-", "-", "-"]
                if g is None
                else [
                    _num(g["calls"]["total"]),
                    _num(g["duration_ms"]["p50"]),
                    _cost(g["cost_usd"]),
                ]
            )
        rows.append(row)
    return [f"by {spec}, side by side", *_table(head, rows)]


def render_text(doc: dict[str, Any], spec: str) -> str:
    """Return the report as aligned text tables."""
    out: list[str] = _price_as_head(doc) if "price_as" in doc else []
    if doc["comparison"] is not None:
        out += _comparison_lines(doc) + [""] + _side_by_side_lines(doc, spec) + [""]
    for run in doc["runs"]:
        out += _run_lines(run) + [""] + _breakdown_lines(run, spec) + [""]
        out += _calls_lines(f"{report.TOP_N} slowest calls", run["slowest"]) + [""]
        out += _calls_lines(f"{report.TOP_N} most expensive calls", run["most_expensive"]) + [""]
    return "\n".join(out)


CSV_COLUMNS = ("run_id", "by", "group", "calls", "ok", "failed", "input_tokens", "cached_input_tokens",
               "cache_write_tokens", "output_tokens", "reasoning_tokens", "cost_usd", "priced_calls",
               "unknown_cost_calls", "estimated_cost_usd", "estimated_calls", "wall_s", "call_time_s",
               "tokens_per_second_mean", "duration_p50_ms", "duration_p95_ms", "duration_max_ms",
               "ttft_p50_ms", "ttft_p95_ms", "ttft_max_ms", "errors")  # fmt: skip


#: Added after CSV_COLUMNS with --price-as.
PRICE_AS_COLUMNS = ("price_as_cost_usd", "price_as_delta_usd", "price_as_repriced_calls",
                    "price_as_no_usage_calls", "price_as_unpriced_recorded_calls", "price_as_kept_calls")  # fmt: skip


def _csv_row(run_id: str, by: str, group: str, s: dict[str, Any]) -> list[Any]:
    c, t, cost, tm, d, f = s["calls"], s["tokens"], s["cost_usd"], s["time"], s["duration_ms"], s["ttft_ms"]
    errors = ";".join(f"{k}={v}" for k, v in s["errors"].items())
    values = [run_id, by, group, c["total"], c["ok"], c["failed"], t["input"], t["cached_input"],
              t["cache_write"], t["output"], t["reasoning"], cost["total"], cost["priced_calls"],
              cost["unknown_calls"], cost["estimated"], cost["estimated_calls"], tm["wall_s"],
              tm["call_time_s"], tm["tokens_per_second_mean"], d["p50"], d["p95"], d["max"], f["p50"],
              f["p95"], f["max"], errors]  # fmt: skip
    if (p := s.get("price_as")) is not None:
        values += [p["total"], p["delta"], p["repriced_calls"], p["no_usage_calls"], p["unpriced_recorded_calls"],
                   p["kept_calls"]]  # fmt: skip
    return ["" if v is None else v for v in values]


def render_csv(doc: dict[str, Any], spec: str) -> str:
    """Return one CSV row per run (by='', group='*') and one per group of its breakdown."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS + (PRICE_AS_COLUMNS if "price_as" in doc else ()))
    for run in doc["runs"]:
        w.writerow(_csv_row(run["run_id"], "", "*", run))
        for g in run["breakdown"][spec]:
            w.writerow(_csv_row(run["run_id"], spec, g["key"] if g["key"] is not None else "", g))
    return buf.getvalue()


def _database(args: argparse.Namespace, cfg: Config | None) -> str | None:
    """The database to read: --db, else ship.postgres of --config, else None (the run files)."""
    if args.db:
        return str(args.db)
    pg = cfg.ship.postgres if cfg is not None else None
    return pg.url if pg is not None else None


def _repricer(args: argparse.Namespace, cfg: Config | None) -> whatif.Repricer | None:
    """The --price-as mapping over the price table (--config's file and custom prices); ValueError if unusable."""
    if not args.price_as:
        return None
    mapping = whatif.parse(args.price_as)
    from proxy.pricing import PriceBook

    book = PriceBook.load() if cfg is None else PriceBook.load(cfg.prices_file, cfg.custom_prices)
    return whatif.Repricer(book, mapping)


class _Failed(Exception):
    """A run that cannot be reported (exit 1); the message is the line to print."""


def _summaries(args: argparse.Namespace, by: list[str], repricer: whatif.Repricer | None,
               db: str | None) -> list[report.RunSummary]:  # fmt: skip
    """The requested runs' summaries, from the database when one is given, else from the run files."""
    view_calls = report.VIEW_CALLS if args.html else 0
    if db is not None:
        from proxy import report_db

        try:
            return asyncio.run(report_db.summarize_runs(db, args.run_ids, by, view_calls, price_as=repricer))
        except (RunNotFound, report_db.DatabaseError) as exc:
            raise _Failed(str(exc)) from None
    runs_dir = Path(args.runs_dir)
    summaries = []
    for run_id in args.run_ids:
        try:
            path = report.run_path(runs_dir, run_id)
            summaries.append(
                report.summarize(path, run_id, by, view_calls=view_calls, price_as=repricer, jobs=args.jobs)
            )
        except RunNotFound as exc:
            known = report.list_runs(runs_dir)
            hint = f" (runs there: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''})" if known else ""
            raise _Failed(f"{exc}{hint}") from None
        except UnsafeRunFile as exc:  # from run_path, or from summarize should the file be swapped meanwhile
            raise _Failed(str(exc)) from None
    return summaries


def cli(args: argparse.Namespace) -> int:
    """Run `metering-proxy report`; return 0, 1 (unknown run, a linked run file, an unreadable database) or 2
    (bad usage)."""
    try:
        spec = report.check_by(args.by)
        if args.html is not None and len(args.run_ids) != 1:
            raise ValueError("--html takes exactly one run")
        cfg = config.load(args.config) if args.config is not None else None  # read once, for both uses
        repricer = _repricer(args, cfg)
    except ValueError as exc:
        print(f"metering-proxy report: {exc}", file=sys.stderr)
        return 2
    by = [spec, "model", "task"] if args.html is not None else [spec]
    try:
        summaries = _summaries(args, by, repricer, _database(args, cfg))
    except _Failed as exc:
        print(f"metering-proxy report: {exc}", file=sys.stderr)
        return 1
    if args.html is not None:
        from proxy import ui

        Path(args.html).write_text(ui.standalone_html(summaries[0]), encoding="utf-8")
        print(f"metering-proxy report: wrote {args.html}", file=sys.stderr)
        for s in summaries:  # the page shows model and task; the text output only the --by breakdown
            s.show_only(spec)
    doc = report.report_json(summaries)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    elif args.csv:
        sys.stdout.write(render_csv(doc, spec))
    else:
        sys.stdout.write(render_text(doc, spec))
    sys.stdout.flush()
    return 0
