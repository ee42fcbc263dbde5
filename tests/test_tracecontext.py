"""W3C traceparent parsing and the proxy's own span ids."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy import tracecontext as T

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_parses() -> None:
    assert T.parse(GOOD) == T.Parent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    assert T.parse(GOOD[:-2] + "00") == T.Parent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", False)
    assert T.parse("01" + GOOD[2:] + "-future") is not None  # a later version may add fields


@pytest.mark.parametrize("value", [
    None, "", GOOD.upper(), "ff" + GOOD[2:], GOOD + "-extra", GOOD[:-1], f"00-{'0' * 32}-00f067aa0ba902b7-01",
    f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01", GOOD.replace("-", "_"),
])  # fmt: skip
def test_an_invalid_traceparent_is_ignored(value: str | None) -> None:
    assert T.parse(value) is None


def test_off_reads_the_clients_trace_only() -> None:
    ctx = T.incoming(CIMultiDict(traceparent=GOOD))
    assert ctx is not None and ctx.trace_id == GOOD[3:35] and ctx.span_id is None
    assert T.incoming(CIMultiDict()) is None
    assert T.incoming(CIMultiDict([("traceparent", GOOD), ("traceparent", GOOD)])) is None  # two: neither


def test_on_makes_a_child_or_a_new_root() -> None:
    child = T.begin(CIMultiDict(traceparent=GOOD, tracestate="a=1"))
    assert child.trace_id == GOOD[3:35] and child.parent is not None and child.tracestate == "a=1"
    assert child.span_id is not None and len(child.span_id) == 16 and child.span_id != child.parent.span_id
    assert child.traceparent() == f"00-{child.trace_id}-{child.span_id}-01"
    root = T.begin(CIMultiDict(traceparent="garbage", tracestate="a=1"))
    assert root.parent is None and root.tracestate is None and root.sampled and len(root.trace_id) == 32
    assert T.begin(CIMultiDict()).trace_id != root.trace_id
