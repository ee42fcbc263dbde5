"""Tell which provider an upstream is, from its URL and, failing that, from its responses."""

from __future__ import annotations

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


def from_response(headers: Mapping[str, str], hint: str | None, usage_raw: dict[str, Any] | None) -> str | None:
    """Guess the provider from what a response carried, or None."""
    if hint:
        return hint
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
