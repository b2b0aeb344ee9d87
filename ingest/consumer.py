"""The consumer: Kafka -> validate -> enrich -> PostgreSQL, with the offsets stored with
the rows.

One loop per process, in a Kafka consumer group:

    getmany() -> parse_telemetry() each record
              -> enrich the valid ones from the device registry (`ingest.enrich`: one
                 query per batch for the devices not cached; retried while it fails)
              -> invalid ones, and those of unregistered devices, to the dead-letter
                 topic (and wait for Kafka's confirmation)
              -> the rest and the batch's next offsets into the store in one
                 transaction (COPY + ON CONFLICT DO NOTHING + offsets upsert)
              -> commit the offsets to Kafka as well (for lag monitoring only)
              -> remove erased owners' keys from stored rows, if any were erased

Exactly-once effect: the database holds, in the same transaction as the rows, where the
group has got to (`<table>_offsets`). When the group gives this process partitions,
`StoredOffsets.on_partitions_assigned` seeks each to its stored offset, so a consumer
killed between the database commit and the Kafka commit restarts with no gap, no
duplicate row and no replay. Partitions with no stored offset keep Kafka's committed
position (or `earliest`).

The seek goes one record back, to the last stored record, and checks its Kafka
timestamp against the stored one before dropping it: a topic deleted and created again
restarts its offsets at 0, and a stored offset must not skip that new log's records.
On a mismatch the partition is read from its beginning instead (the store's key turns
anything already stored into a duplicate).

Records are processed in offset order without holes (`ingest.kafka.ContiguousOffsets`):
a fetch that skipped a batch the broker had not made readable yet is cut there and the
partition read again from the first missing offset.

A store or registry outage is retried with backoff, holding the batch and its offsets
(a batch is never stored without its enrichment); a rebalance that takes the
partitions away meanwhile only means the next owner replays from the stored offsets,
and the store drops what it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from ingest.dead_letter import send_dead_letters
from ingest.enrich import Enricher
from ingest.errors import RegistryLookupFailed, StoreUnavailable
from ingest.kafka import ContiguousOffsets, ensure_topics, make_consumer, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.rows import SourceOffset, unregistered_letters, validate_batch
from ingest.settings import Settings
from ingest.store import UsageStore

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


# How long the record at a stored offset may take to arrive before the partition's log
# is taken to be a different one; a fetch at an existing offset answers in milliseconds.
PROBE_TIMEOUT_S = 5.0


class StoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks newly assigned partitions to the offsets stored with the rows.

    aiokafka calls `on_partitions_assigned` after each group join; a seek there decides
    where this process reads from. Each seek goes to the stored record before
    `next_offset`, kept in `probes` until `check()` has seen it.

    aiokafka's fetcher starts on a new assignment while the listener still awaits the
    database, so a `getmany()` can return records from before the seek. `admit()` lets
    through only batches fetched wholly after the last assignment settled; others are
    dropped, and their partitions sought back so that nothing is skipped.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        store: UsageStore,
        group_id: str,
        holes: ContiguousOffsets,
    ) -> None:
        self._consumer = consumer
        self._store = store
        self._group_id = group_id
        self._holes = holes
        self.probes: dict[TopicPartition, SourceOffset] = {}
        self._probe_deadlines: dict[TopicPartition, float] = {}
        self.generation = 0
        self._settled = asyncio.Event()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._settled.clear()
        self._holes.forget(revoked)
        for tp in revoked:
            self.probes.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._holes.forget(assigned)
        try:
            by_topic: dict[str, list[int]] = {}
            for tp in assigned:
                by_topic.setdefault(tp.topic, []).append(tp.partition)
            for topic, partitions in by_topic.items():
                stored = await self._load(topic, partitions)
                for partition, position in stored.items():
                    tp = TopicPartition(topic, partition)
                    self._consumer.seek(tp, position.next_offset - 1)
                    self.probes[tp] = position
                    self._probe_deadlines[tp] = time.monotonic() + PROBE_TIMEOUT_S
                    log.info("%s: resuming at stored offset %d", tp, position.next_offset)
        finally:
            self.generation += 1
            self._settled.set()

    async def admit(
        self,
        records: dict[TopicPartition, list[ConsumerRecord]],
        generation: int,
        wait_s: float,
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """`records` from a `getmany()` begun at `generation`, minus what must not be
        processed (see the class docstring and `check()`)."""
        try:
            async with asyncio.timeout(wait_s):
                await self._settled.wait()
        except TimeoutError:
            pass  # a rebalance is under way: treat the batch as straddling it
        if self._settled.is_set() and self.generation == generation:
            return await self.check(records)
        assignment = self._consumer.assignment()
        for tp, batch in records.items():
            if not batch or tp not in assignment:
                continue
            probe = self.probes.get(tp)
            self._consumer.seek(tp, batch[0].offset if probe is None else probe.next_offset - 1)
        return {}

    async def _load(self, topic: str, partitions: list[int]) -> dict[int, SourceOffset]:
        """The stored offsets, retried briefly. aiokafka logs and ignores a listener's
        error, so if the store stays down the partitions keep Kafka's committed
        position: a replay, which the store turns into duplicates, never a gap."""
        for attempt in range(3):
            try:
                return await self._store.load_offsets(self._group_id, topic, partitions)
            except StoreUnavailable as exc:
                log.warning("reading stored offsets failed (%s), attempt %d", exc, attempt + 1)
                await asyncio.sleep(0.5 * 2**attempt)
        log.warning("%s: no stored offsets; resuming at Kafka's committed offsets", topic)
        return {}

    async def expire_probes(self) -> None:
        """Read from the beginning any partition whose probe record never came.

        A fetch at an offset that exists returns at once. None for `PROBE_TIMEOUT_S`
        means the log ends before it: the topic was re-created (a broker with memory
        storage restarted, say) while the database kept its offsets. Reading it again is
        safe: the store keeps one row per key.
        """
        now = time.monotonic()
        for tp, deadline in list(self._probe_deadlines.items()):
            if tp not in self.probes:
                del self._probe_deadlines[tp]
            elif now >= deadline:
                probe = self.probes.pop(tp)
                del self._probe_deadlines[tp]
                log.warning(
                    "%s: no record at stored offset %d within %gs: the log is shorter than "
                    "the one the offsets were stored for (topic re-created); reading it again",
                    tp,
                    probe.next_offset - 1,
                    PROBE_TIMEOUT_S,
                )
                await self._consumer.seek_to_beginning(tp)

    async def check(
        self, records: dict[TopicPartition, list[ConsumerRecord]]
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """`records` without the already stored probe records (or, for a partition
        whose log is not the one the offsets were stored for, without any)."""
        out = {}
        for tp, batch in records.items():
            probe = self.probes.pop(tp, None)
            if probe is None or not batch:
                out[tp] = batch
                continue
            first = batch[0]
            if first.offset == probe.next_offset - 1 and first.timestamp == probe.last_timestamp:
                out[tp] = batch[1:]
                continue
            log.warning(
                "%s: the record before stored offset %d is not the one stored (offset %d, "
                "timestamp %s, expected %s): the topic was re-created; reading it again",
                tp,
                probe.next_offset,
                first.offset,
                first.timestamp,
                probe.last_timestamp,
            )
            await self._consumer.seek_to_beginning(tp)
        return out


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
        async with (
            UsageStore(s.postgres) as store,
            Enricher(
                s.enrich,
                registry_schema=s.registry.db_schema,
                dsn=s.postgres.dsn.get_secret_value(),
                metrics=self._metrics,
            ) as enricher,
        ):
            await store.migrate()
            # Erasures made while no consumer ran, before waiting for the group's join.
            await self._retry("erasure", enricher.apply_erasures, store)
            producer = make_producer(s.kafka, client_id=f"{self._client_id}-dlq")
            consumer = make_consumer(
                s.kafka,
                group_id=s.consumer.group_id,
                client_id=self._client_id,
                max_records=s.consumer.batch_max,
            )
            holes = ContiguousOffsets(consumer, self._metrics)
            listener = StoredOffsets(consumer, store, s.consumer.group_id, holes)
            refresher = asyncio.create_task(self._refresh_rollups(store), name="rollups")
            await producer.start()
            try:
                await consumer.start()
                consumer.subscribe([s.kafka.raw_topic], listener=listener)
                try:
                    while not self._stopping.is_set():
                        if deadline is not None and time.monotonic() >= deadline:
                            self.stop(f"after {self._stop_after_s:g}s")
                            break
                        generation = listener.generation
                        records = await consumer.getmany(
                            timeout_ms=s.consumer.batch_wait_ms,
                            max_records=s.consumer.batch_max,
                        )
                        records = await listener.admit(
                            records, generation, s.consumer.batch_wait_ms / 1000
                        )
                        await listener.expire_probes()
                        records = holes.admit(records)
                        if any(records.values()):
                            await self._handle(records, consumer, producer, store, enricher)
                        await self._retry("erasure", enricher.apply_erasures, store)
                finally:
                    await consumer.stop()
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
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
        enricher: Enricher,
    ) -> None:
        m = self._metrics
        started = time.monotonic()
        lap = started

        def stage(name: str) -> None:
            nonlocal lap
            now = time.monotonic()
            m.stage_seconds.labels(name).observe(now - lap)
            lap = now

        batch = validate_batch(records, now=datetime.now(UTC), settings=self._settings)
        stage("validate")
        await self._retry("registry", enricher.record_firmware, batch.rows)
        stage("firmware")
        enriched = await self._retry("registry", enricher.enrich, batch.rows)
        stage("enrich")
        rows, dead = enriched.rows, batch.dead
        if enriched.unregistered:
            if self._settings.enrich.unregistered == "store":
                rows = rows + enriched.unregistered
            else:
                dead = dead + unregistered_letters(enriched.unregistered)
        await self._retry(
            "dead_letter", send_dead_letters, producer, self._settings.kafka.dlq_topic, dead
        )
        for letter in dead:
            m.dead_letters.labels(letter.reason.value).inc()
        stage("dead_letter")
        inserted = await self._retry(
            "store",
            store.write,
            rows,
            batch.positions,
            group_id=self._settings.consumer.group_id,
        )
        stage("store")
        await self._commit_kafka(consumer, batch.offsets)
        stage("kafka_commit")
        r = self.report
        r.batches += 1
        r.consumed += batch.records
        r.stored += inserted
        r.duplicates += len(rows) - inserted
        r.dead_lettered += len(dead)
        m.consumed.inc(batch.records)
        m.stored.inc(inserted)
        m.duplicates.inc(len(rows) - inserted)
        m.batch_size.observe(batch.records)
        m.batch_seconds.observe(time.monotonic() - started)
        if self._stop_after is not None and r.consumed >= self._stop_after:
            self.stop(f"after {self._stop_after} records")

    async def _refresh_rollups(self, store: UsageStore) -> None:
        """Every `postgres.rollup_refresh_s`, materialise the rollup hours that have
        ended (plain PostgreSQL), and the ended days at most every
        `postgres.rollup_day_refresh_s` (the first refresh that finds one noted takes
        it); beside the batches rather than between them. A failed refresh is logged and
        counted; the next one catches up (reads are exact anyway).
        """
        interval = self._settings.postgres.rollup_refresh_s
        day_interval = self._settings.postgres.rollup_day_refresh_s
        days_due = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            days = time.monotonic() >= days_due
            try:
                done = await store.refresh_rollups(settled_only=True, days=days)
            except StoreUnavailable as exc:
                self._metrics.errors.labels("rollup_refresh").inc()
                log.warning("rollup refresh failed (%s); next in %gs", exc, interval)
                continue
            if done is not None and done.days:
                days_due = time.monotonic() + day_interval
            if done is not None and (done.hours or done.days):
                self._metrics.rollup_refresh_seconds.observe(done.seconds)
                self._metrics.rollup_refresh_buckets.labels("hour").inc(done.hours)
                self._metrics.rollup_refresh_buckets.labels("day").inc(done.days)
                log.info(
                    "rollups refreshed: %d hours, %d days in %.3fs",
                    done.hours,
                    done.days,
                    done.seconds,
                )

    async def _commit_kafka(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Commit to Kafka too: lag monitoring reads it; correctness does not need it."""
        try:
            # aiokafka retries a retriable commit error forever (a partition that
            # vanished, say); a bounded wait keeps the loop alive.
            async with asyncio.timeout(self._settings.kafka.request_timeout_ms / 1000):
                await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
            # The rows and their offsets are stored; the next owner seeks past them.
            self._metrics.errors.labels("kafka_commit").inc()
            log.warning("Kafka offset commit failed (%r); the stored offsets stand", exc)

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
            except (StoreUnavailable, RegistryLookupFailed, KafkaError) as exc:
                self._metrics.errors.labels(kind).inc()
                if self._stopping.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", kind, exc, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)
