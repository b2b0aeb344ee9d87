"""A COMMIT whose reply is lost (the connection reset after PostgreSQL committed): the
store finds that the transaction committed, so the counters equal the rows (issue 17
item 7; before, its rows were written again and counted as duplicates)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.errors import StoreUnavailable
from ingest.metrics import ConsumerMetrics
from ingest.rows import SourceOffset
from ingest.settings import ConsumerSettings, Settings
from ingest.store import UsageStore
from simulators.plan import FleetPlan
from tests.conftest import free_port
from tests.ingest.test_exactly_once import produce
from tests.ingest.test_startup import with_dsn_port
from tests.ingest.test_store import pg, plan_rows
from tests.pipeline import expected_keys, stored_keys, wait_for
from tests.proxy import CommitReplyDropper


async def count_rows(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {settings.postgres.table}")
        return n
    finally:
        await conn.close()


async def test_a_write_whose_commit_reply_is_lost_reports_its_rows_as_new(
    settings: Settings,
) -> None:
    port = free_port()
    moved, real = with_dsn_port(settings, port)
    rows = plan_rows(FleetPlan(devices=3, messages_per_device=4, seed=8))
    offsets = [SourceOffset(settings.kafka.raw_topic, 0, 12, 1_700_000_000_000)]
    async with CommitReplyDropper(port, real) as proxy:
        await proxy.start()
        async with UsageStore(pg(moved)) as store:
            await store.migrate()
            proxy.arm(1, b"ambiguous-group")
            assert await store.write(rows, offsets, group_id="ambiguous-group") == 12
            assert proxy.dropped == 1
            assert await count_rows(settings) == 12
            # Had it not committed, the offsets would not be these: retried, as before.
            assert await store.write(rows, offsets, group_id="ambiguous-group") == 0


async def test_a_write_whose_connection_fails_before_commit_is_still_retried(
    settings: Settings,
) -> None:
    """Without offsets to look at (or when they are not the batch's) nothing is assumed."""
    port = free_port()
    moved, real = with_dsn_port(settings, port)
    rows = plan_rows(FleetPlan(devices=1, messages_per_device=3, seed=9))
    async with CommitReplyDropper(port, real) as proxy:
        await proxy.start()
        async with UsageStore(pg(moved)) as store:
            await store.migrate()
            proxy.arm(1, store.table.encode())
            with pytest.raises(StoreUnavailable, match=r"^writing 3 rows failed: "):
                await store.write(rows, group_id="g")
            assert proxy.dropped == 1
            assert await count_rows(settings) == 3  # it had committed, unknown to the store


async def test_counters_equal_the_rows_after_commit_replies_are_lost(settings: Settings) -> None:
    port = free_port()
    moved, real = with_dsn_port(settings, port)
    small = ConsumerSettings(**{**moved.consumer.model_dump(), "batch_max": 30})
    moved = moved.model_copy(update={"consumer": small})
    plan = FleetPlan(devices=10, messages_per_device=30, seed=23)
    total = await produce(settings, plan)
    assert total == 300
    metrics = CollectorRegistry()
    async with CommitReplyDropper(port, real) as proxy:
        await proxy.start()
        proxy.arm(4, moved.consumer.group_id.encode())
        consumer = Consumer(moved, ConsumerMetrics(metrics), stop_after=total)
        async with asyncio.timeout(90):
            report = await consumer.run()
        await wait_for(lambda: proxy.dropped == 4, "4 commit replies dropped")
    keys = await stored_keys(settings)
    assert sorted(keys) == sorted(expected_keys(settings, plan))
    assert await count_rows(settings) == 300
    assert (report.stored, report.duplicates) == (300, 0)
    assert metrics.get_sample_value("usagepipe_consumer_stored_total") == 300
    assert metrics.get_sample_value("usagepipe_consumer_duplicates_total") == 0
