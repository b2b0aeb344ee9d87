"""What an owner's export costs (`devices.export`, `GET /owners/{owner_id}/export`) for
an owner with a long history: time, size, and the memory the streaming takes.

Makes a registry schema with one owner (account, contacts, consents) and a usage table
(plain PostgreSQL, 30-day partitions) holding `--days` days of `--devices` of the
owner's devices, `--per-day` events a day each, under the owner's key, the rollups
materialised; then exports it as JSON and as a zip of CSVs `--repeat` times each,
reading every chunk as a client would and throwing it away. For each format it prints
the seconds (best of the repeats), the megabytes, the usage rows a second, and the
largest Python heap one more export reached (`tracemalloc`, in a run of its own: it
slows Python severalfold), which streaming keeps at
about one batch (`devices.export.BATCH_ROWS`) whatever the history. Schema
`reg_bench_export` and table `usage_bench_export`, dropped before and after. A
benchmark, not a test: it prints figures and asserts nothing.

    python bench/owner_export.py [--devices 3] [--days 400] [--per-day 60] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg

from devices.export import Format, UsageLink, export_owner
from devices.schema import migrate_registry
from ingest.owner_keys import owner_key
from ingest.rows import UsageRow
from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables

COMMAND = "python bench/owner_export.py " + " ".join(sys.argv[1:])
SCHEMA = "reg_bench_export"
TABLE = "usage_bench_export"
SECRET = b"bench-only-owner-key-secret-0123456789abcdef"


async def main(args: argparse.Namespace) -> None:
    settings = Settings()
    dsn = settings.postgres.dsn.get_secret_value()
    conn = await asyncpg.connect(dsn)
    try:
        await drop(conn)
        owner = uuid4()
        key = owner_key(SECRET, owner)
        await migrate_registry(conn, SCHEMA)
        end = datetime(2026, 11, 1, tzinfo=UTC)
        await conn.execute(
            f"INSERT INTO {SCHEMA}.owners (owner_id, region, membership_tier, analytics_consent,"
            " created_at, last_active_at) VALUES ($1, 'KR-11', 'gold', true, $2, $2)",
            owner,
            end - timedelta(days=args.days),
        )
        await conn.execute(
            f"INSERT INTO {SCHEMA}.owner_contacts VALUES ($1, 'Bench Owner', 'b@example.com')",
            owner,
        )
        pg = PostgresSettings(
            dsn=settings.postgres.dsn,
            table=TABLE,
            use_timescaledb=False,
            partition_interval_s=30 * 86400,
            retention_days=max(args.days + 1, 40),
        )
        rows = await fill(pg, key, args, end)
        usage = UsageLink(TABLE, lambda _: [key])

        @asynccontextmanager
        async def snapshot() -> AsyncIterator[asyncpg.Connection]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield conn

        print(f"# {COMMAND}")
        print(f"# {platform.python_version()}, {await conn.fetchval('SHOW server_version')}")
        print(f"# one owner: {args.devices} devices x {args.days} days x {args.per_day}/day")
        print(f"# = {rows:,} usage rows under the owner's key, rollups materialised")
        print(f"{'format':<6} {'seconds':>8} {'MB':>9} {'rows/s':>9} {'peak heap MB':>13}")
        fmt: Format

        async def run(fmt: Format) -> int:
            size = 0
            async for chunk in export_owner(
                snapshot, owner, fmt, registry_schema=SCHEMA, usage=usage, now=datetime.now(UTC)
            ):
                size += len(chunk)
            return size

        for fmt in ("json", "csv"):
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                size = await run(fmt)
                best = min(best, time.perf_counter() - start)
            # Apart from the timed runs: tracing every allocation slows Python severalfold.
            tracemalloc.start()
            await run(fmt)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(
                f"{fmt:<6} {best:>8.2f} {size / 1e6:>9.2f} {rows / best:>9,.0f} {peak / 1e6:>13.1f}"
            )
    finally:
        await drop(conn)
        await conn.close()


async def fill(pg: PostgresSettings, key: str, args: argparse.Namespace, end: datetime) -> int:
    """The owner's usage rows, written through the store in day order; how many."""
    step = timedelta(days=1) / args.per_day
    start = end - timedelta(days=args.days)
    async with UsageStore(pg) as store:
        await store.migrate()
        total = 0
        for day in range(args.days):
            batch: list[UsageRow] = []
            for d in range(args.devices):
                for i in range(args.per_day):
                    seq = day * args.per_day + i
                    at = start + day * timedelta(days=1) + i * step
                    body = {"energy_wh": 2.5, "duration_s": 3600, "program": "cotton"}
                    batch.append(
                        UsageRow(
                            f"WM-BENCH-{d}",
                            "b1",
                            seq,
                            at,
                            "washer.energy",
                            1,
                            body,
                            0,
                            total + len(batch),
                            model="WM-100",
                            category="washer",
                            region="KR-11",
                            membership_tier="gold",
                            owner_key=key,
                        )
                    )
            await store.write(batch)
            total += len(batch)
        await store.refresh_rollups(wait=True)
    return total


async def drop(conn: asyncpg.Connection) -> None:
    await drop_usage_tables(conn, TABLE)
    await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--per-day", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
