"""The shipper: run files tailed into a real webhook receiver (an aiohttp server on loopback).

Failures and recovery, signatures, idempotency keys, torn lines, files that appear later, restarts,
one shipper per runs dir. PostgreSQL-specific behaviour is in tests/test_pg.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import config as C
from proxy.shipper import STATE_DIR, Shipper, Shipping, parse_line
from proxy.webhook import WebhookDestination, verify
from tests.conftest import ProxyFactory, make_client, make_record
from tests.helpers import MSG

SECRET = "whsec-test-0123456789abcdef"


class Receiver:
    """A webhook endpoint whose behaviour the test switches: ok, 500, hang (past the client's timeout), 307."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.attempts: list[tuple[str, str, bytes]] = []  # (mode answered with, Idempotency-Key, body)
        self.signatures: list[str] = []
        self.delivered: list[dict[str, Any]] = []
        self.redirect_hits = 0
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)
        self.app.router.add_post("/elsewhere", self.elsewhere)
        self.server: TestServer | None = None
        self.changed = asyncio.Event()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))

    async def hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        mode = self.mode
        self.attempts.append((mode, request.headers["Idempotency-Key"], body))
        self.signatures.append(request.headers["X-Meter-Signature"])
        self.changed.set()
        assert verify(SECRET, request.headers["X-Meter-Signature"], body)
        if mode == "500":
            return web.json_response({"error": "down"}, status=500)
        if mode == "hang":
            await asyncio.sleep(30)
        if mode == "307":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        self.delivered.extend(orjson.loads(body)["records"])
        return web.json_response({"ok": True})

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirect_hits += 1
        return web.json_response({"ok": True})

    async def wait(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "receiver: condition not met in time"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.05)
            except TimeoutError:
                pass

    def ids(self) -> list[str]:
        return [r["request_id"] for r in self.delivered]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    r.server = TestServer(r.app, host="127.0.0.1", handler_cancellation=True)
    await r.server.start_server()
    yield r
    await r.server.close()


def webhook_cfg(receiver: Receiver, **kw: Any) -> C.ShipWebhook:
    return C.ShipWebhook(**{"url": receiver.url, "secret": SECRET, "secret_env": "X", "batch_size": 10,
                            "interval_s": 0.02, "timeout_s": 0.3, **kw})  # fmt: skip


def shipping(runs: Path, receiver: Receiver, **kw: Any) -> Shipping:
    cfg = webhook_cfg(receiver, **kw)
    return Shipping(runs, [Shipper(runs, WebhookDestination(cfg), cfg.batch_size, cfg.interval_s, 0.05)], 60.0)


@contextlib.asynccontextmanager
async def running(runs: Path, receiver: Receiver, **kw: Any) -> AsyncIterator[Shipping]:
    """A started Shipping to the receiver, closed on the way out whatever the test asserted."""
    s = shipping(runs, receiver, **kw)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


def write_records(path: Path, ids: list[str], tail: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        for rid in ids:
            f.write(make_record(request_id=rid, run_id=path.stem).to_json())
        f.write(tail)


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def metrics_text(base: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        return await r.text()


async def healthz(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(base + "/healthz") as r:
        return r.status, await r.json()


# -- through a real proxy ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_webhook_that_fails_then_recovers_gets_every_record(make_proxy: ProxyFactory,
                                                                  receiver: Receiver) -> None:  # fmt: skip
    """500s, then a timeout, then 200: every record arrives, signed, with the same key on every retry."""
    receiver.mode = "500"
    ship = C.Ship(webhook=webhook_cfg(receiver), retry_max_s=0.05, degraded_after_s=600)
    proxy = await make_proxy(ship=ship)
    base = proxy.url("")
    client = make_client(proxy, run_id="hooked")
    for i in range(12):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers={"X-Meter-Tag-N": str(i)})
    await proxy.settle(12)
    await receiver.wait(lambda: len(receiver.attempts) >= 3)
    status, body = await healthz(base)
    assert status == 200 and body["status"] == "degraded", body
    assert body["shipper"]["webhook"]["failing"] and body["shipper"]["webhook"]["backlog_records"] == 12
    assert "HTTP 500" in body["shipper"]["webhook"]["error"] and SECRET not in str(body)
    text = await metrics_text(base)
    assert 'metering_proxy_shipper_backlog_records{destination="webhook"} 12.0' in text
    assert 'metering_proxy_shipper_failing{destination="webhook"} 1.0' in text
    receiver.mode = "hang"
    n = len(receiver.attempts)
    await receiver.wait(lambda: len(receiver.attempts) >= n + 1)
    receiver.mode = "ok"
    await receiver.wait(lambda: len(receiver.delivered) >= 12)
    figures = proxy.server.app[proxy_shipping_key()].health
    await wait_for(lambda: figures()[1]["webhook"]["backlog_records"] == 0)  # the last batch is committed
    status, body = await healthz(base)
    assert body["status"] == "ok" and body["shipper"]["webhook"]["backlog_records"] == 0
    recs = await proxy.records("hooked")
    assert sorted(receiver.ids()) == sorted(r["request_id"] for r in recs)
    assert receiver.delivered == recs  # the records as they are in the file, in order
    # The first batch was retried: every attempt at it carried the same key, and only its 2xx counted.
    first_key = receiver.attempts[0][1]
    tries = [a for a in receiver.attempts if a[1] == first_key]
    assert [m for m, _, _ in tries][:3] == ["500", "500", "500"] and tries[-1][0] == "ok"
    assert "hang" in [m for m, _, _ in tries]
    # The signature is HMAC-SHA256 over "<t>." + the exact body, checked here without the proxy's code.
    for _, _, raw in receiver.attempts[-1:]:
        doc = orjson.loads(raw)
        assert doc["schema"] == "metering-proxy.records/1" and doc["batch_id"] == receiver.attempts[-1][1]


def proxy_shipping_key() -> Any:
    from proxy.app import SHIPPING

    return SHIPPING


async def test_signature_is_hmac_sha256_over_timestamp_and_body(receiver: Receiver, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_records(runs / "a.jsonl", ["r1", "r2"])
    async with running(runs, receiver):
        await receiver.wait(lambda: len(receiver.delivered) == 2)
    header, raw = receiver.signatures[0], receiver.attempts[0][2]
    t = header.split(",")[0].removeprefix("t=")
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
    assert header == f"t={t},v1={mac}" and abs(int(t) - time.time()) < 60
    assert not verify("another-secret-value", header, raw) and not verify(SECRET, header, raw + b" ")
    assert not verify(SECRET, header, raw, now=int(t) + 301)  # too old: a replay
    doc = orjson.loads(raw)
    assert [r["request_id"] for r in doc["records"]] == ["r1", "r2"] and doc["batch_id"] == receiver.attempts[0][1]


async def test_a_redirect_is_a_failure_and_never_followed(receiver: Receiver, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_records(runs / "a.jsonl", ["r1"])
    receiver.mode = "307"
    async with running(runs, receiver) as s:
        await receiver.wait(lambda: len(receiver.attempts) >= 2)
        assert s.shippers[0].status.failing is not None and "HTTP 307" in s.shippers[0].status.failing.error
        receiver.mode = "ok"
        await receiver.wait(lambda: receiver.ids() == ["r1"])
    assert receiver.redirect_hits == 0


# -- reading the files -------------------------------------------------------------------------------


async def test_torn_last_line_waits_for_its_newline(receiver: Receiver, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    third = make_record(request_id="r3", run_id="a").to_json()
    write_records(runs / "a.jsonl", ["r1", "r2"], tail=third[:40])
    async with running(runs, receiver) as s:
        await receiver.wait(lambda: receiver.ids() == ["r1", "r2"])
        status = s.shippers[0].status
        scans = status.scans
        await wait_for(lambda: status.scans >= scans + 3)  # the torn line was looked at, and left alone
        assert receiver.ids() == ["r1", "r2"] and status.backlog_records == 0
        with (runs / "a.jsonl").open("ab") as f:
            f.write(third[40:])
        await receiver.wait(lambda: receiver.ids() == ["r1", "r2", "r3"])


async def test_lines_that_are_not_records_are_skipped_and_counted(receiver: Receiver, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs).mkdir()
    good = [make_record(request_id=f"r{i}", run_id="a").to_json() for i in range(3)]
    junk = [b'{"ts": "x", "request_id": "torn-fragm\n', b"[1, 2]\n", b'{"no_id": 1}\n', b"\n",
            b'{"request_id": 5}\n', b'{"request_id": "' + b"x" * 300 + b'"}\n', b"\xff\xfe not json\n"]  # fmt: skip
    (runs / "a.jsonl").write_bytes(good[0] + b"".join(junk) + good[1] + good[2])
    async with running(runs, receiver) as s:
        await receiver.wait(lambda: len(receiver.delivered) == 3)
        await wait_for(lambda: s.shippers[0].status.skipped == len(junk))
    assert receiver.ids() == ["r0", "r1", "r2"]


def test_parse_line_takes_what_orjson_refuses_but_json_allows() -> None:
    assert parse_line(b'{"request_id": "r", "cost_usd": NaN, "n": 100000000000000000000000}') is not None
    assert parse_line(b'{"request_id": "r\\u0000x"}') is None  # not an id a database can key on
    assert parse_line(b"") is None


async def test_files_that_appear_later_and_many_runs(receiver: Receiver, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    want: list[str] = []
    for run in range(60):
        ids = [f"run{run}-{i}" for i in range(run % 4 + 1)]
        write_records(runs / f"run{run}.jsonl", ids)
        want += ids
    write_records(runs / ".rejected.jsonl", ["rej-1"])
    write_records(runs / ".other.jsonl", ["never"])  # a dot-file that is not the rejected calls' file
    async with running(runs, receiver, batch_size=25) as s:
        await receiver.wait(lambda: len(receiver.delivered) >= len(want) + 1)
        write_records(runs / "late.jsonl", ["late-1", "late-2"])
        await receiver.wait(lambda: len(receiver.delivered) >= len(want) + 3)
        status = s.shippers[0].status
        scans = status.scans
        await wait_for(lambda: status.scans >= scans + 2)
    got = receiver.ids()
    assert sorted(got) == sorted([*want, "rej-1", "late-1", "late-2"]) and len(got) == len(set(got))
    assert all(len(orjson.loads(b)["records"]) <= 25 for _, _, b in receiver.attempts)


async def test_restart_resumes_from_the_persisted_positions(receiver: Receiver, tmp_path: Path) -> None:
    """Positions are written (atomically) only after a 2xx: a new shipper sends only what is new."""
    runs = tmp_path / "runs"
    write_records(runs / "a.jsonl", [f"r{i}" for i in range(10)])
    s = shipping(runs, receiver)
    await s.start()
    await receiver.wait(lambda: len(receiver.delivered) == 10)
    await s.close()
    state = orjson.loads((runs / STATE_DIR / "webhook.json").read_bytes())
    assert state["files"]["a.jsonl"]["pos"] == (runs / "a.jsonl").stat().st_size
    assert not [p for p in (runs / STATE_DIR).iterdir() if p.name.endswith(".tmp")]
    write_records(runs / "a.jsonl", ["r10", "r11"])
    s2 = shipping(runs, receiver)
    await s2.start()
    try:
        await receiver.wait(lambda: len(receiver.delivered) >= 12)
        status = s2.shippers[0].status
        scans = status.scans
        await wait_for(lambda: status.scans >= scans + 2)
    finally:
        await s2.close()
    assert receiver.ids() == [f"r{i}" for i in range(12)]


async def test_a_truncated_or_replaced_file_is_shipped_from_its_start(receiver: Receiver, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_records(runs / "a.jsonl", ["r1", "r2"])
    async with running(runs, receiver):
        await receiver.wait(lambda: len(receiver.delivered) == 2)
        (runs / "a.jsonl").unlink()
        write_records(runs / "a.jsonl", ["n1"])
        await receiver.wait(lambda: receiver.ids() == ["r1", "r2", "n1"])


async def test_one_process_ships_per_runs_dir_the_other_stands_by(receiver: Receiver, tmp_path: Path) -> None:
    """Two shippers on one runs dir (as two workers): one ships, one reports the backlog; it takes over."""
    runs = tmp_path / "runs"
    receiver.mode = "500"
    write_records(runs / "a.jsonl", ["r1", "r2", "r3"])
    first, second = shipping(runs, receiver), shipping(runs, receiver)
    await first.start()
    await wait_for(lambda: first.owner)
    await second.start()
    try:
        await receiver.wait(lambda: len(receiver.attempts) >= 2)
        st2 = second.shippers[0].status
        await wait_for(lambda: st2.backlog_records == 3 and st2.failing is not None)
        assert not second.owner and not st2.owner
        degraded, figures = second.health()
        assert degraded and figures["webhook"]["role"] == "standby"
        await first.close()  # as if its worker stopped: the standby takes over
        receiver.mode = "ok"
        await wait_for(lambda: second.owner, timeout=5)
        await receiver.wait(lambda: len(receiver.delivered) == 3)
    finally:
        await first.close()
        await second.close()
    assert receiver.ids() == ["r1", "r2", "r3"]


# -- config --------------------------------------------------------------------------------------------


def test_ship_config_is_off_by_default_and_reads_env_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    assert C.Config().ship == C.Ship() and C.Ship().postgres is None and C.Ship().webhook is None
    monkeypatch.setenv("MP_TEST_PG_URL", "postgresql://u:pw-secret-123@h:5432/db")
    monkeypatch.setenv("MP_TEST_HOOK_SECRET", SECRET)
    cfg = C.from_mapping({"ship": {"postgres": {"url_env": "MP_TEST_PG_URL", "batch_size": 500, "interval_ms": 250},
                                   "webhook": {"url": "https://h.example/hook", "secret_env": "MP_TEST_HOOK_SECRET"},
                                   "degraded_after_s": 30}})  # fmt: skip
    assert cfg.ship.postgres == C.ShipPostgres(url="postgresql://u:pw-secret-123@h:5432/db",
                                               url_env="MP_TEST_PG_URL", batch_size=500, interval_s=0.25)
    assert cfg.ship.webhook is not None and cfg.ship.webhook.secret == SECRET
    assert "pw-secret" not in repr(cfg) and SECRET not in repr(cfg)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"postgres": {"url": "mysql://x"}}, "ship.postgres.url"),
        ({"postgres": {"url_env": "MP_TEST_UNSET_VAR"}}, "ship.postgres.url_env"),
        ({"postgres": {"url": "postgresql://h/db", "batch_size": 0}}, "ship.postgres.batch_size"),
        ({"webhook": {"url": "https://h/x"}}, "ship.webhook.secret_env"),
        ({"webhook": {"url": "ftp://h/x", "secret_env": "X"}}, "ship.webhook.url"),
        ({"webhook": {"secret_env": "X"}}, "ship.webhook.url"),
        ({"bogus": 1}, "ship.bogus"),
    ],
)
def test_bad_ship_config_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(C.ConfigError, match=f"{key}:"):
        C.from_mapping({"ship": raw})


def test_a_password_in_a_bad_url_is_never_shown() -> None:
    with pytest.raises(C.ConfigError) as caught:
        C.from_mapping({"ship": {"postgres": {"url": "mysql://u:pw-secret-123@h/db"}}})
    assert "pw-secret" not in str(caught.value)
