"""One row per message id (issue 17, item 2): `(device_id, boot_id, seq)` never makes a
second row, whatever event time a resend carries, on both layouts; a resend with other
content is dead-lettered `conflicting_duplicate`, an identical one is a counted
duplicate, and a payload holding a key twice is refused `duplicate_key`."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.dead_letter import DeadLetterReader
from ingest.errors import ConflictingDuplicates
from ingest.metrics import ConsumerMetrics
from ingest.rows import UsageRow
from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from schemas.errors import Reason
from tests.conftest import connection, require_timescaledb
from tests.pipeline import produce_at, stored_keys, wait_for

AT = datetime(2026, 2, 1, 8, tzinfo=UTC)
SEC = timedelta(seconds=1)


def row(seq: int, at: datetime, *, offset: int = 0, **body: Any) -> UsageRow:
    return UsageRow("d1", "b1", seq, at, "washer.energy", 1, body or {"energy_wh": 2.5}, 0, offset)


async def ids_of(store: UsageStore) -> list[tuple[str, str, int, datetime]]:
    records = await store.fetch(
        "SELECT device_id, boot_id, seq, event_time FROM {table}_ids ORDER BY 1, 2, 3"
    )
    return [tuple(r) for r in records]


async def keys_of(store: UsageStore) -> list[tuple[str, str, int, datetime]]:
    records = await store.fetch(
        "SELECT device_id, boot_id, seq, event_time FROM {table} ORDER BY 1, 2, 3, 4"
    )
    return [tuple(r) for r in records]


async def test_100_event_times_of_one_id_in_one_batch_make_one_row(either: UsageStore) -> None:
    store = either
    resends = [row(14, AT + i * SEC, offset=i) for i in range(100)]
    with pytest.raises(ConflictingDuplicates) as caught:
        await store.write(resends)
    assert [r for r, _ in caught.value.rows] == resends[1:]
    assert caught.value.rows[0][1] == (
        "(device_id, boot_id, seq) = ('d1', 'b1', 14) is earlier in the same batch with"
        " other content; this message differs in event_time (2026-02-01T08:00:01+00:00,"
        " not 2026-02-01T08:00:00+00:00). One id names one message: the first stays"
    )
    assert await keys_of(store) == []  # nothing of the write was kept
    assert await store.write(resends[:1]) == 1
    assert await keys_of(store) == [("d1", "b1", 14, AT)]
    assert await ids_of(store) == [("d1", "b1", 14, AT)]


async def test_100_event_times_of_a_stored_id_make_no_second_row(either: UsageStore) -> None:
    store = either
    assert await store.write([row(14, AT)]) == 1
    resends = [row(14, AT + i * SEC, offset=i) for i in range(1, 100)]
    with pytest.raises(ConflictingDuplicates) as caught:
        await store.write([row(15, AT), *resends])
    why = {r.kafka_offset: message for r, message in caught.value.rows}
    assert sorted(r.kafka_offset for r, _ in caught.value.rows) == list(range(1, 100))
    # The first resend conflicts with the stored row, the others also with it, first
    # in the batch.
    assert why[1] == (
        "(device_id, boot_id, seq) = ('d1', 'b1', 14) is already stored with other"
        " content; this message differs in event_time (2026-02-01T08:00:01+00:00,"
        " not 2026-02-01T08:00:00+00:00). One id names one message: the first stays"
    )
    assert why[99] == (
        "(device_id, boot_id, seq) = ('d1', 'b1', 14) is earlier in the same batch with"
        " other content; this message differs in event_time (2026-02-01T08:01:39+00:00,"
        " not 2026-02-01T08:00:01+00:00). One id names one message: the first stays"
    )
    assert str(caught.value).startswith("99 row(s) conflict with stored messages: ")
    # The rest of the batch goes in once the conflicting ones are taken out.
    assert await store.write([row(15, AT)]) == 1
    assert await keys_of(store) == [("d1", "b1", 14, AT), ("d1", "b1", 15, AT)]


async def test_an_identical_resend_is_a_duplicate_and_another_body_a_conflict(
    either: UsageStore,
) -> None:
    store = either
    assert await store.write([row(1, AT), row(2, AT)]) == 2
    # Byte for byte again, from other Kafka offsets (the device resent it): duplicates,
    # within one batch too.
    assert await store.write([row(1, AT, offset=7), row(1, AT, offset=8), row(3, AT)]) == 1
    other = row(2, AT, energy_wh=3.5)
    with pytest.raises(ConflictingDuplicates) as caught:
        await store.write([row(1, AT, offset=9), other])
    assert caught.value.rows == [
        (
            other,
            "(device_id, boot_id, seq) = ('d1', 'b1', 2) is already stored with other"
            " content; this message differs in schema, schema_version or body. One id"
            " names one message: the first stays",
        )
    ]
    renamed = dataclasses.replace(row(1, AT), schema_version=2)
    with pytest.raises(ConflictingDuplicates) as caught:
        await store.write([renamed])
    assert "differs in schema, schema_version or body." in caught.value.rows[0][1]
    assert len(await keys_of(store)) == 3


async def test_the_migration_gives_existing_rows_their_ids(either: UsageStore) -> None:
    """A table from before migration 007: every row's id, the first stored of an id
    its old key let in twice."""
    store = either
    t = store.table
    later = ["010_ids_by_trigger"] if store.layout.kind == "partitioned" else []
    async with connection(store._settings.dsn.get_secret_value()) as conn:
        await conn.execute(f"DROP TABLE {t}_ids")
        if later:  # the trigger of the partitioned 010, which writes the ids
            await conn.execute(f"DROP FUNCTION {t}_write_ids() CASCADE")
        await conn.execute(
            "DELETE FROM schema_migrations WHERE component = $1 AND name = ANY($2::text[])",
            f"store.{t}",
            ["007_message_ids", *later],
        )
        for seq, at, ingested in [(1, AT, AT), (1, AT - SEC, AT + SEC), (2, AT, AT)]:
            await conn.execute(
                f"INSERT INTO {t} (device_id, boot_id, seq, event_time, schema,"
                " schema_version, body, kafka_partition, kafka_offset, ingested_at)"
                " VALUES ('d1', 'b1', $1, $2, 'washer.energy', 1, '{\"energy_wh\": 2.5}',"
                " 0, 0, $3)",
                seq,
                at,
                ingested,
            )
    assert (await store.migrate()).applied == ["007_message_ids", *later]
    assert await ids_of(store) == [("d1", "b1", 1, AT), ("d1", "b1", 2, AT)]
    # Without a digest, an id from before 007 is compared by event time only.
    assert await store.write([row(1, AT), row(2, AT, energy_wh=9.0), row(3, AT)]) == 1
    with pytest.raises(ConflictingDuplicates):
        await store.write([row(2, AT + SEC)])


def payload(seq: int, at: datetime, **changes: Any) -> bytes:
    body = {"interval_s": 900, "energy_wh": 120.0, **changes}
    document = {
        "device_id": "wm-000001",
        "boot_id": "b7f3c2",
        "seq": seq,
        "event_time": at.isoformat(),
        "schema": "washer.energy",
        "schema_version": 1,
        "body": body,
    }
    return orjson.dumps(document)


async def test_the_consumer_stores_one_row_per_id_and_dead_letters_the_conflicts(
    settings: Settings,
) -> None:
    """100 resends of one id with 100 event times: 1 row, 99 letters
    `conflicting_duplicate`; 5 identical resends: 5 duplicates; a repeated key:
    `duplicate_key`. Across batches and within them alike: the result is exact."""
    now = datetime.now(UTC).replace(microsecond=0)
    times = [now - timedelta(minutes=10) + i * SEC for i in range(100)]
    resends = [payload(14, at) for at in times]
    identical = [resends[0]] * 5
    repeated = payload(15, now).replace(b'"seq":15', b'"seq":15,"seq":1015')
    after = payload(16, now)
    device = "wm-000001"
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
    records = [*resends, *identical, repeated, after]
    kafka_now = time.time_ns() // 1_000_000
    await produce_at(settings, device, records, [kafka_now] * len(records))

    metrics = CollectorRegistry()
    consumer = Consumer(settings, ConsumerMetrics(metrics), client_id="ids")
    task = asyncio.create_task(consumer.run())
    await wait_for(lambda: consumer.report.consumed == len(records), "every record")
    consumer.stop()
    await task

    report = consumer.report
    assert (report.stored, report.duplicates, report.dead_lettered) == (2, 5, 100)
    assert sorted(await stored_keys(settings)) == [
        ("wm-000001", "b7f3c2", 14),
        ("wm-000001", "b7f3c2", 16),
    ]
    async with connection(settings.postgres.dsn.get_secret_value()) as conn:
        stored_time = await conn.fetchval(
            f"SELECT event_time FROM {settings.postgres.table} WHERE seq = 14"
        )
        # The letters' record in PostgreSQL (issue 17 item 3) has them too.
        kept = await conn.fetch(
            f"SELECT reason, count(*) AS n FROM {settings.postgres.table}_dead_letters"
            " GROUP BY reason ORDER BY reason"
        )
    assert stored_time == times[0]
    assert [tuple(k) for k in kept] == [("conflicting_duplicate", 99), ("duplicate_key", 1)]
    async with DeadLetterReader(settings.kafka) as reader:
        letters = [s.letter async for s in reader if s.letter is not None]
    conflicts = [x for x in letters if x.reason is Reason.CONFLICTING_DUPLICATE]
    assert sorted(x.original for x in conflicts) == sorted(resends[1:])
    assert all(
        x.message.startswith("(device_id, boot_id, seq) = ('wm-000001', 'b7f3c2', 14) is ")
        and f"not {times[0].isoformat()})" in x.message
        for x in conflicts
    )
    [refused] = [x for x in letters if x.reason is not Reason.CONFLICTING_DUPLICATE]
    assert (refused.reason, refused.original) == (Reason.DUPLICATE_KEY, repeated)
    assert refused.message == (
        "seq: the key 'seq' appears more than once in the envelope; a key may be given once"
    )
    sample = metrics.get_sample_value
    reasons = {"conflicting_duplicate": 99, "duplicate_key": 1}
    for reason, count in reasons.items():
        labels = {"reason": reason, "model": "unknown"}
        assert sample("usagepipe_consumer_dead_letters_total", labels) == count
    assert sample("usagepipe_consumer_duplicates_total") == 5


@pytest.mark.parametrize(
    "layout", ["partitioned", pytest.param("timescaledb", marks=pytest.mark.timescale)]
)
async def test_retention_forgets_the_ids_of_what_it_drops(settings: Settings, layout: str) -> None:
    if layout == "timescaledb":
        await require_timescaledb(settings)
    hourly = PostgresSettings(
        **{
            **settings.postgres.model_dump(),
            "use_timescaledb": layout == "timescaledb",
            "partition_interval_s": 3600,
            "allowed_lateness_s": 0,
            "retention_days": 1,
        }
    )
    # Recent: TimescaleDB's retention policy (added by migrate) drops by the clock.
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    cutoff = now - timedelta(days=1)  # hh:30
    hour = timedelta(hours=1)
    async with UsageStore(hourly) as store:
        await store.migrate()
        assert store.layout.kind == layout
        await store.write(
            [
                row(1, cutoff - 3 * hour),  # its hour is dropped
                row(2, cutoff - hour),  # dropped
                row(3, cutoff - timedelta(minutes=20)),  # its hour straddles the cutoff: kept
                row(4, cutoff + hour),  # kept
            ]
        )
        # On TimescaleDB the retention policy may drop the same chunks first.
        await store.drop_expired(now)
        kept = [seq for _, _, seq, _ in await keys_of(store)]
        assert kept == [3, 4]
        # On the plain layout every partition before the cutoff's goes with its ids; a
        # chunk's ids go once the chunk is a whole interval before the cutoff.
        expected = [2, 3, 4] if layout == "timescaledb" else [3, 4]
        assert [seq for _, _, seq, _ in await ids_of(store)] == expected
