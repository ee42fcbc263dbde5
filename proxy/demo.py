"""`metering-proxy demo`: the proxy in front of a simulated upstream, a short workload on two models, the report.

Everything runs in this one process and event loop: the simulated upstream (proxy/demo_upstream.py) on a
free loopback port, the real proxy app (make_app, as `serve` builds it) on 127.0.0.1, and a client that
calls the proxy over HTTP as any OpenAI client would. Nothing here needs a key or the network.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import config as config_mod
from proxy import report, report_format
from proxy.app import SINK, make_app
from proxy.demo_upstream import FAIL_HEADER, DemoUpstream
from proxy.pricing import PriceBook

MODELS = ("gpt-4.1-mini", "gpt-4.1")
"""One run per model, so the dashboard and the report have two models to compare."""
CONCURRENCY = 4
RECORD_WAIT_S = 10.0

_SYSTEM = ("You are a careful assistant for a support team. Follow the house rules below exactly. " * 60).strip()
"""A long system prompt shared by one task's calls (over 1,024 tokens): the part a provider caches."""


@dataclass(frozen=True, slots=True)
class Task:
    """One kind of call in the workload."""

    name: str
    calls: int
    stream: bool
    max_tokens: int
    long_prompt: bool = False


TASKS = (
    Task("summarize", 6, stream=True, max_tokens=220, long_prompt=True),
    Task("classify", 8, stream=False, max_tokens=8),
    Task("extract", 5, stream=False, max_tokens=120),
    Task("chat", 5, stream=True, max_tokens=320),
)
FAILURES = {("classify", 3): "429", ("chat", 2): "500"}
"""Calls the simulated upstream fails, by (task, index): a rate limit and a server error in each run."""


def _prompt(rng: random.Random, task: Task, i: int) -> list[dict[str, str]]:
    words = " ".join(rng.choice(("invoice", "refund", "order", "delay", "login", "account", "shipping",
                                 "question", "error", "thanks")) for _ in range(rng.randint(20, 160)))  # fmt: skip
    system = _SYSTEM if task.long_prompt else f"You {task.name} the user's message."
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Ticket {i}: {words}"}]


async def _call(session: aiohttp.ClientSession, base: str, run_id: str, model: str, task: Task, i: int,
                rng: random.Random, gate: asyncio.Semaphore) -> int:  # fmt: skip
    """One chat completion through the proxy, read to the end; its HTTP status."""
    body = {"model": model, "messages": _prompt(rng, task, i), "max_tokens": task.max_tokens, "stream": task.stream}
    headers = {"Authorization": "Bearer demo", "X-Run-Id": run_id, "X-Task-Name": task.name,
               "X-Meter-Tag-Variant": model}  # fmt: skip
    if (fail := FAILURES.get((task.name, i))) is not None:
        headers[FAIL_HEADER] = fail
    async with gate, session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def workload(base: str, run_ids: dict[str, str], seed: int) -> int:
    """Send every task's calls for each model (CONCURRENCY at a time); return how many calls were sent."""
    gate = asyncio.Semaphore(CONCURRENCY)
    calls = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for model, run_id in run_ids.items():
            rng = random.Random(seed)  # the same prompts for every model
            for task in TASKS:
                for i in range(task.calls):
                    calls.append(_call(session, base, run_id, model, task, i, random.Random(rng.random()), gate))
        await asyncio.gather(*calls)
    return len(calls)


def _lines(paths: list[Path]) -> int:
    return sum(p.read_bytes().count(b"\n") for p in paths if p.exists())


async def _await_records(app: web.Application, paths: list[Path], expected: int) -> None:
    """Wait until every call's record is in its file (a record is queued as its call ends, written in batches)."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while True:
        await app[SINK].flush()
        if await asyncio.to_thread(_lines, paths) >= expected or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


def _listen(port: int) -> socket.socket:
    return socket.create_server(("127.0.0.1", config_mod.check_port(port, "--port")), backlog=128)


async def run(args: argparse.Namespace) -> int:
    """Start the upstream and the proxy, drive the workload, print the report; serve until a signal if asked."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        sock = _listen(args.port)
    except OSError as exc:
        print(f"metering-proxy demo: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}"
              " (use --port, or --port 0 for any free port)", file=sys.stderr)  # fmt: skip
        return 2
    upstream = DemoUpstream(args.seed)
    up_runner = web.AppRunner(upstream.app, handle_signals=False)
    await up_runner.setup()
    up_site = web.TCPSite(up_runner, "127.0.0.1", 0)
    await up_site.start()
    up_port = up_runner.addresses[0][1]
    port = sock.getsockname()[1]
    runs_dir = Path(args.runs_dir)
    cfg = config_mod.with_overrides(config_mod.Config(), host="127.0.0.1", port=port,
                                    upstream=f"http://127.0.0.1:{up_port}/v1", runs_dir=str(runs_dir))  # fmt: skip
    app = make_app(cfg, PriceBook.load())
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    base = f"http://127.0.0.1:{port}"
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_ids = {model: f"demo-{stamp}-{model}" for model in MODELS}
        print(f"metering-proxy demo: proxy on {base}/v1 in front of a simulated upstream (no key, no network);"
              f" {len(MODELS)} runs into {runs_dir.resolve()}", file=sys.stderr, flush=True)  # fmt: skip
        sent = await workload(base, run_ids, args.seed)
        paths = [runs_dir / f"{r}.jsonl" for r in run_ids.values()]
        await _await_records(app, paths, sent)
        ids = list(run_ids.values())
        summaries = [await asyncio.to_thread(report.summarize, path, run_id, ("task",))
                     for path, run_id in zip(paths, ids, strict=True)]  # fmt: skip
        sys.stdout.write(report_format.render_text(report.report_json(summaries), "task"))
        where = shlex.quote(str(args.runs_dir))
        print(f"demo: {sent} calls in {time.monotonic() - started:.1f} s; the report above is"
              f" `metering-proxy report {' '.join(ids)} --runs-dir {where} --by task`")
        print(f"what would {ids[1]} cost on {MODELS[0]}?  metering-proxy report {ids[1]} --runs-dir {where}"
              f" --price-as {MODELS[0]}")
        # Both runs in the compare view: the two models side by side, deltas against the first.
        print(f"dashboard: {base}/ui?{'&'.join(f'run={i}' for i in ids)}  (runs list: {base}/ui)")
        if not args.no_wait:
            print("the proxy stays up for the dashboard (and for your own calls to"
                  f" OPENAI_BASE_URL={base}/v1); Ctrl-C stops it")
        sys.stdout.flush()
        if not args.no_wait:
            await stop.wait()
    finally:
        await runner.cleanup()  # flushes the records still queued
        await up_runner.cleanup()
    return 0


def cli(args: argparse.Namespace) -> int:
    """Run `metering-proxy demo`; the process exit code."""
    return asyncio.run(run(args))
