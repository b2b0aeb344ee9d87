"""The consumer: Kafka -> validate -> enrich -> PostgreSQL, with the offsets stored with
the rows.

One loop per process, in a Kafka consumer group:

    getmany() -> the per-device ceiling (`ingest.rate_limit`: a device's excess over
                 `consumer.device_rate_per_s`, by arrival at the bridge, is refused)
              -> parse_message() each record (`schemas.parse`: one validator a message)
              -> enrich the valid ones from the device registry (`ingest.enrich`: one
                 query per batch for the devices not cached; retried while it fails)
              -> invalid ones, those over the ceiling and those of unregistered
                 devices become dead letters, with their device's model and linked
                 owner's key from the registry
              -> the rest, the batch's next offsets and its dead letters into the
                 store in one transaction (COPY + ON CONFLICT DO NOTHING + offsets
                 upsert + letters, `ingest.dead_letter_table`); rows PostgreSQL
                 refuses for what they hold are dead-lettered `unstorable`, resends
                 of a stored message id with other content `conflicting_duplicate`,
                 and the others written again without them, with those letters
              -> the letters' copy to the dead-letter topic, waiting for Kafka's
                 confirmation at most `kafka.request_timeout_ms` (the table is the
                 record; a Kafka away costs the stream its copy, not the batch),
                 counted by reason and the device's model
              -> log the batch's traced messages (`ingest.trace`): one line a message
                 with its trace id, row key and Kafka position; INFO for sampled
                 traces, at most `consumer.trace_log_max` a batch, DEBUG otherwise
              -> commit the offsets to Kafka as well (for lag monitoring only)
              -> remove erased owners' keys from stored rows, if any were erased

Exactly-once effect: the database holds, in the same transaction as the rows, where the
group has got to; `ingest.offsets.StoredOffsets` seeks each newly assigned partition
there (checking that the log is still the one the offsets were stored for), and
`ingest.offsets.ContiguousOffsets` keeps records in offset order without holes.
Partitions with no stored offset keep Kafka's committed position (or `earliest`).

Beside the loop, `ingest.dead_letter_table.BridgeLetters` stores the bridge's dead
letters from the topic in the table, the rollup task deletes letters older than
the retention, at most every `postgres.rollup_day_refresh_s`, and the lag task
measures every `consumer.lag_interval_s` each assigned partition's lag: its end offset
minus the group's committed offset (`usagepipe_consumer_lag_messages`).

A store or registry outage is retried with backoff, holding the batch and its offsets
(a batch is never stored without its enrichment); a rebalance that takes the
partitions away meanwhile only means the next owner replays from the stored offsets,
and the store drops what it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from ingest.backoff import Backoff, wait_to_start
from ingest.dead_letter import DeadLetter, send_dead_letters
from ingest.dead_letter_table import BridgeLetters, LetterRow
from ingest.enrich import Enricher
from ingest.errors import (
    BrokerUnavailable,
    ConflictingDuplicates,
    RegistryLookupFailed,
    RowsRefused,
    StoreUnavailable,
)
from ingest.kafka import (
    TopicKeeper,
    ensure_topics,
    make_consumer,
    make_producer,
    make_reader,
    running,
)
from ingest.metrics import ConsumerMetrics
from ingest.offsets import ContiguousOffsets, LogCheck, StoredOffsets
from ingest.postgres import DB_ERRORS
from ingest.rate_limit import DeviceRateLimiter
from ingest.rows import (
    UsageRow,
    conflict_letters,
    unregistered_letters,
    unstorable_letters,
    validate_batch,
)
from ingest.settings import Settings
from ingest.store import UsageStore
from ingest.trace import TraceParent, header_value, record_traceparent, sampled_header
from schemas.errors import Reason

log = logging.getLogger(__name__)

FINAL_COMMIT_S = 5.0
"""How long a stopping consumer waits for its last Kafka commit (the stored offsets
stand either way; Kafka's copy is for lag monitoring)."""

PING_S = 5.0
"""How often a running consumer asks PostgreSQL `SELECT 1` for `readiness()` (an idle
one would otherwise find an outage only at its next batch)."""

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass
class ConsumerReport:
    """What one run of the consumer did."""

    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    rate_limited: int = 0
    """Of `dead_lettered`: records over their device's rate (`rate_limited`)."""
    batches: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""


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
        self._consuming = False  # once started, an outage is retried batch by batch
        self._limiter = DeviceRateLimiter(
            settings.consumer.device_rate_per_s, settings.consumer.device_burst
        )
        self._to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
        self._commit_due = asyncio.Event()
        self._logs: LogCheck | None = None
        self._state = {"kafka": "connecting", "postgresql": "connecting"}
        """`ok` or why not, by server: set by the loop, read by `readiness()`."""
        self._assigned = 0
        """Partitions the group gave this consumer, as of its last fetch."""
        self._ping: str = "ok"
        """What the last `SELECT 1` of `_ping_postgres` found."""
        self._keeper: TopicKeeper | None = None
        """The running topic check: whether Kafka answers while the consumer is idle."""
        self.report = ConsumerReport()

    def readiness(self) -> dict[str, str]:
        """`GET /ready`'s checks (`ingest.readiness`): Kafka, the partitions assigned to
        this consumer, and PostgreSQL; read from the probe server's thread."""
        kafka = self._state["kafka"]
        if kafka == "ok" and self._keeper is not None and self._keeper.unreachable:
            kafka = self._keeper.unreachable
        if self._state["kafka"] != "ok":
            partitions = "not in the group yet"
        elif self._assigned == 0:
            partitions = (
                "none assigned (the group is rebalancing, or has more consumers than partitions)"
            )
        else:
            partitions = "ok"
        postgresql = self._ping if self._ping != "ok" else self._state["postgresql"]
        return {"kafka": kafka, "postgresql": postgresql, "partitions": partitions}

    def stop(self, why: str = "requested") -> None:
        if not self._stopping.is_set():
            self.report.stopped_by = why
            self._stopping.set()

    async def run(self) -> ConsumerReport:
        """Consume until stopped. Kafka or PostgreSQL not up yet at start (a host
        booting, a deploy starting everything at once) is waited for, with the usual
        backoff and a log line a try, for `consumer.start_wait_s` or until a stop;
        once the first batch was asked for, a failure the loop cannot retry ends it."""
        report = await wait_to_start(
            self._run,
            who="consumer",
            log=log,
            retry_on=(StoreUnavailable, BrokerUnavailable, KafkaError),
            wait_s=self._settings.consumer.start_wait_s,
            started=lambda: self._consuming,
            stopping=self._stopping,
            on_retry=self._metrics.errors.labels("start").inc,
        )
        if report is None:
            log.info("consumer stopped before it started (%s)", self.report.stopped_by)
            return self.report
        return report

    async def _run(self) -> ConsumerReport:
        s = self._settings
        started = time.monotonic()
        deadline = None if self._stop_after_s is None else started + self._stop_after_s
        self._state.update(kafka="connecting", postgresql="connecting")
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
            self._state["postgresql"] = "ok"
            # Erasures made while no consumer ran, before waiting for the group's join.
            await self._retry("erasure", enricher.apply_erasures, store)
            consumer = make_consumer(
                s.kafka,
                group_id=s.consumer.group_id,
                client_id=self._client_id,
                max_records=s.consumer.batch_max,
            )
            holes = ContiguousOffsets(consumer, self._metrics)
            reader = make_reader(s.kafka, client_id=f"{self._client_id}-check")
            self._logs = LogCheck(consumer, reader, self._metrics)
            listener = StoredOffsets(consumer, store, s.consumer.group_id, holes, self._logs)
            keeper = TopicKeeper(
                s.kafka,
                s.kafka.raw_topic,
                s.kafka.dlq_topic,
                on_repair=lambda action, n: self._metrics.topic_repairs.labels(action).inc(n),
            )
            self._keeper = keeper
            async with (
                running(make_producer(s.kafka, client_id=f"{self._client_id}-dlq")) as producer,
                running(consumer),
                running(reader),
            ):
                consumer.subscribe([s.kafka.raw_topic], listener=listener)
                self._consuming = True
                self._state["kafka"] = "ok"
                failed: BaseException | None = None
                try:
                    async with asyncio.TaskGroup() as tasks:
                        refresher = tasks.create_task(self._refresh_rollups(store), name="rollups")
                        letters = tasks.create_task(
                            self._bridge_letters(enricher, store).run(), name="bridge-letters"
                        )
                        pinger = tasks.create_task(self._ping_postgres(store), name="ping")
                        committer = tasks.create_task(
                            self._commit_in_background(consumer), name="kafka-commit"
                        )
                        watchers = [
                            tasks.create_task(keeper.run(), name="topics"),
                            tasks.create_task(self._check_logs(self._logs), name="logs"),
                            tasks.create_task(self._report_lag(consumer), name="lag"),
                        ]
                        await self._consume(
                            consumer,
                            producer,
                            store,
                            enricher,
                            listener=listener,
                            holes=holes,
                            deadline=deadline,
                        )
                        refresher.cancel()
                        letters.cancel()
                        pinger.cancel()
                        committer.cancel()
                        for watcher in watchers:
                            watcher.cancel()
                    await self._commit_last(consumer)
                except BaseExceptionGroup as group:
                    # Whichever fails first (the loop or the refresher), the group
                    # cancels the other: raise that one error, as run() always has, so
                    # callers see a StoreUnavailable, not a group around it.
                    if len(group.exceptions) != 1:
                        raise
                    failed = group.exceptions[0]
                if failed is not None:
                    raise failed
        self._state.update(kafka="stopped", postgresql="stopped")
        self._assigned = 0
        self._ping = "ok"
        self._keeper = None
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

    async def _consume(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        store: UsageStore,
        enricher: Enricher,
        *,
        listener: StoredOffsets,
        holes: ContiguousOffsets,
        deadline: float | None,
    ) -> None:
        """Take batches until a stop is asked for (by `stop()`, `stop_after`, or the
        monotonic `deadline`); the batch in hand is finished and committed first."""
        s = self._settings
        judged = listener.generation
        while not self._stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                self.stop(f"after {self._stop_after_s:g}s")
                break
            generation = listener.generation
            records = await consumer.getmany(
                timeout_ms=s.consumer.batch_wait_ms,
                max_records=s.consumer.batch_max,
            )
            self._assigned = len(consumer.assignment())
            records = await listener.admit(records, generation, s.consumer.batch_wait_ms / 1000)
            if listener.generation != judged:
                # A rebalance: the partitions given to others take their buckets along
                # (those kept, or given back, keep theirs: only ever more lenient).
                judged = listener.generation
                self._limiter.keep_only(consumer.assignment())
            await listener.expire_probes()
            if self._logs is not None and (rewound := await self._logs.apply(listener, holes)):
                records = {tp: batch for tp, batch in records.items() if tp not in rewound}
            records = holes.admit(records)
            if any(records.values()):
                await self._handle(records, consumer, producer, store, enricher)
            await self._retry("erasure", enricher.apply_erasures, store)

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

        batch = validate_batch(
            records, now=datetime.now(UTC), settings=self._settings, limiter=self._limiter
        )
        stage("validate")
        await self._retry("registry", enricher.record_firmware, batch.rows)
        stage("firmware")
        enriched = await self._retry("registry", enricher.enrich, batch.rows)
        rows, dead = enriched.rows, batch.dead
        if enriched.unregistered:
            if self._settings.enrich.unregistered == "store":
                rows = rows + enriched.unregistered
            else:
                dead = dead + unregistered_letters(enriched.unregistered)
        letters = await self._retry("registry", enricher.describe_letters, dead)
        stage("enrich")
        while True:
            try:
                inserted = await self._retry(
                    "store",
                    store.write,
                    rows,
                    batch.positions,
                    group_id=self._settings.consumer.group_id,
                    letters=letters,
                )
                break
            except RowsRefused as refused:
                # What PostgreSQL will never take, and resends that contradict a stored
                # message, are dead-lettered (in the retried write, with the batch's
                # other letters); the rest is written.
                if isinstance(refused, ConflictingDuplicates):
                    log.warning("%s; dead-lettering them as conflicting duplicates", refused)
                    refusals = conflict_letters(refused.rows)
                else:
                    log.warning("%s; dead-lettering them as unstorable", refused)
                    refusals = unstorable_letters(refused.rows)
                letters = letters + await self._retry(
                    "registry", enricher.describe_letters, refusals
                )
                dead = dead + refusals
                gone = {id(row) for row, _ in refused.rows}
                rows = [row for row in rows if id(row) not in gone]
        stage("store")
        _log_stored(rows, dead, self._settings.consumer.trace_log_max)
        await self._copy_to_topic(producer, dead)
        self._count_letters(letters)
        stage("dead_letter")
        if self._logs is not None:
            self._logs.processed(batch.positions)
        # Kafka's copy of the offsets, for lag monitoring, is committed beside the
        # batches: a broker that is slow to answer a commit (after its restart, every
        # commit took its whole request timeout) must not hold the next batch.
        self._to_commit.update(batch.offsets)
        self._commit_due.set()
        r = self.report
        r.batches += 1
        r.consumed += batch.records
        r.stored += inserted
        r.duplicates += len(rows) - inserted
        r.dead_lettered += len(dead)
        r.rate_limited += sum(1 for letter in dead if letter.reason is Reason.RATE_LIMITED)
        m.consumed.inc(batch.records)
        m.stored.inc(inserted)
        m.duplicates.inc(len(rows) - inserted)
        m.batch_size.observe(batch.records)
        m.batch_seconds.observe(time.monotonic() - started)
        if self._stop_after is not None and r.consumed >= self._stop_after:
            self.stop(f"after {self._stop_after} records")

    def _bridge_letters(self, enricher: Enricher, store: UsageStore) -> BridgeLetters:
        """The task storing the bridge's letters from the dead-letter topic in the
        table (`ingest.dead_letter_table`), in a group of its own."""
        return BridgeLetters(
            self._settings.kafka,
            group_id=f"{self._settings.consumer.group_id}.bridge-letters",
            client_id=f"{self._client_id}-bridge-letters",
            describe=enricher.describe_letters,
            store=store.write_letters,
            on_error=self._metrics.errors.labels("bridge_letters").inc,
        )

    async def _copy_to_topic(self, producer: AIOKafkaProducer, letters: list[DeadLetter]) -> None:
        """Send the copy of `letters` (stored in PostgreSQL already) to the dead-letter
        topic, waiting at most `kafka.request_timeout_ms` for Kafka's confirmation: the
        topic is a stream for others, the table the record, so a Kafka that is away
        costs the stream these letters (logged and counted), never the batch its
        progress (see `ingest.dead_letter_table`)."""
        if not letters:
            return
        topic = self._settings.kafka.dlq_topic
        try:
            async with asyncio.timeout(self._settings.kafka.request_timeout_ms / 1000):
                await send_dead_letters(producer, topic, letters)
        except (KafkaError, TimeoutError) as exc:
            self._metrics.errors.labels("dead_letter").inc()
            log.warning(
                "%d dead letters (stored in PostgreSQL) did not reach %s: %r",
                len(letters),
                topic,
                exc,
            )

    def _count_letters(self, letters: list[LetterRow]) -> None:
        """Count `letters` by reason and by their device's model (`unknown` for a
        device the registry does not know)."""
        for row in letters:
            self._metrics.dead_letters.labels(row.letter.reason.value, row.model or "unknown").inc()

    async def _refresh_rollups(self, store: UsageStore) -> None:
        """Every `postgres.rollup_refresh_s`, materialise the rollup hours that have
        ended (either layout), and the ended days at most every
        `postgres.rollup_day_refresh_s` (the first refresh that finds one noted takes
        it); beside the batches rather than between them. A refresh the store could not
        do (`StoreUnavailable`: PostgreSQL away, or on TimescaleDB a refresh refused
        because another overlaps it) is logged and counted; its notes stay and the next
        one catches up (reads are exact anyway). Any other error ends the consumer with
        it: this runs in the consumer's task group, which then cancels the batch loop.
        """
        interval = self._settings.postgres.rollup_refresh_s
        day_interval = self._settings.postgres.rollup_day_refresh_s
        last_success = self._metrics.rollup_refresh_last_success
        for granularity, every in (("hour", interval), ("day", day_interval)):
            self._metrics.rollup_refresh_interval.labels(granularity).set(every)
            # The start stands in for a success until the first: refreshes that never
            # succeed then alert one bound after the start.
            last_success.labels(granularity).set(time.time())
        days_due = letters_due = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            days = time.monotonic() >= days_due
            try:
                done = await store.refresh_rollups(settled_only=True, days=days)
            except StoreUnavailable as exc:
                self._metrics.errors.labels("rollup_refresh").inc()
                log.warning("rollup refresh failed (%s); next in %gs", exc, interval)
                continue
            if done is not None:  # None: another consumer's refresh held the lock
                last_success.labels("hour").set(time.time())
                if days:
                    last_success.labels("day").set(time.time())
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
            if time.monotonic() >= letters_due:
                letters_due = await self._expire_letters(store, letters_due, day_interval)

    async def _expire_letters(self, store: UsageStore, due: float, interval: float) -> float:
        """Delete the dead letters older than the retention; returns when next. A
        failure is logged and counted, and tried again at the next refresh."""
        try:
            expired = await store.expire_letters()
        except StoreUnavailable as exc:
            self._metrics.errors.labels("letter_expiry").inc()
            log.warning("expiring old dead letters failed (%s)", exc)
            return due
        if expired:
            log.info("%d dead letters older than the retention deleted", expired)
        return time.monotonic() + interval

    async def _check_logs(self, logs: LogCheck) -> None:
        """Every `kafka.topic_check_s`, whether each partition's log is still the one
        being read (`ingest.offsets.LogCheck`)."""
        while True:
            await asyncio.sleep(self._settings.kafka.topic_check_s)
            try:
                await logs.check()
            except KafkaError as exc:
                log.warning(
                    "checking the partitions' logs failed (%r); next in %gs",
                    exc,
                    self._settings.kafka.topic_check_s,
                )

    async def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Every `consumer.lag_interval_s`, each assigned partition's lag (end offset
        minus the group's committed offset) into the lag gauges; the partitions no
        longer assigned here leave them (their new owner reports them). A broker that
        does not answer in `kafka.request_timeout_ms` is logged and tried next time."""
        interval = self._settings.consumer.lag_interval_s
        shown: set[TopicPartition] = set()
        while True:
            try:
                async with asyncio.timeout(self._settings.kafka.request_timeout_ms / 1000):
                    shown = await self._measure_lag(consumer, shown)
            except (KafkaError, TimeoutError) as exc:
                log.warning("measuring the consumer lag failed (%r); next in %gs", exc, interval)
            await asyncio.sleep(interval)

    async def _measure_lag(
        self, consumer: AIOKafkaConsumer, shown: set[TopicPartition]
    ) -> set[TopicPartition]:
        """One round of `_report_lag`; returns the partitions now shown."""
        m = self._metrics
        assigned = set(consumer.assignment())
        for tp in shown - assigned:
            for gauge in (m.lag, m.end_offset, m.committed_offset):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))
        if not assigned:
            return assigned
        ends = await consumer.end_offsets(list(assigned))
        committed: dict[TopicPartition, int | None] = {}
        for tp in assigned:
            committed[tp] = await consumer.committed(tp)
        uncommitted = [tp for tp, offset in committed.items() if offset is None]
        starts = await consumer.beginning_offsets(uncommitted) if uncommitted else {}
        for tp in assigned:
            labels = (tp.topic, str(tp.partition))
            end = ends[tp]
            offset = committed[tp]
            done = starts[tp] if offset is None else offset
            m.end_offset.labels(*labels).set(end)
            m.committed_offset.labels(*labels).set(done)
            # Tansu reports end offsets too low: a committed offset past the end.
            m.lag.labels(*labels).set(max(0, end - done))
        return assigned

    async def _commit_in_background(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the latest stored offsets of each partition to Kafka, one commit at a
        time, beside the batch loop: the offsets of the batches stored while a commit
        was under way go together in the next one."""
        while True:
            await self._commit_due.wait()
            self._commit_due.clear()
            offsets, self._to_commit = self._to_commit, {}
            started = time.monotonic()
            try:
                await self._commit_kafka(consumer, offsets)
            except asyncio.CancelledError:
                self._to_commit = {**offsets, **self._to_commit}  # for the last commit
                raise
            self._metrics.stage_seconds.labels("kafka_commit").observe(time.monotonic() - started)

    async def _commit_last(self, consumer: AIOKafkaConsumer) -> None:
        """At a stop, the offsets not committed yet, within `FINAL_COMMIT_S`."""
        offsets, self._to_commit = self._to_commit, {}
        if not offsets:
            return
        try:
            async with asyncio.timeout(FINAL_COMMIT_S):
                await self._commit_kafka(consumer, offsets)
        except TimeoutError:
            self._metrics.errors.labels("kafka_commit").inc()
            log.warning(
                "the last Kafka offset commit took over %gs; the stored offsets stand",
                FINAL_COMMIT_S,
            )

    async def _commit_kafka(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Commit to Kafka too: lag monitoring reads it; correctness does not need it."""
        try:
            # aiokafka retries a retriable commit error forever (a partition that
            # vanished, say); a bounded wait keeps the committer alive.
            async with asyncio.timeout(self._settings.kafka.request_timeout_ms / 1000):
                await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
            # The rows and their offsets are stored; the next owner seeks past them.
            self._metrics.errors.labels("kafka_commit").inc()
            log.warning("Kafka offset commit failed (%r); the stored offsets stand", exc)

    async def _ping_postgres(self, store: UsageStore) -> None:
        """Ask PostgreSQL `SELECT 1` every `PING_S`, for `readiness()` only: the loop
        itself finds and retries outages where it meets them."""
        while True:
            try:
                async with asyncio.timeout(PING_S):
                    await store.pool.fetchval("SELECT 1")
            except DB_ERRORS as exc:
                self._ping = f"unreachable: {exc!r}"
            else:
                self._ping = "ok"
            await asyncio.sleep(PING_S)

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
        backoff = Backoff()
        failing: str | None = None
        while True:
            try:
                done = await fn(*args, **kwargs)
            except (StoreUnavailable, RegistryLookupFailed, KafkaError) as exc:
                failing = "kafka" if isinstance(exc, KafkaError) else "postgresql"
                self._state[failing] = f"{kind} failing: {exc}"
                self._metrics.errors.labels(kind).inc()
                if self._stopping.is_set():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", kind, exc, backoff.delay_s)
                await backoff.wait()
            else:
                if failing is not None:
                    self._state[failing] = "ok"
                return done


def _log_stored(rows: list[UsageRow], letters: list[DeadLetter], info_max: int) -> None:
    """Log what a stored batch did with its traced messages, so that one message can be
    followed from the device (its `traceparent`) to its row or its dead letter: one line
    a traced message, naming its trace id (also in the text, for grep), the row's key
    and its Kafka partition and offset.

    Sampled traces (flags 01, as W3C intends: the device's choice, or the bridge's
    `bridge.trace_sample_ratio`) are logged at INFO, at most `info_max` a batch, so a
    fleet that samples everything cannot flood the log at production rates; the rest
    of them, and traces not sampled, at DEBUG, with one INFO line saying how many were
    held back. Every dead letter has a DEBUG line too (with its trace id if it was
    traced); they are counted by reason at every level."""
    debug = log.isEnabledFor(logging.DEBUG)
    room, held = info_max, 0
    for row in rows:
        source = row.source
        if source is None or not source.headers:
            continue
        raw = header_value(source.headers)
        if raw is None:
            continue
        sampled = sampled_header(raw)  # a glance at the flags: no parse for a line not logged
        if sampled and room:
            level = logging.INFO
        else:
            held += sampled
            if not debug:
                continue
            level = logging.DEBUG
        trace = TraceParent.parse(raw)
        if trace is None:
            continue
        if level == logging.INFO:
            room -= 1
        log.log(
            level,
            "stored trace_id=%s device_id=%s boot_id=%s seq=%d partition=%d offset=%d",
            trace.trace_id,
            row.device_id,
            row.boot_id,
            row.seq,
            row.kafka_partition,
            row.kafka_offset,
            extra={
                "trace_id": trace.trace_id,
                "span_id": trace.parent_id,
                "device_id": row.device_id,
                "boot_id": row.boot_id,
                "seq": row.seq,
                "partition": row.kafka_partition,
                "offset": row.kafka_offset,
            },
        )
    for letter in letters:
        trace = record_traceparent(letter.headers) if letter.headers else None
        if trace is not None and trace.sampled and room:
            room -= 1
            level = logging.INFO
        else:
            held += trace is not None and trace.sampled
            if not debug:
                continue
            level = logging.DEBUG
        trace_id = None if trace is None else trace.trace_id
        log.log(
            level,
            "dead letter (%s): %s%s",
            letter.reason.value,
            letter.message,
            "" if trace_id is None else f" trace_id={trace_id}",
            extra={
                "device_id": letter.key.decode("utf-8", "replace") if letter.key else None,
                "partition": letter.partition,
                "offset": letter.offset,
                "reason": letter.reason.value,
                "trace_id": trace_id,
            },
        )
    if held:
        log.info(
            "%d more sampled traces in this batch logged at DEBUG only (consumer.trace_log_max=%d)",
            held,
            info_max,
        )
