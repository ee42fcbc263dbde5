"""Run reports from the PostgreSQL ``calls`` table that the shipper fills, for runs that span hosts.

The figures come from the same summariser as a JSONL report (``report.RunSummary``), fed the stored
records one by one, so a report over the database equals one over the files for the same records: only
the read differs. The database sends each record without the fields no summary reads (usage_raw,
cost_breakdown, server_timing...), and rows stream through a server-side cursor, so memory stays that
of the summary itself, not of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from proxy.config import redact_url
from proxy.report import RunNotFound, RunSummary
from proxy.whatif import Repricer

#: Record fields a summary never reads: left in the database (they are most of a record's bytes).
UNREAD_FIELDS = ("usage_raw", "cost_breakdown", "server_timing", "usage_invalid", "upstream_request_id",
                 "price_model", "cost_source")  # fmt: skip
_PREFETCH = 5000
_NO_FILE = Path()


class DatabaseError(Exception):
    """The database could not be read (down, refused, wrong credentials, no calls table); the URL redacted."""


def _failed(url: str, exc: BaseException) -> DatabaseError:
    return DatabaseError(f"cannot read {redact_url(url)}: {type(exc).__name__}: {str(exc)[:200].replace(url, '[url]')}")


async def summarize_runs(url: str, run_ids: Iterable[str], by: Iterable[str] = ("model",), view_calls: int = 0,
                         price_as: Repricer | None = None) -> list[RunSummary]:  # fmt: skip
    """Summaries of runs read from the calls table at url; RunNotFound for a run with no rows.

    Rows are read in (ts, request_id) order, the order of the calls across every host.
    """
    import asyncpg

    specs = list(by)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _failed(url, exc) from None
    try:
        summaries = []
        for run_id in run_ids:
            summary = RunSummary(_NO_FILE, run_id, specs, view_calls, source=f"{redact_url(url)} calls",
                                 price_as=price_as)
            async with conn.transaction(readonly=True):  # a server-side cursor lives in a transaction
                query = ("SELECT (record - $2::text[])::text FROM calls WHERE run_id = $1 "
                         "ORDER BY ts, request_id")  # fmt: skip
                async for (text,) in conn.cursor(query, run_id, list(UNREAD_FIELDS), prefetch=_PREFETCH):
                    summary.fold(text)
            if summary.reader.records == 0 and summary.reader.skipped == 0:
                raise RunNotFound(f"no run {run_id!r} in the calls table at {redact_url(url)}")
            summaries.append(summary)
        return summaries
    except asyncpg.UndefinedTableError:
        raise DatabaseError(f"no calls table at {redact_url(url)}: nothing was shipped there yet") from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _failed(url, exc) from None
    finally:
        await conn.close()
