"""The package as a user gets it: a wheel installed into a fresh venv, run outside the source tree.

Everything else imports `proxy` from the checkout, where files beside the package (config/, README) are
always at hand; only here does a file that is missing from the wheel or the sdist show up.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from tests.helpers import port_from_start_line

ROOT = Path(__file__).resolve().parents[1]
# What a build reads: the rest of the checkout (tests, runs, caches) must not be needed.
INPUTS = ("pyproject.toml", "README.md", "proxy", "config")

#: Each test builds a wheel or an sdist, or installs one in a fresh venv (about 15 s for the module).
pytestmark = pytest.mark.slow
# Imported by the installed package; made visible in the venv from where this interpreter has them.
RUNTIME_DEPS = ("aiohttp", "orjson", "prometheus_client", "yaml", "uvloop")
PACKAGE_DATA = ("proxy/data/model_prices.json", "proxy/ui.html")
BUILD_TIMEOUT = 300.0  # an isolated build downloads setuptools first
RUN_TIMEOUT = 60.0


def _env(tmp: Path) -> dict[str, str]:
    """The caller's environment minus what would let the checkout or another env in."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    # A refreshed table in the user cache would be used instead of the bundled one and hide its absence.
    env["METERING_PROXY_CACHE_DIR"] = str(tmp / "price-cache")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _output(proc: subprocess.CompletedProcess[str] | None, stdout: str = "", stderr: str = "") -> str:
    if proc is not None:
        stdout, stderr = proc.stdout, proc.stderr
    return f"\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"


def _run(cmd: Sequence[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = RUN_TIMEOUT,
         ok: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a command to completion; with ok, a non-zero exit fails the test with everything it printed."""
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{args} did not finish within {timeout:.0f} s{_output(None, out, err)}")
    if ok and proc.returncode != 0:
        pytest.fail(f"{args} exited {proc.returncode}{_output(proc)}")
    return proc


def _copy_inputs(dest: Path) -> Path:
    """A copy of the packaging inputs, so builds leave nothing (build/, egg-info) in the checkout."""
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _offline_wheel_build() -> bool:
    """Whether this interpreter's setuptools can build a wheel without downloading anything.

    setuptools has its own bdist_wheel only from 70.1; older ones need the separate `wheel` package.
    """
    try:
        return any(importlib.util.find_spec(m) is not None for m in ("wheel", "setuptools.command.bdist_wheel"))
    except ImportError:  # find_spec imports the parent package; setuptools itself may be missing
        return False


def _dep_dirs() -> list[Path]:
    """The sys.path entries this interpreter finds the runtime dependencies under."""
    dirs: list[Path] = []
    for name in RUNTIME_DEPS:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            pytest.fail(f"runtime dependency {name} is not installed for {sys.executable}")
        origin = Path(spec.origin).resolve()
        # A package's origin is its __init__; a single-module (or extension) dependency sits in the dir itself.
        where = origin.parent.parent if spec.submodule_search_locations else origin.parent
        if where not in dirs:
            dirs.append(where)
    return dirs


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def wheel(work: Path) -> Path:
    tree = _copy_inputs(work / "wheel-src")
    out = work / "wheelhouse"
    # Offline when possible; otherwise pip fetches pyproject's build requirements from the index.
    isolation = ["--no-build-isolation"] if _offline_wheel_build() else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", out, "."],
         cwd=tree, env=_env(work), timeout=BUILD_TIMEOUT)  # fmt: skip
    built = sorted(out.glob("metering_proxy-*.whl"))
    assert len(built) == 1, f"expected one metering_proxy wheel in {out}, found {[p.name for p in out.iterdir()]}"
    return built[0]


@pytest.fixture(scope="module")
def venv(work: Path, wheel: Path) -> Path:
    """A venv without system site packages holding the wheel, with the dependencies borrowed offline."""
    env_dir = work / "venv"
    env = _env(work)
    _run([sys.executable, "-m", "venv", env_dir], cwd=work, env=env, timeout=180.0)
    python = env_dir / "bin" / "python"
    # Before the dependencies are visible: pip would otherwise see the checkout's editable metering-proxy
    # of the same version among them and call the wheel already installed.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=work, env=env, timeout=180.0)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work, env=env)
    # A dir named in a .pth goes on sys.path, but .pth files inside it are not processed: the checkout's
    # __editable__ finder for metering-proxy, which lives beside aiohttp, never loads.
    lines = "".join(f"{d}\n" for d in _dep_dirs())
    (Path(site.stdout.strip()) / "_metering_proxy_test_deps.pth").write_text(lines, encoding="utf-8")
    _run([python, "-c", f"import {', '.join(RUNTIME_DEPS)}"], cwd=work, env=env)
    return env_dir


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A cwd with nothing in it: `python -c` puts the cwd on sys.path, and the checkout must not be it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


def test_wheel_carries_the_package_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [name for name in PACKAGE_DATA if name not in names]
        assert not missing, f"{wheel.name} lacks {missing}; it has {sorted(names)}"
        packaged = zf.read("proxy/data/model_prices.json")
    assert packaged == (ROOT / "proxy" / "data" / "model_prices.json").read_bytes()


def test_installed_package_is_the_wheel(venv: Path, work: Path, outside: Path) -> None:
    code = "import sys, proxy; print(proxy.__file__); print(any(m.startswith('__editable__') for m in sys.modules))"
    proc = _run([venv / "bin" / "python", "-c", code], cwd=outside, env=_env(work))
    where, editable = proc.stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"proxy imported from {where}, not the venv"
    assert editable == "False", f"the checkout's editable finder was loaded{_output(proc)}"


def test_prices_lookup_uses_the_bundled_table(venv: Path, work: Path, outside: Path) -> None:
    proc = _run([venv / "bin" / "metering-proxy", "prices", "lookup", "gpt-4o"], cwd=outside, env=_env(work))
    assert "'gpt-4o'" in proc.stdout and "USD per 1M tokens" in proc.stdout, _output(proc)
    assert "2.5" in proc.stdout, f"no gpt-4o input price in the lookup{_output(proc)}"
    bundled = f"{os.sep}proxy{os.sep}data{os.sep}model_prices.json"
    assert str(venv.resolve()) in proc.stdout and bundled in proc.stdout, f"not the venv's table{_output(proc)}"


def test_prices_lookup_without_a_table_is_one_line(venv: Path, work: Path, outside: Path) -> None:
    site = _run([venv / "bin" / "python", "-c", "import proxy.pricing as p; print(p.BUNDLED_PRICES)"],
                cwd=outside, env=_env(work))  # fmt: skip
    table = Path(site.stdout.strip())
    assert table.is_file(), f"the installed package has no {table}"
    hidden = table.with_name(table.name + ".hidden")
    table.rename(hidden)
    try:
        proc = _run([venv / "bin" / "metering-proxy", "prices", "lookup", "gpt-4o"], cwd=outside, env=_env(work),
                    ok=False)  # fmt: skip
    finally:
        hidden.rename(table)
    assert proc.returncode != 0, f"lookup succeeded without a price table{_output(proc)}"
    assert "Traceback" not in proc.stderr, _output(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "price table" in lines[0] and str(table) in lines[0], _output(proc)


def test_serve_answers_healthz(venv: Path, work: Path, outside: Path) -> None:
    runs = outside / "runs"
    out_path, err_path = outside / "serve.out", outside / "serve.err"
    # Port 0: the kernel picks the port as serve binds it (no other process can take it in between); the
    # start line says which.
    cmd = [str(venv / "bin" / "metering-proxy"), "serve", "--port", "0", "--runs-dir", str(runs)]
    # Files, not pipes: nothing reads the output while polling, and a full pipe would stall the server.
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=outside, env=_env(work), stdout=out, stderr=err, text=True)

    def printed() -> str:
        return _output(None, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))

    # A proxy in the environment must not be asked for loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 20.0
        while "\n" not in out_path.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"serve exited {proc.returncode} before printing its start line{printed()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve printed no start line within 20 s{printed()}")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_from_start_line(out_path.read_text())}/healthz"
        try:  # no retry: the start line is printed once the socket listens
            with opener.open(url, timeout=10.0) as resp:
                body = orjson.loads(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            pytest.fail(f"{url} did not answer 200 ({exc!r}){printed()}")
        assert body["status"] == "ok" and Path(body["runs_dir"]).resolve() == runs.resolve(), body
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not stop within 20 s of SIGTERM{printed()}")
        assert code == 0, f"serve exited {code} on SIGTERM{printed()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10.0)


def test_sdist_carries_the_package_data(work: Path) -> None:
    tree = _copy_inputs(work / "sdist-src")
    out = work / "sdist"
    out.mkdir()
    if importlib.util.find_spec("build") is not None:
        cmd: list[str | Path] = [sys.executable, "-m", "build", "--sdist", "--outdir", out, "."]
    else:  # pip cannot make an sdist; setuptools' PEP 517 hook is what `build` would call
        hook = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
        cmd = [sys.executable, "-c", hook, out]
    _run(cmd, cwd=tree, env=_env(work), timeout=BUILD_TIMEOUT)
    built = sorted(out.glob("metering*proxy-*.tar.gz"))
    assert len(built) == 1, f"expected one sdist in {out}, found {[p.name for p in out.iterdir()]}"
    with tarfile.open(built[0]) as tf:
        names = tf.getnames()
    root = names[0].split("/", 1)[0]
    missing = [name for name in (*PACKAGE_DATA, "pyproject.toml", "README.md") if f"{root}/{name}" not in names]
    assert not missing, f"{built[0].name} lacks {missing}; it has {sorted(names)}"
