"""A fleet: three proxy processes ("hosts", each its own runs dir) sharing one Redis and one PostgreSQL.

The issue's end-to-end promise in one test: a run's budget holds across the hosts, and the report read from
PostgreSQL equals the report over the union of the three hosts' JSONL files.
"""

from __future__ import annotations

import asyncio
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest

from tests.conftest import FakeUpstream
from tests.helpers import parse_lines, serve
from tests.pg_server import PgServer, new_database, pg_module
from tests.redis_server import RedisServer, redis_server
from tests.test_budget_store import ACTUAL, RESERVED, call, client, host_dirs, stop_all

__all__ = ["pg_module", "redis_server"]  # fixtures, used by name

RUN = "fleet-eval"


async def _rows(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM calls WHERE run_id = $1", RUN))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def _report(*argv: str) -> dict[str, Any]:
    """`metering-proxy report RUN --json` as a user runs it, without the source it names."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "report", RUN, "--json", "--by",
                                                "upstream", *argv, stdout=PIPE, stderr=PIPE)  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = orjson.loads(out)
    for run in doc["runs"]:
        run.pop("file")
    return doc


@pytest.mark.slow
async def test_three_hosts_one_budget_one_record_store(fake_upstream: FakeUpstream, redis_server: RedisServer,
                                                       pg_module: PgServer, tmp_path: Path) -> None:  # fmt: skip
    db = await new_database(pg_module)
    limit = 200
    admitted = limit // RESERVED
    runs = host_dirs(tmp_path, 3)
    cfg = {
        "budgets": {"default": {"tokens": limit}, "store": {"url": redis_server.url}},
        "ship": {"postgres": {"url": db, "batch_size": 7, "interval_ms": 50}},
    }
    procs = [await serve(fake_upstream, r, **cfg) for r in runs]
    try:
        clients = [client(p, RUN, **{"X-Fake": "think:0.2"}) for p in procs]
        results = await asyncio.gather(*(call(clients[i % 3]) for i in range(45)))
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        # All in flight together, exactly `admitted` pass; on a loaded machine some finish (settling below their
        # reservation) before the last are admitted, and a few more fit. Either way the spend stays in the limit.
        assert len(ok) >= admitted and len(ok) + len(refused) == 45, results
        assert 15 * ACTUAL > limit  # each host alone would have admitted more than the run may spend
        recs = [r for d in runs if (d / f"{RUN}.jsonl").exists() for r in parse_lines(d / f"{RUN}.jsonl")]
        deadline = time.monotonic() + 20
        while len(recs) < 45 or await _rows(db) < 45:
            assert time.monotonic() < deadline, (len(recs), await _rows(db))
            await asyncio.sleep(0.05)
            recs = [r for d in runs if (d / f"{RUN}.jsonl").exists() for r in parse_lines(d / f"{RUN}.jsonl")]
        assert sum(r["total_tokens"] or 0 for r in recs) == len(ok) * ACTUAL <= limit
        assert sum(1 for d in runs if (d / f"{RUN}.jsonl").exists()) == 3  # every host served the run
    finally:
        await stop_all(procs)
    assert await _rows(db) == 45  # every call of every host once, refusals included

    # The union of the three files, in the order the database reads them (ts, request_id).
    union = tmp_path / "union"
    union.mkdir()
    ordered = sorted(recs, key=lambda r: (r["ts"], r["request_id"]))
    (union / f"{RUN}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in ordered))
    from_files = await _report("--runs-dir", str(union))
    from_db = await _report("--db", db)
    assert from_db == from_files
    assert from_db["runs"][0]["calls"]["total"] == 45
