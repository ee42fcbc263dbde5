"""A call in flight becomes its record without a network: to_record maps what the handler observed."""

from __future__ import annotations

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import redact, routes
from proxy.call import Call, to_record
from proxy.config import Upstream
from proxy.errors import Category
from proxy.usage import Usage


def _call() -> Call:
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": "Bearer sk-client-0123456789"}))
    call = Call(routes.BY_PATH["/v1/chat/completions"], "POST", "/v1/chat/completions", redact.Secrets([]), headers)
    call.run_id, call.requested_model, call.stream, call.status = "r", "gpt-4o-mini", True, 200
    call.upstream = Upstream(name="up", base_url="http://127.0.0.1:1/v1")
    call.ttfb = call.t0 + 0.010
    call.meter.first_output_at = call.t0 + 0.020
    call.meter.model = "gpt-4o-mini-2024-07-18"
    return call


def test_to_record_maps_the_observed_facts() -> None:
    call = _call()
    usage = Usage(input_tokens=11, output_tokens=30, total_tokens=41)
    rec = to_record(call, call.t0 + 1.020, usage, "upstream", "openai", None)
    assert (rec.run_id, rec.endpoint, rec.upstream, rec.provider, rec.model) == (
        "r", "/v1/chat/completions", "up", "openai", "gpt-4o-mini-2024-07-18")  # fmt: skip
    assert rec.success is True and rec.usage_source == "upstream" and rec.total_tokens == 41
    assert rec.ttfb_ms == 10.0 and rec.ttft_ms == 20.0 and rec.duration_ms == 1020.0
    assert rec.tokens_per_second == 30.0  # 30 tokens over the 1 s after the first one
    assert rec.cost_usd is None and rec.error is None
    assert orjson.loads(rec.to_json())["ts"].endswith("Z")


def test_a_failed_call_is_no_success_and_its_credentials_are_known() -> None:
    call = _call()
    err = call.fail(Category.RATE_LIMIT, "upstream said: key sk-client-0123456789 is throttled")
    assert "sk-client-0123456789" not in err.detail and "[redacted]" in err.detail
    rec = to_record(call, call.t0 + 0.5, Usage(), "none", None, None)
    assert rec.success is False and rec.error is err and rec.tokens_per_second is None
