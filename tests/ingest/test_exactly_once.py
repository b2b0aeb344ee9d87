"""Exactly-once effect on the real Kafka-protocol broker and PostgreSQL: a consumer killed
between its database commit and its Kafka commit is followed by one that neither
duplicates nor skips nor replays."""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.settings import ConsumerSettings, Settings
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.pipeline import expected_keys, stored_keys


class Killed(Exception):
    """Stands for the process dying."""


class DiesBeforeKafkaCommit(Consumer):
    """Stores its first batch (rows and offsets, one transaction), then dies."""

    async def _commit_kafka(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        raise Killed("killed between the database commit and the Kafka commit")


async def produce(settings: Settings, plan: FleetPlan) -> int:
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    producer = make_producer(settings.kafka, client_id="test-producer")
    await producer.start()
    try:
        sent = 0
        for device in device_ids(plan):
            for msg in plan_device(plan, device, settings.mqtt.topic_prefix):
                await producer.send(settings.kafka.raw_topic, msg.payload, key=device.encode())
                sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def stored_offsets(settings: Settings) -> dict[int, int]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            f"SELECT partition, next_offset FROM {settings.postgres.table}_offsets"
            " WHERE group_id = $1 AND topic = $2",
            settings.consumer.group_id,
            settings.kafka.raw_topic,
        )
    finally:
        await conn.close()
    return {r["partition"]: r["next_offset"] for r in rows}


async def test_consumer_killed_between_db_and_kafka_commit_resumes_without_replay(
    settings: Settings,
) -> None:
    small_batches = ConsumerSettings(**{**settings.consumer.model_dump(), "batch_max": 40})
    settings = settings.model_copy(update={"consumer": small_batches})
    plan = FleetPlan(devices=12, messages_per_device=25, seed=21)
    total = await produce(settings, plan)
    assert total == 300

    first = DiesBeforeKafkaCommit(settings, ConsumerMetrics(CollectorRegistry()))
    try:
        async with asyncio.timeout(60):
            await first.run()
        raise AssertionError("the first consumer should have died")
    except* Killed:
        pass
    after_first = await stored_offsets(settings)
    stored_first = len(await stored_keys(settings))
    # It stored one batch, with that batch's offsets, and committed nothing to Kafka.
    assert 0 < stored_first <= 40
    assert sum(after_first.values()) == stored_first

    second = Consumer(
        settings, ConsumerMetrics(CollectorRegistry()), stop_after=total - stored_first
    )
    async with asyncio.timeout(60):
        report = await second.run()

    keys = await stored_keys(settings)
    assert sorted(keys) == sorted(expected_keys(settings, plan))
    assert report.consumed == total - stored_first  # nothing read twice ...
    assert report.duplicates == 0  # ... so nothing written twice
    assert report.stored == total - stored_first
    after_second = await stored_offsets(settings)
    assert sum(after_second.values()) == total
