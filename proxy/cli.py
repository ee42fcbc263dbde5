"""Command line: metering-proxy serve | prices | report. main(argv) -> exit code."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import access
from proxy import config as config_mod
from proxy.config import ConfigError

if TYPE_CHECKING:
    from proxy.pricing import PriceBook


def version() -> str:
    """The installed distribution's version; the package's own when running from a source tree."""
    from importlib import metadata

    try:
        return metadata.version("metering-proxy")
    except metadata.PackageNotFoundError:
        import proxy

        return str(getattr(proxy, "__version__", "unknown"))


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for: reading package metadata costs every other command time."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")  # fmt: skip

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:  # fmt: skip
        print(f"metering-proxy {version()}", flush=True)
        parser.exit(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering-proxy", description="Metering proxy for LLM APIs.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on, 1-65535; 0: any free port (default 8787)")
    serve.add_argument("--upstream", help="upstream base URL including /v1 (default https://api.openai.com/v1)")
    serve.add_argument("--runs-dir", help="directory for runs/<run-id>.jsonl (default ./runs)")
    serve.add_argument("--workers", type=int, default=1,
                       help="processes serving one listening socket and sharing the runs dir (default 1)")  # fmt: skip

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
    rep.add_argument("--price-as", action="append", metavar="MODEL|OLD=NEW",
                     help="what-if: re-price the recorded tokens at MODEL's rates (OLD=NEW per model; repeatable)")
    rep.add_argument("--db", metavar="URL",
                     help="read the runs from this PostgreSQL calls table (the fleet's records) instead of files")
    rep.add_argument("--config", type=Path,
                     help="YAML config file: with --db omitted, its ship.postgres database is read if it has one")
    rep.add_argument("--jobs", type=_jobs, default=_default_jobs(), metavar="N",
                     help="processes that read a large run file (32 MiB or more) in parts; 1: this one alone"
                          " (default: the CPUs this process may use, at most 8)")
    demo = sub.add_parser("demo", help="try it with no key: a simulated upstream, two runs, a report, the dashboard")
    demo.add_argument("--port", type=int, default=8787, help="proxy port on 127.0.0.1; 0: any free port (default 8787)")
    demo.add_argument("--runs-dir", default="runs", help="where the demo runs are written (default ./runs)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the simulated answers and prompts (default 7)")
    demo.add_argument("--no-wait", action="store_true",
                      help="exit after printing the report instead of serving the dashboard until Ctrl-C")  # fmt: skip
    return parser


def _default_jobs() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _jobs(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be 1 to 64")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            from proxy import demo as demo_cmd

            return demo_cmd.cli(args)
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


def _pricebook(cfg: config_mod.Config) -> PriceBook:
    """The price table for serve and `prices lookup`; an unreadable one is a ConfigError (one line, exit 2)."""
    from proxy.pricing import PriceBook

    try:
        return PriceBook.load(cfg.prices_file, cfg.custom_prices)
    except ValueError as exc:
        if cfg.prices_file is None:  # the bundled (or cached) table: not something the config said
            raise ConfigError(str(exc)) from None
        raise ConfigError(f"config: prices.file: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    access.check_exposure(cfg)  # before the start line: an open relay must not look like it started
    if args.workers < 1:
        raise ConfigError("--workers: must be >= 1")
    # Also before the bind: a missing uvloop must fail here, not once per worker after the start line.
    # The policy is inherited by forked workers, which create their loops only after the fork.
    _use_event_loop(cfg.event_loop)
    pricebook = _pricebook(cfg)
    try:
        sock = _listen(cfg.host, cfg.port)
    except OSError as exc:
        print(f"metering-proxy: {_listen_error(cfg.host, cfg.port, exc)}", file=sys.stderr)
        return 2
    cfg = replace(cfg, port=int(sock.getsockname()[1]))  # port 0: the one the kernel chose
    print(_start_line(cfg, args.workers), flush=True)
    if args.workers == 1:
        _run_worker(cfg, pricebook, sock)
        return 0
    return _supervise(cfg, pricebook, args.workers, sock)


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port, so that a taken port fails before anything claims to be listening.

    One socket, created here and inherited by every worker: no SO_REUSEPORT, so no other process
    (a second proxy started by mistake) can bind the port too and silently take part of the traffic.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    usable = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not usable:
        raise OSError(errno.EAFNOSUPPORT, "no IPv4 or IPv6 address")
    family, kind, proto, _, address = usable[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":  # restart at once over old connections in TIME_WAIT; never admits a second listener
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it: "::" is IPv6 only
        sock.bind(address)
        sock.listen(1024)  # aiohttp's 128 makes a burst of agents' connections wait for SYN retries
    except BaseException:
        sock.close()
        raise
    return sock


def _host_port(host: str, port: int) -> str:
    shown = host or "0.0.0.0"  # an empty host binds the IPv4 wildcard (the first getaddrinfo answer)
    return f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"


def _listen_error(host: str, port: int, exc: OSError) -> str:
    """One line saying why host:port cannot be listened on and what to change."""
    if isinstance(exc, socket.gaierror):
        why = f"cannot resolve the host ({exc.strerror}; use --host)"
    elif exc.errno == errno.EADDRINUSE:
        why = "address already in use (is another proxy running? use --port)"
    elif exc.errno == errno.EACCES and 0 < port < 1024:
        why = "permission denied (ports below 1024 need privileges; use --port)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"cannot assign requested address (is {host} an address of this machine? use --host)"
    else:
        text = exc.strerror or str(exc)
        why = text[:1].lower() + text[1:]
    return f"cannot listen on {_host_port(host, port)}: {why}"


def _start_line(cfg: config_mod.Config, workers: int) -> str:
    """The one line serve prints: where it listens, forwards and records, and how to point a client at it.

    The host is shown as given (0.0.0.0 included): the line says what was bound, not a guess at which
    of the machine's addresses a client should use.
    """
    base = f"http://{_host_port(cfg.host, cfg.port)}"
    upstreams = ", ".join(f"{u.name}={config_mod.redact_url(u.base_url)}" for u in cfg.upstreams)
    procs = f" ({workers} workers)" if workers > 1 else ""
    return (
        f"metering-proxy listening on {base}/v1{procs} -> forwarding to {upstreams};"
        f" records in {cfg.runs_dir.resolve()}/<run-id>.jsonl; dashboard {base}/ui;"
        f" use it with OPENAI_BASE_URL={base}/v1"
    )


def _run_worker(
    cfg: config_mod.Config, pricebook: PriceBook, sock: socket.socket, multiprocess_dir: Path | None = None,
    shared_budgets: Path | None = None,
) -> None:
    from aiohttp import web

    from proxy.app import make_app

    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    app = make_app(cfg, pricebook, multiprocess_dir=multiprocess_dir, shared_budgets=shared_budgets)
    app.on_startup.append(_freeze_startup_heap)  # after the app's own start-up (cleanup contexts run first)
    app.on_shutdown.append(_hold_further_signals)
    web.run_app(
        app,
        sock=sock,
        print=None,
        access_log=None,
        shutdown_timeout=cfg.shutdown_grace_s,
        handler_cancellation=True,
        backlog=1024,  # asyncio calls listen() again on a given socket, with this backlog
        max_field_size=cfg.max_header_bytes,
        max_line_size=cfg.max_header_bytes,
    )


#: Young-generation threshold of the collector while serving (CPython's default is 700). Nearly everything a
#: call allocates is freed by reference counting when the call ends, but 16 calls in flight keep enough alive
#: that 700 net allocations are reached every few calls: 347 young collections (121 ms) over 9,000 plain calls
#: here, about 13 us a call. At 10,000 the same load ran no collection at all; cyclic garbage waits a little
#: longer, a few kB.
GC_YOUNG_THRESHOLD = 10_000


async def _freeze_startup_heap(app: object) -> None:
    """Move everything loaded at start-up (the price table above all: ~2,000 dicts) out of the collector's way.

    Otherwise every full collection walks it: about 15 ms of pause, every second or so under load (the p99).
    Those objects live as long as the process, so the collector has nothing to gain from them. Then raise the
    young generation's threshold (GC_YOUNG_THRESHOLD).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


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


def _supervise(cfg: config_mod.Config, pricebook: PriceBook, n: int, sock: socket.socket) -> int:
    """Fork n workers serving the one listening socket; pass SIGINT/SIGTERM on to them once; wait for all.

    The workers' metrics meet in a private directory made here, empty, before the fork (prometheus_client's
    multiprocess files); it goes when the supervisor exits (a SIGKILLed supervisor leaves it in the temp dir).
    """
    import shutil
    import tempfile

    metrics_dir = Path(tempfile.mkdtemp(prefix="metering-proxy-metrics-"))
    try:
        return _fork_workers(cfg, pricebook, n, sock, metrics_dir, _shared_budgets(cfg))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _shared_budgets(cfg: config_mod.Config) -> Path | None:
    """The SQLite file the workers keep budgets in, made afresh here: when budgets are set and no Redis is."""
    if not cfg.budgets.configured or cfg.budgets.store.url is not None:
        return None
    from proxy.budget_store import SQLITE_NAME, SqliteStore

    path = cfg.runs_dir / SQLITE_NAME
    SqliteStore.create(path)
    return path


def _fork_workers(
    cfg: config_mod.Config, pricebook: PriceBook, n: int, sock: socket.socket, metrics_dir: Path,
    shared_budgets: Path | None = None,
) -> int:
    import signal

    from prometheus_client.multiprocess import mark_process_dead

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
                _run_worker(cfg, pricebook, sock, metrics_dir, shared_budgets)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                logging.getLogger("metering_proxy").exception("worker crashed")
                code = 1
            os._exit(code)
        children.append(pid)
    # The workers hold the socket now. A copy kept open here would keep the port accepting after the
    # workers closed theirs to drain: connections queued in the kernel that no process will ever serve.
    sock.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    left = set(children)
    while left:  # in the order they end, so that each one's live gauges go as soon as it is gone
        child, raw = os.wait()
        if child not in left:
            continue
        left.discard(child)
        mark_process_dead(child, str(metrics_dir))  # its pending/healthy gauges; its counters stay counted
        status = status or os.waitstatus_to_exitcode(raw)
    return 0 if status == 0 else 1


def _prices(args: argparse.Namespace) -> int:
    from proxy import prices_cmd

    if args.prices_command == "update":
        ok, message = prices_cmd.update_prices(args.url or prices_cmd.DEFAULT_PRICES_URL)
        print(message)
        return 0 if ok else 1
    cfg = config_mod.load(args.config)
    book = _pricebook(cfg)
    provider = None
    for u in cfg.upstreams:
        if u.name == args.upstream:
            from proxy import providers

            provider = u.provider or providers.from_url(u.base_url)
    found = book.explain(args.model, upstream=args.upstream, provider=provider)
    print(prices_cmd.explanation_text(found))
    return 0 if found.priced else 1  # scripts can tell "unpriced" from a price
