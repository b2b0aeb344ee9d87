"""How fast the store stage writes, against raw COPY into the same table shape.

Builds realistic rows (a simulated fleet's messages, parsed as the consumer parses
them, in event-time order as a live stream arrives), then writes them in batches of
`--batch` rows, each in its own transaction, two ways on the real PostgreSQL:

    store     UsageStore.write: COPY of the rows into the partitioned usage table
              under a savepoint, the table's trigger writing their message ids into
              `<table>_ids` (migration 010; INSERT ... ON CONFLICT DO NOTHING where an
              id is already there), the rollup notes for the hours inserted, and the
              Kafka offsets upsert, one transaction per batch
    raw COPY  asyncpg copy_records_to_table straight into an identical partitioned
              table (same columns, same partitions; no rollups, no staging, no ids),
              keyed as the usage table was before migration 007, by (device_id,
              boot_id, seq, event_time): the cheapest table that drops a duplicate
              by itself, and what the 0.8 target was set against. Also printed: raw
              COPY into the same table without that key, as the usage table is now
              (it dedups nothing: the ids table does), and raw COPY of the rows
              and of their ids into both tables, one transaction a batch, as the
              store's fast path did before migration 010 (the client writing the
              ids), without its checks

On plain PostgreSQL (the layout asked for here); `bench/layouts.py` runs the store and
keyed raw COPY runs on a TimescaleDB hypertable too, beside these (`kind`). Each run
gets fresh tables (`usage_bench_store`, `usage_bench_raw`, dropped after). The
best of `--repeat` runs is printed for each, with the ratio store / raw. This is a
benchmark, not a test: it prints figures and asserts nothing.

    python bench/store.py [--devices 2000] [--messages 50] [--batch 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from ingest.rollups import RefreshReport
from ingest.rows import COLUMNS, ID_COLUMNS, SourceOffset, UsageRow, content_digest
from ingest.settings import PostgresSettings
from ingest.sql import Kind
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables
from schemas.parse import parse_telemetry
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids

COMMAND = "python bench/store.py " + " ".join(sys.argv[1:])


def fleet_rows(devices: int, messages: int) -> list[UsageRow]:
    plan = FleetPlan(
        devices=devices,
        messages_per_device=messages,
        seed=1,
        start=datetime.now(UTC) - timedelta(minutes=30),
    )
    now = datetime.now(UTC)
    rows = []
    for device in device_ids(plan):
        for i, msg in enumerate(plan_device(plan, device)):
            env = parse_telemetry(
                msg.payload, now=now, max_future_skew=timedelta(minutes=5), max_bytes=65536
            )
            rows.append(UsageRow.from_envelope(env, hash(device) % 6, i))
    rows.sort(key=lambda r: r.event_time)
    return rows


async def drop(dsn: str, table: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await drop_usage_tables(conn, table)
    finally:
        await conn.close()


def settings(base: PostgresSettings, table: str, kind: Kind = "partitioned") -> PostgresSettings:
    return PostgresSettings(
        **{
            **base.model_dump(),
            "table": table,
            "use_timescaledb": kind == "timescaledb",
            "pool_size": 1,
        }
    )


async def migrate(store: UsageStore, kind: Kind) -> None:
    """Make the store's table; SystemExit if the server gave it another layout than
    `kind` (TimescaleDB asked for where the server cannot have it)."""
    await store.migrate()
    if store.layout.kind != kind:
        raise SystemExit(f"bench/store.py: {store.table} came out {store.layout.kind}, not {kind}")


REFRESHES: list[RefreshReport] = []


async def run_store(
    base: PostgresSettings, batches: list[list[UsageRow]], kind: Kind = "partitioned"
) -> float:
    table = "usage_bench_store"
    await drop(base.dsn.get_secret_value(), table)
    try:
        async with UsageStore(settings(base, table, kind)) as store:
            await migrate(store, kind)
            started = time.perf_counter()
            for n, batch in enumerate(batches):
                offsets = [SourceOffset("bench", p, (n + 1) * len(batch), n) for p in range(6)]
                await store.write(batch, offsets, group_id="bench")
            elapsed = time.perf_counter() - started
            refreshed = await store.refresh_rollups()
            assert refreshed is not None
            REFRESHES.append(refreshed)
            return elapsed
    finally:
        await drop(base.dsn.get_secret_value(), table)


async def run_raw(
    base: PostgresSettings,
    batches: list[list[UsageRow]],
    *,
    keyed: bool,
    ids: bool = False,
    kind: Kind = "partitioned",
) -> float:
    """Raw COPY of `batches` into a table made as the store's: on plain PostgreSQL its
    partitions without the ids trigger, keyed by (device_id, boot_id, seq, event_time)
    if `keyed`; on TimescaleDB the hypertable as migrated, which has that key already
    (`keyed` must be true) and no trigger."""
    table = "usage_bench_raw"
    await drop(base.dsn.get_secret_value(), table)
    try:
        async with UsageStore(settings(base, table, kind)) as store:
            await migrate(store, kind)  # the same table and partitions (or chunks)
            if kind == "partitioned":  # TimescaleDB makes a chunk as a row needs it
                await store.ensure_partitions(r.event_time for b in batches for r in b)
            async with store.pool.acquire() as conn:
                if kind == "timescaledb":
                    assert keyed, "the hypertable keeps its key (its migration 007)"
                else:
                    # Without the trigger that writes the ids (migration 010): the rows.
                    await conn.execute(f"DROP TRIGGER {table}_write_ids ON {table}")
                if keyed and kind == "partitioned":
                    await conn.execute(
                        f"ALTER TABLE {table} ADD PRIMARY KEY (device_id, boot_id, seq, event_time)"
                    )
                started = time.perf_counter()
                for batch in batches:
                    records = [r.record() for r in batch]
                    if not ids:
                        await conn.copy_records_to_table(table, records=records, columns=COLUMNS)
                        continue
                    async with conn.transaction():
                        await conn.copy_records_to_table(table, records=records, columns=COLUMNS)
                        await conn.copy_records_to_table(
                            f"{table}_ids",
                            records=[
                                (*r.key, content_digest(x))
                                for r, x in zip(batch, records, strict=True)
                            ],
                            columns=ID_COLUMNS,
                        )
                return time.perf_counter() - started
    finally:
        await drop(base.dsn.get_secret_value(), table)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=50, help="per device")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    base = PostgresSettings()
    rows = fleet_rows(args.devices, args.messages)
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    conn = await asyncpg.connect(base.dsn.get_secret_value())
    version = await conn.fetchval("SHOW server_version")
    await conn.close()
    print(
        f"{len(rows):,} rows from {args.devices:,} devices, {len(batches)} batches of "
        f"{args.batch:,}; PostgreSQL {version}, Python {platform.python_version()}"
    )
    store_s = raw_s = keyless_s = both_s = float("inf")
    for _ in range(args.repeat):  # alternate, so drift hits all alike
        raw_s = min(raw_s, await run_raw(base, batches, keyed=True))
        store_s = min(store_s, await run_store(base, batches))
        keyless_s = min(keyless_s, await run_raw(base, batches, keyed=False))
        both_s = min(both_s, await run_raw(base, batches, keyed=False, ids=True))
    store_rate, raw_rate = len(rows) / store_s, len(rows) / raw_s
    keyless_rate, both_rate = len(rows) / keyless_s, len(rows) / both_s
    print(f"store stage (UsageStore.write, ids and rollups):  {store_rate:>10,.0f} rows/s")
    print(f"raw COPY (same table, keyed as before 007):       {raw_rate:>10,.0f} rows/s")
    print(f"raw COPY (same table, no key):                    {keyless_rate:>10,.0f} rows/s")
    print(f"ratio store / raw COPY: {store_rate / raw_rate:.2f} (target >= 0.80)")
    print(f"raw COPY (same table, no key, and its ids):       {both_rate:>10,.0f} rows/s")
    print(f"ratio store / raw COPY without a key: {store_rate / keyless_rate:.2f}")
    print(f"ratio store / raw COPY of the rows and their ids: {store_rate / both_rate:.2f}")
    refresh = min(REFRESHES, key=lambda r: r.seconds)
    print(
        f"rollup refresh afterwards (off the write path): {refresh.hours} hours and"
        f" {refresh.days} days from {len(rows):,} rows in {refresh.seconds:.3f} s"
        f" = {len(rows) / refresh.seconds:,.0f} rows/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
