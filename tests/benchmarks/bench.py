#!/usr/bin/env python
"""metering-proxy benchmark: the proxy against a thin pass-through (and a direct connection), on this machine.

    python tests/benchmarks/bench.py [--quick] [--json OUT] [--workers N] [--profile] [--no-report] ...

Starts a fast fake OpenAI upstream, the metering proxy (recording into a temp runs dir), the thin
pass-through (passthrough.py: same event loop, parses the request JSON and a plain answer's usage,
streams chunks through, no metering) and, when installed, LiteLLM's proxy; drives the same load at
each of them in turn from a separate load-generator process (wrk when installed, else loadgen.py),
times `metering-proxy report` over a large run file (report_bench.py), and prints one table:
metric, value, target, pass/fail. The headline rows are proxy/thin ratios; the comparisons with a
direct connection follow as info. See README.md beside this file.

Everything listens on 127.0.0.1; every phase is bounded in calls and seconds; every child process
is started in its own process group and killed on exit.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TICK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
MODEL = "gpt-4o-mini"
CLIENT_KEY = "sk-bench-not-a-key"  # what clients send as their API key (the fake upstream ignores it)
STREAM_CHUNKS = 20  # content chunks per stream in the throughput and soak phases
FLUSH_MS = 200  # the proxy's flush interval (its default), written into the temp config

CONCURRENCIES = (1, 16, 64)  # throughput phases, each non-streaming and with 20-chunk streams
REPORT_RECORDS = 1_000_000  # the report target is for this many records

# Issue 16's targets, all against the thin pass-through (passthrough.py) except RSS and the report.
TARGETS = {
    "thin_ratio": 0.90,  # throughput >= 0.9x thin at c16, non-streaming and 20-chunk streams
    "p99_vs_thin": 1.5,  # p99 latency at c16 (wrk) <= 1.5x thin's, both kinds
    "cpu_call_vs_thin": 1.2,  # proxy CPU per non-streaming call (c16) <= 1.2x thin's
    "extra_chunk_us": 2.0,  # marginal CPU per streamed chunk <= thin's + 2 us
    "added_p50_ms": 0.1,  # p50 at c1 (sequential) <= thin's + 0.1 ms
    "rss_mb": 100.0,  # RSS with 1,000 concurrent streams
    "soak_growth_mb": 5.0,  # "flat": growth from 10% of the soak to its end
    "report_s": 3.0,  # `metering-proxy report` over 1,000,000 records, wall seconds
    "report_rss_mb": 120.0,  # ... and its peak RSS
    "ttft_ms": 2.0,  # |recorded ttft - truth|
}


class Settings:
    """How long and how many, full or --quick."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.round_s = 2 if quick else 3  # one load run of a c16 throughput phase (whole seconds: wrk's -d)
        self.side_round_s = 1 if quick else 3  # the same for c1 and c64 (no target rides on them) and workers
        self.rounds = 2 if quick else 3  # alternating rounds per throughput phase (direct, proxy, thin, ...)
        self.warmup_s = 1  # once per target at start, non-streaming and streaming
        self.litellm_rounds = 1 if quick else 2  # LiteLLM only needs a rough figure (~1% of direct)
        self.litellm_round_s = 2 if quick else 3
        self.lat_rounds = 2 if quick else 3
        self.lat_calls = 500 if quick else 1500  # per round per target
        self.lat_warmup = 20
        self.ttft_calls = 30 if quick else 100
        self.ttft_direct_calls = 20 if quick else 40
        self.ttft_delay_ms = 50
        self.slow_streams = 1000
        self.slow_chunks = 20
        self.slow_delay_ms = 100
        self.soak_calls = 10_000 if quick else 100_000
        self.soak_concurrency = 16
        self.soak_stream_every = 4  # every 4th soak call is a 20-chunk stream
        self.soak_limit_s = 60 if quick else 150
        self.report_timeout_s = 900  # a first run builds the 1.3 GB file (about 35 s), then reuses it


# -- processes -------------------------------------------------------------------------------


class Procs:
    """Children in their own process groups; all killed (group-wide) by close()."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        out = subprocess.PIPE if stdout_pipe else open(self.logdir / f"{name}.out", "ab")  # noqa: SIM115
        err = open(self.logdir / f"{name}.err", "ab")  # noqa: SIM115

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        p = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pin,
            env=env,
            cwd=cwd,
        )
        self.items.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 10.0) -> int | None:
        """Signal p's process group, wait up to `wait` s, then SIGKILL the group."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # stragglers of the group (workers), if any
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(5)
        return p.returncode

    def close(self) -> None:
        for p in reversed(self.items):
            self.stop(p, wait=3.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_file_line(path: Path, prefix: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited with {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise RuntimeError(f"{path.stem} not ready after {timeout} s")


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no answer on port {port} after {timeout} s")


# -- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """pid and its live descendants (for a proxy that forks workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_s(pid: int) -> float:
    """utime + stime of pid's process tree (all threads), in seconds."""
    total = 0
    for p in tree(pid):
        f = _stat_fields(p)
        if f is not None:
            total += int(f[11]) + int(f[12])
    return total / TICK


def rss_mb(pid: int) -> float:
    """VmRSS of pid's process tree, in MB (10^6 bytes)."""
    kib = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
        except FileNotFoundError:
            pass
    return kib * 1024 / 1e6


def wait_idle(limit_s: float, below: float = 0.10) -> tuple[float, float]:
    """Wait (at most limit_s) until the machine's user+system CPU over 3 s is below `below` of all
    CPUs; return (seconds waited, last busy fraction)."""
    t0 = time.monotonic()
    ncpu = os.cpu_count() or 1
    while True:
        b0 = system_cpu_s()[0]
        time.sleep(3)
        frac = (system_cpu_s()[0] - b0) / 3 / ncpu
        waited = time.monotonic() - t0
        if frac < below or waited >= limit_s:
            return waited, frac


def system_cpu_s() -> tuple[float, float, float]:
    """(user+system, irq+softirq, steal) CPU seconds of the whole machine since boot, from /proc/stat.

    Loopback packet processing runs as softirq and is charged to no process, so it is kept apart.
    """
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system) / TICK, (irq + softirq) / TICK, steal / TICK


class RssSampler:
    """Samples a process tree's RSS every `every` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.every = pid, every
        self.peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_mb(self.pid))
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self.peak = rss_mb(self.pid)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(2)


# -- load ------------------------------------------------------------------------------------


class Load:
    """Runs one load-generator process at a time (wrk or loadgen.py) and parses its result."""

    def __init__(self, procs: Procs, tmp: Path, use_wrk: bool) -> None:
        self.procs, self.tmp, self.use_wrk = procs, tmp, use_wrk
        self.wrk = shutil.which("wrk") if use_wrk else None

    def _run(self, cmd: list[str], timeout: float, on_line: Any = None) -> str:
        p = self.procs.start("loadgen", cmd, stdout_pipe=True)
        killer = threading.Timer(timeout, lambda: self.procs.stop(p, signal.SIGKILL, 1))
        killer.start()
        lines = []
        try:
            assert p.stdout is not None
            for raw in p.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            p.wait(10)
        finally:
            killer.cancel()
            self.procs.items.remove(p)
        for line in lines:
            for tag in ("RESULT ", "WRKJSON "):
                if line.startswith(tag):
                    return line[len(tag) :]
        raise RuntimeError(f"load generator gave no result (exit {p.returncode}): {' '.join(cmd)[:200]}")

    def timed(
        self, port: int, stream: bool, concurrency: int, seconds: float, run_id: str, auth: str = CLIENT_KEY
    ) -> dict[str, Any]:
        """Closed-loop load for `seconds`; returns completed, errors, non2xx, elapsed_s, rps, strict."""
        headers = {"X-Fake-Chunks": str(STREAM_CHUNKS)}
        if self.wrk:
            body = orjson.dumps({**BODY, "stream": True} if stream else BODY).decode()
            script = self.tmp / f"wrk-{run_id}.lua"
            script.write_text(WRK_LUA.format(body=body, run_id=run_id, chunks=STREAM_CHUNKS, auth=auth))
            cmd = [
                self.wrk,
                "-t1",
                f"-c{concurrency}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/v1/chat/completions",
            ]
            r = orjson.loads(self._run(cmd, seconds + 30))
            errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
            elapsed = r["duration_us"] / 1e6
            return {
                "completed": r["requests"],
                "errors": errors,
                "non2xx": r["status"],
                "elapsed_s": elapsed,
                "rps": r["requests"] / elapsed,
                "strict": False,
                "p50_us": r["p50_us"],
                "p99_us": r["p99_us"],
            }
        cmd = [
            PY,
            str(HERE / "loadgen.py"),
            "throughput",
            "--port",
            str(port),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(seconds),
            "--run-id",
            run_id,
            "--hard-limit",
            str(seconds + 60),
        ]
        cmd += ["--stream"] if stream else []
        cmd += ["--auth", auth]
        cmd += [a for k, v in headers.items() for a in ("--header", f"{k}: {v}")]
        r = orjson.loads(self._run(cmd, seconds + 90))
        return {
            "completed": r["completed"],
            "errors": r["errors"],
            "non2xx": r["non2xx"],
            "elapsed_s": r["elapsed_s"],
            "rps": r["rps"],
            "strict": True,
        }

    def py(self, mode: str, port: int, run_id: str, timeout: float, *extra: str, on_line: Any = None) -> dict:
        cmd = [PY, str(HERE / "loadgen.py"), mode, "--port", str(port), "--run-id", run_id, *extra]
        return orjson.loads(self._run(cmd, timeout, on_line))


BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in five words."},
    ],
    "max_tokens": 64,
}

WRK_LUA = """-- generated by bench.py: one fixed request, static so that wrk builds it once
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {auth}"
wrk.headers["X-Run-Id"] = "{run_id}"
wrk.headers["X-Fake-Chunks"] = "{chunks}"

done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.s = Settings(args.quick)
        self.tmp = Path(tempfile.mkdtemp(prefix="metering-bench-"))
        self.runs = self.tmp / "runs"
        self.procs = Procs(self.tmp)
        self.load = Load(self.procs, self.tmp, use_wrk=args.loadgen != "python")
        self.expected: dict[str, dict[str, Any]] = {}  # run_id -> calls made through the proxy
        self.res: dict[str, Any] = {"phases": {}}
        self.rows: list[tuple[str, str, str, str]] = []
        self.sections: dict[int, str] = {}  # row index -> heading printed above it
        cpus = sorted(os.sched_getaffinity(0))
        pin = args.pin and len(cpus) >= 2
        self.cpu_proxy = cpus[0] if pin else None
        self.cpu_upstream = cpus[-1] if pin else None
        self.servers: dict[str, dict[str, Any]] = {}  # name -> {port, proc}
        self.t_start = time.monotonic()
        self.litellm_key = CLIENT_KEY
        self.thin_loop = "?"  # the event loop passthrough.py runs on (its LOOP line)
        self.ttft_client: dict[str, float] = {}
        self.ttft_upstream: dict[str, float] = {}
        self.noise = {"busy_s": 0.0, "ours_s": 0.0, "softirq_s": 0.0, "steal_s": 0.0, "wall_s": 0.0}

    # -- set-up ---------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def start_upstream(self) -> None:
        cmd = [PY, str(HERE / "fake_upstream.py"), "--port", "0", "--impl", self.args.upstream_impl]
        p = self.procs.start("upstream", cmd, cpu=self.cpu_upstream)
        port = int(wait_file_line(self.tmp / "upstream.out", "READY ", p, 15).split()[1])
        self.servers["direct"] = {"port": port, "proc": p}
        self.upstream_url = f"http://127.0.0.1:{port}/v1"

    def proxy_config(self, name: str) -> Path:
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(f"log_level: warning\nflush_interval_ms: {FLUSH_MS}\nshutdown_grace_s: 5\n")
        return cfg

    def start_proxy(self, name: str, workers: int | None = None) -> str | None:
        """Start `python -m proxy serve`; return None, or why it could not start."""
        port = free_port()
        cmd = [
            PY,
            "-m",
            "proxy",
            "serve",
            "--port",
            str(port),
            "--upstream",
            self.upstream_url,
            "--runs-dir",
            str(self.runs),
            "--config",
            str(self.proxy_config(name)),
        ]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = self.procs.start(name, cmd, cpu=self.cpu_proxy if workers is None else None, env=env, cwd=ROOT)
        try:
            wait_http(port, "/healthz", p, 30)
        except RuntimeError as exc:
            self.procs.stop(p)
            err = (self.tmp / f"{name}.err").read_text(errors="replace")
            if "unrecognized arguments" in err:
                return "serve rejects " + " ".join(cmd[cmd.index("--workers") :]) if workers else err[-300:]
            return f"{exc}: {err.strip()[-300:]}"
        self.servers[name] = {"port": port, "proc": p}
        return None

    def start_thin(self) -> None:
        port = free_port()
        cmd = [PY, str(HERE / "passthrough.py"), "--port", str(port), "--upstream", self.upstream_url]
        p = self.procs.start("thin", cmd, cpu=self.cpu_proxy)
        wait_file_line(self.tmp / "thin.out", "READY ", p, 15)
        self.thin_loop = wait_file_line(self.tmp / "thin.out", "LOOP ", p, 1).split()[1]
        wait_http(port, "/healthz", p, 15)  # 404 from the pass-through itself is fine
        self.servers["thin"] = {"port": port, "proc": p}

    def litellm_python(self) -> str | None:
        py = self.args.litellm_python or PY
        try:
            ok = subprocess.run([py, "-c", "import litellm"], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        return py if ok else None

    def start_litellm(self, py: str) -> str | None:
        port = free_port()
        cfg = self.tmp / "litellm.yaml"
        self.litellm_key = "sk-" + os.urandom(24).hex()  # LiteLLM refuses to start without a master key
        cfg.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {self.upstream_url}\n"
            "      api_key: sk-bench-not-a-key\n"
            "litellm_settings:\n  telemetry: false\n  set_verbose: false\n"
            f"general_settings:\n  master_key: {self.litellm_key}\n"
        )
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "NO_PROXY": "*",
        }
        env.pop("DATABASE_URL", None)
        cmd = [
            py,
            "-m",
            "litellm.proxy.proxy_cli",
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        p = self.procs.start("litellm", cmd, cpu=self.cpu_proxy, env=env)
        try:
            wait_http(port, "/health/liveliness", p, 90)
        except RuntimeError as exc:
            self.procs.stop(p)
            return f"LiteLLM did not start: {exc} (see litellm.err in the temp dir; --keep keeps it)"
        self.servers["litellm"] = {"port": port, "proc": p}
        return None

    # -- phases ---------------------------------------------------------------------------

    def expect(self, run_id: str, r: dict[str, Any], slack: int) -> None:
        e = self.expected.setdefault(run_id, {"calls": 0, "slack": 0, "strict": True})
        e["calls"] += r["completed"] + r["errors"]
        if not r.get("strict", True):
            e["strict"] = False
            e["slack"] += slack

    def ours_cpu_s(self) -> float:
        """CPU of every process this benchmark started: live servers plus waited-for children."""
        live = sum(cpu_s(v["proc"].pid) for v in self.servers.values() if v["proc"].poll() is None)
        ch, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        return live + ch.ru_utime + ch.ru_stime + me.ru_utime + me.ru_stime

    def throughput(
        self,
        kind: str,
        concurrency: int,
        targets: list[str],
        tag: str = "",
        rounds: int = 0,
        seconds: int = 0,
    ) -> dict[str, Any]:
        busy0, irq0, steal0 = system_cpu_s()
        ours0, wall0 = self.ours_cpu_s(), time.monotonic()
        try:
            return self._throughput(kind, concurrency, targets, tag, rounds or self.s.rounds, seconds or self.s.round_s)
        finally:
            busy1, irq1, steal1 = system_cpu_s()
            n = self.noise
            n["busy_s"] += busy1 - busy0
            n["softirq_s"] += irq1 - irq0
            n["steal_s"] += steal1 - steal0
            n["ours_s"] += self.ours_cpu_s() - ours0
            n["wall_s"] += time.monotonic() - wall0

    def _throughput(
        self, kind: str, concurrency: int, targets: list[str], tag: str, rounds: int, seconds: int
    ) -> dict[str, Any]:
        stream = kind == "stream"
        name = f"{kind}_c{concurrency}{tag}"
        self.log(f"throughput {name}: {', '.join(targets)} x {rounds} rounds of {seconds} s")
        out: dict[str, Any] = {t: {"rounds": []} for t in targets}
        for i in range(rounds):
            for t in targets:
                srv = self.servers[t]
                pid = srv["proc"].pid
                run_id = f"{name}-{t}-r{i}"
                c0 = cpu_s(pid)
                auth = self.litellm_key if t == "litellm" else CLIENT_KEY
                r = self.load.timed(srv["port"], stream, concurrency, seconds, run_id, auth)
                r["cpu_s"] = cpu_s(pid) - c0
                out[t]["rounds"].append(r)
                if t not in ("direct", "thin", "litellm"):
                    self.expect(run_id, r, concurrency)
        for t in targets:
            rs: list[dict[str, Any]] = out[t]["rounds"]
            done = sum(x["completed"] for x in rs)
            secs = sum(x["elapsed_s"] for x in rs)
            cpu = sum(x["cpu_s"] for x in rs)
            p99s = [x["p99_us"] for x in rs if x.get("p99_us")]  # wrk only
            p50s = [x["p50_us"] for x in rs if x.get("p50_us")]
            out[t].update(
                rps=done / secs if secs else 0.0,
                completed=done,
                errors=sum(x["errors"] for x in rs),
                non2xx=sum(x["non2xx"] for x in rs),
                cpu_us_per_call=cpu / done * 1e6 if done else None,
                cpu_util=cpu / secs if secs else None,
                p50_us=statistics.fmean(p50s) if p50s else None,  # mean of the rounds' wrk p50
                p99_us=statistics.fmean(p99s) if p99s else None,  # mean of the rounds' wrk p99
            )
        # ratio / round_ratios: to direct (info); ratio_thin / round_ratios_thin: to the thin pass-through
        for ref, suffix in (("direct", ""), ("thin", "_thin")):
            if ref not in out:
                continue
            base = out[ref]["rps"]
            for t in targets:
                out[t]["ratio" + suffix] = out[t]["rps"] / base if base else None
                out[t]["round_ratios" + suffix] = [
                    r["rps"] / d["rps"] if d["rps"] else None
                    for r, d in zip(out[t]["rounds"], out[ref]["rounds"], strict=True)
                ]
        self.res["phases"][name] = out
        summary = ", ".join(f"{t} {out[t]['rps']:.0f}/s" for t in targets)
        self.log(f"  {summary}")
        return out

    def warmup(self, targets: list[str]) -> None:
        """One short load of each kind per target: connection pools, caches, first-call costs."""
        self.log(f"warm-up: {self.s.warmup_s} s non-streaming + {self.s.warmup_s} s streaming per target")
        for t in targets:
            for stream in (False, True):
                run_id = f"warmup-{t}-{'stream' if stream else 'nonstream'}"
                auth = self.litellm_key if t == "litellm" else CLIENT_KEY
                r = self.load.timed(self.servers[t]["port"], stream, 16, self.s.warmup_s, run_id, auth)
                if t not in ("direct", "thin", "litellm"):
                    self.expect(run_id, r, 16)

    def latency(self) -> dict[str, Any]:
        s = self.s
        targets = ["direct", "proxy", "thin"]
        self.log(f"latency c1: {s.lat_rounds} rounds x {s.lat_calls} sequential calls per target")
        lat: dict[str, list[float]] = {t: [] for t in targets}
        errors: Counter[str] = Counter()
        for i in range(s.lat_rounds):
            for t in targets:
                run_id = f"latency-{t}-r{i}"
                r = self.load.py(
                    "latency",
                    self.servers[t]["port"],
                    run_id,
                    120,
                    "--calls",
                    str(s.lat_calls + s.lat_warmup),
                    "--header",
                    "X-Fake-Chunks: 20",
                )
                lat[t] += r["latency_us"][s.lat_warmup :]
                errors[t] += r["errors"] + r["non2xx"]
                if t == "proxy":
                    self.expect(run_id, r, 0)
        out: dict[str, Any] = {}
        for t in targets:
            xs = sorted(lat[t])
            out[t] = {
                "n": len(xs),
                "errors": errors[t],
                "p50_us": pct(xs, 50),
                "p90_us": pct(xs, 90),
                "p99_us": pct(xs, 99),
                "mean_us": statistics.fmean(xs) if xs else None,
            }
        for t in ("proxy", "thin"):  # added over direct (info)
            out[t]["added_p50_ms"] = (out[t]["p50_us"] - out["direct"]["p50_us"]) / 1000
            out[t]["added_p99_ms"] = (out[t]["p99_us"] - out["direct"]["p99_us"]) / 1000
        out["proxy"]["added_p50_vs_thin_ms"] = (out["proxy"]["p50_us"] - out["thin"]["p50_us"]) / 1000
        out["proxy"]["added_p99_vs_thin_ms"] = (out["proxy"]["p99_us"] - out["thin"]["p99_us"]) / 1000
        self.res["phases"]["latency_c1"] = out
        self.log(
            f"  p50 direct {out['direct']['p50_us']:.0f} us, proxy {out['proxy']['p50_us']:.0f} us, "
            f"thin {out['thin']['p50_us']:.0f} us"
        )
        return out

    def ttft(self) -> dict[str, Any]:
        s = self.s
        self.log(f"ttft: {s.ttft_calls} streams with a {s.ttft_delay_ms} ms first-token delay")
        hdr = ["--stream", "--header", f"X-Fake-Ttft-Ms: {s.ttft_delay_ms}", "--header", "X-Fake-Chunks: 5"]
        port = self.servers["direct"]["port"]
        d = self.load.py("ttft", port, "ttft-direct", 60, "--calls", str(s.ttft_direct_calls), "--seq-tag", "d", *hdr)
        p = self.load.py(
            "ttft",
            self.servers["proxy"]["port"],
            "ttft",
            60,
            "--calls",
            str(s.ttft_calls),
            "--seq-tag",
            "p",
            *hdr,
        )
        self.expect("ttft", p, 0)
        # What the upstream itself saw: request in -> first content chunk written, per call.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/_bench/stats")
        self.ttft_upstream = orjson.loads(conn.getresponse().read())["ttft"]
        conn.close()
        self.ttft_client = {f"p{i}": x for i, x in zip(p["seq"], p["ttft_ms"], strict=True) if x is not None}
        direct_client = [x for x in d["ttft_ms"] if x is not None]
        direct_overhead = [
            x - self.ttft_upstream[f"d{i}"]
            for i, x in zip(d["seq"], d["ttft_ms"], strict=True)
            if x is not None and f"d{i}" in self.ttft_upstream
        ]
        out = {
            "configured_ms": s.ttft_delay_ms,
            "calls": p["completed"],
            "errors": p["errors"] + p["non2xx"],
            "direct_client_mean_ms": mean(direct_client),
            "direct_client_max_ms": max(direct_client, default=None),
            "direct_client_minus_upstream_mean_ms": mean(direct_overhead),
            "proxy_client_ms": p["ttft_ms"],
            "upstream_ms": self.ttft_upstream,
        }
        self.res["phases"]["ttft"] = out
        return out

    def slow_streams(self) -> dict[str, Any]:
        s = self.s
        pid = self.servers["proxy"]["proc"].pid
        self.log(f"rss: {s.slow_streams} concurrent streams of {s.slow_chunks} chunks every {s.slow_delay_ms} ms")
        before = rss_mb(pid)
        with RssSampler(pid) as sampler:
            r = self.load.py(
                "slow",
                self.servers["proxy"]["port"],
                "slow",
                180,
                "--calls",
                str(s.slow_streams),
                "--stream",
                "--header",
                f"X-Fake-Chunks: {s.slow_chunks}",
                "--header",
                f"X-Fake-Delay-Ms: {s.slow_delay_ms}",
                "--hard-limit",
                "120",
            )
        self.expect("slow", r, 0)
        time.sleep(0.5)
        out = {
            "streams": s.slow_streams,
            "completed": r["completed"],
            "ok": r["ok"],
            "errors": r["errors"],
            "max_open": r["max_open"],
            "elapsed_s": r["elapsed_s"],
            "rss_before_mb": before,
            "rss_peak_mb": sampler.peak,
            "rss_after_mb": rss_mb(pid),
            "samples": sampler.samples,
        }
        self.res["phases"]["slow_streams"] = out
        self.log(f"  peak RSS {out['rss_peak_mb']:.1f} MB, {r['max_open']} streams open at once")
        return out

    def soak(self) -> dict[str, Any]:
        s = self.s
        pid = self.servers["proxy"]["proc"].pid
        n = s.soak_calls
        self.log(f"soak: {n} calls at c{s.soak_concurrency}, every {s.soak_stream_every}th a stream")
        points: list[tuple[int, float]] = [(0, rss_mb(pid))]

        def on_line(line: str) -> None:
            if line.startswith("PROGRESS "):
                points.append((int(line.split()[1]), rss_mb(pid)))

        r = self.load.py(
            "throughput",
            self.servers["proxy"]["port"],
            "soak",
            s.soak_limit_s + 120,
            "--calls",
            str(n),
            "--concurrency",
            str(s.soak_concurrency),
            "--stream-every",
            str(s.soak_stream_every),
            "--header",
            f"X-Fake-Chunks: {STREAM_CHUNKS}",
            "--progress-every",
            str(max(1, n // 10)),
            "--hard-limit",
            str(s.soak_limit_s),
            on_line=on_line,
        )
        self.expect("soak", r, 0)
        time.sleep(0.3)
        points.append((r["completed"] + r["errors"], rss_mb(pid)))
        # Records on disk while the proxy runs: wait for its flush (bounded), then count the soak file.
        calls = r["completed"] + r["errors"]
        deadline = time.monotonic() + 10 * FLUSH_MS / 1000 + 2
        on_disk = 0
        while time.monotonic() < deadline:
            time.sleep(FLUSH_MS / 1000)
            on_disk = count_lines(self.runs / "soak.jsonl")
            if on_disk >= calls:
                break
        tenth = next((rss for done, rss in points if done >= n // 10 and done > 0), points[-1][1])
        out = {
            "calls": calls,
            "completed": r["completed"],
            "errors": r["errors"],
            "non2xx": r["non2xx"],
            "rps": r["rps"],
            "elapsed_s": r["elapsed_s"],
            "hard_limit_hit": r["hard_limit_hit"],
            "rss_points": points,
            "rss_start_mb": points[0][1],
            "rss_10pct_mb": tenth,
            "rss_end_mb": points[-1][1],
            "growth_mb": points[-1][1] - tenth,
            "records_on_disk_after_flush": on_disk,
        }
        self.res["phases"]["soak"] = out
        self.log(
            f"  {calls} calls in {r['elapsed_s']:.1f} s; RSS {points[0][1]:.1f} -> {tenth:.1f} -> "
            f"{points[-1][1]:.1f} MB; {on_disk} records on disk"
        )
        return out

    def litellm_phase(self) -> str | None:
        """The throughput rows against LiteLLM's proxy, started only for this phase (it would steal
        the proxy's CPU if it idled beside it). Returns None, or why the rows are skipped."""
        if self.args.no_litellm:
            return "--no-litellm"
        py = self.litellm_python()
        if py is None:
            return "litellm not importable here (pip install 'litellm[proxy]', or --litellm-python PATH)"
        self.log("litellm: starting LiteLLM's proxy")
        why = self.start_litellm(py)
        if why is not None:
            return why
        self.warmup(["litellm"])
        for kind in ("nonstream", "stream"):
            for c in (16, 64):
                self.throughput(
                    kind,
                    c,
                    ["direct", "litellm"],
                    tag="_litellm",
                    rounds=self.s.litellm_rounds,
                    seconds=self.s.litellm_round_s,
                )
        self.procs.stop(self.servers["litellm"]["proc"])
        return None

    def workers_phase(self, n: int) -> dict[str, Any]:
        name = f"proxy_w{n}"
        self.log(f"workers: starting serve --workers {n}")
        why = self.start_proxy(name, workers=n)
        out: dict[str, Any]
        if why is not None:
            out = {"skipped": why}
            self.res["phases"]["workers"] = out
            self.log(f"  skipped: {why}")
            return out
        out = {"workers": n}
        for kind in ("nonstream", "stream"):
            out[kind] = self.throughput(kind, 64, ["direct", name], tag=f"_w{n}", seconds=self.s.side_round_s)
        self.procs.stop(self.servers[name]["proc"], signal.SIGTERM, 30)
        self.res["phases"]["workers"] = out
        return out

    def profile(self) -> dict[str, Any]:
        spy = shutil.which("py-spy")
        if spy is None:
            return {"skipped": "py-spy not installed (pip install py-spy)"}
        pid = self.servers["proxy"]["proc"].pid
        secs = max(3, int(self.s.round_s))
        self.log(f"profile: py-spy on the proxy for {secs} s of non-streaming c16 load")
        raw = self.tmp / "profile.folded"
        p = self.procs.start(
            "py-spy",
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(secs + 1),
                "--rate",
                "250",
                "--format",
                "raw",
                "--gil",  # only the thread holding the GIL: where the event loop's time goes
                "--nonblocking",  # do not pause the proxy for each sample
                "--output",
                str(raw),
            ],
        )
        time.sleep(1.0)
        r = self.load.timed(self.servers["proxy"]["port"], False, 16, secs, "profile")
        self.expect("profile", r, 16)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            self.procs.stop(p)
        if not raw.exists():
            return {"skipped": "py-spy wrote nothing: " + (self.tmp / "py-spy.err").read_text()[-300:]}
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()  # inclusive samples of the proxy's own functions
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            # "func (file.py:123)" -> "func (file.py)": a function's samples on all its lines together
            frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")] if stack.strip() else []
            own[frames[-1] if frames else "(no Python frame: native code, GC)"] += int(count)
            for f in set(frames):
                if "(proxy/" in f and "(proxy/cli.py)" not in f and "(proxy/__main__.py)" not in f:
                    incl[f] += int(count)
            total += int(count)
        keep = Path(self.args.profile_out)
        shutil.copy(raw, keep)
        top = [{"function": f, "samples": c, "pct": 100 * c / total} for f, c in own.most_common(15)]
        top_incl = [{"function": f, "samples": c, "pct": 100 * c / total} for f, c in incl.most_common(12)]
        out = {"samples": total, "top_own": top, "top_proxy_inclusive": top_incl, "folded": str(keep)}
        self.res["phases"]["profile"] = out
        return out

    def report_phase(self) -> dict[str, Any]:
        """`metering-proxy report` over a large run file, timed by report_bench.py in a child process.

        report_bench.py builds the file under /tmp on its first use for a record count (1,000,000 records:
        about 1.3 GB and 35 s) and reuses it after. It runs after the proxy has stopped, so nothing else
        the benchmark started is busy.
        """
        a = self.args
        if a.no_report:
            return {"skipped": "--no-report"}
        script = HERE / "report_bench.py"
        if not script.exists():
            return {"skipped": f"{script.name} not found"}
        n = a.report_records
        self.log(f"report: report_bench.py over {n:,} records (builds the file under /tmp on first use)")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                [PY, str(script), "--json", "--repeat", "1", "--records", str(n)],
                capture_output=True,
                timeout=self.s.report_timeout_s,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return {"records": n, "failed": f"timed out after {self.s.report_timeout_s} s"}
        wall = time.monotonic() - t0
        line = next((x for x in reversed(p.stdout.decode(errors="replace").splitlines()) if x.startswith("{")), "")
        if p.returncode != 0 or not line:
            err = p.stderr.decode(errors="replace").strip()[-300:]
            return {"records": n, "failed": f"exit {p.returncode}: {err}"}
        r = orjson.loads(line)
        # report_bench gives ru_maxrss / 1024 (MiB); the benchmark's MB are 10^6 bytes
        rss = [x * 1.048576 for x in r["rss_mb"]]
        out = {
            "records": r.get("records", n),
            "file_mb": r.get("file_mb"),
            "wall_s": min(r["wall_s"]),
            "rss_mb": max(rss),
            # report --jobs: the largest forked worker's peak (they share the parent's pages until written)
            "worker_rss_mb": max(x * 1.048576 for x in r.get("worker_rss_mb", [0.0])),
            "runs_wall_s": r["wall_s"],
            "runs_rss_mib": r["rss_mb"],
            "phase_s": wall,
            "stderr": p.stderr.decode(errors="replace").strip()[-300:],
        }
        self.log(f"  report over {n:,} records: {out['wall_s']:.2f} s, peak RSS {out['rss_mb']:.0f} MB")
        return out

    # -- records --------------------------------------------------------------------------

    def check_records(self) -> dict[str, Any]:
        """SIGTERM the proxy (which flushes), then compare the lines of each run file to the calls made."""
        p = self.servers["proxy"]["proc"]
        t0 = time.monotonic()
        code = self.procs.stop(p, signal.SIGTERM, 40)
        self.log(f"proxy stopped (exit {code}) in {time.monotonic() - t0:.1f} s; counting records")
        runs: dict[str, Any] = {}
        for run_id, e in sorted(self.expected.items()):
            path = self.runs / f"{run_id}.jsonl"
            lines = path.read_bytes().splitlines() if path.exists() else []
            cats: Counter[str] = Counter()
            ok = 0
            ttfts = []
            # (recorded ttft, the upstream's own first-token time, the client's ttft), per call
            triples = []
            for line in lines:
                rec = orjson.loads(line)
                if rec.get("success"):
                    ok += 1
                else:
                    cats[(rec.get("error") or {}).get("category", "?")] += 1
                if run_id == "ttft" and rec.get("ttft_ms") is not None:
                    ttfts.append(rec["ttft_ms"])
                    seq = (rec.get("tags") or {}).get("bench-seq")
                    if seq in self.ttft_client and seq in self.ttft_upstream:
                        triples.append((rec["ttft_ms"], self.ttft_upstream[seq], self.ttft_client[seq]))
            n = len(lines)
            good = n == e["calls"] if e["strict"] else e["calls"] <= n <= e["calls"] + e["slack"]
            runs[run_id] = {
                "records": n,
                "calls": e["calls"],
                "strict": e["strict"],
                "slack": e["slack"],
                "success": ok,
                "errors": dict(cats),
                "match": good,
            }
            if ttfts:
                self.res["phases"]["ttft"]["record_ttft_ms"] = ttfts
                self.res["phases"]["ttft"]["triples_ms"] = triples
        strict = [r for r in runs.values() if r["strict"]]
        loose = [r for r in runs.values() if not r["strict"]]
        out = {
            "proxy_exit": code,
            "runs": runs,
            "strict_calls": sum(r["calls"] for r in strict),
            "strict_records": sum(r["records"] for r in strict),
            "strict_match": all(r["match"] for r in strict),
            "wrk_calls": sum(r["calls"] for r in loose),
            "wrk_records": sum(r["records"] for r in loose),
            "wrk_match": all(r["match"] for r in loose),
            "extra_files": sorted(f.name for f in self.runs.glob("*.jsonl") if f.stem not in self.expected),
        }
        self.res["phases"]["records"] = out
        return out

    # -- run ------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        self.log(f"temp dir {self.tmp}")
        self.start_upstream()
        why = self.start_proxy("proxy")
        if why is not None:
            raise RuntimeError(f"the proxy did not start: {why}")
        self.start_thin()
        targets = ["direct", "proxy", "thin"]
        self.res["setup"] = self.setup()
        self.log("setup: " + ", ".join(f"{k}={v}" for k, v in self.res["setup"].items()))
        self.warmup(targets)
        for kind in ("nonstream", "stream"):
            for c in CONCURRENCIES:
                self.throughput(kind, c, targets, seconds=self.s.round_s if c == 16 else self.s.side_round_s)
        self.latency()
        self.ttft()
        self.slow_streams()
        self.soak()
        if a.profile:
            self.res["phases"]["profile"] = self.profile()
        if a.workers and a.workers > 1:
            self.workers_phase(a.workers)
        else:
            self.res["phases"]["workers"] = {"skipped": "--workers 1"}
        self.res["litellm_note"] = self.litellm_phase()
        self.check_records()
        self.res["phases"]["report"] = self.report_phase()
        self.res["elapsed_s"] = time.monotonic() - self.t_start
        n = self.noise
        n["other_s"] = max(0.0, n["busy_s"] - n["ours_s"])
        self.res["noise"] = n
        self.res["setup"]["loadavg_end"] = os.getloadavg()
        return self.report()

    def setup(self) -> dict[str, Any]:
        a = self.args
        try:
            dirty = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            commit = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            commit += " + uncommitted changes" if dirty else ""
        except (OSError, subprocess.TimeoutExpired):
            commit = ""
        import aiohttp

        return {
            "mode": "quick" if a.quick else "full",
            "commit": commit,
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "cpus": len(os.sched_getaffinity(0)),
            "load_generator": f"wrk ({self.load.wrk})" if self.load.wrk else "python loadgen.py",
            "upstream": f"fake_upstream.py --impl {a.upstream_impl}",
            "event_loop": f"proxy: uvloop when it imports (event_loop: auto); thin: {self.thin_loop}",
            "pinning": (
                f"proxy/thin/litellm on CPU {self.cpu_proxy}, upstream on CPU {self.cpu_upstream}, "
                "load generator unpinned"
            )
            if self.cpu_proxy is not None
            else "none",
            "round_s": self.s.round_s,
            "side_round_s": self.s.side_round_s,
            "rounds": self.s.rounds,
            "stream_chunks": STREAM_CHUNKS,
            "flush_interval_ms": FLUSH_MS,
            "loadavg_start": os.getloadavg(),
        }

    # -- report ---------------------------------------------------------------------------

    def row(self, metric: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((metric, value, target, "" if ok is None else ("pass" if ok else "FAIL")))

    def section(self, title: str) -> None:
        """A heading printed above the next row."""
        self.sections[len(self.rows)] = title

    def report_row(self, rp: dict[str, Any], H: dict[str, Any]) -> None:
        T = TARGETS
        n = rp.get("records", self.args.report_records)
        target = f"<= {T['report_s']:.0f} s, <= {T['report_rss_mb']:.0f} MB peak RSS"
        if "skipped" in rp:
            self.row(f"report over {n:,} records", "skipped: " + rp["skipped"], target)
            return
        if "failed" in rp:
            self.row(f"report over {n:,} records", "failed: " + rp["failed"][:200], target, False)
            return
        H.update(report_records=n, report_wall_s=rp["wall_s"], report_rss_mb=rp["rss_mb"])
        wall_target = T["report_s"] * n / REPORT_RECORDS  # a report reads every line: linear in records
        note = ""
        if n != REPORT_RECORDS:
            why = "--quick" if self.args.quick else "--report-records"
            note = f"; {why}: {n:,} records, not {REPORT_RECORDS:,}: wall target scaled, RSS not"
            target = f"<= {wall_target:.2f} s (scaled), <= {T['report_rss_mb']:.0f} MB peak RSS"
        self.row(
            f"report over {n:,} records: wall, peak RSS",
            f"{rp['wall_s']:.2f} s, {rp['rss_mb']:.0f} MB (largest --jobs worker {rp.get('worker_rss_mb', 0):.0f} MB;"
            f" {rp['file_mb']:.0f} MB file, 1 run{note})",
            target,
            rp["wall_s"] <= wall_target and rp["rss_mb"] <= T["report_rss_mb"],
        )

    def report(self) -> int:
        P, T = self.res["phases"], TARGETS
        H: dict[str, Any] = {}  # the headline figures, also written to the JSON as "headline"
        label = {"nonstream": "non-streaming", "stream": f"{STREAM_CHUNKS}-chunk streams"}
        self.section("HEADLINE: the proxy against the thin pass-through (passthrough.py); issue 16's targets")
        for kind in ("nonstream", "stream"):
            for c in CONCURRENCIES:
                ph = P[f"{kind}_c{c}"]
                p, t = ph["proxy"], ph["thin"]
                ratio = p["ratio_thin"]
                H[f"throughput_{kind}_c{c}_proxy_thin"] = ratio
                spread = "/".join(f"{x:.2f}" for x in p["round_ratios_thin"] if x is not None)
                target = T["thin_ratio"] if c == 16 else None
                self.row(
                    f"throughput {label[kind]} c{c}: proxy/thin",
                    f"{ratio:.3f}x ({p['rps']:.0f} vs {t['rps']:.0f}/s; rounds {spread})",
                    f">= {target}x thin" if target else "(info)",
                    None if target is None else ratio >= target,
                )
                bad = sum(ph[x]["errors"] + ph[x]["non2xx"] for x in ("direct", "proxy", "thin"))
                if bad:
                    self.row(f"  errors/non-2xx in {kind} c{c}", str(bad), "0", False)
        for kind in ("nonstream", "stream"):
            p, t = P[f"{kind}_c16"]["proxy"], P[f"{kind}_c16"]["thin"]
            name = f"p99 latency c16 {label[kind]} (wrk): proxy/thin"
            if p["p99_us"] and t["p99_us"]:
                r = p["p99_us"] / t["p99_us"]
                H[f"p99_c16_{kind}_proxy_thin"] = r
                self.row(
                    name,
                    f"{r:.2f}x ({p['p99_us'] / 1000:.2f} vs {t['p99_us'] / 1000:.2f} ms; "
                    f"p50 {p['p50_us'] / 1000:.2f} vs {t['p50_us'] / 1000:.2f} ms; mean of the rounds)",
                    f"<= {T['p99_vs_thin']}x thin",
                    r <= T["p99_vs_thin"],
                )
            else:
                self.row(name, "n/a: only wrk reports latency under load", f"<= {T['p99_vs_thin']}x thin")
        ns, st = P["nonstream_c16"], P["stream_c16"]
        cp, ct = ns["proxy"]["cpu_us_per_call"], ns["thin"]["cpu_us_per_call"]
        sp, stt = st["proxy"]["cpu_us_per_call"], st["thin"]["cpu_us_per_call"]
        cr = cp / ct
        mp, mt = (sp - cp) / STREAM_CHUNKS, (stt - ct) / STREAM_CHUNKS
        extra = mp - mt
        H.update(
            cpu_call_us_proxy=cp,
            cpu_call_us_thin=ct,
            cpu_call_proxy_thin=cr,
            cpu_chunk_us_proxy=sp / STREAM_CHUNKS,
            cpu_chunk_us_thin=stt / STREAM_CHUNKS,
            marginal_chunk_us_proxy=mp,
            marginal_chunk_us_thin=mt,
            extra_chunk_us=extra,
        )
        self.row(
            "CPU per non-streaming call c16: proxy/thin",
            f"{cr:.2f}x ({cp:.0f} vs {ct:.0f} us)",
            f"<= {T['cpu_call_vs_thin']}x thin",
            cr <= T["cpu_call_vs_thin"],
        )
        self.row(
            "extra CPU per streamed chunk c16: proxy - thin",
            f"{extra:+.1f} us (marginal, (stream - plain) / {STREAM_CHUNKS}: proxy {mp:.1f}, thin {mt:.1f} us;"
            f" all-in, stream / {STREAM_CHUNKS}: proxy {sp / STREAM_CHUNKS:.1f}, thin {stt / STREAM_CHUNKS:.1f})",
            f"<= {T['extra_chunk_us']:.0f} us over thin",
            extra <= T["extra_chunk_us"],
        )
        lat = P["latency_c1"]
        lp, lt = lat["proxy"], lat["thin"]
        H.update(
            p50_c1_us_proxy=lp["p50_us"],
            p50_c1_us_thin=lt["p50_us"],
            p99_c1_us_proxy=lp["p99_us"],
            p99_c1_us_thin=lt["p99_us"],
            added_p50_c1_ms=lp["added_p50_vs_thin_ms"],
        )
        self.row(
            "added p50 latency c1 (sequential): proxy - thin",
            f"{lp['added_p50_vs_thin_ms']:.3f} ms ({lp['p50_us']:.0f} vs {lt['p50_us']:.0f} us, n={lp['n']})",
            f"<= {T['added_p50_ms']} ms over thin",
            lp["added_p50_vs_thin_ms"] <= T["added_p50_ms"],
        )
        self.row(
            "p99 latency c1 (sequential): proxy vs thin",
            f"{lp['p99_us']:.0f} vs {lt['p99_us']:.0f} us ({lp['p99_us'] / lt['p99_us']:.2f}x, "
            f"{lp['added_p99_vs_thin_ms']:+.3f} ms)",
            "(info)",
        )
        sl = P["slow_streams"]
        H["rss_1000_streams_mb"] = sl["rss_peak_mb"]
        self.row(
            f"proxy RSS peak, {sl['streams']} concurrent slow streams",
            f"{sl['rss_peak_mb']:.1f} MB "
            f"(idle {sl['rss_before_mb']:.1f} MB; {sl['max_open']} open at once; {sl['ok']} ok, "
            f"{sl['errors']} errors)",
            f"<= {T['rss_mb']:.0f} MB",
            sl["rss_peak_mb"] <= T["rss_mb"] and sl["ok"] == sl["streams"],
        )
        so = P["soak"]
        H["soak_growth_mb"] = so["growth_mb"]
        self.row(
            f"proxy RSS over a {so['calls']}-call soak",
            f"{so['rss_start_mb']:.1f} -> "
            f"{so['rss_10pct_mb']:.1f} (10%) -> {so['rss_end_mb']:.1f} MB; growth {so['growth_mb']:+.1f} MB "
            f"({so['rps']:.0f} calls/s)",
            f"flat (<= +{T['soak_growth_mb']:.0f} MB after 10%)",
            so["growth_mb"] <= T["soak_growth_mb"] and not so["hard_limit_hit"],
        )
        self.report_row(P["report"], H)
        self.res["headline"] = H

        self.section("secondary: against a direct connection to the fake upstream (info)")
        for kind in ("nonstream", "stream"):
            for c in CONCURRENCIES:
                ph = P[f"{kind}_c{c}"]
                d, p, t = ph["direct"], ph["proxy"], ph["thin"]
                spread = "/".join(f"{x:.2f}" for x in p["round_ratios"] if x is not None)
                self.row(
                    f"throughput {label[kind]} c{c}: proxy/direct",
                    f"{p['ratio']:.3f}x ({p['rps']:.0f} vs {d['rps']:.0f}/s; rounds {spread}); "
                    f"thin/direct {t['ratio']:.3f}x",
                    "(info)",
                )
                lp_ = P.get(f"{kind}_c{c}_litellm")
                if lp_ is not None:
                    ll = lp_["litellm"]
                    self.row(
                        f"  LiteLLM proxy c{c}: litellm/direct",
                        f"{ll['ratio']:.4f}x ({ll['rps']:.0f} vs "
                        f"{lp_['direct']['rps']:.0f}/s, {ll['errors'] + ll['non2xx']} errors; CPU "
                        f"{ll['cpu_us_per_call'] or 0:.0f} us/call)",
                        "(info)",
                    )
        if self.res["litellm_note"]:
            self.row("LiteLLM proxy rows", "skipped: " + self.res["litellm_note"], "(info)")
        self.row(
            "added latency c1 p50 / p99 (proxy - direct)",
            f"{lp['added_p50_ms']:.3f} / {lp['added_p99_ms']:.3f} ms "
            f"(direct {lat['direct']['p50_us']:.0f} / {lat['direct']['p99_us']:.0f} us)",
            "(info)",
        )
        self.row(
            "added latency c1 p50 / p99 (thin - direct)",
            f"{lt['added_p50_ms']:.3f} / {lt['added_p99_ms']:.3f} ms",
            "(info)",
        )
        cpu = "; ".join(
            f"c{c} {P[f'nonstream_c{c}']['proxy']['cpu_us_per_call']:.0f}/"
            f"{P[f'nonstream_c{c}']['thin']['cpu_us_per_call']:.0f} plain, "
            f"{P[f'stream_c{c}']['proxy']['cpu_us_per_call']:.0f}/"
            f"{P[f'stream_c{c}']['thin']['cpu_us_per_call']:.0f} stream"
            for c in CONCURRENCIES
        )
        self.row("CPU per call, proxy/thin (us)", cpu, "(info)")
        self.row(
            "  CPU use while saturated, c16 plain / stream",
            f"proxy {ns['proxy']['cpu_util'] * 100:.0f}% / {st['proxy']['cpu_util'] * 100:.0f}%, thin "
            f"{ns['thin']['cpu_util'] * 100:.0f}% / {st['thin']['cpu_util'] * 100:.0f}% of one core",
            "(info)",
        )

        self.section("checks")
        rec = P["records"]
        bad_runs = [k for k, v in rec["runs"].items() if not v["match"]]
        soak_rec = rec["runs"].get("soak", {})
        self.row(
            "records == calls (loadgen.py phases)",
            f"{rec['strict_records']} records / {rec['strict_calls']}"
            f" calls; soak on disk after flush, proxy running: {so['records_on_disk_after_flush']}/"
            f"{so['calls']}",
            "equal",
            rec["strict_match"] and so["records_on_disk_after_flush"] == so["calls"],
        )
        if rec["wrk_calls"]:
            self.row(
                "records vs calls (wrk phases)",
                f"{rec['wrk_records']} records / {rec['wrk_calls']} calls "
                f"(wrk abandons <= c in flight at its stop; they are recorded too)",
                "calls <= records <= calls + c per run",
                rec["wrk_match"],
            )
        if bad_runs:
            self.row("  runs that do not match", ", ".join(bad_runs)[:200], "", False)
        if soak_rec and soak_rec.get("errors"):
            self.row("  failed records in the soak", str(soak_rec["errors"]), "none", False)
        tt = P["ttft"]
        recs = tt.get("record_ttft_ms", [])
        triples = tt.get("triples_ms", [])
        if recs and triples:
            err_up = [r - u for r, u, _ in triples]
            abs_up = [abs(x) for x in err_up]
            err_cl = [abs(r - c) for r, _, c in triples]
            err_cfg = [abs(x - tt["configured_ms"]) for x in recs]
            err_dir = [abs(x - tt["direct_client_mean_ms"]) for x in recs]
            self.row(
                "recorded ttft_ms vs the upstream's own first-token time, per call",
                f"mean |err| {mean(abs_up):.2f} ms, p95 {pct(sorted(abs_up), 95):.2f}, max "
                f"{max(abs_up):.2f} ms (signed mean "
                f"{mean(err_up):+.2f}; n={len(triples)}; {tt['configured_ms']} ms delay, recorded mean "
                f"{mean(recs):.2f} ms)",
                f"within {T['ttft_ms']:.0f} ms",
                max(abs_up) <= T["ttft_ms"] and len(triples) == tt["calls"],
            )
            self.row(
                "  vs the client's TTFT of the same call via the proxy",
                f"mean |err| {mean(err_cl):.2f} ms, max {max(err_cl):.2f} ms",
                "(info)",
            )
            self.row(
                f"  vs the configured {tt['configured_ms']} ms delay",
                f"mean |err| {mean(err_cfg):.2f} ms, max {max(err_cfg):.2f} ms",
                "(info)",
            )
            self.row(
                "  vs the client-measured direct TTFT (mean)",
                f"mean |err| {mean(err_dir):.2f} ms, max "
                f"{max(err_dir):.2f} ms (direct TTFT mean {tt['direct_client_mean_ms']:.2f} ms, max "
                f"{tt['direct_client_max_ms']:.2f})",
                "(info)",
            )
        else:
            self.row("recorded ttft_ms", "no ttft_ms in the records", f"within {T['ttft_ms']:.0f} ms", False)
        w = P["workers"]
        if "skipped" in w:
            self.row("throughput with serve --workers N", "skipped: " + w["skipped"], "(info)")
        else:
            for kind in ("nonstream", "stream"):
                ph = w[kind]
                name = f"proxy_w{w['workers']}"
                one = P[f"{kind}_c64"]["proxy"]["ratio"]
                self.row(
                    f"throughput {kind} c64, --workers {w['workers']}",
                    f"{ph[name]['ratio']:.3f}x direct ({ph[name]['rps']:.0f}/s; 1 worker: {one:.3f}x)",
                    "(info)",
                )
        n = self.res["noise"]
        if n["wall_s"]:
            other, steal = n["other_s"] / n["wall_s"], n["steal_s"] / n["wall_s"]
            irq = n["softirq_s"] / n["wall_s"]
            self.row(
                "other processes' CPU during throughput phases",
                f"{other * 100:.0f}% of a core "
                f"(hypervisor steal {steal * 100:.0f}%; softirq, mostly loopback, {irq * 100:.0f}%)",
                "~0 (else the run is noisy)",
                None,
            )
        prof = P.get("profile")
        self.print_table()
        if prof and "top_own" in prof:
            print(
                f"\nproxy profile (py-spy --gil, {prof['samples']} samples, non-streaming c16),"
                " top 15 functions by own time:"
            )
            for t in prof["top_own"]:
                print(f"  {t['pct']:5.1f}%  {t['function']}")
            print("the proxy's own functions by inclusive time (callees included):")
            for t in prof["top_proxy_inclusive"]:
                print(f"  {t['pct']:5.1f}%  {t['function']}")
        elif prof:
            print(f"\nprofile skipped: {prof['skipped']}")
        section = ""
        self.res["table"] = []
        for i, r in enumerate(self.rows):
            section = self.sections.get(i, section)
            self.res["table"].append(
                {"section": section, **dict(zip(("metric", "value", "target", "result"), r, strict=True))}
            )
        self.res["targets"] = TARGETS
        out = Path(self.args.json)
        out.write_bytes(orjson.dumps(self.res, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        print(f"\nJSON: {out}   ({self.res['elapsed_s']:.0f} s; temp dir {self.tmp})")
        return 0

    def print_table(self) -> None:
        st = self.res["setup"]
        print(
            f"\nmetering-proxy benchmark ({st['mode']}, commit {st['commit']}, Python {st['python']}, "
            f"aiohttp {st['aiohttp']}, {st['cpus']} CPUs)"
        )
        print(
            f"load: {st['load_generator']}; upstream: {st['upstream']}; pinning: {st['pinning']}; "
            f"{st['rounds']} alternating rounds x {st['round_s']} s per c16 throughput phase "
            f"({st['side_round_s']} s at c1 and c64); event loop: {st['event_loop']}"
        )
        heads = ("metric", "value", "target", "result")
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) for i, h in enumerate(heads)]
        widths[1] = min(widths[1], 100)
        line = "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))
        for i, r in enumerate(self.rows):
            if i in self.sections:
                print(f"\n{self.sections[i]}")
                print(line)
                print("-" * len(line))
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted xs."""
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs))) - 1))]


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="metering-proxy benchmark (see tests/benchmarks/README.md)")
    parser.add_argument("--quick", action="store_true", help="shorter phases (under two minutes)")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write the results")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also measure `serve --workers N` (default 2; 1 turns the phase off)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "python"),
        default="auto",
        help="auto: wrk when installed, else loadgen.py; python: always loadgen.py",
    )
    parser.add_argument(
        "--upstream-impl",
        choices=("aiohttp", "raw"),
        default="aiohttp",
        help="fake upstream: aiohttp low-level server (default) or raw asyncio protocol",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM even when installed")
    parser.add_argument("--litellm-python", help="a python that can import litellm (e.g. a venv's)")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy under non-streaming load")
    parser.add_argument("--profile-out", default="/tmp/metering-proxy-profile.folded")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (runs, logs)")
    parser.add_argument(
        "--report-records",
        type=int,
        default=None,
        metavar="N",
        help=f"records for the report phase (default {REPORT_RECORDS:,}; 200,000 with --quick)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report phase (report_bench.py)")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for the machine to be idle (< 10%% CPU busy over 3 s)",
    )
    args = parser.parse_args()
    if args.report_records is None:
        args.report_records = 200_000 if args.quick else REPORT_RECORDS
    if args.wait_idle > 0:
        waited, frac = wait_idle(args.wait_idle)
        print(f"waited {waited:.0f} s for an idle machine; busy {frac * 100:.0f}%", file=sys.stderr)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}\nlogs in {bench.tmp}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        bench.procs.close()
        if not args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
