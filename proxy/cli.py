"""Command line: metering-proxy serve | prices | report. main(argv) -> exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from proxy import access
from proxy import config as config_mod
from proxy.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering-proxy", description="Metering proxy for LLM APIs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8787)")
    serve.add_argument("--upstream", help="upstream base URL including /v1 (default https://api.openai.com/v1)")
    serve.add_argument("--runs-dir", help="directory for runs/<run-id>.jsonl (default ./runs)")
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (SO_REUSEPORT) and the runs dir (default 1)")  # fmt: skip

    prices = sub.add_parser("prices", help="inspect or refresh the price table")
    psub = prices.add_subparsers(dest="prices_command", required=True)
    update = psub.add_parser("update", help="download the current LiteLLM price table into the cache")
    update.add_argument("--url", help="where to download it from")
    lookup = psub.add_parser("lookup", help="show which price entry a model matches")
    lookup.add_argument("model")
    lookup.add_argument("--upstream", help="upstream name (for custom prices and provider hints)")
    lookup.add_argument("--config", type=Path, help="YAML config file (custom prices, price file)")

    rep = sub.add_parser("report", help="summarise runs: tokens, cost, timings, breakdowns, comparisons")
    rep.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="runs to report; several are compared")
    rep.add_argument("--runs-dir", default="runs", help="directory holding <run-id>.jsonl (default ./runs)")
    rep.add_argument("--by", default="model",
                     help="breakdown: model, task, upstream or tag:NAME (default: model)")
    fmt = rep.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON (schema metering-proxy.report/1)")
    fmt.add_argument("--csv", action="store_true", help="CSV: one row per run and per group")
    rep.add_argument("--html", metavar="FILE", help="also write the run view as one standalone HTML file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "report":
            from proxy.report_format import cli as report_cli

            return report_cli(args)
        return _prices(args)
    except ConfigError as exc:
        print(f"metering-proxy: {exc}", file=sys.stderr)
        return 2


def _load(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.load(args.config)
    if args.command == "serve":
        cfg = config_mod.with_overrides(
            cfg, host=args.host, port=args.port, upstream=args.upstream, runs_dir=args.runs_dir
        )
    return cfg


def _pricebook(cfg: config_mod.Config) -> object | None:
    try:
        from proxy.pricing import PriceBook
    except ImportError:  # pricing not built yet
        return None
    try:
        return PriceBook.load(cfg.prices_file, cfg.custom_prices)
    except ValueError as exc:
        raise ConfigError(f"config: prices.file: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    access.check_exposure(cfg)  # before the start line: an open relay must not look like it started
    if args.workers < 1:
        raise ConfigError("--workers: must be >= 1")
    pricebook = _pricebook(cfg)
    upstreams = ", ".join(f"{u.name}={u.base_url}" for u in cfg.upstreams)
    workers = f" ({args.workers} workers)" if args.workers > 1 else ""
    print(
        f"metering-proxy listening on http://{cfg.host}:{cfg.port}/v1{workers} -> forwarding to {upstreams};"
        f" records in {cfg.runs_dir.resolve()}/<run-id>.jsonl",
        flush=True,
    )
    if args.workers == 1:
        _run_worker(cfg, pricebook, reuse_port=False)
        return 0
    return _supervise(cfg, pricebook, args.workers)


def _run_worker(cfg: config_mod.Config, pricebook: object | None, reuse_port: bool) -> None:
    from aiohttp import web

    from proxy.app import make_app

    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    _use_event_loop(cfg.event_loop)
    app = make_app(cfg, pricebook)
    app.on_shutdown.append(_hold_further_signals)
    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        print=None,
        access_log=None,
        shutdown_timeout=cfg.shutdown_grace_s,
        handler_cancellation=True,
        reuse_port=reuse_port,
        backlog=1024,  # aiohttp's 128 makes a burst of agents' connections wait for SYN retries
        max_field_size=cfg.max_header_bytes,
        max_line_size=cfg.max_header_bytes,
    )


async def _hold_further_signals(app: object) -> None:
    """Once the drain has begun, log a second SIGTERM/SIGINT instead of letting it through.

    aiohttp would raise GracefulExit again inside its cleanup: in-flight calls cut, exit 1, and every
    record still queued lost. The drain is bounded by shutdown_grace_s anyway; SIGKILL stops at once.
    """
    import asyncio
    import signal

    loop = asyncio.get_running_loop()

    def again() -> None:
        logging.getLogger("metering_proxy").warning(
            "already shutting down: in-flight calls drain, then records are flushed (SIGKILL stops now)"
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, again)


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this worker if the supervisor dies, even by SIGKILL."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers outlive a killed supervisor
        pass


def _use_event_loop(choice: str) -> None:
    """Install uvloop's event loop when asked to, or when installed and the choice is auto."""
    if choice == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop: uvloop is not installed (pip install uvloop)") from None
        return
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _supervise(cfg: config_mod.Config, pricebook: object | None, n: int) -> int:
    """Fork n workers sharing the port; pass SIGINT/SIGTERM on to them once; wait for all."""
    import os
    import signal

    children: list[int] = []
    supervisor = os.getpid()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # worker: its own process group, so a terminal's ^C reaches it only through us
            os.setpgid(0, 0)
            _die_with_parent()
            if os.getppid() != supervisor:  # it died before the death signal was armed
                os._exit(0)
            code = 0
            try:
                _run_worker(cfg, pricebook, reuse_port=True)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                logging.getLogger("metering_proxy").exception("worker crashed")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, raw = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(raw)
    return 0 if status == 0 else 1


def _prices(args: argparse.Namespace) -> int:
    from proxy import pricing

    if args.prices_command == "update":
        ok, message = pricing.update_prices(args.url or pricing.DEFAULT_PRICES_URL)
        print(message)
        return 0 if ok else 1
    cfg = config_mod.load(args.config)
    book = pricing.PriceBook.load(cfg.prices_file, cfg.custom_prices)
    provider = None
    for u in cfg.upstreams:
        if u.name == args.upstream:
            from proxy import providers

            provider = u.provider or providers.from_url(u.base_url)
    print(book.lookup_text(args.model, upstream=args.upstream, provider=provider))
    return 0
