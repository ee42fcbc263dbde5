"""Access control and safe defaults: proxy keys, admin token, no open relay, no secrets in logs or records."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy import access as A
from proxy.app import make_app
from proxy.cli import main
from proxy.config import Access, BudgetRule, Budgets, Config, ConfigError, Upstream, resolve_env
from proxy.pricing import BUNDLED_PRICES, PriceBook
from tests.conftest import FakeUpstream, Messages, ProxyFactory, ProxyUnderTest, make_client

KEY = "mp-proxykey-0123456789"
#: What the clients here send in Authorization unless a test says otherwise: their upstream key.
UPSTREAM_KEY = "sk-upstream-key-42"
MSGS: Messages = [{"role": "user", "content": "hi"}]


async def chat(c: openai.AsyncOpenAI) -> Any:
    try:
        return await c.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    except openai.APIStatusError as exc:
        return exc


def rejected(proxy: ProxyUnderTest) -> list[dict[str, Any]]:
    path = proxy.runs_dir / ".rejected.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("LocalHost", True), ("::1", True),
    ("[::1]", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("192.168.1.5", False), ("example.com", False), ("10.0.0.1", False),
])  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert A.is_loopback(host) is loopback


# -- proxy keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_proxy_key"),
    ({"Authorization": "Basic " + KEY}, "missing_proxy_key"),
    ({"X-Proxy-Key": "mp-wrong"}, "invalid_proxy_key"),
    ({"X-Proxy-Key": KEY + "x", "Authorization": f"Bearer {KEY}"}, "invalid_proxy_key"),
    ({"Authorization": f"Bearer {KEY[:-1]}"}, "invalid_proxy_key"),
    ({"X-Proxy-Key": "ключ"}, "invalid_proxy_key"),
])  # fmt: skip
async def test_missing_or_wrong_key_is_401_with_a_rejected_record(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream, headers: dict[str, str], code: str
) -> None:
    proxy = await make_proxy(access=Access(proxy_keys=(KEY,)))
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url("/run/acc/v1/chat/completions"), headers=headers,
                             json={"model": "gpt-4o-mini", "messages": MSGS}) as r:  # fmt: skip
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            err = (await r.json())["error"]
            request_id = r.headers["X-Meter-Request-Id"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and "proxy key" in err["message"]
    assert err["param"] == "Authorization"
    assert not fake_upstream.requests
    await proxy.settle(1)
    # One record, in .rejected.jsonl with no run id: the unauthenticated client wrote into no run file.
    assert sorted(p.name for p in proxy.runs_dir.iterdir()) == [".rejected.jsonl"]
    [rec] = rejected(proxy)
    assert rec["run_id"] is None and rec["status"] == 401 and rec["error"]["category"] == "unauthorized"
    assert rec["request_id"] == request_id and rec["tags"] == {}
    assert rec["endpoint"] == "/v1/chat/completions" and rec["requested_model"] is None


async def test_wrong_key_in_authorization(make_proxy: ProxyFactory, fake_upstream: FakeUpstream) -> None:
    proxy = await make_proxy(access=Access(proxy_keys=(KEY,)))
    exc = await chat(make_client(proxy, run_id="acc", api_key="sk-this-is-my-openai-key"))
    assert isinstance(exc, openai.AuthenticationError)
    assert exc.response.json()["error"]["code"] == "invalid_proxy_key" and "X-Proxy-Key" in exc.message
    assert not fake_upstream.requests


async def test_right_key_in_x_proxy_key_keeps_client_authorization(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(access=Access(proxy_keys=("other-key", KEY)))
    resp = await chat(make_client(proxy, run_id="acc", api_key=UPSTREAM_KEY, headers={"X-Proxy-Key": KEY}))
    assert resp.choices[0].message.content == "Hello there!"
    sent = fake_upstream.requests[-1]["headers"]
    assert sent["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any(k.lower() == "x-proxy-key" or KEY in v for k, v in sent.items())
    [rec] = await proxy.wait_records("acc", 1)
    assert rec["success"] is True


async def test_right_key_in_authorization_is_stripped(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(access=Access(proxy_keys=(KEY,)))
    resp = await chat(make_client(proxy, run_id="acc", api_key=KEY))
    assert resp.choices[0].message.content == "Hello there!"
    sent = fake_upstream.requests[-1]["headers"]
    assert "Authorization" not in sent and not any(KEY in v for v in sent.values())
    # The unmetered passthrough needs the key too, and strips it the same way.
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url("/v1/models")) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "missing_proxy_key"
        async with http.get(proxy.url("/v1/models"), headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
        async with http.get(proxy.url("/healthz")) as r:
            assert r.status == 200  # health stays open
    assert fake_upstream.requests[-1]["path"] == "/v1/models"
    assert "Authorization" not in fake_upstream.requests[-1]["headers"]
    await proxy.settle(1)  # the chat call's record only
    assert rejected(proxy) == []  # unmetered paths get no record, refused or not


async def test_key_in_authorization_with_injected_upstream_key(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MP_TEST_UPSTREAM_KEY", "sk-injected-by-proxy")
    monkeypatch.setenv("MP_TEST_PROXY_KEYS", f" first-key , {KEY},")
    up = Upstream(name="fake", base_url=fake_upstream.base_url, api_key_env="MP_TEST_UPSTREAM_KEY")
    proxy = await make_proxy(upstreams=(up,), access=Access(proxy_keys_env="MP_TEST_PROXY_KEYS"))
    resp = await chat(make_client(proxy, run_id="acc", api_key=KEY))
    assert resp.choices[0].message.content == "Hello there!"
    assert fake_upstream.requests[-1]["headers"]["Authorization"] == "Bearer sk-injected-by-proxy"
    assert isinstance(await chat(make_client(proxy, run_id="acc", api_key="not-a-key")), openai.AuthenticationError)


def test_keys_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TEST_KEYS", "a1, b2,,c3 ")
    def resolved(access: Access) -> Access:
        return resolve_env(Config(access=access)).access

    keys = resolved(Access(proxy_keys=("k0",), proxy_keys_env="MP_TEST_KEYS"))
    assert keys.proxy_keys == ("k0", "a1", "b2", "c3") and resolved(keys) == keys  # idempotent
    monkeypatch.delenv("MP_TEST_KEYS")
    with pytest.raises(
        ConfigError, match="access.proxy_keys_env: environment variable MP_TEST_KEYS is not set"
    ):
        resolved(Access(proxy_keys_env="MP_TEST_KEYS"))
    monkeypatch.setenv("MP_TEST_ADMIN", "tok")
    assert resolved(Access(admin_token_env="MP_TEST_ADMIN")).admin_token == "tok"
    assert resolved(Access(admin_token="own", admin_token_env="MP_TEST_ADMIN")).admin_token == "own"


# -- admin token on /runs, /ui, /metrics -----------------------------------------------------------


async def get(proxy: ProxyUnderTest, path: str, **headers: str) -> tuple[int, dict[str, Any] | None]:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url(path), headers=headers) as r:
            body = await r.json() if r.content_type == "application/json" else None
            return r.status, body


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_admin_paths_need_the_token_on_a_non_loopback_bind(make_proxy: ProxyFactory) -> None:
    # The config says 0.0.0.0 (what the middleware decides on); the test server still listens on loopback.
    proxy = await make_proxy(host="0.0.0.0", access=Access(admin_token="adm-token-1"))
    for path in ("/metrics", "/runs", "/runs/r1", "/runs/r1/events", "/ui", "/ui/app.js"):
        status, body = await get(proxy, path)
        assert status == 401 and body is not None, path
        assert body["error"]["code"] == "invalid_admin_token" and body["error"]["message"].startswith(
            "Missing"
        )
        status, body = await get(proxy, path, **{"X-Admin-Token": "adm-token-2"})
        assert status == 401 and body is not None and body["error"]["message"].startswith("Invalid")
        status, _ = await get(proxy, path, Authorization="Bearer wrong")
        assert status == 401
    assert (await get(proxy, "/metrics", **{"X-Admin-Token": "adm-token-1"}))[0] == 200
    assert (await get(proxy, "/metrics", Authorization="Bearer adm-token-1"))[0] == 200
    # Browsers: the 401 carries a Basic challenge; the token is the password (any user name).
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url("/ui")) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="metering-proxy admin"'
        async with http.get(
            proxy.url("/metrics"), headers={"Authorization": basic("anyone", "adm-token-1")}
        ) as r:
            assert r.status == 200
        async with http.get(proxy.url("/metrics"), headers={"Authorization": basic("adm-token-1", "x")}) as r:
            assert r.status == 401
        async with http.get(proxy.url("/metrics"), headers={"Authorization": "Basic %%%"}) as r:
            assert r.status == 401
    # With the token the request reaches routing: an admin path nobody serves is a plain 404.
    assert (await get(proxy, "/runs-nowhere", Authorization="Bearer adm-token-1"))[0] == 404
    assert (await get(proxy, "/healthz"))[0] == 200
    # Without proxy keys and without an injected upstream key, the API itself stays open.
    assert (await get(proxy, "/v1/models"))[0] == 200


async def test_admin_paths_closed_without_a_configured_token(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(host="0.0.0.0")
    status, body = await get(proxy, "/metrics", Authorization="Bearer anything")
    assert status == 401 and body is not None and "no admin token is configured" in body["error"]["message"]


async def test_admin_paths_on_loopback(make_proxy: ProxyFactory) -> None:
    open_proxy = await make_proxy()
    assert (await get(open_proxy, "/metrics"))[0] == 200  # loopback, no token: open as before
    guarded = await make_proxy(access=Access(admin_token="adm"))
    assert (await get(guarded, "/metrics"))[0] == 401  # a configured token is always required
    assert (await get(guarded, "/metrics", **{"X-Admin-Token": "adm"}))[0] == 200
    keyed = await make_proxy(access=Access(proxy_keys=(KEY,)))
    assert (await get(keyed, "/metrics"))[0] == 200  # proxy keys guard the API, not the admin paths


# -- no open relay ---------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv", [["--config", "{cfg}"], ["--config", "{cfg_loop}", "--host", "0.0.0.0"]])
def test_open_relay_refused_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:  # fmt: skip
    monkeypatch.setenv("MP_TEST_UPSTREAM_KEY", "sk-real")
    ups = (
        "upstreams: [{name: openai, base_url: 'http://127.0.0.1:9/v1', api_key_env: MP_TEST_UPSTREAM_KEY}]\n"
    )
    cfg = _write(tmp_path, "host: 0.0.0.0\n" + ups)
    cfg_loop = str(tmp_path / "loop.yaml")
    Path(cfg_loop).write_text(ups)
    assert main(["serve", *[a.format(cfg=cfg, cfg_loop=cfg_loop) for a in argv]]) == 2
    out = capsys.readouterr()
    [line] = out.err.strip().splitlines()
    assert "access.proxy_keys: refusing to listen on 0.0.0.0 (not loopback)" in line and "openai" in line
    assert "listening" not in out.out
    assert "sk-real" not in out.err


def test_exposure_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MP_TEST_UPSTREAM_KEY", "sk-real")
    injecting = (Upstream(name="u", base_url="http://127.0.0.1:9/v1", api_key_env="MP_TEST_UPSTREAM_KEY"),)
    plain = (Upstream(name="u", base_url="http://127.0.0.1:9/v1"),)
    with pytest.raises(ConfigError, match="refusing to listen on all interfaces"):
        A.check_exposure(Config(host="", upstreams=injecting))
    with pytest.raises(ConfigError):
        make_app(Config(host="10.1.2.3", upstreams=injecting, runs_dir=tmp_path))  # make_app refuses too
    A.check_exposure(Config(host="127.0.0.1", upstreams=injecting))  # loopback: fine
    A.check_exposure(Config(host="0.0.0.0", upstreams=plain))  # the client's own key goes upstream: fine
    A.check_exposure(Config(host="0.0.0.0", upstreams=injecting, access=Access(proxy_keys=("k",))))


def test_secrets_are_not_in_the_config_repr() -> None:
    text = repr(Config(access=Access(proxy_keys=("mp-secret-key",), admin_token="adm-secret-token")))
    assert "mp-secret-key" not in text and "adm-secret-token" not in text


# -- safe defaults: no secret and no prompt text in logs or records ---------------------------------

# The fake upstream's 'status:401:long' error echoes exactly this key, as OpenAI's invalid-key error does.
API_KEY = "sk-proj-FAKE0123456789abcdef"
PROMPT = "PROMPT-zebra-quartz-4471 please summarise the secret plan"
WRONG = "mp-wrongkey-zz9911"
ADMIN = "adm-token-qq7733"


async def test_no_secret_or_prompt_in_logs_or_records(make_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(
        host="0.0.0.0", pricebook=PriceBook.load(BUNDLED_PRICES),
        access=Access(proxy_keys=(KEY,), admin_token=ADMIN),
        budgets=Budgets(runs=(BudgetRule(match="capped", tokens=0),)),
    )  # fmt: skip
    msgs: Messages = [{"role": "system", "content": PROMPT}, {"role": "user", "content": PROMPT}]

    async def call(stream: bool = False, headers: dict[str, str] | None = None) -> None:
        c = make_client(proxy, run_id="secrets", api_key=API_KEY, headers={"X-Proxy-Key": KEY, **(headers or {})})
        try:
            if stream:
                async for _ in await c.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True):
                    pass
            else:
                await c.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        except openai.APIError:
            pass

    await call()  # success
    await call(stream=True)  # streamed success
    await call(headers={"X-Fake": "status:401:long"})  # upstream error echoing the key
    await call(headers={"X-Fake": "status:500"})  # upstream error
    await call(stream=True, headers={"X-Fake": "cut"})  # stream broken off
    await call(headers={"X-Proxy-Key": WRONG})  # refused: wrong proxy key
    await call(headers={"X-Run-Id": "capped"})  # refused: budget
    await call(headers={"X-Run-Budget-Usd": "lots"})  # refused: invalid budget header
    for path in ("/metrics", "/runs/secrets"):
        await get(proxy, path, **{"X-Admin-Token": WRONG})
        await get(proxy, path, Authorization=f"Bearer {ADMIN}")
    await proxy.settle(8)  # 6 in secrets.jsonl, one each in capped.jsonl and .rejected.jsonl
    recs = await proxy.records("secrets")
    assert len(recs) == 6 and len(rejected(proxy)) == 1
    assert len(fake_upstream.requests) == 5
    files = sorted(p for p in proxy.runs_dir.rglob("*") if p.is_file())
    assert [p.name for p in files] == [".rejected.jsonl", "capped.jsonl", "secrets.jsonl"]
    blobs = {p.name: p.read_bytes().decode() for p in files}
    # The proxy's log: everything but the test's own client (the openai SDK logs its requests at DEBUG).
    client_side = ("openai", "httpx", "httpcore")
    blobs["log"] = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(client_side))
    assert blobs["log"].count("call failed: ") >= 2  # the failures (the refusal included) were logged
    assert "aiohttp.access" in {r.name for r in caplog.records}  # and the server's access log was captured
    for secret in (API_KEY, KEY, WRONG, ADMIN, "PROMPT-zebra", "secret plan"):
        for name, text in blobs.items():
            assert secret not in text, f"{secret!r} found in {name}"


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("/v1//chat/completions", "/v1/chat/completions"),
        ("/v1/chat/./completions", "/v1/chat/completions"),
        ("/run/r/v1/messages", "/v1/messages"),
        ("/api/chat", "/api/chat"),
        ("/api/generate", "/api/generate"),
        ("/api/embeddings", "/api/embeddings"),
        ("/api/embed", "/api/embed"),
    ],
)
async def test_a_missing_key_on_any_spelling_of_a_metered_path_is_recorded(
    make_proxy: ProxyFactory, fake_upstream: FakeUpstream, path: str, endpoint: str
) -> None:
    """The refusal path reads the same endpoint table as the meter: no spelling escapes the record."""
    import asyncio

    proxy = await make_proxy(access=Access(proxy_keys=(KEY,)))
    assert proxy.server.port is not None
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSGS})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)  # exactly this spelling
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
    await proxy.settle(1)
    [rec] = rejected(proxy)
    assert rec["endpoint"] == endpoint and rec["error"]["category"] == "unauthorized"
    assert fake_upstream.requests == []
