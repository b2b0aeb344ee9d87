"""Both storage layouts give the numbers of a direct aggregate over the raw rows in
every state: rows inside and outside every TimescaleDB policy window, before and after
refreshes, late rows into compressed chunks, and after the compression and retention
policies ran (`CALL run_job`, as TimescaleDB's scheduler would).

Times are relative to now because the policies are; what is asserted is equality,
which holds whatever the date and the time of day."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ingest.rollups import bucket_start, direct_rollup_query, usage_rollup
from ingest.rows import UsageRow
from ingest.settings import Settings
from ingest.store import UsageStore
from simulators.plan import FleetPlan
from tests.conftest import cleanup, require_timescaledb
from tests.ingest.test_store import (
    Connection,
    device_days,
    direct_device_days,
    pg,
    plan_rows,
    refresh,
    vars_of,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)

Numbers = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


async def read(conn: Connection, table: str, span: tuple[datetime, datetime]) -> Numbers:
    """What the planners read: hourly, daily and device-day rollups over `span`."""
    hourly = [tuple(vars_of(r)) for r in await usage_rollup(conn, table, "hourly", *span)]
    daily = [tuple(vars_of(r)) for r in await usage_rollup(conn, table, "daily", *span)]
    return hourly, daily, await device_days(conn, table, *span)


async def direct(conn: Connection, table: str, span: tuple[datetime, datetime]) -> Numbers:
    """The same straight from the raw rows."""
    hourly = [tuple(r) for r in await conn.fetch(direct_rollup_query(table, "hourly"), *span)]
    daily = [tuple(r) for r in await conn.fetch(direct_rollup_query(table, "daily"), *span)]
    return hourly, daily, await direct_device_days(conn, table, *span)


def fleet(start: datetime, run_id: str, *, seed: int = 1) -> list[UsageRow]:
    """Three devices' messages from `start`, every fifth sent twice, with owner keys."""
    plan = FleetPlan(
        devices=3, messages_per_device=12, seed=seed, run_id=run_id, duplicate_rate=0.2,
        start=start,
    )  # fmt: skip
    return [
        dataclasses.replace(r, owner_key=f"k{r.seq % 3}", region="KR-11") if r.seq % 2 else r
        for r in plan_rows(plan)
    ]


async def job(conn: Connection, table: str, proc: str) -> int:
    found: int = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs"
        " WHERE hypertable_name = $1 AND proc_name = $2",
        table,
        proc,
    )
    return found


@pytest.mark.timescale
async def test_both_layouts_equal_a_direct_aggregate_in_and_out_of_every_policy_window(
    settings: Settings,
) -> None:
    await require_timescaledb(settings)
    now = datetime.now(UTC)
    hour = bucket_start(now, HOUR)
    # Compression after allowed lateness (3 days) plus one chunk (1 day); retention 30
    # days, so the consumers accept events up to 29 days old.
    ts_pg = pg(settings, use_timescaledb=True, retention_days=30)
    plain_pg = pg(settings, table=f"{settings.postgres.table}_plain", retention_days=30)
    rows = [
        *fleet(hour - 28 * DAY + 3 * HOUR, "old"),  # compressed, later past retention
        *fleet(hour - 10 * DAY, "compressed"),  # compressed
        *fleet(hour - 2 * DAY - 5 * HOUR, "late"),  # inside the lateness: not compressed
        *fleet(hour - HOUR + 5 * MINUTE, "ended"),  # the hour that just ended
        *fleet(hour, "open"),  # the open hour (and a little after now)
    ]
    span = (hour - 30 * DAY, hour + 2 * DAY)
    try:
        async with UsageStore(ts_pg) as ts, UsageStore(plain_pg) as plain:
            await ts.migrate()
            await plain.migrate()
            assert (ts.layout.kind, plain.layout.kind) == ("timescaledb", "partitioned")
            stores = (ts, plain)
            async with ts.pool.acquire() as tc, plain.pool.acquire() as pc:
                conns = ((tc, ts), (pc, plain))

                async def same(step: str) -> Numbers:
                    """Every store reads its direct aggregate, and both alike."""
                    seen = []
                    for conn, store in conns:
                        numbers = await read(conn, store.table, span)
                        assert numbers == await direct(conn, store.table, span), step
                        seen.append(numbers)
                    assert seen[0] == seen[1], step
                    assert sum(r[6] for r in seen[0][1]) > 0, step  # events counted
                    return seen[0]

                for i in range(0, len(rows), 100):
                    stored = [await s.write(rows[i : i + 100]) for s in stores]
                    assert stored[0] == stored[1] > 0
                await same("noted")
                for store in stores:
                    assert await refresh(store, now=now) is not None
                await same("refreshed")

                # The compression policy: every chunk that ended more than 4 days ago.
                await tc.execute(f"CALL run_job({await job(tc, ts.table, 'policy_compression')})")
                compressed = await tc.fetch(
                    "SELECT range_end FROM timescaledb_information.chunks"
                    " WHERE hypertable_name = $1 AND is_compressed",
                    ts.table,
                )
                assert len(compressed) == 2
                assert all(r["range_end"] <= now - 4 * DAY for r in compressed)
                await same("compressed")

                # Late rows into compressed chunks, the lateness window and the ended
                # hour, and a replay of earlier ones: duplicates add nothing.
                late = [
                    *fleet(hour - 28 * DAY + 7 * HOUR, "old-late", seed=2),
                    *fleet(hour - 10 * DAY + 20 * HOUR, "compressed-late", seed=2),
                    *fleet(hour - 2 * DAY, "late-late", seed=2),
                    *fleet(hour - 50 * MINUTE, "ended-late", seed=2),
                ]
                for batch in (late, rows[::7] + late[::5]):
                    stored = [await s.write(batch) for s in stores]
                    assert stored[0] == stored[1]
                assert stored == [0, 0]
                await same("late, noted")
                for store in stores:
                    await refresh(store, now=now)
                before = await same("late, refreshed")

                # Retention: past 20 days (an operator's alter_job on TimescaleDB; the
                # plain layout's drop_expired at the same cutoff).
                retention = await job(tc, ts.table, "policy_retention")
                await tc.execute(
                    "SELECT alter_job(job_id, config => jsonb_set(config, '{drop_after}',"
                    " '\"20 days\"')) FROM timescaledb_information.jobs WHERE job_id = $1",
                    retention,
                )
                await tc.execute(f"CALL run_job({retention})")
                assert await plain.drop_expired(now + 10 * DAY) != []
                for conn, store in conns:
                    oldest = await conn.fetchval(f"SELECT min(event_time) FROM {store.table}")
                    assert oldest >= hour - 21 * DAY, store.layout.kind
                    await refresh(store, now=now)
                    # The rollups keep what retention dropped from the raw rows.
                    assert await read(conn, store.table, span) == before, store.layout.kind
    finally:
        await cleanup(settings.model_copy(update={"postgres": plain_pg}))
