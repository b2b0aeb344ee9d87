"""A Kafka broker with memory storage restarted under a running consumer (issue 17 item
4): its topics are made again with their partitions, and a re-created partition is read
from its start, never from the position the consumer had in the lost log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from devices.schema import migrate_registry_at
from ingest.consumer import Consumer
from ingest.kafka import TopicKeeper, ensure_topics, make_producer, make_reader
from ingest.metrics import ConsumerMetrics
from ingest.settings import Settings
from simulators.plan import FleetPlan
from tests.conftest import cleanup, free_port, isolated
from tests.ingest.test_exactly_once import produce, stored_offsets
from tests.pipeline import expected_keys, stored_keys, wait_for
from usagepipe.services import TansuBroker


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TansuBroker]:
    """A private Tansu the test may kill and restart."""
    tansu = TansuBroker("127.0.0.1", free_port(), tmp_path / "tansu.log")
    tansu.start()
    try:
        yield tansu
    finally:
        tansu.stop()


async def partition_counts(settings: Settings, *topics: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(list(topics))}
    finally:
        await admin.close()


async def test_a_restarted_broker_keeps_what_was_written_before_the_topic_check(
    base_settings: Settings, test_name: str, broker: TansuBroker
) -> None:
    """Tansu accepts records for a topic it lost in a restart; the check must not make
    the topic anew over them (a CreateTopics then drops them: seen, 180 records
    acknowledged and none readable). The producer's own request made it again, with
    Tansu's 4 partitions: reported as short; a topic no client asked for is created
    with its partitions only once a producer was refused for it."""
    settings = isolated(
        base_settings,
        test_name,
        bootstrap_servers=broker.address,
        partitions=6,
        topic_check_s=0.5,
    )
    k = settings.kafka
    repairs: list[tuple[str, int]] = []
    keeper = TopicKeeper(k, k.raw_topic, k.dlq_topic, on_repair=lambda a, n: repairs.append((a, n)))
    first = await ensure_topics(k, k.raw_topic, k.dlq_topic)  # as a start does
    assert first.created == [k.raw_topic, k.dlq_topic]
    assert await partition_counts(settings, k.raw_topic) == {k.raw_topic: 6}

    broker.kill()  # memory storage: the topics go with it
    broker.start()
    producer = make_producer(k, client_id="test-producer")
    await producer.start()
    try:
        for i in range(12):
            await producer.send_and_wait(k.raw_topic, b"%d" % i, key=b"device-%d" % i)
    finally:
        await producer.stop()
    found = await keeper.check()
    assert (found.created, found.missing, found.short) == ([], [k.dlq_topic], {k.raw_topic: 4})
    # No client asked for the dead-letter topic, and no producer was refused for it:
    # left alone (Tansu would take records for it and drop them at a creation).
    await asyncio.sleep(k.topic_check_s)
    assert (await keeper.check()).created == []
    keeper.nudge(unknown_topic=True)  # what a broker with auto-creation off answers
    again = await keeper.check()
    assert (again.created, again.missing, again.short) == ([k.dlq_topic], [], {k.raw_topic: 4})
    assert await partition_counts(settings, k.dlq_topic) == {k.dlq_topic: 6}
    assert repairs == [("short", 1), ("created", 1)]
    assert sorted(await read_all(settings, k.raw_topic, 4)) == sorted(b"%d" % i for i in range(12))


async def read_all(settings: Settings, topic: str, partitions: int) -> list[bytes]:
    reader = make_reader(settings.kafka, client_id="test-reader")
    await reader.start()
    try:
        reader.assign([TopicPartition(topic, p) for p in range(partitions)])
        values: list[bytes] = []
        for _ in range(5):
            for records in (await reader.getmany(timeout_ms=500)).values():
                values += [r.value for r in records if r.value is not None]
        return values
    finally:
        await reader.stop()


async def test_a_topic_with_too_few_partitions_is_reported_when_the_broker_cannot_add_them(
    base_settings: Settings, test_name: str, broker: TansuBroker
) -> None:
    settings = isolated(base_settings, test_name, bootstrap_servers=broker.address, partitions=6)
    k = settings.kafka
    admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(k.raw_topic, 4, 1)])  # as Tansu's auto-create does
    finally:
        await admin.close()
    repairs: list[tuple[str, int]] = []
    keeper = TopicKeeper(k, k.raw_topic, on_repair=lambda a, n: repairs.append((a, n)))
    found = await keeper.check()
    assert (found.created, found.grown, found.short) == ([], [], {k.raw_topic: 4})
    assert (await keeper.check()).short == {k.raw_topic: 4}
    assert repairs == [("short", 1)]  # counted when found so, not at every check
    assert await ensure_topics(k, k.raw_topic) == found


async def test_a_partition_recreated_under_a_running_consumer_is_read_from_its_start(
    base_settings: Settings, test_name: str, broker: TansuBroker
) -> None:
    # Four partitions, Tansu's own default: whoever makes the topics again (the
    # consumer's topic check, or a client's metadata request), the group sees the same
    # partitions and does not rebalance: only the running check can find the new logs.
    settings = isolated(
        base_settings,
        test_name,
        bootstrap_servers=broker.address,
        partitions=4,
        topic_check_s=0.5,
    )
    before = FleetPlan(devices=8, messages_per_device=10, seed=41, run_id="before")
    after = FleetPlan(devices=8, messages_per_device=25, seed=41, run_id="after")
    await migrate_registry_at(settings.postgres.dsn.get_secret_value(), settings.registry.db_schema)
    registry = CollectorRegistry()
    consumer = Consumer(settings, ConsumerMetrics(registry))
    try:
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(consumer.run())
            assert await produce(settings, before) == 80
            await wait_for(lambda: consumer.report.stored == 80, "the first 80 rows")
            positions = await stored_offsets(settings)
            assert sum(positions.values()) == 80

            broker.kill()
            broker.start()
            await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)

            def found() -> float:
                return sum(
                    registry.get_sample_value(
                        "usagepipe_consumer_recreated_partitions_total", {"found": how}
                    )
                    or 0.0
                    for how in ("running", "assigned")
                )

            await wait_for(lambda: found() == len(positions), "every partition found re-created")
            # More records than the old logs held, so each new log grows past the old
            # position: a consumer that kept it would skip offsets 0 to that position.
            assert await produce(settings, after) == 200
            await wait_for(lambda: consumer.report.stored == 280, "the 200 new rows", 90)
            consumer.stop("test over")
            await running
        keys = await stored_keys(settings)
    finally:
        await cleanup(settings)
    assert sorted(keys) == sorted(expected_keys(settings, before) | expected_keys(settings, after))
    assert found() == len(positions)
    # From each new log's start to where the consumer was: the 80 offsets it had read.
    assert registry.get_sample_value("usagepipe_consumer_recreated_gap_offsets_total") == 80
    assert consumer.report.duplicates == 0
