"""The consumer: Kafka -> validate -> PostgreSQL, committing offsets after the database.

One loop per process, in a Kafka consumer group:

    getmany() -> parse_telemetry() each record
              -> invalid ones to the dead-letter topic (and wait for Kafka's confirmation)
              -> valid ones into the store in one transaction (COPY + ON CONFLICT DO NOTHING)
              -> commit the batch's offsets

Offsets are committed only after the transaction committed, so a crash can replay a
batch but never skip one; the store's key (device, boot, seq) turns the replay into a
no-op. A store outage is retried with backoff, holding the batch and its offsets; a
rebalance that takes the partitions away meanwhile only means the next owner replays.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from ingest.dead_letter import DeadLetter, send_dead_letters
from ingest.errors import StoreUnavailable
from ingest.kafka import ensure_topics, make_consumer, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.settings import Settings
from ingest.store import UsageRow, UsageStore
from schemas.errors import InvalidTelemetry
from schemas.parse import parse_telemetry

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass
class ConsumerReport:
    """What one run of the consumer did."""

    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""


@dataclass(frozen=True, slots=True)
class Batch:
    """One `getmany()` result, validated: rows to store, letters to dead-letter."""

    rows: list[UsageRow]
    dead: list[DeadLetter]
    offsets: dict[TopicPartition, OffsetAndMetadata]
    records: int


def validate_batch(
    records: dict[TopicPartition, list[ConsumerRecord]],
    *,
    now: datetime,
    settings: Settings,
) -> Batch:
    """Split Kafka records into storable rows and dead letters, and note the offsets."""
    rows: list[UsageRow] = []
    dead: list[DeadLetter] = []
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    skew = settings.consumer.max_future_skew
    max_bytes = settings.bridge.max_payload_bytes
    count = 0
    for tp, batch in records.items():
        for record in batch:
            count += 1
            value: bytes = record.value if record.value is not None else b""
            try:
                env = parse_telemetry(value, now=now, max_future_skew=skew, max_bytes=max_bytes)
            except InvalidTelemetry as error:
                dead.append(
                    DeadLetter.from_error(
                        error,
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=record.offset,
                        key=record.key,
                        original=value,
                    )
                )
                continue
            rows.append(UsageRow.from_envelope(env, tp.partition, record.offset))
        if batch:
            offsets[tp] = OffsetAndMetadata(batch[-1].offset + 1, "")
    return Batch(rows, dead, offsets, count)


class Consumer:
    """Stores validated telemetry from `kafka.raw_topic` into the usage table.

    Stops by itself after `stop_after` records or `stop_after_s` seconds, or when
    `stop()` is called; the batch in hand is always finished and committed first.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: ConsumerMetrics,
        *,
        stop_after: int | None = None,
        stop_after_s: float | None = None,
        client_id: str = "usagepipe-consumer",
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stop_after = stop_after
        self._stop_after_s = stop_after_s
        self._client_id = client_id
        self._stopping = asyncio.Event()
        self.report = ConsumerReport()

    def stop(self, why: str = "requested") -> None:
        if not self._stopping.is_set():
            self.report.stopped_by = why
            self._stopping.set()

    async def run(self) -> ConsumerReport:
        s = self._settings
        started = time.monotonic()
        deadline = None if self._stop_after_s is None else started + self._stop_after_s
        await ensure_topics(s.kafka, s.kafka.raw_topic, s.kafka.dlq_topic)
        async with UsageStore(s.postgres) as store:
            await store.migrate()
            producer = make_producer(s.kafka, client_id=f"{self._client_id}-dlq")
            consumer = make_consumer(
                s.kafka,
                s.kafka.raw_topic,
                group_id=s.consumer.group_id,
                client_id=self._client_id,
                max_records=s.consumer.batch_max,
            )
            await producer.start()
            try:
                await consumer.start()
                try:
                    while not self._stopping.is_set():
                        if deadline is not None and time.monotonic() >= deadline:
                            self.stop(f"after {self._stop_after_s:g}s")
                            break
                        records = await consumer.getmany(
                            timeout_ms=s.consumer.batch_wait_ms,
                            max_records=s.consumer.batch_max,
                        )
                        if records:
                            await self._handle(records, consumer, producer, store)
                finally:
                    await consumer.stop()
            finally:
                await producer.stop()
        self.report.elapsed_s = time.monotonic() - started
        log.info(
            "consumer stopped (%s): %d consumed, %d stored, %d duplicates, %d dead letters",
            self.report.stopped_by,
            self.report.consumed,
            self.report.stored,
            self.report.duplicates,
            self.report.dead_lettered,
        )
        return self.report

    async def _handle(
        self,
        records: dict[TopicPartition, list[ConsumerRecord]],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        store: UsageStore,
    ) -> None:
        m = self._metrics
        started = time.monotonic()
        batch = validate_batch(records, now=datetime.now(UTC), settings=self._settings)
        await self._retry(
            "dead_letter", send_dead_letters, producer, self._settings.kafka.dlq_topic, batch.dead
        )
        for letter in batch.dead:
            m.dead_letters.labels(letter.reason.value).inc()
        inserted = await self._retry("store", store.write, batch.rows)
        try:
            # aiokafka retries a retriable commit error forever (a partition that
            # vanished, say); a bounded wait keeps the loop alive.
            async with asyncio.timeout(self._settings.kafka.request_timeout_ms / 1000):
                await consumer.commit(batch.offsets)
        except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
            # The rows are stored; whoever reads these partitions next replays them,
            # and the store drops them as duplicates.
            m.errors.labels("kafka_commit").inc()
            log.warning("offset commit failed (%r); rows are stored, replay is harmless", exc)
        r = self.report
        r.batches += 1
        r.consumed += batch.records
        r.stored += inserted
        r.duplicates += len(batch.rows) - inserted
        r.dead_lettered += len(batch.dead)
        m.consumed.inc(batch.records)
        m.stored.inc(inserted)
        m.duplicates.inc(len(batch.rows) - inserted)
        m.batch_size.observe(batch.records)
        m.batch_seconds.observe(time.monotonic() - started)
        if self._stop_after is not None and r.consumed >= self._stop_after:
            self.stop(f"after {self._stop_after} records")

    async def _retry(
        self,
        kind: str,
        fn: Callable[_P, Awaitable[_T]],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run `fn` until it succeeds, backing off with jitter on retriable errors.

        Once a stop was asked for, the error is raised instead: the batch's offsets are
        not committed, so its records come again to whoever consumes next.
        """
        backoff = 0.1
        while True:
            try:
                return await fn(*args, **kwargs)
            except (StoreUnavailable, KafkaError) as exc:
                self._metrics.errors.labels(kind).inc()
                if self._stopping.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", kind, exc, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)
