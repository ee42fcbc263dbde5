"""The README's recipes, run: each `<!-- recipe: NAME -->` fenced block is read from README.md here, so the
README and what was tried cannot drift.

Client recipes run as written (the URL pointed at the proxy under test) against the proxy in front of the
suite's fake upstream, which answers in the client's dialect; server recipes are upstream configs: each
loads with proxy.config, and a call through a fake upstream replaying that server's recorded payloads is
metered with the fixture's usage.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import config as C
from tests.conftest import FakeUpstream, load_case, make_client

ROOT = Path(__file__).resolve().parents[1]
README_URL = "http://127.0.0.1:8787"
RECIPE_RE = re.compile(r"^<!-- recipe: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
CLIENTS = ("openai-sdk", "anthropic-sdk", "claude-code", "llm", "langchain", "pydantic-ai", "openai-agents")
# recipe -> (provider the config names, the payload that server's dialect is replayed from)
SERVERS = {
    "ollama": ("ollama", "ollama/chat_stream_usage"),
    "llamacpp": ("llamacpp", "llamacpp/chat_stream_usage"),
    "vllm": ("vllm", "vllm/chat_stream_continuous"),
    "lmstudio": ("lmstudio", "lmstudio/chat_stream_no_usage"),
    "openrouter": ("openrouter", "openrouter/chat_stream"),
    "litellm": ("openai-compatible", "openai/chat_stream_usage"),
}


def recipes() -> dict[str, tuple[str, str]]:
    """Every marked block of the README: name -> (fence language, text)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found: dict[str, tuple[str, str]] = {}
    for name, lang, body in RECIPE_RE.findall(text):
        assert name not in found, f"recipe {name} twice"
        found[name] = (lang, body)
    return found


def test_every_recipe_is_tried_here() -> None:
    assert set(recipes()) == set(CLIENTS) | set(SERVERS) | {"docker", "docker-config"}


def test_docker_recipe_reaches_the_host_mounts_its_config_opens_the_ui_and_outlasts_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy import access

    _, run = recipes()["docker"]
    _, config_text = recipes()["docker-config"]
    assert "--add-host=host.docker.internal:host-gateway" in run
    [mount] = re.findall(r'-v "\$PWD/docker.yaml:(\S+):ro"', run)
    assert f"--config {mount}" in run
    monkeypatch.setenv("METERING_PROXY_ADMIN_TOKEN", "t0ken")
    assert "-e METERING_PROXY_ADMIN_TOKEN" in run
    # As the image's ENTRYPOINT runs it: all interfaces, so /ui needs the admin token.
    cfg = replace(C.resolve_env(C.from_mapping(yaml.safe_load(config_text))), host="0.0.0.0")
    access.check_exposure(cfg)  # not an open relay: it starts
    assert cfg.access.admin_token == "t0ken"
    assert cfg.upstreams[0].base_url.startswith("http://host.docker.internal:")
    [stop] = re.findall(r"--stop-timeout (\d+)", run)
    assert int(stop) > cfg.shutdown_grace_s
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    assert float(compose["x-proxy"]["stop_grace_period"].removesuffix("s")) > C.Config().shutdown_grace_s


@pytest.fixture
async def dialect_upstream() -> Any:
    """The suite's FakeUpstream, answering Anthropic Messages and OpenAI Responses calls with recorded
    payloads of those APIs (the SDKs could not parse its default chat answer), everything else as usual."""
    fake = FakeUpstream()

    @web.middleware
    async def by_path(request: web.Request, handler: Any) -> web.StreamResponse:
        case = {"/v1/messages": "anthropic/messages_nonstream", "/v1/responses": "openai/responses_nonstream"}
        if request.path in case and "X-Fake" not in request.headers:
            request = request.clone(headers={**request.headers, "X-Fake": f"fixture:{case[request.path]}"})
        return await handler(request)

    fake.app.middlewares.append(by_path)
    fake.server = TestServer(fake.app, host="127.0.0.1")
    await fake.server.start_server()
    yield fake
    await fake.server.close()


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", "LITELLM_MASTER_KEY"):
        monkeypatch.setenv(var, "sk-test-recipes")
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs it)")


def _run_python(source: str) -> None:
    """A recipe's Python as written; blocking clients, so run in a thread while the proxy serves on the loop."""
    exec(compile(source, "<README recipe>", "exec"), {"__name__": "recipe"})


async def _llm_cli(proxy_url: str, user_dir: Path) -> None:
    _, block = recipes()["llm"]
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / "extra-openai-models.yaml").write_text(block.replace(README_URL, proxy_url), encoding="utf-8")
    exe = shutil.which("llm")
    cmd = [exe] if exe else [sys.executable, "-m", "llm"]
    proc = await asyncio.create_subprocess_exec(*cmd, "-m", "metered-gpt-4.1-mini", "Hi",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=dict(os.environ))  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    assert out.strip(), err


# Over 2 s each here: importing anthropic (about 4 s) or openai-agents, or starting the llm command.
_SLOW = {"anthropic-sdk", "claude-code", "llm", "openai-agents"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in CLIENTS])
async def test_client_recipe(name: str, make_proxy: Any, dialect_upstream: FakeUpstream, keys: None,
                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    needs = {"anthropic-sdk": "anthropic", "claude-code": "anthropic", "llm": "llm", "langchain": "langchain_openai",
             "pydantic-ai": "pydantic_ai", "openai-agents": "agents"}  # fmt: skip
    if name in needs:
        _needs(needs[name])
    proxy = await make_proxy(upstreams=(C.Upstream(name="fake", base_url=dialect_upstream.base_url),))
    url = proxy.base_url.removesuffix("/v1").rstrip("/")
    lang, block = recipes()[name]
    if name == "claude-code":
        # Claude Code reads ANTHROPIC_BASE_URL like the anthropic SDK, which stands in for it here, making
        # the call Claude Code makes (beta messages, ?beta=true).
        [base] = re.findall(r"ANTHROPIC_BASE_URL=(\S+)", block)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", base.replace(README_URL, url))

        def claude() -> None:
            import anthropic

            anthropic.Anthropic().beta.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                                       messages=[{"role": "user", "content": "Hi"}])  # fmt: skip

        await asyncio.to_thread(claude)
    elif name == "llm":
        await _llm_cli(url, tmp_path / "llm")
    else:
        assert lang == "python"
        await asyncio.to_thread(_run_python, block.replace(README_URL, url))
    [rec] = await proxy.wait_records(name, 1)
    assert rec["success"] is True and rec["usage_source"] == "upstream", rec
    assert rec["input_tokens"] > 0 and rec["output_tokens"] > 0
    want = {"anthropic-sdk": "/v1/messages", "claude-code": "/v1/messages", "openai-agents": "/v1/responses"}
    assert rec["endpoint"] == want.get(name, "/v1/chat/completions")
    if name == "llm":
        assert rec["stream"] is True
    if name == "claude-code":  # the run id came from the URL in ANTHROPIC_BASE_URL, the call reached /v1/messages
        assert [r["path"] for r in dialect_upstream.requests] == ["/v1/messages"]


@pytest.mark.parametrize("name", sorted(SERVERS))
async def test_server_recipe(name: str, make_proxy: Any, fake_upstream: FakeUpstream, keys: None) -> None:
    provider, case = SERVERS[name]
    lang, block = recipes()[name]
    assert lang == "yaml"
    cfg = C.resolve_env(C.from_mapping(yaml.safe_load(block)))
    [upstream] = cfg.upstreams
    assert upstream.name == name and upstream.provider == provider
    proxy = await make_proxy(upstreams=(replace(upstream, base_url=fake_upstream.base_url),))
    stream = await make_client(proxy, run_id=name).chat.completions.create(
        model="any-model", messages=[{"role": "user", "content": "Hi"}], stream=True,
        extra_headers={"X-Fake": f"fixture:{case}"},
    )
    async for _ in stream:
        pass
    [rec] = await proxy.wait_records(name, 1)
    assert rec["upstream"] == name and rec["provider"] == provider and rec["success"] is True
    expected = orjson.loads((ROOT / "tests" / "payloads" / f"{case}.expected.json").read_bytes())
    if expected["usage"] is None:  # a server that sends no usage on streams: the proxy estimates it
        assert rec["usage_source"] == "estimated" and rec["output_tokens"] > 0
    else:
        assert rec["usage_source"] == "upstream"
        for key in ("input_tokens", "cached_input_tokens", "output_tokens"):
            assert rec[key] == expected["usage"][key], key
    if upstream.api_key_env:  # the proxy's key replaced the client's
        [sent] = fake_upstream.requests
        assert sent["headers"]["Authorization"] == "Bearer sk-test-recipes"
    assert load_case(*case.split("/"))[1] == "sse"
