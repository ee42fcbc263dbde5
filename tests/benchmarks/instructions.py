#!/usr/bin/env python
"""Instructions per call, counted by valgrind: the proxy against the thin pass-through, free of machine noise.

    python tests/benchmarks/instructions.py [--calls 200] [--chunks 20] [--json]

On a shared virtual machine CPU time per call moves by 10-30% from one minute to the next (hypervisor steal,
other tenants), more than most changes to the hot path are worth. Instructions executed do not. This runs,
under ``valgrind --tool=callgrind`` (no hardware counters needed), one Python process holding the fake
upstream (fake_upstream.py's aiohttp server), the thing measured (the proxy app, the thin pass-through of
passthrough.py, or nothing: "direct") and an aiohttp client, all on one uvloop, all on 127.0.0.1. Each
configuration runs twice, with a few calls and with --calls more; the difference divided by the extra calls
is the instructions of one call, start-up and warm-up cancelled out. Client and upstream are the same in
every configuration, so subtracting "direct" leaves what the proxy (or the thin pass-through) costs.

It counts instructions, not time: a cache miss costs nothing here. Use it to compare two commits or the
proxy with thin, not for absolute speed. About 3 minutes (valgrind runs Python some 50 times slower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TARGETS = ("direct", "thin", "proxy")
WARM = 30  # calls made before the counted ones, in both runs of a pair


async def _drive(target: str, kind: str, calls: int, chunks: int) -> None:
    import aiohttp
    import orjson

    sys.path.insert(0, str(HERE))
    import fake_upstream
    import passthrough

    stats: dict[str, Any] = {"calls": 0, "streams": 0, "ttft": {}}
    server = await fake_upstream.serve_aiohttp("127.0.0.1", 0, stats)
    up_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    runner = None
    base = up_url
    tmp = Path(tempfile.mkdtemp(prefix="instr-"))
    if target != "direct":
        from aiohttp import web

        if target == "thin":
            app = passthrough.make_app(up_url)
        else:
            from proxy import app as app_mod
            from proxy import config
            from proxy.pricing import PriceBook

            cfg = config.from_mapping({"upstreams": [{"name": "fake", "base_url": up_url}],
                                       "runs_dir": str(tmp / "runs"), "log_level": "warning"})  # fmt: skip
            app = app_mod.make_app(cfg, PriceBook.load())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if target == "proxy":
            from proxy.cli import _freeze_startup_heap

            await _freeze_startup_heap(app)  # as serve does once started
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}/v1"
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                         "stream": kind == "stream"})  # fmt: skip
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "X-Run-Id": "instr",
               "X-Fake-Chunks": str(chunks)}  # fmt: skip
    async with aiohttp.ClientSession() as client:
        for _ in range(WARM + calls):
            async with client.post(f"{base}/chat/completions", data=body, headers=headers) as resp:
                if kind == "stream":
                    async for _chunk in resp.content.iter_any():
                        pass
                else:
                    await resp.read()
                assert resp.status == 200, resp.status
    if runner is not None:
        await runner.cleanup()
    server.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _child(target: str, kind: str, calls: int, chunks: int) -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_drive(target, kind, calls, chunks))


def count(target: str, kind: str, calls: int, chunks: int) -> int:
    """Instructions of one whole child process (callgrind's total Ir)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
               sys.executable, __file__, "--child", target, kind, str(calls), str(chunks)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if p.returncode != 0:
            raise SystemExit(f"instructions: {target}/{kind} failed:\n{p.stderr[-2000:]}")
        found = re.search(r"Collected : (\d+)", p.stderr)
        if found is None:
            raise SystemExit(f"instructions: no count in callgrind's output:\n{p.stderr[-1000:]}")
        return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--calls", type=int, default=200, help="counted calls per configuration (default 200)")
    ap.add_argument("--chunks", type=int, default=20, help="content chunks per stream (default 20)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kind", action="append", choices=("plain", "stream"), help="only these (repeatable)")
    ap.add_argument("--target", action="append", choices=TARGETS, help="only these (repeatable)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        target, kind, calls, chunks = args.child
        _child(target, kind, int(calls), int(chunks))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions: needs valgrind (apt-get install -y valgrind)")
    per_call: dict[str, dict[str, float]] = {}
    for kind in args.kind or ("plain", "stream"):
        per_call[kind] = {}
        for target in args.target or TARGETS:
            few, many = count(target, kind, 10, args.chunks), count(target, kind, 10 + args.calls, args.chunks)
            per_call[kind][target] = (many - few) / args.calls
            print(f"  {kind:6s} {target:6s} {per_call[kind][target] / 1e3:9.1f} k instructions/call", file=sys.stderr)
    out: dict[str, Any] = {"calls": args.calls, "chunks": args.chunks, "per_call": per_call}
    if args.kind or args.target:  # a partial run: the raw counts only
        print(json.dumps(out) if args.json else json.dumps(per_call, indent=1))
        return 0
    for kind, row in per_call.items():
        proxy, thin = row["proxy"] - row["direct"], row["thin"] - row["direct"]
        out[kind] = {"proxy_k": round(proxy / 1e3, 1), "thin_k": round(thin / 1e3, 1),
                     "ratio": round(proxy / thin, 2) if thin > 0 else None}  # fmt: skip
    if {"plain", "stream"} <= out.keys():
        marg = {t: (per_call["stream"][t] - per_call["plain"][t]) / args.chunks for t in TARGETS}
        out["per_chunk_k"] = {"proxy": round((marg["proxy"] - marg["direct"]) / 1e3, 2),
                              "thin": round((marg["thin"] - marg["direct"]) / 1e3, 2)}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        for kind in ("plain", "stream"):
            r = out[kind]
            print(f"{kind:6s}: proxy {r['proxy_k']:8.1f} k, thin {r['thin_k']:8.1f} k instructions per call"
                  f" (over direct): {r['ratio']}x")  # fmt: skip
        pc = out["per_chunk_k"]
        print(f"marginal per streamed chunk (over direct): proxy {pc['proxy']} k, thin {pc['thin']} k instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
