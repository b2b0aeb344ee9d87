"""The heat map's owners per UTC hour (`<table>_hourly_owners`, partitioned migration
015, TimescaleDB 014): what it holds and what reads of it return equal a direct
aggregate of the raw rows, before and after refreshes, with duplicates and late events;
erasure clears its keys."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.erasure import unlink_owners
from ingest.rollups import hourly_owners_source
from ingest.store import UsageStore
from simulators.plan import FleetPlan
from tests.ingest.test_store import Connection, multiset, plan_rows, row

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SEC = timedelta(seconds=1)

DIRECT = """
    SELECT date_trunc('hour', event_time AT TIME ZONE 'UTC') AS hour,
           split_part(schema, '.', 1) AS category, model, firmware, region, owner_key,
           count(*) AS events
    FROM {t} WHERE event_time >= $1 AND event_time < $2
    GROUP BY 1, 2, 3, 4, 5, 6
"""
"""Written apart from `ingest.rollups.hourly_owners_query` (date_trunc, not date_bin)."""


async def direct(conn: Connection, t: str, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
    return multiset(await conn.fetch(DIRECT.format(t=t), start, end))


async def read(conn: Connection, t: str, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
    """What the heat map reads, in DIRECT's columns; rows of one group (an erasure
    leaves two alike) summed, as the report's re-aggregation does."""
    source = await hourly_owners_source(conn, t, start, end, hours_parameter=3)
    rows = await conn.fetch(
        f"""SELECT bucket AT TIME ZONE 'UTC' AS hour, category, model, firmware, region,
                   owner_key, sum(events)::bigint AS events
            FROM {source.sql} h GROUP BY 1, 2, 3, 4, 5, 6""",
        start,
        end,
        source.live_hours,
    )
    return multiset(rows)


async def materialised(conn: Connection, t: str) -> list[tuple[Any, ...]]:
    return multiset(
        await conn.fetch(
            "SELECT bucket AT TIME ZONE 'UTC', category, model, firmware, region, owner_key,"
            f" events FROM {t}_hourly_owners"
        )
    )


async def test_owners_per_hour_equal_a_direct_aggregate_after_duplicates_and_late_events(
    either: UsageStore,
) -> None:
    store = either
    t = store.table
    midnight = datetime(2026, 4, 10, tzinfo=UTC)
    recent = FleetPlan(
        devices=15, messages_per_device=60, seed=4, duplicate_rate=0.1, start=midnight - 90 * SEC
    )
    late = FleetPlan(
        devices=8,
        messages_per_device=30,
        seed=4,
        run_id="late",
        start=midnight - DAY - 5 * HOUR - 40 * SEC,
    )
    rows, late_rows = plan_rows(recent), plan_rows(late)
    random.Random(6).shuffle(rows)
    # Keys and registry facts on two rows in three, as enrichment stores them.
    rows = [
        dataclasses.replace(r, owner_key=f"k{hash(r.device_id) % 4}", region="KR-11",
                            model="WM-A", firmware="1.0")
        if i % 3 else r
        for i, r in enumerate(rows)
    ]  # fmt: skip
    for i in range(0, len(rows), 250):
        await store.write(rows[i : i + 250])
    await store.write(late_rows)
    await store.write(rows[:200] + late_rows[:50])  # a replay: duplicates only
    span = (midnight - 3 * DAY, midnight + DAY)
    cut = (midnight - DAY - 5 * HOUR, midnight + 7 * HOUR)  # whole hours, not days
    async with store.pool.acquire() as conn:
        for step in ("noted", "refreshed", "late", "refreshed again"):
            if step == "late":
                more = plan_rows(
                    FleetPlan(devices=3, messages_per_device=10, seed=8, run_id="later",
                              start=midnight - 2 * DAY + 21 * HOUR)
                )  # fmt: skip
                assert await store.write(more) == len(more)
            elif step.startswith("refreshed"):
                done = await store.refresh_rollups(wait=True)
                assert done is not None and done.hours > 0
                assert await materialised(conn, t) == await direct(conn, t, *span), step
            for start, end in (span, cut):
                expected = await direct(conn, t, start, end)
                assert await read(conn, t, start, end) == expected, (step, start)
            assert {r[5] for r in expected} == {None, "k0", "k1", "k2", "k3"}
            assert sum(r[6] for r in await direct(conn, t, *span)) == await conn.fetchval(
                f"SELECT count(*) FROM {t}"
            )


async def test_erasure_removes_owner_keys_from_the_owners_per_hour(either: UsageStore) -> None:
    store = either
    t = store.table
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    keyed = [dataclasses.replace(row("d1", s, at + s * HOUR), owner_key="gone") for s in range(30)]
    other = [dataclasses.replace(row("d2", 1, at), owner_key="stays")]
    await store.write(keyed + other)
    await store.refresh_rollups(wait=True)
    span = (at - DAY, at + 3 * DAY)
    async with store.pool.acquire() as conn:
        before = await materialised(conn, t)
        assert len(before) == 31 and {r[5] for r in before} == {"gone", "stays"}
    assert await unlink_owners(store, [(uuid.uuid4(), ["gone"])]) == 30
    async with store.pool.acquire() as conn:
        keys = await conn.fetch(f"SELECT owner_key, sum(events) FROM {t}_hourly_owners GROUP BY 1")
        assert {(r[0], r[1]) for r in keys} == {(None, 30), ("stays", 1)}
        # Still what the raw rows say, read live (the erased days are noted) and
        # after the refresh that recomputes them.
        assert await read(conn, t, *span) == await direct(conn, t, *span)
        await store.refresh_rollups(wait=True)
        assert await read(conn, t, *span) == await direct(conn, t, *span)
        assert (
            await conn.fetchval(f"SELECT count(*) FROM {t}_hourly_owners WHERE owner_key = 'gone'")
            == 0
        )
