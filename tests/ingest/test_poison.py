"""A record PostgreSQL refuses for what it holds is one dead letter, never a stall: the
rest of its batch is stored, and the partition goes on (`ingest.store`, `RowsRefused`).

The poison here is real: a CHECK constraint the test adds to its own usage table refuses
one message's row, as PostgreSQL refuses a value it cannot hold; validation lets the
message through, since it is valid."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.dead_letter import DeadLetterReader
from ingest.errors import RowsRefused, StoreUnavailable
from ingest.metrics import ConsumerMetrics
from ingest.rows import UsageRow
from ingest.settings import Settings
from ingest.store import UsageStore
from schemas.errors import Reason
from schemas.parse import parse_telemetry
from simulators.plan import FleetPlan, plan_device
from simulators.traffic import Message
from simulators.units import device_ids
from tests.conftest import connection
from tests.pipeline import produce_at, stored_keys, table_letters, wait_for


async def refuse_seq(settings: Settings, seq: int) -> str:
    """Add a CHECK to the test's usage table that refuses rows with `seq`; its name."""
    name = "test_poison_seq"
    async with connection(settings.postgres.dsn.get_secret_value()) as conn:
        await conn.execute(
            f"ALTER TABLE {settings.postgres.table} ADD CONSTRAINT {name} CHECK (seq <> {seq})"
        )
    return name


def one_device(settings: Settings, seed: int, count: int) -> tuple[str, list[Message]]:
    """A one-device fleet of `count` messages: its device id and messages."""
    plan = FleetPlan(devices=1, messages_per_device=count, seed=seed)
    (device,) = device_ids(plan)
    return device, plan_device(plan, device, settings.mqtt.topic_prefix)


def rows_of(messages: Sequence[Message]) -> list[UsageRow]:
    """The rows the consumer would write for `messages` (partition 0, offsets 0...)."""
    now = datetime.now(UTC)
    return [
        UsageRow.from_envelope(
            parse_telemetry(m.payload, now=now, max_future_skew=timedelta(days=1), max_bytes=65536),
            0,
            offset,
        )
        for offset, m in enumerate(messages)
    ]


async def test_a_row_the_database_refuses_is_dead_lettered_and_the_rest_stored(
    settings: Settings,
) -> None:
    device, messages = one_device(settings, 63, 14)
    poison = messages[6]
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
    constraint = await refuse_seq(settings, poison.key[2])
    now = time.time_ns() // 1_000_000
    await produce_at(settings, device, [m.payload for m in messages], [now] * 14)

    metrics = CollectorRegistry()
    consumer = Consumer(settings, ConsumerMetrics(metrics), client_id="poison")
    task = asyncio.create_task(consumer.run())
    await wait_for(lambda: consumer.report.consumed == 14, "the 14 records")
    # The partition is not stalled: what comes after is stored too.
    later = FleetPlan(devices=1, messages_per_device=17, seed=63)
    rest = plan_device(later, device, settings.mqtt.topic_prefix)[14:]
    await produce_at(settings, device, [m.payload for m in rest], [now] * 3)
    await wait_for(lambda: consumer.report.consumed == 17, "the 3 later records")
    consumer.stop()
    await task

    report = consumer.report
    assert (report.stored, report.dead_lettered) == (16, 1)
    assert sorted(await stored_keys(settings)) == sorted(
        m.key for m in [*messages, *rest] if m is not poison
    )
    async with DeadLetterReader(settings.kafka) as reader:
        letters = [s.letter async for s in reader if s.letter is not None]
    assert [(x.reason, x.original, x.key) for x in letters] == [
        (Reason.UNSTORABLE, poison.payload, device.encode())
    ]
    assert letters[0].message.startswith("PostgreSQL refused the row: CheckViolationError: ")
    assert constraint in letters[0].message
    # The record: the letter is in the table, written by the retried write.
    table = await table_letters(settings)
    assert [(r["reason"], bytes(r["original"]), r["message"]) for r in table] == [
        ("unstorable", poison.payload, letters[0].message)
    ]
    assert (
        metrics.get_sample_value(
            "usagepipe_consumer_dead_letters_total", {"reason": "unstorable", "model": "unknown"}
        )
        == 1
    )


async def test_the_store_names_the_refused_rows_and_keeps_nothing_of_the_write(
    settings: Settings,
) -> None:
    _, messages = one_device(settings, 64, 40)
    rows = rows_of(messages)
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
        await refuse_seq(settings, rows[5].seq)
        async with connection(settings.postgres.dsn.get_secret_value()) as conn:
            await conn.execute(
                f"ALTER TABLE {settings.postgres.table}"
                f" ADD CONSTRAINT test_poison_seq_2 CHECK (seq <> {rows[31].seq})"
            )
        with pytest.raises(RowsRefused) as caught:
            await store.write(rows)
        assert [row for row, _ in caught.value.rows] in ([rows[5], rows[31]], [rows[31], rows[5]])
        assert str(caught.value).startswith("PostgreSQL refused 2 row(s): ")
        assert await stored_keys(settings) == []
        assert await store.write([r for i, r in enumerate(rows) if i not in (5, 31)]) == 38
    assert len(await stored_keys(settings)) == 38


async def test_an_outage_is_not_taken_for_poison(settings: Settings) -> None:
    """A refusal that is no row's fault (here: the table is gone) stays a retriable
    StoreUnavailable, never a dead letter."""
    _, messages = one_device(settings, 65, 2)
    rows = rows_of(messages)
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
        table = settings.postgres.table
        async with connection(settings.postgres.dsn.get_secret_value()) as conn:
            await conn.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")
            try:
                with pytest.raises(StoreUnavailable):
                    await store.write(rows)
            finally:
                await conn.execute(f"ALTER TABLE {table}_gone RENAME TO {table}")
