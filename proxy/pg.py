"""PostgreSQL: the schema (versioned, migrated by the proxy itself), a pool from the config, and the destination
that copies record batches into ``calls``, idempotent on request_id.

Every column is coerced from the record's JSON: a value of the wrong type, out of the column's range, not
finite, or not a valid timestamp is NULL; strings lose NUL characters (PostgreSQL text cannot hold them) and
are cut to a bound. The ``record`` JSONB column keeps the whole record, with each NUL in a string or key
replaced by U+FFFD (jsonb cannot hold ``\\u0000``) and NaN or infinities (only a foreign file can hold
them) as null. So no record value can make a batch fail for ever and wedge the shipper.
"""

from __future__ import annotations

import json
import math
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from proxy.config import ShipPostgres, redact_url
from proxy.shipper import Batch, DeliveryError, jsonable, record_epoch

if TYPE_CHECKING:
    import asyncpg

#: pg_advisory_xact_lock key for migrations: two proxies starting together migrate one after the other.
MIGRATION_LOCK = 0x6D657465_72696E67  # "metering"
#: pg_advisory_xact_lock key taken by every insert into calls until it commits (see _DDL_V2).
SEQ_LOCK = 0x6D657465_72736571  # "metersq"
_INT8 = 2**63
_INT4 = 2**31
_TEXT_MAX = 1024
_DETAIL_MAX = 4096
#: Floats past this are no measurement (a duration of 1e300 ms): NULL rather than a bogus sum.
_FLOAT_MAX = 1e18

#: The calls table's columns in COPY order (column, SQL type); each is the record field of that name, except
#: error_* (from error.category/id/detail), record (the whole record) and shipped_by (the shipping host).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "text"),
    ("run_id", "text"),
    ("ts", "timestamptz"),
    ("task", "text"),
    ("tags", "jsonb"),
    ("endpoint", "text"),
    ("method", "text"),
    ("upstream", "text"),
    ("provider", "text"),
    ("requested_model", "text"),
    ("model", "text"),
    ("stream", "boolean"),
    ("status", "integer"),
    ("success", "boolean"),
    ("finish_reason", "text"),
    ("input_tokens", "bigint"),
    ("cached_input_tokens", "bigint"),
    ("cache_write_tokens", "bigint"),
    ("cache_write_5m_tokens", "bigint"),
    ("cache_write_1h_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("total_tokens", "bigint"),
    ("usage_source", "text"),
    ("stream_usage_injected", "boolean"),
    ("ttfb_ms", "double precision"),
    ("ttft_ms", "double precision"),
    ("duration_ms", "double precision"),
    ("tokens_per_second", "double precision"),
    ("upstream_request_id", "text"),
    ("error_category", "text"),
    ("error_id", "text"),
    ("error_detail", "text"),
    ("cost_usd", "double precision"),
    ("cost_source", "text"),
    ("price_model", "text"),
    ("upstream_cost_usd", "double precision"),
    ("service_tier", "text"),
    ("record", "jsonb"),
    ("shipped_by", "text"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)

_DDL_V1 = (
    "CREATE TABLE calls (\n    "
    + ",\n    ".join(f"{name} {kind}{' PRIMARY KEY' if name == 'request_id' else ''}"
                     f"{' NOT NULL' if name == 'record' else ''}" for name, kind in COLUMNS)
    + ",\n    shipped_at timestamptz NOT NULL DEFAULT now()\n)",
    "CREATE INDEX calls_run_id_ts ON calls (run_id, ts)",
    "CREATE INDEX calls_ts ON calls (ts)",
)  # fmt: skip

#: An arrival order for readers that follow the table (the events stream of ship.postgres.serve_reads). seq
#: is drawn inside deliver()'s INSERT under SEQ_LOCK, held to commit, so seq order is commit order: a reader
#: that has seen seq N will never later find a row below N. Existing rows are numbered once, in no set order.
_DDL_V2 = (
    "ALTER TABLE calls ADD COLUMN seq bigserial",
    "CREATE INDEX calls_by_seq ON calls (seq)",
    "CREATE INDEX calls_run_id_by_seq ON calls (run_id, seq)",
)

#: Ordered migrations: MIGRATIONS[i] takes the schema from version i to i + 1. Only ever append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_DDL_V1, _DDL_V2)
SCHEMA_VERSION = len(MIGRATIONS)


async def open_pool(cfg: ShipPostgres, *, max_size: int = 2) -> asyncpg.Pool:
    """A connection pool for the configured database (connects now; raises when it cannot)."""
    import asyncpg

    return await asyncpg.create_pool(cfg.url, min_size=1, max_size=max_size, timeout=10, command_timeout=60)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction under an advisory lock; return the version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS metering_proxy_schema "
                           "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
        current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM metering_proxy_schema"))
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO metering_proxy_schema (version) VALUES ($1)", version)
        return max(current, SCHEMA_VERSION)


# -- coercion: a record's JSON values -> column values that PostgreSQL always accepts ----------------


def _text(value: Any, limit: int = _TEXT_MAX) -> str | None:
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "\ufffd")[:limit].encode("utf-8", "replace").decode("utf-8")


def _int(value: Any, bound: int = _INT8) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not -bound <= value < bound:
        return None
    return value


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value) if abs(value) < 1e300 else math.inf
    return f if math.isfinite(f) and abs(f) <= _FLOAT_MAX else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _ts(record: dict[str, Any]) -> datetime | None:
    epoch = record_epoch(record)
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def jsonb_text(value: Any) -> str:
    """value as JSON text that jsonb accepts (the fast path when nothing needs replacing)."""
    try:
        out = orjson.dumps(value)
        if b"\\u0000" not in out:
            return out.decode()
    except TypeError:  # integers past 64 bits, lone surrogates
        pass
    return json.dumps(jsonable(value), ensure_ascii=False, allow_nan=False)


def row(record: dict[str, Any], shipped_by: str) -> tuple[Any, ...]:
    """The calls row for one record, in COLUMNS order."""
    r = record
    raw_err = r.get("error")
    err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
    tags = r.get("tags")
    return (
        r["request_id"], _text(r.get("run_id")), _ts(r), _text(r.get("task")),
        jsonb_text(tags) if isinstance(tags, dict) else None,
        _text(r.get("endpoint")), _text(r.get("method")), _text(r.get("upstream")), _text(r.get("provider")),
        _text(r.get("requested_model")), _text(r.get("model")), _bool(r.get("stream")),
        _int(r.get("status"), _INT4), _bool(r.get("success")), _text(r.get("finish_reason")),
        _int(r.get("input_tokens")), _int(r.get("cached_input_tokens")), _int(r.get("cache_write_tokens")),
        _int(r.get("cache_write_5m_tokens")), _int(r.get("cache_write_1h_tokens")), _int(r.get("output_tokens")),
        _int(r.get("reasoning_tokens")), _int(r.get("total_tokens")), _text(r.get("usage_source")),
        _bool(r.get("stream_usage_injected")), _float(r.get("ttfb_ms")), _float(r.get("ttft_ms")),
        _float(r.get("duration_ms")), _float(r.get("tokens_per_second")), _text(r.get("upstream_request_id")),
        _text(err.get("category")), _text(err.get("id")), _text(err.get("detail"), _DETAIL_MAX),
        _float(r.get("cost_usd")), _text(r.get("cost_source")), _text(r.get("price_model")),
        _float(r.get("upstream_cost_usd")), _text(r.get("service_tier")), jsonb_text(r), shipped_by,
    )  # fmt: skip


class PostgresDestination:
    """Copies batches into ``calls``: COPY into a temporary table, then INSERT ... ON CONFLICT DO NOTHING."""

    name = "postgres"

    def __init__(self, cfg: ShipPostgres) -> None:
        self.cfg = cfg
        self.pool: asyncpg.Pool | None = None
        self.host = socket.gethostname()[:_TEXT_MAX]

    async def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            try:
                pool = await open_pool(self.cfg)
            except Exception as exc:  # noqa: BLE001 - whatever asyncpg raises, the message must not hold the URL
                raise DeliveryError(f"cannot connect to {redact_url(self.cfg.url)}: {type(exc).__name__}: "
                                    f"{str(exc)[:200].replace(self.cfg.url, '[url]')}") from None  # fmt: skip
            try:
                async with pool.acquire() as conn:
                    await migrate(conn)
            except BaseException:
                await pool.close()
                raise
            self.pool = pool
        return self.pool

    async def deliver(self, batch: Batch) -> None:
        """Insert the batch's records in one transaction; records already there (same request_id) are kept."""
        rows = [row(r, self.host) for r in batch.records]
        pool = await self._pool()
        columns = ", ".join(COLUMN_NAMES)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("CREATE TEMPORARY TABLE calls_stage (LIKE calls INCLUDING DEFAULTS) ON COMMIT DROP")
            await conn.copy_records_to_table("calls_stage", records=rows, columns=COLUMN_NAMES)
            # Only the insert and the commit are serialised across the fleet; the COPY above is not.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SEQ_LOCK)
            await conn.execute(f"INSERT INTO calls ({columns}) SELECT {columns} FROM calls_stage "
                               "ON CONFLICT (request_id) DO NOTHING")  # fmt: skip

    async def close(self) -> None:
        """Close the pool."""
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
