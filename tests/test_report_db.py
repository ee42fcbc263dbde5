"""report --db: a run read from the PostgreSQL calls table equals the same run read from its files."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy.cli import main
from proxy.config import ShipPostgres
from proxy.pg import PostgresDestination
from proxy.shipper import Batch
from tests.conftest import ProxyFactory, make_client
from tests.pg_server import PgServer, new_database, pg_module  # noqa: F401 - the fixture
from tests.test_report import RUN_A, RUN_B, write_run


async def _ship(url: str, records: list[dict[str, Any]]) -> None:
    dest = PostgresDestination(ShipPostgres(url=url))
    try:
        for i in range(0, max(len(records), 1), 7):  # several batches, as the shipper sends them
            await dest.deliver(Batch(uuid.uuid4().hex, records[i : i + 7], ()))
    finally:
        await dest.close()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def _report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["report", *argv])
    out = capsys.readouterr()
    return code, (orjson.loads(out.out) if code == 0 and "--json" in argv else out.err)


def _without_source(doc: dict[str, Any]) -> dict[str, Any]:
    for run in doc["runs"]:
        assert run.pop("file")
    return doc


async def test_a_report_from_the_database_equals_the_report_from_the_files(
    pg_module: PgServer,  # noqa: F811
    make_proxy: ProxyFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await make_proxy()
    client = make_client(proxy, run_id="fleet-db")
    for i in range(12):
        kwargs: dict[str, Any] = {"extra_headers": {"X-Meter-Task": f"t{i % 3}"}}
        if i % 5 == 4:
            kwargs["extra_headers"]["X-Fake"] = "status:429"
        try:
            await client.chat.completions.create(model="gpt-4o-mini" if i % 2 else "gpt-4o",
                                                 messages=[{"role": "user", "content": "hi"}],
                                                 stream=i % 3 == 0, **kwargs)  # fmt: skip
        except openai.APIStatusError:
            pass
    await proxy.settle(12)
    runs = proxy.runs_dir
    # Hand-made records (failures, estimated usage, tags), each carrying its run's id as the proxy writes it.
    for run, recs in (("a", RUN_A), ("b", RUN_B)):
        write_run(runs, run, [{**r, "run_id": run, "request_id": f"{run}-{r['request_id']}"} for r in recs])
    url = await new_database(pg_module)
    for run in ("fleet-db", "a", "b"):
        await _ship(url, _lines(runs / f"{run}.jsonl"))
    await _ship(url, _lines(runs / "a.jsonl"))  # shipped twice: stored once

    for argv in (["fleet-db", "--by", "task"], ["a", "b", "--by", "tag:variant"], ["a", "--by", "model"],
                 ["fleet-db", "--price-as", "gpt-4o-mini=claude-sonnet-4-5", "--price-as", "gpt-4.1"]):
        code, from_files = await _report(capsys, *argv, "--json", "--runs-dir", str(runs))
        assert code == 0, from_files
        code, from_db = await _report(capsys, *argv, "--json", "--db", url)
        assert code == 0, from_db
        assert from_db["runs"][0]["file"].endswith(" calls") and "postgres@" not in from_db["runs"][0]["file"]
        assert _without_source(from_db) == _without_source(from_files)
        if argv[0] == "a":
            assert from_files["runs"][0]["records"] == len(RUN_A)
    assert from_db["runs"][0]["price_as"]["repriced_calls"] > 0  # the last: what-if prices over the database


async def test_report_db_errors_name_the_run_and_never_the_password(
    pg_module: PgServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    refused_port: int,
) -> None:
    url = await new_database(pg_module)
    code, err = await _report(capsys, "a", "--db", url)
    assert code == 1 and "no calls table" in err  # nothing shipped there yet
    await _ship(url, [])  # creates the schema
    code, err = await _report(capsys, "nope", "--db", url)
    assert code == 1 and "no run 'nope'" in err
    secret = "pw-ee3c1d0b"
    code, err = await _report(capsys, "a", "--db", f"postgresql://u:{secret}@127.0.0.1:{refused_port}/x")
    assert code == 1 and "cannot read" in err and secret not in err and "***@127.0.0.1" in err
