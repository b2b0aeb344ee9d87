"""Running the pipeline inside a test: bridge and consumer as tasks, plus waiting and
reading helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from devices.schema import migrate_registry_at
from ingest.bridge import Bridge
from ingest.consumer import Consumer
from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import BridgeMetrics, ConsumerMetrics, SimulatorMetrics
from ingest.mqtt import MqttClient
from ingest.settings import Settings
from simulators.fleet import Fleet
from simulators.ledger import LedgerWriter
from simulators.plan import FleetPlan, plan_device
from simulators.provision import open_registry, provision
from simulators.report import FleetReport
from simulators.units import device_ids


@dataclass
class Running:
    bridge: Bridge
    consumer: Consumer


@contextlib.asynccontextmanager
async def pipeline(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    *,
    consumer_registry: CollectorRegistry | None = None,
) -> AsyncIterator[Running]:
    """Bridge and consumer running until the block ends, then stopped cleanly.

    The bridge's metrics go to `registry` if given, the consumer's to
    `consumer_registry` (a fresh one otherwise). The registry schema is migrated first,
    as `usagepipe consume` does.
    """
    await migrate_registry_at(settings.postgres.dsn.get_secret_value(), settings.registry.db_schema)
    bridge = Bridge(settings, BridgeMetrics(registry or CollectorRegistry()))
    consumer = Consumer(settings, ConsumerMetrics(consumer_registry or CollectorRegistry()))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(bridge.run(), name="test-bridge")
        tasks.create_task(consumer.run(), name="test-consumer")
        try:
            async with asyncio.timeout(30):
                await bridge.ready.wait()
            yield Running(bridge, consumer)
        finally:
            bridge.stop("test over")
            consumer.stop("test over")


async def publish(
    settings: Settings, plan: FleetPlan, ledger: LedgerWriter | None = None
) -> FleetReport:
    """Run `plan`'s fleet, each device logged in with the secret its registration gave it
    (and every message written to `ledger`, if given)."""
    credentials = await provisioned(settings, plan)
    metrics = SimulatorMetrics(CollectorRegistry())
    return await Fleet(settings.mqtt, plan, metrics, credentials=credentials, ledger=ledger).run()


_provisioned: dict[tuple[str, int, str, int, int], dict[str, str]] = {}


async def provisioned(settings: Settings, plan: FleetPlan) -> dict[str, str]:
    """Register `plan`'s devices in the test's own registry schema (so on the broker),
    once per test: a later fleet of the same devices reuses their secrets, as a real
    device keeps its own. (That also lets a test publish while Kafka, where the
    registry's events go, is down.) `tests.conftest.cleanup` deletes the accounts."""
    key = (settings.registry.db_schema, settings.mqtt.port, plan.fleet, plan.seed, plan.devices)
    if key not in _provisioned:
        await ensure_topics(settings.kafka, settings.registry.events_topic)
        async with open_registry(settings) as registry:
            _provisioned[key] = (await provision(registry, plan)).credentials
    return _provisioned[key]


async def publish_payloads(
    settings: Settings,
    client_id: str,
    topic: str,
    payloads: Sequence[bytes],
    password: str | None = None,
) -> None:
    """Publish `payloads` to `topic` in order over one connection, QoS 1; return on the
    broker's last PUBACK. With `password`, log in as `client_id` (a device's account)."""
    username = client_id if password is not None else None
    async with MqttClient(
        settings.mqtt, client_id=client_id, username=username, password=password
    ) as device:
        pending = [await device.publish(topic, payload) for payload in payloads]
        await asyncio.gather(*pending)


def expected_keys(settings: Settings, plan: FleetPlan) -> set[tuple[str, str, int]]:
    prefix = settings.mqtt.topic_prefix
    return {m.key for d in device_ids(plan) for m in plan_device(plan, d, prefix)}


async def stored_keys(settings: Settings) -> list[tuple[str, str, int]]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(f"SELECT device_id, boot_id, seq FROM {settings.postgres.table}")
    finally:
        await conn.close()
    return [(r["device_id"], r["boot_id"], r["seq"]) for r in rows]


async def table_letters(settings: Settings) -> list[asyncpg.Record]:
    """The dead-letter table's rows (`ingest.dead_letter_table`), in id order."""
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        return list(
            await conn.fetch(
                f"SELECT * FROM {settings.postgres.table}_dead_letters ORDER BY letter_id"
            )
        )
    finally:
        await conn.close()


async def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer with no group that reads from the beginning and commits nothing."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


async def read_topic(settings: Settings, topic: str, count: int) -> list[bytes]:
    """Read `count` records of `topic` from the beginning, with no consumer group."""
    consumer = reader(settings)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        values: list[bytes] = []
        async with asyncio.timeout(30):
            while len(values) < count:
                batch = await consumer.getmany(timeout_ms=200)
                values.extend(r.value for records in batch.values() for r in records)
        return values
    finally:
        await consumer.stop()


async def read_to_end(settings: Settings, topic: str, idle_s: float = 1.0) -> list[ConsumerRecord]:
    """Every record of `topic`: read from the beginning until nothing comes for `idle_s`."""
    consumer = reader(settings)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            return []  # no such topic
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        records: list[ConsumerRecord] = []
        async with asyncio.timeout(30):
            while batch := await consumer.getmany(timeout_ms=int(idle_s * 1000)):
                records.extend(r for part in batch.values() for r in part)
        return records
    finally:
        await asyncio.sleep(0)  # see DeadLetterReader.close
        await consumer.stop()


async def produce_at(
    settings: Settings, device: str, payloads: Sequence[bytes], times: Sequence[int]
) -> None:
    """`payloads` to the raw topic keyed by `device`, with the Kafka timestamps `times`
    (ms): as the bridge would have produced them had they arrived then."""
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    producer = make_producer(settings.kafka, client_id="test-produce")
    await producer.start()
    try:
        pending = [
            await producer.send(
                settings.kafka.raw_topic, payload, key=device.encode(), timestamp_ms=at
            )
            for payload, at in zip(payloads, times, strict=True)
        ]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
