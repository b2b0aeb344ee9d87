"""Dead letters: messages that can never become rows, kept with why and where from.

Each dead letter is one JSON record on `kafka.dlq_topic`, keyed like the original (the
device id of its MQTT topic), in the shape `schemas.dead_letter.DeadLetterMessage`
declares:

    {"reason": "schema_violation", "message": "body.spin_rpm: ...",
     "source": {"topic": "telemetry.raw", "partition": 3, "offset": 1234},
     "original_b64": "...", "failed_at": "2026-11-23T10:00:00.123456Z"}

Two components write them. The consumer dead-letters a Kafka record it refuses: the
letter is stored in PostgreSQL in the batch's transaction (the record:
`ingest.dead_letter_table`), then copied to the topic with a bounded wait. The bridge
dead-letters an MQTT message it refuses before Kafka (too large, or naming another
device than its topic): the source is then the MQTT topic, with partition and offset
null, and the message is acknowledged to MQTT only after Kafka confirmed the dead
letter; the consumer copies it from the topic into the table. Either way a poison
message is moved aside, never dropped, and never stops what comes after it.

A letter keeps the trace context of what it refuses (`ingest.trace`): the Kafka record's
`traceparent` and `tracestate` headers, or for a bridge letter the ones the bridge gave
the message, ride on the letter's record as headers, so a refused message can be
followed too.

The original bytes are kept whole, so a dead letter can be replayed after a fix
(`usagepipe.dlq`); `DeadLetterReader` reads the topic back for that, with no group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from ingest.errors import BrokerUnavailable
from ingest.kafka import CONSUMER_SAFETY, running
from ingest.offsets import ContiguousOffsets
from ingest.settings import KafkaSettings
from ingest.trace import record_traceparent, trace_headers
from schemas.dead_letter import DeadLetterMessage, DeadLetterSource, SourceKind
from schemas.errors import InvalidTelemetry, Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused message: the record published on the dead-letter topic, and its key."""

    doc: DeadLetterMessage
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    """The trace headers of the refused message, put on the letter's record."""

    @classmethod
    def from_error(
        cls,
        error: InvalidTelemetry,
        *,
        topic: str,
        partition: int | None,
        offset: int | None,
        key: bytes | None,
        original: bytes,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> DeadLetter:
        """The dead letter for `original`, refused with `error`.

        A Kafka record gives its topic, partition and offset; an MQTT message (refused
        by the bridge) gives its MQTT topic, and None for partition and offset.
        """
        doc = DeadLetterMessage(
            reason=error.reason,
            message=error.message,
            source=DeadLetterSource(topic=topic, partition=partition, offset=offset),
            original_b64=base64.b64encode(original).decode("ascii"),
            failed_at=datetime.now(UTC),
        )
        return cls(doc, key, tuple(headers))

    @classmethod
    def for_record(cls, error: InvalidTelemetry, record: ConsumerRecord) -> DeadLetter:
        """The dead letter for a Kafka record the consumer refused with `error`."""
        return cls.from_error(
            error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            original=record.value if record.value is not None else b"",
            headers=trace_headers(record.headers),
        )

    def to_json(self) -> bytes:
        return self.doc.model_dump_json().encode()

    @classmethod
    def from_json(
        cls, raw: bytes, key: bytes | None = None, headers: Sequence[tuple[str, bytes]] = ()
    ) -> DeadLetter:
        """Read one record of the dead-letter topic (its value, key and trace headers);
        raises pydantic's ValidationError."""
        return cls(DeadLetterMessage.model_validate_json(raw), key, trace_headers(headers))

    @property
    def trace_id(self) -> str | None:
        """The trace id of the refused message, if it was traced."""
        parent = record_traceparent(self.headers)
        return None if parent is None else parent.trace_id

    @property
    def reason(self) -> Reason:
        return self.doc.reason

    @property
    def message(self) -> str:
        return self.doc.message

    @property
    def original(self) -> bytes:
        return base64.b64decode(self.doc.original_b64)

    @property
    def topic(self) -> str:
        """The Kafka topic, or for a message the bridge refused, the MQTT topic."""
        return self.doc.source.topic

    @property
    def partition(self) -> int | None:
        return self.doc.source.partition

    @property
    def offset(self) -> int | None:
        return self.doc.source.offset

    @property
    def kind(self) -> SourceKind:
        """`kafka` if the consumer refused it, `mqtt` if the bridge did."""
        return self.doc.source.kind

    @property
    def failed_at(self) -> datetime:
        return self.doc.failed_at


def letter_device(letter: DeadLetter) -> str | None:
    """The device a letter is of: its Kafka key (the device id of its MQTT topic)."""
    return None if letter.key is None else letter.key.decode("utf-8", "replace")


async def send_dead_letters(
    producer: AIOKafkaProducer, topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Send `letters` and return once Kafka confirmed every one (acks=all)."""
    if not letters:
        return
    pending = [
        await producer.send(
            topic, value=letter.to_json(), key=letter.key, headers=list(letter.headers) or None
        )
        for letter in letters
    ]
    await asyncio.gather(*pending)


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """One record of the dead-letter topic: where it is, and the letter it holds.

    `letter` is None for a record that is not a dead letter (`problem` says why): the
    topic is written only by usagepipe, but a reader must not stop at a stray record.
    """

    partition: int
    offset: int
    letter: DeadLetter | None
    problem: str = ""

    @property
    def position(self) -> str:
        """`partition:offset` in the dead-letter topic, as `usagepipe dlq show` takes it."""
        return f"{self.partition}:{self.offset}"


class DeadLetterReader:
    """Reads the dead-letter topic from `start` to its end: `async for stored in reader`.

    A plain consumer with no group: it assigns every partition (or `partitions`), seeks
    each to `start` (the beginning by default), commits nothing and disturbs no one.
    The end is where a fetch brings nothing for `idle_s`: the local broker's
    ListOffsets(LATEST) is unreliable (Tansu answers 1 whatever the log holds), so end
    offsets are not asked for. Letters come in fetch order: each partition's in offset
    order, partitions interleaved.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        partitions: Collection[int] | None = None,
        start: int = 0,
        idle_s: float = 1.0,
        client_id: str = "usagepipe-dlq-reader",
    ) -> None:
        self._settings = settings
        self._partitions = partitions
        self._start = start
        self._idle_ms = int(idle_s * 1000)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=client_id,
            group_id=None,
            request_timeout_ms=settings.request_timeout_ms,
            **CONSUMER_SAFETY,
        )
        self._holes = ContiguousOffsets(self._consumer, None)
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        topic = self._settings.dlq_topic
        try:
            await self._stack.enter_async_context(running(self._consumer))
            known = self._consumer.partitions_for_topic(topic) or set()
            wanted = sorted(known if self._partitions is None else known & set(self._partitions))
            assigned = [TopicPartition(topic, p) for p in wanted]
            self._consumer.assign(assigned)
            if assigned and self._start > 0:
                for tp in assigned:
                    self._consumer.seek(tp, self._start)
            elif assigned:
                await self._consumer.seek_to_beginning(*assigned)
        except KafkaError as exc:
            await self.close()
            raise BrokerUnavailable(
                f"Kafka at {self._settings.bootstrap_servers} could not be read: {exc!r}"
            ) from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the consumer; harmless when already closed."""
        await self._stack.aclose()

    def __aiter__(self) -> AsyncIterator[StoredLetter]:
        return self._read()

    async def _read(self) -> AsyncIterator[StoredLetter]:
        if not self._consumer.assignment():
            return  # no such topic yet: nothing was ever dead-lettered
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=self._idle_ms)
            except KafkaError as exc:
                raise BrokerUnavailable(f"reading {self._settings.dlq_topic}: {exc!r}") from exc
            if not batch:
                return
            batch = self._holes.admit(batch)
            for tp in sorted(batch, key=lambda tp: tp.partition):
                for record in batch[tp]:
                    yield _stored(tp.partition, record)


def _stored(partition: int, record: ConsumerRecord) -> StoredLetter:
    value: bytes = record.value if record.value is not None else b""
    try:
        letter = DeadLetter.from_json(value, record.key, record.headers)
    except ValidationError as exc:
        log.warning("record %d:%d is not a dead letter", partition, record.offset)
        return StoredLetter(partition, record.offset, None, f"not a dead letter: {exc}")
    return StoredLetter(partition, record.offset, letter)
