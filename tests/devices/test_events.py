"""Registry events on the real Kafka-protocol broker, and the publisher contract."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devices.events import EventPublisher, KafkaEventPublisher
from devices.factory_import import import_units
from devices.records import Purchase, PurchaseChannel
from devices.registry import Registry
from ingest.settings import KafkaSettings, RegistrySettings
from tests.devices.catalog import DSN, KAFKA, T0, UNITS_CSV, WASHER, new_owner
from tests.devices.fakes import RecordingBroker, RecordingPublisher


@pytest.fixture
async def topic() -> AsyncIterator[str]:
    """A `registry.events`-like topic of this test's own, deleted afterwards."""
    name = f"registry.events.test-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


async def read_all(
    topic: str, expect: int
) -> list[tuple[bytes | None, dict[str, Any], dict[str, bytes]]]:
    """Every record on `topic` from the earliest offset, waiting until `expect` arrived
    and then once more, so an extra record would be seen too."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records = []
    try:
        for _ in range(20):
            batch = await consumer.getmany(timeout_ms=500)
            fetched = [record for part in batch.values() for record in part]
            records.extend(fetched)
            if len(records) >= expect and not fetched:
                break
    finally:
        await consumer.stop()
    return [(r.key, orjson.loads(r.value), dict(r.headers)) for r in records]


def kafka_publisher(topic: str) -> KafkaEventPublisher:
    return KafkaEventPublisher(KafkaSettings(bootstrap_servers=KAFKA), topic=topic)


async def test_registration_emits_exactly_one_event(
    topic: str, reg_settings: RegistrySettings, broker: RecordingBroker
) -> None:
    settings = reg_settings.model_copy(update={"events_topic": topic})
    async with (
        kafka_publisher(settings.events_topic) as publisher,
        Registry(settings, publisher=publisher, broker=broker, dsn=DSN) as registry,
    ):
        await registry.add_product_model(WASHER)
        async with registry.transaction() as conn:
            await import_units(
                conn,
                UNITS_CSV.splitlines(keepends=True)[:2],
                schema=settings.db_schema,
                hash_log2_n=10,
            )
        owner = await registry.create_owner(new_owner(), source="test", at=T0)
        done = await registry.register(
            owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", Purchase(PurchaseChannel.GIFT), at=T0
        )
        assert await registry.pending_events() == 0

    records = await read_all(topic, expect=1)
    assert len(records) == 1
    key, payload, headers = records[0]
    assert key == done.device_id.encode()
    assert headers == {"event_type": b"device.registered"}
    assert uuid.UUID(payload.pop("event_id")).version == 4
    assert payload == {
        "event_type": "device.registered",
        "occurred_at": T0.isoformat(),
        "device_id": done.device_id,
        "model_number": "WM-100",
        "owner_id": str(owner),
        "valid_from": T0.isoformat(),
        "purchase_channel": "gift",
    }


@pytest.mark.parametrize("kind", ["kafka", "recording"])
async def test_publisher_contract(kind: str, topic: str) -> None:
    """Both publishers deliver what they are given, in order, keyed as asked."""
    events = [
        ("device.registered", "dev-1", {"event_id": "a", "n": 1}),
        ("device.transferred", "dev-1", {"event_id": "b", "n": 2}),
        ("owner.erased", "owner-9", {"event_id": "c", "n": 3}),
    ]
    if kind == "kafka":
        async with kafka_publisher(topic) as kafka:
            await publish_all(kafka, events)
        seen = [
            (headers["event_type"].decode(), (key or b"").decode(), payload)
            for key, payload, headers in await read_all(topic, expect=3)
        ]
    else:
        recording = RecordingPublisher()
        await publish_all(recording, events)
        seen = recording.events
    assert seen == events


async def publish_all(
    publisher: EventPublisher, events: list[tuple[str, str, dict[str, Any]]]
) -> None:
    for event_type, key, payload in events:
        await publisher.publish(event_type, key, payload)
