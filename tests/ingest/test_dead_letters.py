"""Dead letters end to end: every input the consumer refuses is moved aside with its
reason while good messages around it are stored, and `usagepipe dlq` lists, shows and
replays them."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.dead_letter import DeadLetter, DeadLetterReader, send_dead_letters
from ingest.dead_letter_table import LetterRow
from ingest.erasure import unlink_owners
from ingest.errors import RowsRefused, StoreUnavailable
from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.rate_limit import REPLAY_HEADER
from ingest.rows import SourceOffset
from ingest.settings import Settings
from ingest.store import UsageStore
from schemas.errors import InvalidTelemetry, Reason
from schemas.parse import parse_telemetry
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.conftest import cleanup, connection, free_port, isolated
from tests.ingest.test_poison import refuse_seq
from tests.ingest.test_store import row
from tests.pipeline import (
    pipeline,
    produce_at,
    publish_payloads,
    read_to_end,
    stored_keys,
    table_letters,
    wait_for,
)
from usagepipe.dlq import (
    list_letters,
    list_table_letters,
    parse_position,
    replay,
    replay_from_table,
    show_letter,
    show_table_letter,
)
from usagepipe.services import TansuBroker


def bad_inputs(good: dict[str, Any]) -> dict[bytes, Reason]:
    """One payload per class of input the consumer refuses, made from a good document."""

    def variant(seq: int, **changes: Any) -> dict[str, Any]:
        return {**good, "seq": seq, **changes}

    missing = variant(106)
    del missing["event_time"]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    return {
        orjson.dumps(variant(100)).replace(b'"boot_id":"', b'"boot_id":"\xff'): (
            Reason.INVALID_UTF8
        ),
        orjson.dumps(variant(101))[:-9]: Reason.INVALID_JSON,
        orjson.dumps([variant(102)]): Reason.INVALID_JSON,
        orjson.dumps(variant(103)).replace(b'"seq":103', b'"seq":NaN'): Reason.NON_FINITE_NUMBER,
        orjson.dumps({**variant(104), "seq": "104"}): Reason.SCHEMA_VIOLATION,
        orjson.dumps(missing): Reason.SCHEMA_VIOLATION,
        orjson.dumps(variant(107, schema="washer.spin")): Reason.UNKNOWN_SCHEMA,
        orjson.dumps(variant(108, schema_version=99)): Reason.UNKNOWN_SCHEMA_VERSION,
        orjson.dumps(variant(109, event_time=future)): Reason.EVENT_TIME_IN_FUTURE,
    }


async def read_letters(settings: Settings) -> list[DeadLetter]:
    async with DeadLetterReader(settings.kafka) as reader:
        letters = [stored.letter async for stored in reader]
    assert None not in letters
    return [letter for letter in letters if letter is not None]


async def test_each_refused_input_is_dead_lettered_once_and_replay_refuses_it_again(
    settings: Settings,
) -> None:
    plan = FleetPlan(devices=1, messages_per_device=8, seed=43)
    [device] = device_ids(plan)
    good = plan_device(plan, device, settings.mqtt.topic_prefix)
    bad = bad_inputs(orjson.loads(good[0].payload))
    assert len(bad) == 9
    topic = good[0].topic
    payloads = [m.payload for m in good[:4]] + list(bad) + [m.payload for m in good[4:]]

    async with pipeline(settings) as run:
        await publish_payloads(settings, device, topic, payloads)
        await wait_for(lambda: run.consumer.report.consumed == 17, "17 records")
        assert run.consumer.report.dead_lettered == 9
        assert sorted(await stored_keys(settings)) == sorted(m.key for m in good)

        letters = await read_letters(settings)
        assert {letter.original: letter.reason for letter in letters} == bad
        assert len(letters) == 9
        for letter in letters:
            assert (letter.kind, letter.topic) == ("kafka", settings.kafka.raw_topic)
            assert letter.key == device.encode()

        # The record: the same nine letters in PostgreSQL, committed with the batch.
        table = await table_letters(settings)
        assert {bytes(r["original"]): Reason(r["reason"]) for r in table} == bad
        assert len(table) == 9
        by_source = {(r["source_partition"], r["source_offset"]): r for r in table}
        for letter in letters:
            row = by_source[(letter.partition, letter.offset)]
            assert (row["source_kind"], row["source_topic"]) == ("kafka", letter.topic)
            assert (row["message"], row["failed_at"]) == (letter.message, letter.failed_at)
            assert row["device_id"] == device
            assert row["model"] is None  # the test's device is not registered

        # Nothing was fixed: the replayed message is refused again, as a new letter.
        report = await replay(settings, reason=Reason.UNKNOWN_SCHEMA_VERSION)
        assert report.replayed == {"unknown_schema_version": 1}
        await wait_for(lambda: run.consumer.report.dead_lettered == 10, "the letter again")

    again = await read_letters(settings)
    assert Counter(letter.reason for letter in again) == {
        **Counter(bad.values()),
        Reason.UNKNOWN_SCHEMA_VERSION: 2,
    }
    first, second = (a for a in again if a.reason is Reason.UNKNOWN_SCHEMA_VERSION)
    assert first.original == second.original
    assert first.offset != second.offset  # the replayed record, later in the raw topic
    assert Counter(Reason(r["reason"]) for r in await table_letters(settings)) == Counter(
        letter.reason for letter in again
    )
    assert sorted(await stored_keys(settings)) == sorted(m.key for m in good)
    assert run.consumer.report.consumed == 18


async def test_replayed_letter_that_is_now_valid_is_stored_once_even_when_replayed_twice(
    settings: Settings,
) -> None:
    """A message refused for a clock ahead of the consumer's skew, replayed once the skew
    was raised (the fix): stored, and a second replay changes nothing."""
    plan = FleetPlan(devices=1, messages_per_device=1, seed=44, start=datetime.now(UTC))
    [device] = device_ids(plan)
    message = plan_device(plan, device, settings.mqtt.topic_prefix)[0]
    document = orjson.loads(message.payload)
    ahead = datetime.fromisoformat(document["event_time"]) + timedelta(hours=1)
    raw = orjson.dumps({**document, "event_time": ahead.isoformat()})
    with pytest.raises(InvalidTelemetry) as refused:  # what the consumer said at first
        parse_telemetry(
            raw,
            now=datetime.now(UTC),
            max_future_skew=settings.consumer.max_future_skew,
            max_bytes=settings.bridge.max_payload_bytes,
        )
    assert refused.value.reason is Reason.EVENT_TIME_IN_FUTURE
    letter = DeadLetter.from_error(
        refused.value,
        topic=settings.kafka.raw_topic,
        partition=0,
        offset=0,
        key=device.encode(),
        original=raw,
    )
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    producer = make_producer(settings.kafka, client_id="test-dlq")
    await producer.start()
    try:
        await send_dead_letters(producer, settings.kafka.dlq_topic, [letter])
    finally:
        await producer.stop()

    fixed = settings.model_copy(
        update={"consumer": settings.consumer.model_copy(update={"max_future_skew_s": 7200})}
    )
    consumer = Consumer(fixed, ConsumerMetrics(CollectorRegistry()))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run(), name="test-consumer")
        try:
            for _ in range(2):
                report = await replay(settings, reason=Reason.EVENT_TIME_IN_FUTURE)
                assert report.replayed == {"event_time_in_future": 1}
            await wait_for(lambda: consumer.report.consumed == 2, "both replayed records")
        finally:
            consumer.stop("test over")

    assert await stored_keys(settings) == [message.key]
    assert (consumer.report.stored, consumer.report.duplicates) == (1, 1)
    assert consumer.report.dead_lettered == 0
    assert len(await read_letters(settings)) == 1


async def test_list_show_and_dry_run(settings: Settings) -> None:
    """Letters written straight to the dead-letter topic, partition 0, offsets 0..3."""
    kafka = settings.kafka
    utf8 = b'\xff\xfe{"device_id": "wm-7-000001"}'
    newer = '{"device_id": "wm-7-000001", "schema_version": 99, "x": "\u202e"}\n'.encode()
    spoof = b'{"device_id": "wm-7-000002"}'
    letters = [
        DeadLetter.from_error(
            InvalidTelemetry(Reason.INVALID_UTF8, "byte 0: invalid start byte (b'\\xff')"),
            topic=kafka.raw_topic,
            partition=1,
            offset=5,
            key=b"wm-7-000001",
            original=utf8,
        ),
        DeadLetter.from_error(
            InvalidTelemetry(Reason.UNKNOWN_SCHEMA_VERSION, "schema_version: not 99"),
            topic=kafka.raw_topic,
            partition=1,
            offset=6,
            key=b"wm-7-000001",
            original=newer,
        ),
        DeadLetter.from_error(
            InvalidTelemetry(Reason.DEVICE_ID_MISMATCH, "device_id: 'wm-7-000002' ..."),
            topic="devices/wm-7-000001/telemetry",
            partition=None,
            offset=None,
            key=b"wm-7-000001",
            original=spoof,
        ),
    ]
    await ensure_topics(kafka, kafka.dlq_topic)
    producer = make_producer(kafka, client_id="test-dlq")
    await producer.start()
    try:
        for value in [*(letter.to_json() for letter in letters), b"not a dead letter"]:
            await _send_to_partition_0(producer, kafka.dlq_topic, value)
    finally:
        await producer.stop()

    out = io.StringIO()
    assert await list_letters(kafka, out=out) == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        f"{kafka.dlq_topic}: 4 records "
        "(device_id_mismatch 1, invalid_utf8 1, unknown_schema_version 1)"
    )
    assert lines[1] == "not dead letters (see `dlq show`): 0:3"
    assert lines[2] == "the newest 3 of 3, oldest first:"
    assert lines[3].split() == ["POSITION", "REASON", "SOURCE", "DEVICE", "FAILED_AT", "MESSAGE"]
    rows = [line.split()[:5] for line in lines[4:]]
    assert [row[:4] for row in rows] == [
        ["0:0", "invalid_utf8", "kafka", f"{kafka.raw_topic}"],
        ["0:1", "unknown_schema_version", "kafka", f"{kafka.raw_topic}"],
        ["0:2", "device_id_mismatch", "mqtt", "devices/wm-7-000001/telemetry"],
    ]
    assert lines[4].split()[4:6] == ["1:5", "-"]
    assert lines[5].split()[4:6] == ["1:6", "wm-7-000001"]
    assert lines[6].split()[4] == "wm-7-000002"

    out = io.StringIO()
    assert await list_letters(kafka, reason=Reason.INVALID_UTF8, limit=5, out=out) == 1
    assert (
        out.getvalue().splitlines()[2] == "the newest 1 of 1 of reason invalid_utf8, oldest first:"
    )

    out = io.StringIO()
    assert await show_letter(kafka, parse_position("0:0"), out=out) == 0
    shown = out.getvalue().splitlines()
    assert shown[0] == f"dead letter 0:0 in {kafka.dlq_topic}"
    assert shown[1:3] == [
        "  reason     invalid_utf8",
        "  message    byte 0: invalid start byte (b'\\xff')",
    ]
    assert shown[-3:] == [
        f"  original   {len(utf8)} bytes, not UTF-8 (invalid start byte at byte 0), as hex:",
        '00000000  ff fe 7b 22 64 65 76 69 63 65 5f 69 64 22 3a 20  |..{"device_id": |',
        '00000010  22 77 6d 2d 37 2d 30 30 30 30 30 31 22 7d        |"wm-7-000001"}|',
    ]

    out = io.StringIO()
    assert await show_letter(kafka, parse_position("0:1"), out=out) == 0
    assert out.getvalue().endswith(
        f"  original   {len(newer)} bytes, UTF-8 text:\n"
        '{"device_id": "wm-7-000001", "schema_version": 99, "x": "\\u202e"}\n\n'
    )

    out = io.StringIO()
    assert await show_letter(kafka, parse_position("0:3"), out=out) == 0
    assert out.getvalue().splitlines()[1].startswith("  not a dead letter: 1 validation error")

    assert await show_letter(kafka, parse_position("0:9"), out=io.StringIO()) == 1

    report = await replay(settings, dry_run=True)
    assert report.replayed == {"invalid_utf8": 1, "unknown_schema_version": 1}
    assert report.skipped == {"device_id_mismatch": 1}
    assert report.unreadable == 1
    assert await read_to_end(settings, kafka.raw_topic, idle_s=0.3) == []


async def _send_to_partition_0(producer: AIOKafkaProducer, topic: str, value: bytes) -> None:
    await (await producer.send(topic, value=value, key=b"wm-7-000001", partition=0))


@pytest.mark.parametrize(("text", "position"), [("2:17", (2, 17)), ("17", (None, 17))])
def test_position(text: str, position: tuple[int | None, int]) -> None:
    assert parse_position(text) == position


@pytest.mark.parametrize("text", ["x:1", "1:", "-1", "2:-3", ""])
def test_not_a_position(text: str) -> None:
    with pytest.raises(ValueError, match="use PARTITION:OFFSET"):
        parse_position(text)


# -- the record in PostgreSQL --------------------------------------------------------------


def made_letter(
    reason: Reason,
    offset: int | None,
    *,
    original: bytes = b"{not json",
    topic: str = "t.raw",
    failed_at: datetime | None = None,
) -> DeadLetter:
    """A letter of the raw topic's record at `0:offset`, or (offset None) the bridge's."""
    letter = DeadLetter.from_error(
        InvalidTelemetry(reason, f"{reason.value} at {offset}"),
        topic=topic if offset is not None else "devices/wm-7-000001/telemetry",
        partition=None if offset is None else 0,
        offset=offset,
        key=b"wm-7-000001",
        original=original,
    )
    if failed_at is None:
        return letter
    return DeadLetter(letter.doc.model_copy(update={"failed_at": failed_at}), letter.key)


async def test_letters_commit_with_their_batch_once_expire_and_are_erased(
    settings: Settings, either: UsageStore
) -> None:
    store = either
    t = store.table
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    rows = [row("wm-7-000001", seq, at + timedelta(seconds=seq)) for seq in range(3)]
    old = at - store.tables._settings.retention - timedelta(days=1)
    letters = [
        LetterRow(made_letter(Reason.INVALID_JSON, 3)),
        LetterRow(made_letter(Reason.SCHEMA_VIOLATION, 4), "WM-7", "k-owner"),
        LetterRow(made_letter(Reason.DEVICE_ID_MISMATCH, None)),
        LetterRow(made_letter(Reason.INVALID_UTF8, 5, failed_at=old)),
    ]
    offsets = [SourceOffset("t.raw", 0, 6, None)]

    # One transaction: a write PostgreSQL refuses keeps none of its letters either.
    await refuse_seq(settings, 1)
    with pytest.raises(RowsRefused):
        await store.write(rows, offsets, group_id="g", letters=letters)
    assert await store.fetch("SELECT * FROM {table}_dead_letters") == []
    unstorable = LetterRow(made_letter(Reason.UNSTORABLE, 1, original=b'{"seq": 1}'))
    stored = [r for r in rows if r.seq != 1]
    assert await store.write(stored, offsets, group_id="g", letters=[*letters, unstorable]) == 2
    # Redelivered (the same batch again): nothing new, letters included.
    assert await store.write(stored, offsets, group_id="g", letters=[*letters, unstorable]) == 0
    assert await store.write_letters([letters[2]]) == 0
    records = await store.fetch(
        "SELECT reason, source_kind, source_topic, source_partition, source_offset, model,"
        " owner_key FROM {table}_dead_letters ORDER BY letter_id"
    )
    mqtt = "devices/wm-7-000001/telemetry"
    assert [tuple(r) for r in records] == [
        ("invalid_json", "kafka", "t.raw", 0, 3, None, None),
        ("schema_violation", "kafka", "t.raw", 0, 4, "WM-7", "k-owner"),
        ("device_id_mismatch", "mqtt", mqtt, None, None, None, None),
        ("invalid_utf8", "kafka", "t.raw", 0, 5, None, None),
        ("unstorable", "kafka", "t.raw", 0, 1, None, None),
    ]
    records = await store.fetch(
        "SELECT message, device_id, original, failed_at FROM {table}_dead_letters"
        " ORDER BY letter_id"
    )
    everything = [*letters, unstorable]
    assert [tuple(r) for r in records] == [
        (x.letter.message, "wm-7-000001", x.letter.original, x.letter.failed_at) for x in everything
    ]

    # Retention: the letter older than postgres.retention_days goes, the rest stay.
    await store.drop_expired()
    left = await store.fetch("SELECT reason FROM {table}_dead_letters ORDER BY letter_id")
    assert [r[0] for r in left] == [
        "invalid_json",
        "schema_violation",
        "device_id_mismatch",
        "unstorable",
    ]
    # Erasure: the owner's letter goes with the owner's keys; a later pass verifies it.
    assert await unlink_owners(store, [(uuid.UUID(int=7), ["k-owner"])]) == 0
    left = await store.fetch("SELECT reason FROM {table}_dead_letters ORDER BY letter_id")
    assert [r[0] for r in left] == ["invalid_json", "device_id_mismatch", "unstorable"]
    verified = await store.fetch(f"SELECT verified FROM {t}_erasures")
    assert [r[0] for r in verified] == [False]
    await unlink_owners(store, [(uuid.UUID(int=7), ["k-owner"])])
    verified = await store.fetch(f"SELECT verified FROM {t}_erasures")
    assert [r[0] for r in verified] == [True]


async def test_list_show_and_replay_from_the_table(settings: Settings) -> None:
    kafka = settings.kafka
    utf8 = b'\xff\xfe{"device_id": "wm-7-000001"}'
    spoof = b'{"device_id": "wm-7-000002"}'
    letters = [
        made_letter(Reason.INVALID_UTF8, 5, original=utf8, topic=kafka.raw_topic),
        made_letter(Reason.INVALID_JSON, 6, topic=kafka.raw_topic),
        made_letter(Reason.DEVICE_ID_MISMATCH, None, original=spoof),
        made_letter(Reason.INVALID_JSON, 6, topic="other.raw"),  # the same source position
    ]
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
        assert await store.write_letters([LetterRow(letter) for letter in letters]) == 4
        t = store.table

    out = io.StringIO()
    assert await list_table_letters(settings.postgres, out=out) == 4
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        f"{t}_dead_letters: 4 letters (device_id_mismatch 1, invalid_json 2, invalid_utf8 1)"
    )
    assert lines[1] == "the newest 4 of 4, oldest first:"
    assert lines[2].split() == ["ID", "REASON", "SOURCE", "DEVICE", "FAILED_AT", "MESSAGE"]
    assert [line.split()[:4] for line in lines[3:]] == [
        ["1", "invalid_utf8", "kafka", kafka.raw_topic],
        ["2", "invalid_json", "kafka", kafka.raw_topic],
        ["3", "device_id_mismatch", "mqtt", "devices/wm-7-000001/telemetry"],
        ["4", "invalid_json", "kafka", "other.raw"],
    ]
    assert lines[3].split()[4:6] == ["0:5", "-"]
    assert lines[5].split()[4] == "wm-7-000002"

    out = io.StringIO()
    assert await list_table_letters(settings.postgres, reason=Reason.INVALID_JSON, limit=1, out=out)
    assert out.getvalue().splitlines()[1:] == [
        "the newest 1 of 2 of reason invalid_json, oldest first:",
        out.getvalue().splitlines()[2],
        out.getvalue().splitlines()[3],
    ]
    assert out.getvalue().splitlines()[3].split()[:2] == ["4", "invalid_json"]

    out = io.StringIO()
    assert await show_table_letter(settings.postgres, parse_position("1"), out=out) == 0
    shown = out.getvalue().splitlines()
    assert shown[0] == f"dead letter 1 in {t}_dead_letters"
    assert shown[1:4] == [
        "  reason     invalid_utf8",
        "  message    invalid_utf8 at 5",
        f"  source     kafka {kafka.raw_topic} 0:5",
    ]
    assert shown[7] == "  model      -"
    assert shown[-1].startswith("00000010  22 77 6d 2d 37 2d 30 30 30 30 30 31 22 7d  ")
    out = io.StringIO()
    assert await show_table_letter(settings.postgres, parse_position("0:5"), out=out) == 0
    assert out.getvalue().splitlines()[0] == f"dead letter 1 in {t}_dead_letters"
    assert await show_table_letter(settings.postgres, parse_position("0:6")) == 2  # two letters
    assert await show_table_letter(settings.postgres, parse_position("9")) == 1

    report = await replay_from_table(settings, dry_run=True)
    assert report.replayed == {"invalid_utf8": 1, "invalid_json": 2}
    assert report.skipped == {"device_id_mismatch": 1}
    report = await replay_from_table(settings, reason=Reason.INVALID_JSON, from_id=2, to_id=3)
    assert (report.replayed, report.skipped) == ({"invalid_json": 1}, {})
    replayed = await read_to_end(settings, kafka.raw_topic, idle_s=0.3)
    assert [(r.key, r.value) for r in replayed] == [(b"wm-7-000001", b"{not json")]
    assert dict(replayed[0].headers) == {REPLAY_HEADER: b"invalid_json"}


async def test_the_dlq_commands_say_when_there_is_no_table(settings: Settings) -> None:
    with pytest.raises(StoreUnavailable, match=r"no dead-letter table .* `usagepipe db migrate`"):
        await list_table_letters(settings.postgres, out=io.StringIO())


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60.0) -> None:
    """`wait_for` for a check that must ask a server."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_the_bridge_letters_and_the_consumers_outlive_the_topic(settings: Settings) -> None:
    """A letter of each kind (the bridge's device_id_mismatch, the consumer's
    invalid_json) is in the table; deleting the dead-letter topic loses neither."""
    plan = FleetPlan(devices=2, messages_per_device=6, seed=45)
    device, other_device = device_ids(plan)
    good = plan_device(plan, device, settings.mqtt.topic_prefix)
    topic = good[0].topic
    spoof = plan_device(plan, other_device, settings.mqtt.topic_prefix)[0].payload
    broken = good[0].payload[:-9]
    sequence = [m.payload for m in good[:3]] + [spoof, broken] + [m.payload for m in good[3:]]

    async def both_stored() -> bool:
        return len(await table_letters(settings)) == 2

    async with pipeline(settings) as run:
        await publish_payloads(settings, device, topic, sequence)
        await wait_for(lambda: run.consumer.report.stored == 6, "the 6 good messages")
        await wait_for(lambda: run.consumer.report.dead_lettered == 1, "the consumer's letter")
        await poll(both_stored, "both letters in the table")
    assert len(await read_letters(settings)) == 2

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics([settings.kafka.dlq_topic])
    finally:
        await admin.close()

    table = await table_letters(settings)
    assert sorted((r["reason"], r["source_kind"], r["source_topic"]) for r in table) == [
        ("device_id_mismatch", "mqtt", topic),
        ("invalid_json", "kafka", settings.kafka.raw_topic),
    ]
    by_reason = {r["reason"]: r for r in table}
    assert bytes(by_reason["device_id_mismatch"]["original"]) == spoof
    assert bytes(by_reason["invalid_json"]["original"]) == broken
    assert {r["device_id"] for r in table} == {device}
    out = io.StringIO()
    assert await list_table_letters(settings.postgres, out=out) == 2
    assert out.getvalue().splitlines()[0] == (
        f"{settings.postgres.table}_dead_letters: 2 letters (device_id_mismatch 1, invalid_json 1)"
    )


async def test_a_batchs_letters_are_stored_while_kafka_is_down(
    base_settings: Settings, test_name: str, tmp_path: Path
) -> None:
    """Kafka (a private, memory-only Tansu) is killed while a batch with two poison
    records is in hand: its rows and letters are stored all the same, the Kafka copy
    gives up after its bound, and the letters outlive the broker, which comes back
    empty."""
    broker = TansuBroker("127.0.0.1", free_port(), tmp_path / "tansu.log")
    broker.start()
    settings = isolated(base_settings, test_name, bootstrap_servers=broker.address)
    plan = FleetPlan(devices=1, messages_per_device=6, seed=46)
    [device] = device_ids(plan)
    good = plan_device(plan, device, settings.mqtt.topic_prefix)
    poison = [good[0].payload[:-9], orjson.dumps([1])]
    payloads = [m.payload for m in good[:3]] + poison + [m.payload for m in good[3:]]
    t = settings.postgres.table
    dsn = settings.postgres.dsn.get_secret_value()
    metrics = CollectorRegistry()

    async def migrated() -> bool:
        async with connection(dsn) as conn:
            return bool(await conn.fetchval("SELECT to_regclass($1)", f"{t}_dead_letters"))

    try:
        async with pipeline(settings, consumer_registry=metrics) as run, connection(dsn) as lock:
            await poll(migrated, "the consumer's migrations")
            # The batch will wait on this lock inside its transaction, rows written.
            held = lock.transaction()
            await held.start()
            await lock.execute(f"LOCK TABLE {t}_dead_letters IN ACCESS EXCLUSIVE MODE")

            async def waiting() -> bool:
                async with connection(dsn) as conn:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted"
                            " AND relation = to_regclass($1)",
                            f"{t}_dead_letters",
                        )
                    )

            await produce_at(settings, device, payloads, [time.time_ns() // 1_000_000] * 8)
            await poll(waiting, "the batch's write")
            broker.kill()
            await held.rollback()
            await wait_for(lambda: run.consumer.report.consumed == 8, "the batch", 90)
            assert (run.consumer.report.stored, run.consumer.report.dead_lettered) == (6, 2)
            assert (
                metrics.get_sample_value("usagepipe_consumer_errors_total", {"kind": "dead_letter"})
                == 1
            )
            broker.start()  # empty: what Kafka had is gone
        assert sorted(await stored_keys(settings)) == sorted(m.key for m in good)
        table = await table_letters(settings)
        assert sorted((r["source_offset"], r["reason"], bytes(r["original"])) for r in table) == [
            (3, "invalid_json", poison[0]),
            (4, "invalid_json", poison[1]),
        ]
    finally:
        broker.stop()
        await cleanup(settings)


async def test_a_letter_whose_text_postgresql_cannot_hold_is_stored_escaped(
    settings: Settings,
) -> None:
    """A letter's message quotes what it refused, and its key is whatever the record
    had: a NUL, a lone surrogate or bytes that are not UTF-8 must not make the batch's
    transaction fail forever (PostgreSQL's text holds none of them)."""
    letter = DeadLetter.from_error(
        InvalidTelemetry(Reason.SCHEMA_VIOLATION, "boot_id: 'a\x00b' \ud800 is not allowed"),
        topic="t.raw",
        partition=0,
        offset=1,
        key=b"wm-\xff\x00",
        original=b'{"boot_id": "a\\u0000b"}',
    )
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
        assert await store.write([], (), letters=[LetterRow(letter)]) == 0
        records = await store.fetch("SELECT message, device_id, original FROM {table}_dead_letters")
    assert [tuple(r) for r in records] == [
        ("boot_id: 'a\\x00b' \\ud800 is not allowed", "wm-\ufffd\\x00", letter.original)
    ]


async def test_the_consumer_deletes_letters_older_than_the_retention(settings: Settings) -> None:
    fast = settings.model_copy(
        update={"postgres": settings.postgres.model_copy(update={"rollup_refresh_s": 0.1})}
    )
    old = datetime.now(UTC) - settings.postgres.retention - timedelta(minutes=1)
    young = datetime.now(UTC) - settings.postgres.retention + timedelta(hours=1)
    letters = [
        LetterRow(made_letter(Reason.INVALID_JSON, 1, failed_at=old)),
        LetterRow(made_letter(Reason.INVALID_JSON, 2, failed_at=young)),
    ]
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
        assert await store.write_letters(letters) == 2

    async def one_left() -> bool:
        return len(await table_letters(settings)) == 1

    consumer = Consumer(fast, ConsumerMetrics(CollectorRegistry()), client_id="expiry")
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run(), name="test-consumer")
        try:
            await poll(one_left, "the old letter's expiry", 30)
        finally:
            consumer.stop("test over")
    assert [r["source_offset"] for r in await table_letters(settings)] == [2]
