"""The dashboard: one self-contained page (inline CSS and JS, no CDN), served at /ui or written standalone."""

from __future__ import annotations

import time
from functools import cache
from importlib import resources

import orjson
from aiohttp import web

from proxy import report

_EMBED_SLOT = '<script id="embedded" type="application/json">null</script>'


@cache
def page() -> str:
    """Return the page as shipped (proxy/ui.html)."""
    return resources.files("proxy").joinpath("ui.html").read_text(encoding="utf-8")


async def handle(request: web.Request) -> web.Response:
    """GET /ui: the runs list, or one run's live view with ?run=<id>."""
    return web.Response(text=page(), content_type="text/html", headers={"Cache-Control": "no-store"})


def standalone_html(summary: report.RunSummary) -> str:
    """Return the run view with the run's data embedded, readable without a server."""
    data = {
        "generated": report.iso(time.time()),
        "summary": report.report_json([summary]),
        "calls": summary.view_calls,
    }
    # '<' only occurs inside JSON strings, where \u003c means the same: nothing can close the script tag.
    payload = orjson.dumps(data).decode().replace("<", "\\u003c")
    return page().replace(_EMBED_SLOT, f'<script id="embedded" type="application/json">{payload}</script>', 1)
