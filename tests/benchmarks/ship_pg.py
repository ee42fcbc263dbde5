"""Shipper throughput into PostgreSQL: N records pre-written to run files, drained by one Shipping.

python -m tests.benchmarks.ship_pg [N] [batch_size]: prints records/s and the CPU the shipping process
spent per record (the PostgreSQL server's own CPU is not counted: it is another process).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from proxy import config as C
from proxy import pg
from proxy.shipper import Shipper, Shipping
from tests.conftest import make_record
from tests.pg_server import PgServer


async def main(n: int, batch: int) -> None:
    server = PgServer()
    server.start()
    try:
        runs = Path(tempfile.mkdtemp(prefix="mp-ship-")) / "runs"
        runs.mkdir()
        per_run = n // 10
        for run in range(10):
            with (runs / f"bench{run}.jsonl").open("wb") as f:
                f.write(b"".join(make_record(request_id=f"req_{run}_{i}", run_id=f"bench{run}", task="t",
                                             tags={"v": "A"}, cost_usd=0.0001).to_json() for i in range(per_run)))
        size = sum(p.stat().st_size for p in runs.iterdir())
        cfg = C.ShipPostgres(url=server.url, batch_size=batch, interval_s=0.05)
        shipping = Shipping(runs, [Shipper(runs, pg.PostgresDestination(cfg), batch, 0.05, 1.0)], 60.0)
        cpu0, t0 = time.process_time(), time.monotonic()
        await shipping.start()
        conn = await asyncpg.connect(server.url)
        while True:
            try:
                done = await conn.fetchval("SELECT count(*) FROM calls")
            except asyncpg.UndefinedTableError:
                done = 0
            if done >= per_run * 10:
                break
            await asyncio.sleep(0.05)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await conn.close()
        await shipping.close()
        print(f"{per_run * 10} records ({size / 1e6:.1f} MB) in {wall:.2f} s: {per_run * 10 / wall:,.0f} records/s;"
              f" shipping process CPU {cpu:.2f} s = {cpu / (per_run * 10) * 1e6:.1f} us per record (batch {batch})")
    finally:
        server.destroy()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(args[0] if args else 100_000, args[1] if len(args) > 1 else 1000))
