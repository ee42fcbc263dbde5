"""The one error shape, categories by status, and what error details may never contain."""

from __future__ import annotations

import orjson
import pytest

from proxy import errors


def test_render_is_openai_shaped_with_ids() -> None:
    resp = errors.render(errors.NoRoute("no route", param="model", code="model_not_found"), "abcdef012345", "req_1")
    assert resp.status == 404
    assert resp.headers["X-Meter-Error-Id"] == "abcdef012345" and resp.headers["X-Meter-Request-Id"] == "req_1"
    assert resp.body is not None
    body = orjson.loads(resp.body)  # type: ignore[arg-type]
    assert body == {"error": {"message": "no route", "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "category"),
    [(400, "bad_request"), (401, "auth_error"), (403, "auth_error"), (402, "billing_error"),
     (404, "model_not_found"), (408, "timeout"), (413, "payload_too_large"), (422, "bad_request"),
     (429, "rate_limit"), (500, "server_error"), (503, "server_error"), (504, "timeout"), (529, "server_error")],
)  # fmt: skip
def test_category_for_status(status: int, category: str) -> None:
    assert errors.category_for_status(status) == category
    assert category in errors.CATEGORIES


def test_error_ids_are_12_hex() -> None:
    ids = {errors.new_error_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 12 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        pytest.param("Incorrect API key provided: sk-proj-abcdefgh12345678", "Incorrect API key provided", "abcdefgh",
                     id="openai-key"),
        pytest.param("auth failed for Bearer eyJhbGciOiJIUzI1NiJ9.payload", "auth failed for", "eyJhbGci",
                     id="bearer"),
        pytest.param("upstream answered 400: [{'type': 'string_type', 'loc': ('body',), 'input': [{'text': 'SECRET "
                     "patient note'}]}]", "string_type", "SECRET", id="pydantic-echo"),
        pytest.param('bad request {"messages": [{"role": "user", "content": "SECRET"}]}', "bad request", "SECRET",
                     id="json-echo"),
    ],
)  # fmt: skip
def test_scrub_masks_keys_and_echoed_prompts(text: str, kept: str, gone: str) -> None:
    out = errors.scrub(text)
    assert kept in out and gone not in out and len(out) <= 200


def test_scrub_keeps_useful_messages_and_limits_length() -> None:
    msg = "Invalid 'messages[0].content': string too long. Expected a string with maximum length 10485760."
    assert errors.scrub(msg) == msg
    assert len(errors.scrub("x" * 5000)) == 200


def test_every_category_is_documented_and_the_code_names_none_as_a_bare_string() -> None:
    """Categories are Category members: a string literal passed as one would escape the enum's check."""
    import re
    from pathlib import Path

    from proxy.errors import CATEGORIES

    root = Path(__file__).resolve().parents[1]
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((root / "proxy").glob("*.py")))
    bare = set(re.findall(r"""\.fail\(\s*["']([a-z_]+)["']""", source))
    bare |= set(re.findall(r"""\bcategory\s*=\s*["']([a-z_]+)["']""", source))
    assert not bare, bare
    assert len(re.findall(r"Category\.[A-Z_]+", source)) >= 30
    records_doc = (root / "docs" / "records.md").read_text(encoding="utf-8")
    table = records_doc.split("`error.category` is one of:", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert documented == CATEGORIES, (CATEGORIES - documented, documented - CATEGORIES)
