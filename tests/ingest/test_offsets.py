"""Offsets positioning (`ingest.offsets`), on the real Kafka-protocol broker."""

from __future__ import annotations

import dataclasses

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.offsets import ContiguousOffsets
from ingest.settings import Settings
from tests.pipeline import reader


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
