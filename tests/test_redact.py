"""Secrets by value and request text never leave the proxy, even when a hostile upstream echoes them."""

from __future__ import annotations

import logging
import os
import secrets as pysecrets
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import redact
from proxy.app import SINK, make_app
from proxy.config import Access, Config, Timeouts, Upstream, load, resolve_env
from tests.conftest import settle, track_handlers


def test_mask_by_value_in_text_bytes_and_json() -> None:
    s = redact.Secrets(["gsk_live_0123456789", "short", 'with"quote-and\\slash'])
    assert s.mask("key gsk_live_0123456789 here") == "key [redacted] here"
    assert s.mask("short stays") == "short stays"  # placeholders are not keys
    line = orjson.dumps({"m": 'x with"quote-and\\slash y', "k": "gsk_live_0123456789"})
    assert b"quote-and" not in s.mask_bytes(line) and b"gsk_live" not in s.mask_bytes(line)
    assert orjson.loads(s.mask_bytes(line)) == {"m": "x [redacted] y", "k": "[redacted]"}


def test_a_calls_credentials_are_masked_too() -> None:
    from multidict import CIMultiDict

    sent = {"Authorization": "Bearer sk-client-abcdefghij", "X-Api-Key": "anthropic-client-key", "api-key": "k"}
    creds = redact.credentials(CIMultiDict(sent))
    s = redact.Secrets(["configured-secret-1"])
    text = "a Bearer sk-client-abcdefghij b anthropic-client-key c configured-secret-1 d k"
    assert s.mask(text, creds) == "a [redacted] b [redacted] c [redacted] d k"
    assert s.mask_bytes(text.encode(), creds) == b"a [redacted] b [redacted] c [redacted] d k"


def test_cut_echo_at_the_first_quote_of_the_request() -> None:
    body = {"model": "gpt-4o-mini-long-name", "messages": [{"content": "tell me a secret plan"}]}
    needles = redact.request_text({"User-Agent": "agent/1.0 canary", "Content-Type": "application/json"}, body)
    assert "gpt-4o-mini-long-name" not in needles and "application/json" not in needles
    text = "Invalid request. You said: tell me a secret plan; agent/1.0 canary"
    assert redact.cut_echo(text, needles) == "Invalid request. You said: [request content removed]"
    assert redact.cut_echo("model gpt-4o-mini-long-name not found", needles) == "model gpt-4o-mini-long-name not found"


# -- end to end: a canary in every field, an upstream that echoes everything --------------------


class EchoUpstream:
    """Answers every call with an error quoting the whole request: headers, body, credentials."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = (await request.read()).decode("utf-8", "replace")
        echo = f"Incorrect API key provided: {request.headers.get('Authorization')} / " \
               f"{request.headers.get('x-api-key')} / {request.headers.get('api-key')}. " \
               f"Your request was {raw} with headers {dict(request.headers)}"  # fmt: skip
        err = {"error": {"message": echo, "type": "invalid_request_error", "code": "invalid_api_key", "param": None}}
        if b"stream" in raw.encode() and '"stream":true' in raw.replace(" ", ""):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(err, status=401, headers={"x-echo": echo[:200].encode("ascii", "replace").decode()})


async def test_no_canary_and_no_secret_leaves_the_proxy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    canary = "CANARY" + pysecrets.token_hex(8)
    injected = "gsk_" + pysecrets.token_hex(16)
    header_secret = "azure-" + pysecrets.token_hex(12)
    password = "pw-" + pysecrets.token_hex(10)
    proxy_key = "mp-" + pysecrets.token_hex(12)
    admin = "adm-" + pysecrets.token_hex(12)
    client_key = "sk-client-" + pysecrets.token_hex(12)
    secret_values = [injected, header_secret, password, proxy_key, admin, client_key]
    os.environ["REDACT_TEST_KEY"] = injected
    caplog.set_level(logging.DEBUG)

    echo = EchoUpstream()
    up = TestServer(echo.app, host="127.0.0.1")
    await up.start_server()
    base = str(up.make_url("/v1")).replace("http://", f"http://user:{password}@")
    cfg = Config(
        runs_dir=tmp_path / "runs",
        upstreams=(
            Upstream(name="inj", base_url=base, api_key_env="REDACT_TEST_KEY", models=("inj-*",),
                     headers=(("api-key", header_secret),)),
            Upstream(name="plain", base_url=str(up.make_url("/v1")), models=("plain-*",)),
        ),  # fmt: skip
        timeouts=Timeouts(connect_s=2, read_s=5, total_s=10),
        flush_interval_s=0.05,
        access=Access(proxy_keys=(proxy_key,), admin_token=admin),
    )
    proxy = TestServer(track_handlers(make_app(resolve_env(cfg))), host="127.0.0.1")
    await proxy.start_server()
    client_bodies: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as s:
            for model in ("inj-model", "plain-model"):
                for stream in (False, True):
                    body = {
                        "model": model, "stream": stream, "user": canary, "metadata": {"note": canary},
                        "messages": [{"role": "system", "content": f"system {canary}"},
                                     {"role": "user", "content": [{"type": "text", "text": f"hi {canary}"}]}],
                        "tools": [{"type": "function", "function": {"name": "f", "description": canary}}],
                    }  # fmt: skip
                    headers = {"X-Run-Id": "leak", "X-Proxy-Key": proxy_key, "x-api-key": client_key,
                               "Authorization": f"Bearer {client_key}", "User-Agent": f"agent {canary}",
                               "X-Custom": canary}  # fmt: skip
                    async with s.post(proxy.make_url("/v1/chat/completions"), json=body, headers=headers) as r:
                        client_bodies.append(await r.read() + str(dict(r.headers)).encode())
            await settle(proxy.app, 4)
            admin_h = {"Authorization": f"Bearer {admin}"}
            outputs: dict[str, bytes] = {}
            for path in ("/runs", "/runs/leak", "/runs/leak/records", "/metrics"):
                async with s.get(proxy.make_url(path), headers=admin_h) as r:
                    assert r.status == 200, path
                    outputs[path] = await r.read()
    finally:
        await proxy.close()
        await up.close()
        del os.environ["REDACT_TEST_KEY"]
    recs = [orjson.loads(line) for line in (tmp_path / "runs" / "leak.jsonl").read_bytes().splitlines()]
    assert len(recs) == 4 and all(r["error"] is not None for r in recs)
    # The structured fields survive; the message is cut where it starts quoting.
    assert all("code=invalid_api_key" in r["error"]["detail"] for r in recs if not r["stream"])
    for f in sorted((tmp_path / "runs").iterdir()):
        outputs[f"file {f.name}"] = f.read_bytes()
    # aiohttp's access log (the test server's; `serve` runs without one) shows the User-Agent header.
    client_libs = ("aiohttp.client", "aiohttp.access")
    outputs["log"] = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(client_libs)).encode()
    for name, data in outputs.items():
        for needle in [canary, *secret_values]:
            assert needle.encode() not in data, (name, needle, data[:2000])
    # The client may see its own prompt echoed, but no secret, not even its own key.
    for data in client_bodies:
        for needle in secret_values:
            assert needle.encode() not in data, (needle, data[:2000])


def test_base_url_password_is_a_secret() -> None:
    cfg = Config(upstreams=(Upstream(name="u", base_url="http://me:s3cr3t-password@host/v1"),))
    assert "s3cr3t-password" in redact.from_config(cfg).values


def test_fleet_and_exporter_credentials_are_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MP_TEST_HOOK_SECRET", "hook-secret-51f0a2")
    monkeypatch.setenv("MP_TEST_OTEL_HEADERS", "x-honeycomb-team=otel-key-93ad1c")
    conf = tmp_path / "fleet.yaml"
    conf.write_text(
        "budgets: {store: {url: 'redis://u:redis-pw-7c1e@127.0.0.1:6379/0'}}\n"
        "ship:\n"
        "  postgres: {url: 'postgresql://u:pg-pw-2b9d@127.0.0.1/db'}\n"
        "  webhook: {url: 'https://u:hook-pw-c07e@hooks.example/in', secret_env: MP_TEST_HOOK_SECRET}\n"
        "otel: {enabled: true, headers_env: MP_TEST_OTEL_HEADERS}\n"
    )
    values = redact.from_config(load(conf)).values
    for secret in ("redis-pw-7c1e", "pg-pw-2b9d", "hook-pw-c07e", "hook-secret-51f0a2", "otel-key-93ad1c"):
        assert secret in values, secret


async def test_base_url_password_never_reaches_a_record_a_log_or_the_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refused_port: int
) -> None:
    caplog.set_level(logging.DEBUG)
    port = refused_port  # the upstream is unreachable
    password = "pw-" + pysecrets.token_hex(10)
    cfg = Config(runs_dir=tmp_path / "runs", flush_interval_s=0.05,
                 upstreams=(Upstream(name="u", base_url=f"http://me:{password}@127.0.0.1:{port}/v1"),))  # fmt: skip
    proxy = TestServer(make_app(cfg), host="127.0.0.1")
    await proxy.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.make_url("/v1/chat/completions"), json={"model": "m", "messages": []},
                              headers={"X-Run-Id": "pw"}) as r:  # fmt: skip
                assert r.status == 502
                answer = await r.read()
        await proxy.app[SINK].flush()
    finally:
        await proxy.close()
    record = (tmp_path / "runs" / "pw.jsonl").read_bytes()
    assert b"connection_error" in record and b"127.0.0.1" in answer
    log = "\n".join(r.getMessage() for r in caplog.records).encode()
    for where in (answer, record, log):
        assert password.encode() not in where and b"me:" not in where
