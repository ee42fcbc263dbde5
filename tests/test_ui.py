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
import pytest

from proxy.cli import main
from proxy.pricing import BUNDLED_PRICES, PriceBook
from tests.conftest import Messages, ProxyFactory, ProxyUnderTest, make_client

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = Path("/tmp/ui-screenshot.png")
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
               fake: str | None = None) -> None:  # fmt: skip
    headers = {"X-Fake": fake or f"think:{think}", "X-Fake-Delay": "0.04"}
    c = make_client(proxy, run_id="ui-run", headers={"X-Task-Name": task} if task else None)
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
