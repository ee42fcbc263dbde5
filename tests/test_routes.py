"""Canonical paths, default deny: every spelling is metered, refused (with a record) or allow-listed.

The upstream here answers any path and logs the raw request target it received, so each case also
shows exactly what reached it; its base URL has a path prefix (/tenant/v1) that must never be left.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import routes
from proxy.app import make_app
from proxy.config import Config, Timeouts, Upstream, resolve_env
from tests.conftest import settle, track_handlers

CHAT_OK = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}  # fmt: skip


class AnyPathUpstream:
    """Answers every method and path; keeps the raw request target of each request."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.targets.append(request.raw_path)
        await request.read()
        if request.method == "GET":
            return web.json_response({"object": "list", "data": []})
        return web.json_response(CHAT_OK)


class Harness:
    def __init__(self, proxy: TestServer, upstream: AnyPathUpstream, runs: Path) -> None:
        self.proxy, self.upstream, self.runs = proxy, upstream, runs

    async def raw(self, method: str, target: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
        """One request with the target exactly as given (no client library normalises it)."""
        assert self.proxy.port is not None
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                             "stream": False})  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        head = (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n")  # fmt: skip
        writer.write(head.encode("latin-1") + body)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        head_bytes, _, payload = rest.partition(b"\r\n\r\n")
        hdrs = dict(line.split(": ", 1) for line in head_bytes.decode("latin-1").split("\r\n") if ": " in line)
        return int(status_line.split()[1]), {k.lower(): v for k, v in hdrs.items()}, payload

    async def records(self) -> dict[str, list[dict[str, Any]]]:
        await settle(self.proxy.app)
        out: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.runs.glob("*.jsonl")) if self.runs.is_dir() else []:
            out[path.stem] = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
        return out


@pytest.fixture
async def harness(tmp_path: Path) -> Any:
    upstream = AnyPathUpstream()
    up_server = TestServer(upstream.app, host="127.0.0.1")
    await up_server.start_server()
    cfg = Config(
        runs_dir=tmp_path / "runs",
        upstreams=(Upstream(name="tenant", base_url=str(up_server.make_url("/tenant/v1"))),),
        timeouts=Timeouts(connect_s=2, read_s=5, total_s=10),
        flush_interval_s=0.05,
    )
    servers: list[TestServer] = [up_server]

    async def start(**overrides: Any) -> Harness:
        server = TestServer(track_handlers(make_app(replace(cfg, **overrides))), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Harness(server, upstream, cfg.runs_dir)

    yield start
    for s in reversed(servers):
        await s.close()


METERED = "metered"
REFUSED = "refused"
PASS = "pass"
PLAIN_404 = "plain404"

CHAT_UP = "/tenant/v1/chat/completions"
# (method, target as sent, outcome, what the upstream received or (status, code) of the refusal, run id)
CASES: list[tuple[str, str, str, Any, str | None]] = [
    # Spellings of metered endpoints: metered, budgeted and recorded, and the upstream gets the canonical path.
    ("POST", "/v1/chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/chat/./completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/./chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/chat/completions/", METERED, CHAT_UP, "default"),
    ("POST", "/v1//chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "//v1/chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/chat/completions/.", METERED, CHAT_UP, "default"),
    ("POST", "/v1/x/../chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/chat/x/../completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/models/../chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/x/../v1/chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/%63hat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/v1/chat/completions?api-version=1", METERED, CHAT_UP + "?api-version=1", "default"),
    ("POST", "/run/r/v1/chat/completions", METERED, CHAT_UP, "r"),
    ("POST", "/run/r/v1/./chat/completions", METERED, CHAT_UP, "r"),
    ("POST", "/run/r/./v1/chat/completions", METERED, CHAT_UP, "r"),
    ("POST", "/run/r/../../v1/chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/run/r/v1/../../other/v1/chat/completions", METERED, CHAT_UP, "other"),
    ("POST", "/v1/embeddings/.", METERED, "/tenant/v1/embeddings", "default"),
    ("POST", "/v1/embeddings/", METERED, "/tenant/v1/embeddings", "default"),
    ("POST", "/v1/completions", METERED, "/tenant/v1/completions", "default"),
    ("POST", "/v1/responses", METERED, "/tenant/v1/responses", "default"),
    ("POST", "/v1/messages", METERED, "/tenant/v1/messages", "default"),
    ("POST", "/api/chat", METERED, "/tenant/api/chat", "default"),
    ("POST", "/api/./generate", METERED, "/tenant/api/generate", "default"),
    ("POST", "/api/embeddings", METERED, "/tenant/api/embeddings", "default"),
    ("POST", "/runs/../v1/chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/ui/../v1/chat/completions", METERED, CHAT_UP, "default"),
    ("POST", "/run/r/api/embed", METERED, "/tenant/api/embed", "r"),
    # Ambiguous encodings and climbs: 400 invalid_path, recorded, nothing forwarded.
    ("POST", "/v1/x/..%2Fchat/completions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/x/..%2fchat/completions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/%2E/chat/completions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/%2e%2e/v1/chat/completions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/run/r/v1/x/..%2Fchat/completions", REFUSED, (400, "invalid_path"), None),
    ("GET", "/v1/..%2F..%2Fsecret", REFUSED, (400, "invalid_path"), None),
    ("POST", "/run/r/v1/..%2F..%2Fother/v1/chat/completions", REFUSED, (400, "invalid_path"), None),
    ("GET", "/v1/models/..%2F..%2Fadmin", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/chat%5Ccompletions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/chat/completions%00", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/%ff/chat/completions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/../v1/chat/completions", REFUSED, (400, "invalid_path"), None),
    ("POST", "/v1/../../chat/completions", REFUSED, (400, "invalid_path"), None),
    ("GET", "/v1/models/../../../etc/passwd", REFUSED, (400, "invalid_path"), None),
    # Not served: 404/405 unknown_path, recorded (under the API roots), nothing forwarded.
    ("GET", "/v1/chat/completions", REFUSED, (405, "method_not_allowed"), None),
    ("PUT", "/v1/embeddings", REFUSED, (405, "method_not_allowed"), None),
    ("POST", "/v1/files", REFUSED, (404, "unknown_path"), None),
    ("POST", "/v1/chat/completions/extra", REFUSED, (404, "unknown_path"), None),
    ("DELETE", "/v1/models", REFUSED, (404, "unknown_path"), None),
    ("POST", "/v1/models", REFUSED, (404, "unknown_path"), None),
    ("GET", "/v1/models/a/b", REFUSED, (404, "unknown_path"), None),
    ("GET", "/v1", REFUSED, (404, "unknown_path"), None),
    ("POST", "/api/pull", REFUSED, (404, "unknown_path"), None),
    ("POST", "/run/r", REFUSED, (404, "unknown_path"), None),
    ("POST", "/chat/completions", REFUSED, (404, "unknown_path"), None),
    # Spellings of the proxy's own pages: only the canonical one is served.
    ("GET", "/v1/models/../../healthz", PLAIN_404, None, None),
    ("GET", "//healthz", PLAIN_404, None, None),
    ("GET", "/favicon.ico", PLAIN_404, None, None),
    # The allow-list: forwarded unmetered, no record.
    ("GET", "/v1/models", PASS, "/tenant/v1/models", None),
    ("GET", "/v1/./models", PASS, "/tenant/v1/models", None),
    ("GET", "/v1/models/gpt-4o", PASS, "/tenant/v1/models/gpt-4o", None),
    ("GET", "/v1/models/a%20b", PASS, "/tenant/v1/models/a%20b", None),
    ("GET", "/v1/models?limit=1", PASS, "/tenant/v1/models?limit=1", None),
    ("GET", "/run/r/v1/models/", PASS, "/tenant/v1/models", None),
]


@pytest.mark.parametrize(("method", "target", "outcome", "expect", "run_id"), CASES,
                         ids=[f"{c[0]} {c[1]}" for c in CASES])  # fmt: skip
async def test_every_spelling(harness: Any, method: str, target: str, outcome: str, expect: Any,
                              run_id: str | None) -> None:  # fmt: skip
    h: Harness = await harness()
    status, headers, body = await h.raw(method, target)
    recs = await h.records()
    if outcome == METERED:
        assert status == 200, body
        assert h.upstream.targets == [expect]
        assert run_id is not None and list(recs) == [run_id] and len(recs[run_id]) == 1
        rec = recs[run_id][0]
        assert rec["success"] is True and rec["endpoint"] == routes.resolve(target.split("?")[0], "POST").path
        assert rec["request_id"] == headers["x-meter-request-id"]
    elif outcome == REFUSED:
        err = orjson.loads(body)["error"]
        assert (status, err["code"]) == expect, body
        assert h.upstream.targets == []
        assert list(recs) == [".rejected"] and len(recs[".rejected"]) == 1
        rec = recs[".rejected"][0]
        assert rec["status"] == status and rec["error"]["id"] == headers["x-meter-error-id"]
        assert rec["error"]["category"] in ("invalid_path", "unknown_path")
    elif outcome == PASS:
        assert status == 200, body
        assert h.upstream.targets == [expect]
        assert recs == {}
    else:
        assert status == 404 and orjson.loads(body)["error"]["code"] == "unknown_path"
        assert h.upstream.targets == [] and recs == {}


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 40
    assert {c[2] for c in CASES} == {METERED, REFUSED, PASS, PLAIN_404}


async def test_a_zero_budget_cannot_be_bypassed_by_spelling(harness: Any) -> None:
    """The issue's reproduction: {match: "zero-*", usd: 0} and POST /v1/chat/./completions answered 200."""
    from proxy.config import BudgetRule, Budgets

    h: Harness = await harness(budgets=Budgets(runs=(BudgetRule(match="zero-*", usd=0),)))
    for target in ("/v1/chat/./completions", "/v1/./chat/completions", "/v1/embeddings/.", "/v1//chat/completions"):
        status, _, body = await h.raw("POST", target, "X-Run-Id: zero-r\r\n")
        assert status == 429, (target, body)
    assert h.upstream.targets == []
    recs = await h.records()
    assert [r["error"]["category"] for r in recs["zero-r"]] == ["budget_exceeded"] * 4


async def test_configured_passthrough_rules(harness: Any) -> None:
    h: Harness = await harness(passthrough=("GET /v1/files/**", "* /v1/batches"))
    assert (await h.raw("GET", "/v1/files/a/b/content"))[0] == 200
    assert (await h.raw("DELETE", "/v1/batches"))[0] == 200
    assert (await h.raw("GET", "/v1/models"))[0] == 404  # the default list is replaced, not extended
    assert h.upstream.targets == ["/tenant/v1/files/a/b/content", "/tenant/v1/batches"]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("", "/"),
        ("/a/b/../c/./d/", "/a/c/d"),
        ("//a///b", "/a/b"),
        ("/a/%62", "/a/b"),
        ("/a/%7e", "/a/~"),
        ("/a/b%20c", "/a/b c"),
        ("/a/..", "/"),
        ("/a/%zz", "/a/%zz"),  # a malformed escape is literal text, as RFC 3986 leaves it
    ],
)
def test_canonical_path(raw: str, canonical: str) -> None:
    assert routes.canonical_path(raw) == canonical


@pytest.mark.parametrize("raw", ["/..", "/a/../..", "/%2e", "/a%2fb", "/a%5cb", "/a%00", "/a\\b", "/%c3%28"])
def test_canonical_path_refuses(raw: str) -> None:
    with pytest.raises(routes.InvalidPath):
        routes.canonical_path(raw)


def test_the_endpoint_table_is_the_only_list() -> None:
    from proxy import metrics

    assert set(metrics.OPERATIONS) == set(routes.BY_PATH)
    assert all(e.path.startswith(("/v1/", "/api/")) for e in routes.ENDPOINTS)


# -- redirects are never followed --------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/models"])
async def test_upstream_redirects_are_not_followed(tmp_path: Path, status: int, target: str) -> None:
    """A redirect to another host would hand it the injected key, configured headers and the prompt."""
    import os

    thief_got: list[dict[str, str]] = []

    async def thief(request: web.Request) -> web.Response:
        thief_got.append(dict(request.headers))
        return web.json_response(CHAT_OK)

    thief_app = web.Application()
    thief_app.router.add_route("*", "/{tail:.*}", thief)
    thief_server = TestServer(thief_app, host="127.0.0.1")
    await thief_server.start_server()

    class Redirect(web.HTTPException):
        status_code = status

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        raise Redirect(headers={"Location": str(thief_server.make_url(request.path))})

    up_app = web.Application()
    up_app.router.add_route("*", "/{tail:.*}", handler)
    up_server = TestServer(up_app, host="127.0.0.1")
    await up_server.start_server()
    os.environ["ROUTES_TEST_KEY"] = "sk-ant-injected-secret"
    cfg = Config(
        runs_dir=tmp_path / "runs",
        upstreams=(Upstream(name="up", base_url=str(up_server.make_url("/v1")), provider="anthropic",
                            api_key_env="ROUTES_TEST_KEY", headers=(("api-key", "azure-secret"),)),),  # fmt: skip
        flush_interval_s=0.05,
    )
    proxy = TestServer(track_handlers(make_app(resolve_env(cfg))), host="127.0.0.1")
    await proxy.start_server()
    try:
        h = Harness(proxy, AnyPathUpstream(), cfg.runs_dir)
        got, headers, _ = await h.raw("POST" if "chat" in target else "GET", target, "X-Run-Id: redir\r\n")
        assert got == status
        assert headers["location"].startswith(str(thief_server.make_url("/")))  # the client decides
        assert thief_got == []
        recs = await h.records()
        if "chat" in target:
            [rec] = recs["redir"]
            assert rec["status"] == status and rec["error"]["category"] == "upstream_redirect"
            assert rec["error"]["id"] == headers["x-meter-error-id"]
    finally:
        await proxy.close()
        await up_server.close()
        await thief_server.close()
        del os.environ["ROUTES_TEST_KEY"]
