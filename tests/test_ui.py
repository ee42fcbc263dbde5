"""The dashboard in real headless Chromium over the DevTools protocol: it shows a run and follows it live."""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy import report
from proxy.cli import main
from proxy.pricing import BUNDLED_PRICES, PriceBook
from tests.conftest import Messages, ProxyFactory, ProxyUnderTest, make_client

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = Path("/tmp/ui-screenshot.png")
SHOTS = {name: Path(f"/tmp/ui-{name}.png") for name in ("compare", "run-chart", "record")}
MSG: Messages = [{"role": "user", "content": "hi"}]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium package to test the UI"
)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Start headless Chromium once for the module; yield its DevTools port."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield int(port_file.read_text().split()[0])
    finally:
        proc.kill()
        proc.wait(10)


class Page:
    """One browser tab over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    async def call(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", timeout=5.0, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate until truthy; return the value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.eval(expression)
            except (AssertionError, TimeoutError):  # e.g. no document.body yet while the page loads
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


async def open_page(session: aiohttp.ClientSession, port: int, url: str) -> Page:
    async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
        target = await resp.json()
    page = Page(await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))
    await page.call("Page.enable")
    await page.call("Runtime.enable")
    await page.call(
        "Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False
    )
    await page.call("Page.navigate", url=url)
    return page


async def call(proxy: ProxyUnderTest, model: str, task: str, think: float = 0.0, stream: bool = True,
               fake: str | None = None, run_id: str = "ui-run", tag: str | None = None) -> None:  # fmt: skip
    headers = {"X-Fake": fake or f"think:{think}", "X-Fake-Delay": "0.04"}
    sent = ({"X-Task-Name": task} if task else {}) | ({"X-Meter-Tag-Variant": tag} if tag else {})
    c = make_client(proxy, run_id=run_id, headers=sent)
    if not stream:
        await c.chat.completions.create(model=model, messages=MSG, extra_headers=headers)
        return
    async for _ in await c.chat.completions.create(
        model=model, messages=MSG, stream=True, extra_headers=headers
    ):
        pass


BARS = "document.querySelectorAll('#timeline rect.bar').length"


@pytest.mark.slow
async def test_dashboard_shows_a_run_and_follows_it_live(
    make_proxy: ProxyFactory, chromium: int, tmp_path: Path
) -> None:
    proxy = await make_proxy(pricebook=PriceBook.load(BUNDLED_PRICES))
    # A little concurrency, two priced models, one unknown to the price table, one failure.
    await asyncio.gather(
        call(proxy, "gpt-4o-mini", "summarise", 0.3), call(proxy, "gpt-4o", "summarise", 0.1),
        call(proxy, "llama-3.1-8b-local", "classify", 0.2, stream=False),
        call(proxy, "gpt-4o-mini", "classify", 0.05),
    )  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        await call(proxy, "gpt-4o", "extract", stream=False, fake="status:429")
    await call(proxy, "gpt-4o-mini", "extract", 0.1)
    await proxy.wait_records("ui-run", 6)

    async with aiohttp.ClientSession() as session:
        page = await open_page(session, chromium, proxy.url("/ui?run=ui-run"))
        try:
            assert await page.wait_for(
                f"document.body.dataset.live === '1' && {BARS} === 6 && document.body.dataset.state"
            )
            text = await page.eval("document.getElementById('app').innerText")
            assert "gpt-4o-mini" in text and "llama-3.1-8b-local" in text and "summarise" in text
            assert await page.eval("document.querySelectorAll('#timeline rect.bar.failed').length") == 1
            assert (
                await page.eval("document.querySelectorAll('#timeline rect.ttft').length") == 4
            )  # the streams
            assert "rate_limit" in await page.eval("document.getElementById('failed').innerText")
            assert "6" in await page.eval("document.querySelector('.card .v').innerText")

            # A new call through the proxy: the page must show it without a reload.
            await call(proxy, "gpt-4o", "extract", 0.15)
            assert await page.wait_for(f"{BARS} === 7", timeout=5)
            await page.wait_for("document.querySelector('.card .v').innerText === '7'", timeout=5)
            shot = tmp_path / "ui.png"
            await page.screenshot(shot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            shutil.copy(shot, SCREENSHOT_COPY)

            # The runs list links to the run with its totals.
            await page.call("Page.navigate", url=proxy.url("/ui"))
            row = await page.wait_for(
                "document.querySelector('#runs a[href=\"?run=ui-run\"]')?.closest('tr').innerText"
            )
            assert row.split("\t")[2:4] == ["7", "1"]  # calls, failed
        finally:
            await page.close()


async def test_standalone_html_file_renders_without_a_server(
    make_proxy: ProxyFactory, chromium: int, tmp_path: Path
) -> None:
    proxy = await make_proxy()
    for task in ("a", "b", "c"):
        await call(proxy, "gpt-4o-mini", task)
    await proxy.wait_records("ui-run", 3)
    out = tmp_path / "view.html"
    assert main(["report", "ui-run", "--runs-dir", str(proxy.runs_dir), "--html", str(out)]) == 0
    await proxy.server.close()  # nothing to fetch from: the file must carry everything
    async with aiohttp.ClientSession() as session:
        page = await open_page(session, chromium, out.as_uri())
        try:
            assert await page.wait_for(f"document.body.dataset.state === 'ready' && {BARS} === 3")
            text = await page.eval("document.getElementById('app').innerText")
            assert "Snapshot written by" in text and "gpt-4o-mini" in text
            assert await page.eval("document.getElementById('live').hidden") is True
        finally:
            await page.close()


@pytest.mark.slow
async def test_a_run_that_does_not_exist_yet_is_waited_for(make_proxy: ProxyFactory, chromium: int) -> None:
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as session:
        page = await open_page(session, chromium, proxy.url("/ui?run=ui-run"))
        try:
            await page.wait_for("document.body.dataset.state === 'waiting'")
            assert "waiting for its first call" in await page.eval("document.getElementById('app').innerText")
            await call(proxy, "gpt-4o-mini", "first")
            await page.wait_for(f"{BARS} === 1 && document.body.dataset.live === '1'", timeout=8)
            await call(proxy, "gpt-4o", "second")
            await page.wait_for(f"{BARS} === 2", timeout=5)
        finally:
            await page.close()


@pytest.mark.slow
async def test_price_as_switch_shows_the_what_if_cost(make_proxy: ProxyFactory, chromium: int, tmp_path: Path) -> None:
    proxy = await make_proxy(pricebook=PriceBook.load(BUNDLED_PRICES))
    await asyncio.gather(call(proxy, "gpt-4o", "summarise", 0.05), call(proxy, "gpt-4o", "classify", 0.05))
    await proxy.wait_records("ui-run", 2)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url("/runs/ui-run?price_as=gpt-4o-mini")) as resp:
            expected = (await resp.json())["runs"][0]["price_as"]["total"]
        page = await open_page(session, chromium, proxy.url("/ui?run=ui-run&price_as=gpt-4o-mini"))
        try:
            card = await page.wait_for("document.getElementById('price-as-card')?.innerText")
            assert "Cost as gpt-4o-mini" in card and f"${expected:.6f}" in card and "recorded $" in card
            assert "as gpt-4o-mini" in await page.eval("document.getElementById('by-model').innerText")
            await page.screenshot(tmp_path / "price-as.png")
            shutil.copy(tmp_path / "price-as.png", SCREENSHOT_COPY.with_name("ui-price-as-screenshot.png"))
            # The form switches to another model; an unknown one says so and shows the recorded run.
            await page.eval("document.querySelector('#price-as input').value = 'no-such-model-x';"
                            "document.querySelector('#price-as button').click()")  # fmt: skip
            await page.wait_for("document.getElementById('price-as-err').innerText.includes('no-such-model-x')")
            await page.wait_for("!document.getElementById('price-as-card')")
            await page.eval("document.querySelector('#price-as input').value = 'gpt-4.1';"
                            "document.querySelector('#price-as button').click()")  # fmt: skip
            assert "Cost as gpt-4.1" in await page.wait_for(
                "document.getElementById('price-as-card')?.innerText")
            assert "price_as=gpt-4.1" in await page.eval("location.search")
        finally:
            await page.close()


async def _shoot(page: Page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / f"{name}.png"
    await page.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(shot, SHOTS[name])
    print(f"screenshot: {SHOTS[name]}")


async def _select(page: Page, name: str, value: str) -> None:
    await page.eval(f"(() => {{ const s = document.querySelector('#filters select[name={name}]'); s.value = {value!r};"
                    " s.dispatchEvent(new Event('change', {bubbles: true})); })()")  # fmt: skip


ROWS = "document.querySelectorAll('#calls tr.pick').length"


@pytest.mark.slow
async def test_compare_chart_filter_and_record(make_proxy: ProxyFactory, chromium: int, tmp_path: Path) -> None:
    proxy = await make_proxy(pricebook=PriceBook.load(BUNDLED_PRICES))
    # Two runs on different models, the same tasks; run B has a failure, a tag, and more calls.
    await asyncio.gather(
        call(proxy, "gpt-4o-mini", "summarise", 0.05, run_id="ui-a"),
        call(proxy, "gpt-4o-mini", "classify", 0.02, stream=False, run_id="ui-a"),
        call(proxy, "gpt-4o", "summarise", 0.05, run_id="ui-b", tag="long"),
        call(proxy, "gpt-4o", "classify", 0.02, run_id="ui-b", tag="short"),
        call(proxy, "gpt-4o", "classify", 0.03, stream=False, run_id="ui-b", tag="short"),
    )  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        await call(proxy, "gpt-4o", "extract", stream=False, fake="status:429", run_id="ui-b")
    await proxy.wait_records("ui-a", 2)
    recs_b = await proxy.wait_records("ui-b", 4)
    # What `report ui-a ui-b` compares: the page must show the same figures and deltas.
    want = report.report_json([report.summarize(proxy.runs_dir / f"{r}.jsonl", r, ["model", "task"])
                               for r in ("ui-a", "ui-b")])  # fmt: skip
    a, b = want["runs"]
    deltas = want["comparison"]["runs"][0]["metrics"]
    assert a["calls"]["total"] == 2 and b["calls"]["total"] == 4 and deltas["cost_usd.total"]["delta"] > 0

    async with aiohttp.ClientSession() as session:
        page = await open_page(session, chromium, proxy.url("/ui"))
        try:
            # The first run picked is the baseline.
            await page.wait_for("document.querySelectorAll('#runs .pick-run').length === 2")
            await page.eval("document.querySelector('.pick-run[value=\"ui-a\"]').click();"
                            "document.querySelector('.pick-run[value=\"ui-b\"]').click()")  # fmt: skip
            assert "baseline: ui-a" in await page.eval("document.getElementById('compare-bar').innerText")
            await page.eval("document.getElementById('compare-btn').click()")
            await page.wait_for("!!document.getElementById('compare-totals')")
            assert await page.eval("location.search") == "?run=ui-a&run=ui-b"

            def cell(run: str, metric: str, attr: str) -> str:
                sel = f"#compare-totals td[data-run=\"{run}\"][data-metric=\"{metric}\"]"
                kind = ".delta" if attr == "delta" else ":not(.delta)"
                return f"document.querySelector('{sel}{kind}')?.dataset.{attr}"

            for metric in ("calls.total", "calls.failed", "tokens.input", "tokens.output", "cost_usd.total",
                           "duration_ms.p50", "ttft_ms.p95"):  # fmt: skip
                sec, key = metric.split(".")
                for run in (a, b):
                    shown = await page.eval(cell(run["run_id"], metric, "value"))
                    value = run[sec][key]
                    assert (shown == "") if value is None else float(shown) == pytest.approx(value, abs=1e-12), metric
                got = await page.eval(cell("ui-b", metric, "delta"))
                assert float(got) == pytest.approx(deltas[metric]["delta"], abs=1e-9), metric
            pct = deltas["cost_usd.total"]["pct"]
            text = await page.eval("document.getElementById('compare-totals').innerText")
            assert f"(+{pct:.1f}%)" in text and "+2 (+100.0%)" in text  # calls: 4 against 2
            by_model = await page.eval("document.getElementById('compare-model').innerText")
            assert "gpt-4o-mini" in by_model and "gpt-4o\t" in by_model
            assert "extract" in await page.eval("document.getElementById('compare-task').innerText")
            await _shoot(page, tmp_path, "compare")

            # The compare view is live: a new call to B shows without a reload.
            await call(proxy, "gpt-4o", "extract", 0.01, run_id="ui-b")
            await page.wait_for(f"{cell('ui-b', 'calls.total', 'value')} === '5'", timeout=15)

            # Run B's view: the cumulative chart ends at the run's totals.
            await proxy.wait_records("ui-b", 5)
            async with session.get(proxy.url("/runs/ui-b")) as resp:
                b_now = (await resp.json())["runs"][0]
            await page.call("Page.navigate", url=proxy.url("/ui?run=ui-b"))
            final = await page.wait_for(f"{ROWS} === 5 && document.getElementById('cum-cost')?.dataset.final")
            assert float(final) == pytest.approx(b_now["cost_usd"]["total"], abs=1e-9) and float(final) > 0
            tokens = await page.eval("document.getElementById('cum-tokens').dataset.final")
            assert int(tokens) == b_now["tokens"]["total"]
            assert await page.eval("document.querySelectorAll('#cum-cost path.line').length") == 1
            await _shoot(page, tmp_path, "run-chart")

            # Filters narrow the call list, and the address keeps them.
            await _select(page, "outcome", "failed")
            assert await page.wait_for(f"{ROWS} === 1 && document.querySelector('#calls tr.pick').innerText")
            assert "rate_limit" in await page.eval("document.querySelector('#calls tr.pick').innerText")
            await _select(page, "outcome", "")
            await _select(page, "tag", "variant=short")
            await page.wait_for(f"{ROWS} === 2")
            await _select(page, "task", "classify")
            await _select(page, "model", "gpt-4o")
            await page.wait_for(f"{ROWS} === 2")
            await _select(page, "tag", "")
            await _select(page, "task", "extract")
            await page.wait_for(f"{ROWS} === 2")  # the failed extract and the one sent since
            await _select(page, "outcome", "ok")
            await page.wait_for(f"{ROWS} === 1")
            assert "outcome=ok" in await page.eval("location.search")

            # Clicking a call opens its whole record.
            rid = await page.eval("document.querySelector('#calls tr.pick').dataset.id")
            await page.eval("document.querySelector('#calls tr.pick td:nth-child(3)').click()")
            shown = await page.wait_for("document.getElementById('record')?.innerText")
            file_recs = {r["request_id"]: r for r in await proxy.records("ui-b")}
            assert rid in file_recs and orjson.loads(shown) == file_recs[rid]
            assert rid in await page.eval("document.querySelector('#record-panel h3').innerText")
            assert f"call={rid}" in await page.eval("location.search")
            await _shoot(page, tmp_path, "record")

            # A link opens the same view: the filters and the open call.
            link = await page.eval("location.href")
            await page.call("Page.navigate", url=link)
            await page.wait_for(f"document.getElementById('record')?.innerText.includes('{rid}') && {ROWS} === 1")
            assert await page.eval("document.querySelector('#filters select[name=task]').value") == "extract"
            # A failed call's record too, from the failed-calls panel; Esc closes it.
            failed_id = next(r["request_id"] for r in recs_b if not r["success"])
            await page.eval(f"document.querySelector('#failed tr[data-id=\"{failed_id}\"]').click()")
            await page.wait_for("document.getElementById('record')?.innerText.includes('\"rate_limit\"')")
            await page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape")
            await page.wait_for("document.getElementById('record-panel').hidden")
            assert "call=" not in await page.eval("location.search")
        finally:
            await page.close()
