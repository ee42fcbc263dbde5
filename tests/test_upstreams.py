"""Routing, upstream URLs, header and auth policy, provider facts: what forward.py asks of an upstream."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import routes
from proxy.config import Config, Upstream, resolve_env
from proxy.upstreams import Router, Upstreams, client_headers, shown_url


def test_router_first_matching_glob_wins() -> None:
    a = Upstream(name="a", base_url="http://a/v1", models=("llama*", "qwen*"))
    b = Upstream(name="b", base_url="http://b/v1")
    router = Router((a, b))
    assert router.pick("llama3.2") is a and router.pick("gpt-4o") is b
    assert Router((a,)).pick("gpt-4o") is None
    assert router.patterns() == "a: llama*, qwen*; b: *"


@pytest.mark.parametrize(
    ("base", "path", "query", "expected"),
    [
        ("http://h:1/v1", "/v1/chat/completions", "", "http://h:1/v1/chat/completions"),
        ("http://h:1/tenant/v1", "/v1/models/a b", "", "http://h:1/tenant/v1/models/a%20b"),
        ("http://h:1/v1", "/api/chat", "", "http://h:1/api/chat"),
        ("https://x.openai.azure.com/openai", "/v1/chat/completions", "api-version=2024-10-21",
         "https://x.openai.azure.com/openai/chat/completions?api-version=2024-10-21"),
    ],
)
def test_url_is_the_canonical_path_under_base_url(base: str, path: str, query: str, expected: str) -> None:
    up = Upstream(name="u", base_url=base)
    ups = Upstreams(Config(upstreams=(up,)))
    route = routes.Route(canonical=path, path=path, run_id=None, endpoint=None)
    assert str(ups.url(up, route, query)) == expected
    assert str(ups.url(up, route, query)) == expected  # and again, from the cache


def test_request_headers_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP_KEY", "sk-injected-0123456789")
    openai_up = Upstream(name="o", base_url="https://api.openai.com/v1", api_key_env="UP_KEY",
                         headers=(("OpenAI-Organization", "org-1"),))  # fmt: skip
    anthropic_up = Upstream(name="a", base_url="https://api.anthropic.com/v1", api_key_env="UP_KEY")
    ups = Upstreams(resolve_env(Config(upstreams=(openai_up, anthropic_up))))
    sent = CIMultiDictProxy(CIMultiDict({
        "Authorization": "Bearer sk-client", "x-api-key": "client", "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1", "Keep-Alive": "timeout=5", "X-Run-Id": "r", "X-Meter-Tag-A": "b",
        "Accept-Encoding": "br", "User-Agent": "sdk",
    }))  # fmt: skip
    out = ups.request_headers(sent, openai_up, frozenset({"x-run-id"}))
    assert dict(out) == {"User-Agent": "sdk", "Authorization": "Bearer sk-injected-0123456789",
                         "OpenAI-Organization": "org-1"}  # fmt: skip
    out = ups.request_headers(sent, anthropic_up, frozenset({"x-run-id"}))
    assert out["x-api-key"] == "sk-injected-0123456789" and "Authorization" not in out


def test_header_decisions_remembered_by_name_never_cross_calls() -> None:
    # Names are judged once and remembered, but a header the Connection header names is dropped only in that
    # call, and a name remembered as forwarded is still dropped when a later call names it.
    up = Upstream(name="o", base_url="http://127.0.0.1:1/v1")
    ups = Upstreams(Config(upstreams=(up,)))
    consumed = frozenset({"x-run-id"})

    def sent(connection: str) -> dict[str, str]:
        headers = {"Connection": connection, "X-Hop": "1", "X-Run-Id": "r", "User-Agent": "sdk"}
        return dict(ups.request_headers(CIMultiDictProxy(CIMultiDict(headers)), up, consumed))

    assert sent("keep-alive") == {"X-Hop": "1", "User-Agent": "sdk"}
    assert sent("keep-alive, X-Hop") == {"User-Agent": "sdk"}
    assert sent("keep-alive") == {"X-Hop": "1", "User-Agent": "sdk"}
    # Other consumed names (another caller's policy): judged afresh, not by what was remembered.
    assert dict(ups.request_headers(CIMultiDictProxy(CIMultiDict({"X-Hop": "1"})), up, frozenset({"x-hop"}))) == {}


def test_a_flood_of_header_names_is_judged_right_past_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import upstreams

    monkeypatch.setattr(upstreams, "_MAX_KNOWN_HEADERS", 8)
    up = Upstream(name="o", base_url="http://127.0.0.1:1/v1")
    ups = Upstreams(Config(upstreams=(up,)))
    consumed = frozenset({"x-run-id"})
    for i in range(40):
        headers = {f"X-N{i}": "v", f"X-Meter-Tag-T{i}": "t", "Keep-Alive": "5", "X-Run-Id": "r"}
        out = ups.request_headers(CIMultiDictProxy(CIMultiDict(headers)), up, consumed)
        assert dict(out) == {f"X-N{i}": "v"}
    assert len(ups._forwarded) == 8


def test_provider_is_configured_else_learned_once_and_kept() -> None:
    local = Upstream(name="l", base_url="http://127.0.0.1:8080/v1")
    ups = Upstreams(Config(upstreams=(local,)))
    assert ups.provider(local, None, None, None) is None
    assert ups.provider(local, {"openai-processing-ms": "3"}, None, None) is None  # a local host: no cloud signal
    assert ups.provider(local, {}, "llamacpp", None) == "llamacpp"
    assert ups.provider(local, {}, None, None) == "llamacpp"  # learned: holds for every endpoint
    assert ups.provider(local, None, None, None) == "llamacpp"


def test_client_headers_drop_hop_by_hop_and_mask() -> None:
    got = {"Content-Encoding": "gzip", "Transfer-Encoding": "chunked", "X-Echo": "key sk-abc-0123456789"}
    out = client_headers(got, lambda v, extra: v.replace("sk-abc-0123456789", "[redacted]"), ())
    assert dict(out) == {"X-Echo": "key [redacted]"}


def test_shown_url_hides_userinfo_and_query() -> None:
    from yarl import URL

    assert shown_url(URL("http://me:pw@h:1/v1/chat?key=1")) == "http://h:1/v1/chat"
