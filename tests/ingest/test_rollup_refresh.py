"""The consumers' periodic rollup refresh (plain PostgreSQL): ended hours at every
tick, ended days at most every `postgres.rollup_day_refresh_s`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.metrics import ConsumerMetrics
from ingest.settings import Settings
from ingest.store import UsageStore
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


class RefreshBroke(Exception):
    """Stands for a refresh failing in a way the refresher does not expect."""


class _BrokenRefreshStore:
    """Stands in for the store in the refresher only: its refresh fails."""

    async def refresh_rollups(self, *, settled_only: bool, days: bool) -> None:
        raise RefreshBroke("the rollup refresh broke")


class BrokenRefresher(Consumer):
    async def _refresh_rollups(self, store: UsageStore) -> None:
        await super()._refresh_rollups(_BrokenRefreshStore())  # type: ignore[arg-type]


async def test_a_refresher_failure_ends_the_consumer_with_that_error(settings: Settings) -> None:
    postgres = settings.postgres.model_copy(update={"rollup_refresh_s": 0.2})
    s = settings.model_copy(update={"postgres": postgres})
    device = "wm-43-000001"
    await produce(s, [(device, message(device, 1, datetime.now(UTC) - timedelta(hours=1)))])
    metrics = CollectorRegistry()
    consumer = BrokenRefresher(s, ConsumerMetrics(metrics))
    # Nothing else stops this consumer: it must end by itself, with the refresher's
    # error (a bare refresher task would die alone and the consumer run on).
    run = asyncio.create_task(consumer.run(), name="test-consumer")
    try:
        done, _ = await asyncio.wait([run], timeout=30)
    finally:
        run.cancel()
    assert done == {run}
    with pytest.raises(RefreshBroke) as failed:
        run.result()
    assert type(failed.value) is RefreshBroke
    assert str(failed.value) == "the rollup refresh broke"
    assert consumer.report.stopped_by == ""
    assert sample(metrics, "usagepipe_consumer_errors_total", kind="rollup_refresh") == 0
