"""The consumers' periodic rollup refresh (plain PostgreSQL): ended hours at every
tick, ended days at most every `postgres.rollup_day_refresh_s`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from ingest.settings import Settings
from tests.ingest.test_enrich import message, produce, running, sample
from tests.pipeline import wait_for

REFRESHED = "usagepipe_consumer_rollup_refresh_buckets_total"


async def test_ended_hours_are_refreshed_every_tick_and_ended_days_once_per_day_interval(
    settings: Settings,
) -> None:
    postgres = settings.postgres.model_copy(
        update={"rollup_refresh_s": 0.2, "rollup_day_refresh_s": 3600, "use_timescaledb": False}
    )
    s = settings.model_copy(update={"postgres": postgres})
    day = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
    device = "wm-43-000001"
    await produce(s, [(device, message(device, 1, day + timedelta(hours=10, minutes=5)))])
    async with running(s) as (_, metrics):
        await wait_for(lambda: sample(metrics, REFRESHED, granularity="day") == 1, "a day refresh")
        assert sample(metrics, REFRESHED, granularity="hour") == 1
        # A late event for the same ended day: its hour at the next tick, not its day.
        await produce(s, [(device, message(device, 2, day + timedelta(hours=15, minutes=5)))])
        await wait_for(lambda: sample(metrics, REFRESHED, granularity="hour") == 2, "an hour")
        # That tick left the day noted: the next day refresh is an hour away.
        assert sample(metrics, REFRESHED, granularity="day") == 1
    conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
    try:
        t = s.postgres.table
        hourly = await conn.fetch(f"SELECT bucket, events FROM {t}_hourly ORDER BY 1")
        daily = await conn.fetch(f"SELECT bucket, events FROM {t}_daily ORDER BY 1")
        notes = await conn.fetch(f"SELECT bucket, hourly_done FROM {t}_rollup_invalidations")
    finally:
        await conn.close()
    assert [tuple(r) for r in hourly] == [
        (day + timedelta(hours=10), 1),
        (day + timedelta(hours=15), 1),
    ]
    assert [tuple(r) for r in daily] == [(day, 1)]  # materialised before the late event
    assert [tuple(n) for n in notes] == [(day + timedelta(hours=15), True)]
