"""Tell which provider an upstream is, from its URL and, failing that, from its responses."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

_HOSTS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.groq.com": "groq",
    "openrouter.ai": "openrouter",
    "api.deepseek.com": "deepseek",
    "generativelanguage.googleapis.com": "gemini",
    "api.together.xyz": "together",
    "api.together.ai": "together",
    "api.x.ai": "xai",
    "api.mistral.ai": "mistral",
    "api.fireworks.ai": "fireworks",
}
# Default ports of local servers that are distinctive enough to trust.
_PORTS = {11434: "ollama", 1234: "lmstudio", 1337: "jan"}


def from_url(base_url: str) -> str | None:
    """Guess the provider from an upstream base URL, or None."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if host in _HOSTS:
        return _HOSTS[host]
    if host.endswith(".openai.azure.com"):
        return "azure"
    try:
        port = parts.port
    except ValueError:
        return None
    return _PORTS.get(port) if port is not None else None


#: Servers that run on the user's own machines; their own signals are the only ones a local host can send.
LOCAL_SERVERS = frozenset({"ollama", "llamacpp", "lmstudio", "jan", "vllm"})


def is_local(base_url: str) -> bool:
    """Whether an upstream runs on this machine or a private network (so it is no cloud API)."""
    host = (urlsplit(base_url).hostname or "").lower()
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal", ".lan")) or "." not in host:
        return True  # a bare name (a container or compose service) is a local server too
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private or addr.is_link_local


def from_response(
    headers: Mapping[str, str], hint: str | None, usage_raw: dict[str, Any] | None, local: bool = False
) -> str | None:
    """Guess the provider from what a response carried, or None.

    A local server's answer proves nothing about cloud providers: llama-cpp-python sends OpenAI's
    openai-processing-ms header, and any server can relay another's usage fields. For a local host
    only the local servers' own body signals (llama.cpp timings, Ollama's fields) count.
    """
    if hint and (not local or hint in LOCAL_SERVERS):
        return hint
    if local:
        return None
    if "openai-processing-ms" in headers or "openai-organization" in headers:
        return "openai"
    if "anthropic-ratelimit-requests-limit" in headers or "anthropic-organization-id" in headers:
        return "anthropic"
    if "x-groq-region" in headers:
        return "groq"
    if usage_raw:
        if "prompt_cache_hit_tokens" in usage_raw:
            return "deepseek"
        if "is_byok" in usage_raw or "cost_details" in usage_raw:
            return "openrouter"
        if "queue_time" in usage_raw:
            return "groq"
    return None
