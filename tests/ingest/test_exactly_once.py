"""Exactly-once effect on the real Kafka-protocol broker and PostgreSQL: a consumer killed
between its database commit and its Kafka commit is followed by one that neither
duplicates nor skips nor replays."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.kafka import ContiguousOffsets, ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.settings import ConsumerSettings, Settings
from simulators.fleet import FleetPlan, device_ids, plan_device
from tests.pipeline import expected_keys, reader, stored_keys


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


async def test_a_hole_in_the_offsets_is_read_again_and_only_a_lasting_one_read_past(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = settings.kafka.raw_topic
    await ensure_topics(settings.kafka, topic)
    producer = make_producer(settings.kafka, client_id="test-holes")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"r{i}".encode(), partition=0)
    finally:
        await producer.stop()
    tp = TopicPartition(topic, 0)
    consumer = reader(settings)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        log: list[ConsumerRecord] = []
        while len(log) < 10:
            log.extend((await consumer.getmany(tp, timeout_ms=2000)).get(tp, []))
        assert [r.offset for r in log] == list(range(10))
        metrics = CollectorRegistry()
        now = [100.0]
        holes = ContiguousOffsets(
            consumer, ConsumerMetrics(metrics), wait_s=5, clock=lambda: now[0]
        )

        def offsets(records: dict[TopicPartition, list[ConsumerRecord]]) -> list[int]:
            return [r.offset for r in records[tp]]

        def holes_met(outcome: str) -> float:
            name = "usagepipe_consumer_offset_holes_total"
            return metrics.get_sample_value(name, {"outcome": outcome}) or 0.0

        assert offsets(holes.admit({tp: log[0:3]})) == [0, 1, 2]
        # 3 and 4 not readable yet when 5 and 6 were: cut, and fetched again from 3.
        assert offsets(holes.admit({tp: [log[5], log[6]]})) == []
        assert await consumer.position(tp) == 3
        assert offsets(holes.admit({tp: [log[3], log[4], log[7], log[8]]})) == [3, 4]
        assert await consumer.position(tp) == 5
        again: list[ConsumerRecord] = []
        while not again or again[-1].offset < 9:
            again.extend((await consumer.getmany(tp, timeout_ms=2000)).get(tp, []))
        assert offsets(holes.admit({tp: again})) == [5, 6, 7, 8, 9]
        assert holes_met("read_again") == 2
        # A hole that stays (offsets 10 and 11 never come): read past after the wait.
        later = dataclasses.replace(log[9], offset=12)
        assert offsets(holes.admit({tp: [later]})) == []
        assert await consumer.position(tp) == 10
        now[0] += 5
        assert offsets(holes.admit({tp: [later]})) == [12]
        assert holes_met("read_again") == 3
        assert holes_met("read_past") == 1
        assert "offsets 10-11 are still missing after 5s: reading past them" in caplog.text
    finally:
        await consumer.stop()
