"""A simulated OpenAI-compatible upstream for `metering-proxy demo`: no key, no network, deterministic.

Each answer is drawn from a generator seeded by (seed, request body), so the same workload gets the same
tokens whatever order concurrent calls arrive in. Usage follows OpenAI's shape and rules: prompt tokens
about one per four characters, cached tokens for a long shared prefix (in 128-token steps from 1,024 on,
as OpenAI caches), reasoning tokens for reasoning models (counted in completion_tokens), a final usage chunk
in streams only when stream_options.include_usage is set. Latency is a first-token delay plus a token rate
per model, scaled down so a demo takes seconds. A client asks for a failure with the X-Demo-Fail header
(429 or 500), so a workload decides where failures fall.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

FAIL_HEADER = "X-Demo-Fail"
CACHE_MIN_TOKENS = 1024
CACHE_STEP = 128
CHUNK_TOKENS = 6
WORDS = ("the", "model", "run", "token", "cost", "cache", "latency", "budget", "report", "answer", "short",
         "table", "price", "call", "stream", "usage", "record", "proxy", "result", "task", "value", "metric",
         "request", "output", "input", "fast", "careful", "summary", "context", "window")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Profile:
    """How one simulated model behaves."""

    ttft_ms: float
    """Typical delay before the first token."""
    tokens_per_s: float
    """Output rate once tokens flow."""
    reasoning: bool = False
    """Spends hidden reasoning tokens before answering."""


MODELS: dict[str, Profile] = {
    "gpt-4.1-mini": Profile(ttft_ms=35.0, tokens_per_s=2400.0),
    "gpt-4.1": Profile(ttft_ms=70.0, tokens_per_s=1200.0),
    "gpt-4o-mini": Profile(ttft_ms=40.0, tokens_per_s=2000.0),
    "o4-mini": Profile(ttft_ms=120.0, tokens_per_s=1500.0, reasoning=True),
}


def _error(status: int, message: str, kind: str, code: str | None, headers: dict[str, str] | None = None
           ) -> web.Response:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: orjson.dumps(o).decode())


def _text_tokens(value: Any) -> int:
    """About one token per four characters of the text in a message's content (a string or parts)."""
    if isinstance(value, str):
        return math.ceil(len(value) / 4)
    if isinstance(value, list):
        return sum(_text_tokens(p.get("text")) for p in value if isinstance(p, dict))
    return 0


class DemoUpstream:
    """The aiohttp app and its seed."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.calls = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "demo"} for name in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, streamed or not."""
        self.calls += 1
        raw = await request.read()
        try:
            body = orjson.loads(raw)
            messages = body["messages"]
            model = body["model"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        profile = MODELS.get(model) if isinstance(model, str) else None
        if profile is None:
            return _error(404, f"The model `{model}` does not exist (demo models: {', '.join(MODELS)}).",
                          "invalid_request_error", "model_not_found")  # fmt: skip
        rng = random.Random(f"{self.seed}:{hashlib.sha256(raw).hexdigest()}")
        fail = request.headers.get(FAIL_HEADER)
        if fail == "429":
            await asyncio.sleep(0.005)
            return _error(429, f"Rate limit reached for {model} on requests per min (RPM): Limit 500.", "requests",
                          "rate_limit_exceeded", {"Retry-After": "1"})  # fmt: skip
        if fail == "500":
            await asyncio.sleep(profile.ttft_ms / 1000)
            return _error(500, "The server had an error while processing your request.", "server_error", None)
        usage, words, finish = self._usage(rng, profile, messages, body)
        ttft = profile.ttft_ms * rng.uniform(0.7, 1.6) / 1000
        if profile.reasoning:
            ttft += usage["completion_tokens_details"]["reasoning_tokens"] / profile.tokens_per_s
        ident = f"chatcmpl-demo{rng.getrandbits(48):012x}"
        headers = {"x-request-id": f"req_demo{rng.getrandbits(64):016x}", "openai-processing-ms": "0"}
        if body.get("stream") is True:
            options = body.get("stream_options")
            include = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, ident, model, profile, words, finish, usage if include else None,
                                      ttft, headers)  # fmt: skip
        await asyncio.sleep(ttft + len(words) / profile.tokens_per_s)
        answer = {
            "id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                         "finish_reason": finish}],
            "usage": usage, "service_tier": "default", "system_fingerprint": "fp_demo",
        }  # fmt: skip
        return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)

    def _usage(self, rng: random.Random, profile: Profile, messages: Any, body: dict[str, Any]
               ) -> tuple[dict[str, Any], list[str], str]:  # fmt: skip
        """Usage in OpenAI's shape, the answer's words (one token each) and the finish reason."""
        msgs = messages if isinstance(messages, list) else []
        per_msg = [_text_tokens(m.get("content")) + 4 for m in msgs if isinstance(m, dict)]
        prompt = sum(per_msg) + 3
        prefix = per_msg[0] if per_msg else 0  # the system prompt a workload repeats is what a cache holds
        cached = (prefix // CACHE_STEP) * CACHE_STEP if prefix >= CACHE_MIN_TOKENS and rng.random() < 0.85 else 0
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or 512
        cap = cap if isinstance(cap, int) and cap > 0 else 512
        visible = rng.randint(max(1, cap // 3), cap)
        finish = "length" if visible == cap else "stop"
        reasoning = rng.randint(visible, visible * 3) if profile.reasoning else 0
        usage = {
            "prompt_tokens": prompt, "completion_tokens": visible + reasoning,
            "total_tokens": prompt + visible + reasoning,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }  # fmt: skip
        return usage, [rng.choice(WORDS) for _ in range(visible)], finish

    async def _stream(self, request: web.Request, ident: str, model: str, profile: Profile, words: list[str],
                      finish: str, usage: dict[str, Any] | None, ttft: float, headers: dict[str, str]
                      ) -> web.StreamResponse:  # fmt: skip
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> bytes:
            choices = [{"index": 0, "delta": delta, "finish_reason": reason}] if delta or reason else []
            obj = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "fp_demo", "choices": choices, **extra}  # fmt: skip
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        await asyncio.sleep(ttft)
        await resp.write(chunk({"role": "assistant", "content": ""}))
        for at in range(0, len(words), CHUNK_TOKENS):
            piece = words[at : at + CHUNK_TOKENS]
            await resp.write(chunk({"content": (" " if at else "") + " ".join(piece)}))
            await asyncio.sleep(len(piece) / profile.tokens_per_s)
        await resp.write(chunk({}, finish))
        if usage is not None:
            await resp.write(chunk({}, None, usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
