#!/usr/bin/env python
"""Time `metering-proxy report` over a large run file: wall seconds and peak RSS of the report process.

    python tests/benchmarks/report_bench.py [--records 1000000] [--file PATH] [--repeat 3] [--json]

The file is built from real records: the built-in demo (real proxy, simulated upstream) writes two runs, and
their records are the templates. Each generated line takes a template and varies what a summary reads
(request id, ts, duration, TTFT, tokens, cost, model, task, a failure now and then), so the lines keep the
proxy's own field order, nesting and size (about 1.3 kB). The file is kept (--file, default under /tmp) and
reused by later runs with the same record count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

PY = sys.executable
MODELS = ("gpt-4.1-mini", "gpt-4.1", "claude-sonnet-4-5", "gpt-4o-mini", "llama3.1:8b")
TASKS = ("summarize", "classify", "extract", None)


def templates() -> list[dict[str, Any]]:
    """Records written by the real proxy, via the demo."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [PY, "-m", "proxy", "demo", "--port", "0", "--runs-dir", tmp, "--no-wait"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip
        out: list[dict[str, Any]] = []
        for path in sorted(Path(tmp).glob("*.jsonl")):
            out.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip())
    if not out:
        raise SystemExit("report_bench: the demo wrote no records")
    return out


def build(path: Path, n: int, seed: int = 1) -> None:
    """Write n varied records to path (atomically: a file that exists is whole)."""
    rng = random.Random(seed)
    base = templates()
    t0 = 1_780_000_000.0
    part = path.with_suffix(".part")
    with open(part, "wb") as f:
        lines = []
        for i in range(n):
            rec = dict(rng.choice(base))
            start = t0 + i * 0.01
            ms = int((start % 1) * 1000)
            rec["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + f".{ms:03d}Z"
            rec["run_id"] = "big"
            rec["request_id"] = f"req_{rng.getrandbits(96):024x}"
            rec["model"] = rec["requested_model"] = rng.choice(MODELS)
            rec["task"] = rng.choice(TASKS)
            rec["duration_ms"] = round(rng.lognormvariate(5, 0.8), 3)
            if rec.get("ttft_ms") is not None:
                rec["ttft_ms"] = round(rec["duration_ms"] * rng.random(), 3)
            rec["input_tokens"] = rng.randrange(1, 20_000)
            rec["output_tokens"] = rng.randrange(0, 2_000)
            rec["total_tokens"] = rec["input_tokens"] + rec["output_tokens"]
            if rec.get("cost_usd") is not None:
                rec["cost_usd"] = round(rng.random() / 100, 10)
            if rng.random() < 0.02:
                rec.update(status=500, success=False, cost_usd=None,
                           error={"category": "upstream_error", "id": "err_x", "detail": "HTTP 500"})  # fmt: skip
            lines.append(orjson.dumps(rec))
            if len(lines) == 10_000:
                f.write(b"\n".join(lines) + b"\n")
                lines.clear()
        if lines:
            f.write(b"\n".join(lines) + b"\n")
    os.replace(part, path)


def time_report(path: Path, *args: str) -> dict[str, float]:
    """Run `metering-proxy report` once on path, as a user would; return its wall seconds (interpreter start
    included) and the peak RSS (MiB) of the command's process and of the largest of its workers."""
    code = (
        "import resource, sys\n"
        "from proxy.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "sys.stdout.flush()\n"
        "self, kids = (resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
        "print(f'\\nRSS {self} {kids}', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    t = time.perf_counter()
    p = subprocess.run(
        [PY, "-c", code, "report", "--runs-dir", str(path.parent), path.stem, *args],
        capture_output=True, check=True, timeout=600,
    )  # fmt: skip
    wall = time.perf_counter() - t
    last = p.stderr.decode().strip().splitlines()[-1].split()
    return {"wall_s": round(wall, 3), "rss_mb": int(last[1]) / 1024, "worker_rss_mb": int(last[2]) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path, default=None, help="default /tmp/metering-report-<N>/big.jsonl")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--jobs", type=int, default=None, help="report --jobs (default: the command's own default)")
    args = parser.parse_args()
    path = args.file or Path(tempfile.gettempdir()) / f"metering-report-{args.records}" / "big.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        t = time.perf_counter()
        build(path, args.records)
        print(f"built {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    extra = ["--jobs", str(args.jobs)] if args.jobs else []
    runs = [time_report(path, "--json", *extra) for _ in range(args.repeat)]
    result = {
        "records": args.records,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "wall_s": [r["wall_s"] for r in runs],
        "rss_mb": [round(r["rss_mb"], 1) for r in runs],
        "worker_rss_mb": [round(r["worker_rss_mb"], 1) for r in runs],
        "jobs": args.jobs,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"report over {args.records:,} records ({result['file_mb']} MB): wall {min(result['wall_s']):.2f} s"
              f" (runs {result['wall_s']}), peak RSS {max(result['rss_mb']):.0f} MiB"
              f" (largest worker {max(result['worker_rss_mb']):.0f} MiB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
