"""The one place that configures Kafka clients.

aiokafka's defaults are wrong for this job (acks=1, auto-commit on, offset reset
`latest`), so every client usagepipe makes is built here with each of those stated:

- producers: acks=all, idempotence from settings (off only for brokers without
  InitProducerId, such as the local Tansu), bounded linger and batch size;
- consumers: auto-commit off (offsets are committed after the database commits), offset
  reset `earliest` (a new group reads everything; `latest` would skip what arrived
  before it joined), read_committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.errors import BrokerUnavailable, ConfigurationError
from ingest.settings import KafkaSettings

if TYPE_CHECKING:
    from ingest.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

# Stated once: the consumer settings usagepipe never runs without.
CONSUMER_SAFETY: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "isolation_level": "read_committed",
}


def _check(settings: KafkaSettings) -> None:
    if settings.acks != "all":  # the settings type already forbids it; keep the guard
        raise ConfigurationError(f"kafka.acks must be 'all', not {settings.acks!r}")


def make_producer(
    settings: KafkaSettings, *, client_id: str, linger_ms: int | None = None
) -> AIOKafkaProducer:
    """A producer that confirms a send only once every in-sync replica has it.

    `linger_ms` overrides the setting for a producer that sends one record at a time
    and waits for it (a batch that never fills would only add the linger to each send).
    """
    _check(settings)
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=settings.linger_ms if linger_ms is None else linger_ms,
        max_batch_size=settings.max_batch_bytes,
        request_timeout_ms=settings.request_timeout_ms,
    )


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str, client_id: str, max_records: int
) -> AIOKafkaConsumer:
    """A group consumer that never commits by itself and starts new groups at `earliest`."""
    _check(settings)
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        max_poll_records=max_records,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        request_timeout_ms=max(settings.request_timeout_ms, settings.session_timeout_ms + 5000),
        **CONSUMER_SAFETY,
    )


async def ensure_topics(settings: KafkaSettings, *topics: str) -> None:
    """Create `topics` with the configured partitions where they do not exist yet."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=settings.request_timeout_ms,
    )
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(t, settings.partitions, settings.replication_factor) for t in missing]
                )
                log.info("created topics %s", ", ".join(missing))
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"Kafka at {settings.bootstrap_servers} could not list/create topics: {exc!r}"
        ) from exc
    finally:
        await admin.close()


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
