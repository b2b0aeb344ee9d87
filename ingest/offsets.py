"""Where a partition is read from: the offsets stored with the rows, read without holes.

Two guards decide the position of every partition the consumer (and, for the second,
the dead-letter reader) reads:

- `StoredOffsets`, the consumer group's rebalance listener: the database holds, in the
  same transaction as the rows, where the group has got to (`<table>_offsets`). On each
  assignment it seeks to the stored offset, so a consumer killed between its database
  commit and its Kafka commit restarts with no gap, no duplicate row and no replay.
  The seek goes one record back and checks that record's Kafka timestamp against the
  stored one: a topic deleted and created again restarts its offsets at 0, and a
  stored offset must not skip that new log's records (on a mismatch, or no record
  there within `PROBE_TIMEOUT_S`, the partition is read from its beginning; the
  store's key turns anything already stored into a duplicate).
- `ContiguousOffsets`: records are processed in offset order without holes; a fetch
  that skipped a batch the broker had not made readable yet is cut there and the
  partition read again from the first missing offset (`HOLE_WAIT_S` before a hole is
  taken to be real).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from ingest.errors import StoreUnavailable

if TYPE_CHECKING:
    from ingest.metrics import ConsumerMetrics
    from ingest.rows import SourceOffset
    from ingest.store import UsageStore

log = logging.getLogger(__name__)


# How long a hole in a partition's offsets is read again before it is taken to be real.
HOLE_WAIT_S = 5.0


class ContiguousOffsets:
    """Holds back the records that follow a hole in a partition's offsets.

    A partition's offsets run without holes on the raw topic: Apache Kafka leaves them
    only where compaction or transaction markers took records away, and the raw topic
    has neither. But a broker can answer a fetch while an earlier batch is not readable
    yet, and a consumer that takes the later one has moved past the earlier for good:
    seen with the Tansu broker, whose memory storage, under two producers writing one
    partition, let a live consumer skip a batch of 4 records that a second read from the
    beginning found in its place (four rows missing from a benchmark run).

    `admit` cuts a partition's records at a hole and seeks the partition back to the
    first missing offset, so the next fetch reads it again. A hole still there after
    `wait_s` is real (records deleted by retention before they were read, say): it is
    logged and counted, and read past. Counted by outcome in
    `usagepipe_consumer_offset_holes_total` (read_again, read_past) where `metrics` is
    given. Used by the consumer and by the dead-letter reader.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        metrics: ConsumerMetrics | None,
        *,
        wait_s: float = HOLE_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._wait_s = wait_s
        self._clock = clock
        self._next: dict[TopicPartition, int] = {}
        self._seen: dict[tuple[TopicPartition, int], float] = {}
        """(partition, first missing offset) -> when the hole was first met."""

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Start these partitions afresh (a rebalance sets their positions anew)."""
        for tp in partitions:
            self._next.pop(tp, None)
        gone = set(partitions)
        self._seen = {k: t for k, t in self._seen.items() if k[0] not in gone}

    def admit(
        self, records: dict[TopicPartition, list[ConsumerRecord]]
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """`records`, each partition's cut at its first hole (see the class docstring).
        Call with every batch that is then processed, in order."""
        out: dict[TopicPartition, list[ConsumerRecord]] = {}
        now = self._clock()
        for tp, batch in records.items():
            expected = self._next.get(tp)
            keep = len(batch)
            for i, record in enumerate(batch):
                if expected is not None and record.offset > expected:
                    since = self._seen.setdefault((tp, expected), now)
                    if now - since < self._wait_s:
                        if self._metrics is not None:
                            self._metrics.offset_holes.labels("read_again").inc()
                        self._consumer.seek(tp, expected)
                        keep = i
                        break
                    if self._metrics is not None:
                        self._metrics.offset_holes.labels("read_past").inc()
                    log.warning(
                        "%s: offsets %d-%d are still missing after %gs: reading past them",
                        tp,
                        expected,
                        record.offset - 1,
                        self._wait_s,
                        extra={"partition": tp.partition, "offset": expected},
                    )
                if expected is None or record.offset >= expected:
                    expected = record.offset + 1
            if expected is not None:
                self._next[tp] = expected
                if self._seen:
                    self._seen = {
                        k: t for k, t in self._seen.items() if k[0] != tp or k[1] >= expected
                    }
            out[tp] = batch[:keep]
        return out


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
        logs: LogCheck | None = None,
    ) -> None:
        self._consumer = consumer
        self._store = store
        self._group_id = group_id
        self._holes = holes
        self._logs = logs
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
        if self._logs is not None:
            self._logs.keep_only(assigned)
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
                    if self._logs is not None:
                        self._logs.anchor(tp, position)
                    log.info(
                        "%s: resuming at stored offset %d",
                        tp,
                        position.next_offset,
                        extra={"partition": partition, "offset": position.next_offset},
                    )
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
                self._recreated(tp, probe)
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
            self._recreated(tp, probe)
            await self._consumer.seek_to_beginning(tp)
        return out

    def _recreated(self, tp: TopicPartition, probe: SourceOffset) -> None:
        self._holes.forget([tp])
        if self._logs is not None:
            self._logs.forget([tp])
            self._logs.count(tp, probe.next_offset, "assigned")


class LogCheck:
    """Finds a partition whose log was re-created while the consumer was reading it.

    A broker with memory storage (the local Tansu) that restarts comes back with empty
    logs, and the consumer group may not even rebalance: the consumer keeps its
    position, and Tansu answers a fetch past a log's end with nothing (not
    OFFSET_OUT_OF_RANGE) until the new log grows that far, so the consumer would go on
    from there and skip every record before it, silently. Nor does any end offset tell:
    Tansu reports them too low.

    So each partition keeps an anchor, a record it processed (offset and Kafka
    timestamp): the stored one at an assignment, else the first one processed. Every
    `kafka.topic_check_s` a reader of its own (no group) fetches each anchor: the same
    record means the same log, and the anchor moves up to the last record processed
    before that check began; another record there (or, from a broker that resets a
    fetch out of range, one at another offset) means a new log; no record within
    `PROBE_TIMEOUT_S` while the broker reports the log's end at or before the anchor,
    too. A new log's partition is read again from its start (`apply()`, between
    batches): logged, and counted in `usagepipe_consumer_recreated_partitions_total` and
    `usagepipe_consumer_recreated_gap_offsets_total` (from the log's start to where the
    consumer was). A broker that does not answer decides nothing.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        reader: AIOKafkaConsumer,
        metrics: ConsumerMetrics | None,
        *,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self._consumer = consumer
        self._reader = reader
        self._metrics = metrics
        self._probe_timeout_s = probe_timeout_s
        self._anchors: dict[TopicPartition, SourceOffset] = {}
        self._latest: dict[TopicPartition, SourceOffset] = {}
        self._found: dict[TopicPartition, int] = {}
        """Partitions found re-created, not yet sought back: how far the consumer was."""

    def anchor(self, tp: TopicPartition, position: SourceOffset) -> None:
        """`position` (the stored one) anchors `tp` unless it has an anchor already: a
        rebalance right after a broker restart must not replace an anchor in the lost
        log by stored offsets that may already be in the new one (the consumer may have
        read past its old position there before the check came)."""
        self._anchors.setdefault(tp, position)

    def keep_only(self, assigned: list[TopicPartition]) -> None:
        """Forget the partitions not in `assigned` (a new assignment)."""
        self.forget(
            [tp for tp in {*self._anchors, *self._latest, *self._found} if tp not in assigned]
        )

    def forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._anchors.pop(tp, None)
            self._latest.pop(tp, None)
            self._found.pop(tp, None)

    def processed(self, positions: list[SourceOffset]) -> None:
        """Call after each batch is stored, with its positions."""
        for position in positions:
            if position.last_timestamp is None:
                continue
            tp = TopicPartition(position.topic, position.partition)
            self._latest[tp] = position
            self._anchors.setdefault(tp, position)

    def count(self, tp: TopicPartition, gap: int, found: str) -> None:
        if gap <= 0:
            return
        log.warning(
            "%s: the log was re-created (found %s); reading it again from its start: "
            "offsets 0-%d would have been skipped",
            tp,
            found,
            gap - 1,
            extra={"partition": tp.partition, "offset": 0},
        )
        if self._metrics is not None:
            self._metrics.recreated_partitions.labels(found).inc()
            self._metrics.recreated_gap_offsets.inc(gap)

    async def check(self) -> None:
        """Fetch every anchor once (see the class docstring)."""
        anchors = {tp: a for tp, a in self._anchors.items() if tp not in self._found}
        if not anchors:
            return
        latest = dict(self._latest)
        seen = await self._fetch(anchors)
        missing = [tp for tp in anchors if tp not in seen]
        ends: dict[TopicPartition, int] = {}
        if missing:
            try:
                async with asyncio.timeout(self._probe_timeout_s):
                    ends = await self._reader.end_offsets(missing)
            except (KafkaError, TimeoutError):
                ends = {}  # the broker does not answer: nothing is decided
        for tp, anchor in anchors.items():
            if self._anchors.get(tp) is not anchor:
                continue  # reassigned meanwhile
            record = seen.get(tp)
            if record is not None:
                same = record.offset == anchor.next_offset - 1 and (
                    record.timestamp == anchor.last_timestamp
                )
            elif tp in ends and ends[tp] <= anchor.next_offset - 1:
                same = False
            else:
                continue  # undecided: try again next time
            if same:
                if tp in latest:
                    self._anchors[tp] = latest[tp]
                continue
            where = self._latest.get(tp, anchor)
            self._found[tp] = where.next_offset

    async def _fetch(
        self, anchors: dict[TopicPartition, SourceOffset]
    ) -> dict[TopicPartition, ConsumerRecord]:
        """The first record at or after each anchor's offset, within the probe timeout."""
        reader = self._reader
        reader.assign(list(anchors))
        for tp, anchor in anchors.items():
            reader.seek(tp, anchor.next_offset - 1)
        seen: dict[TopicPartition, ConsumerRecord] = {}
        deadline = time.monotonic() + self._probe_timeout_s
        while len(seen) < len(anchors) and (left := deadline - time.monotonic()) > 0:
            waiting = [tp for tp in anchors if tp not in seen]
            batch = await reader.getmany(
                *waiting, timeout_ms=int(left * 1000), max_records=len(waiting)
            )
            for tp, records in batch.items():
                if records and tp not in seen:
                    seen[tp] = records[0]
                    reader.pause(tp)
        for tp in anchors:
            reader.resume(tp)
        return seen

    async def apply(self, listener: StoredOffsets, holes: ContiguousOffsets) -> set[TopicPartition]:
        """Read the partitions found re-created again from their start; returns them.
        The caller drops what it holds of them: records fetched from the old position
        in the new log, stored, would store that position with them, and a rejoin then
        resumes there, past the new log's first offsets (seen: 4,900 never read)."""
        if not self._found:
            return set()
        found, self._found = self._found, {}
        assignment = self._consumer.assignment()
        for tp, gap in found.items():
            self._anchors.pop(tp, None)
            self._latest.pop(tp, None)
            if tp not in assignment:
                continue
            listener.probes.pop(tp, None)
            holes.forget([tp])
            self.count(tp, gap, "running")
            await self._consumer.seek_to_beginning(tp)
        return set(found)
