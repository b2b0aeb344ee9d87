"""Where a Kafka record becomes a usage row: a `getmany()` batch validated into rows
to store and dead letters, the row type as the usage table stores it, and the Kafka
position the batch ends at."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from ingest.dead_letter import DeadLetter
from ingest.rate_limit import DeviceRateLimiter
from ingest.settings import Settings
from schemas.envelope import Envelope, Telemetry
from schemas.errors import InvalidTelemetry, Reason
from schemas.parse import parse_message

COLUMNS = (
    "device_id",
    "boot_id",
    "seq",
    "event_time",
    "schema",
    "schema_version",
    "body",
    "model",
    "firmware",
    "region",
    "kafka_partition",
    "kafka_offset",
    "category",
    "membership_tier",
    "purchase_channel",
    "analytics_consent",
    "owner_key",
)

ID_COLUMNS = ("device_id", "boot_id", "seq", "event_time", "digest")
"""The columns of `<table>_ids` (migration 007): a stored message's id, the event time
its row has, and `content_digest` of the rest of what the device sent."""


def content_digest(record: tuple[Any, ...]) -> bytes:
    """What tells a resend from another message with the same id, besides the event
    time: 8 bytes of BLAKE2b over the schema, its version and the body's JSON text of a
    `UsageRow.record()` (the validated body, fields in the model's order, so the same
    message always gives the same text). About 0.5 us a row."""
    text = f"{record[4]}\x00{record[5]}\x00{record[6]}"
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


@dataclass(slots=True)
class UsageRow:
    """One stored usage event, as the consumer hands it to the store.

    The fields after `kafka_offset` are filled by `ingest.enrich` from the device
    registry (None where the registry has nothing, or the owner does not consent):
    model, firmware and region are also the rollups' grouping keys.

    `body` is the body as `schemas.parse` parsed it, once; `body_json` its JSON text
    as the parser wrote it (`schemas.envelope.Telemetry`), which `record()` hands to the
    store's COPY (rows built without it have their body dumped there). `source` is the
    Kafka record the row came from (None for rows built otherwise): a row the consumer
    refuses after validation (an unregistered device) is dead-lettered with its
    original bytes.

    Not frozen, though no stage changes a row (enrichment makes a new one): a frozen
    dataclass sets each of its 19 fields through `object.__setattr__`, which made
    building a row 2.5 times as dear, and every message builds two.
    """

    device_id: str
    boot_id: str
    seq: int
    event_time: datetime
    schema: str
    schema_version: int
    body: dict[str, Any]
    kafka_partition: int
    kafka_offset: int
    model: str | None = None
    firmware: str | None = None
    region: str | None = None
    category: str | None = None
    membership_tier: str | None = None
    purchase_channel: str | None = None
    analytics_consent: bool | None = None
    owner_key: str | None = None
    source: ConsumerRecord | None = field(default=None, compare=False, repr=False)
    body_json: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_envelope(
        cls,
        env: Envelope | Telemetry,
        partition: int,
        offset: int,
        source: ConsumerRecord | None = None,
    ) -> UsageRow:
        return cls(
            env.device_id,
            env.boot_id,
            env.seq,
            # In UTC, with the standard library's tzinfo: the device's own offset says
            # nothing the instant does not, and every later use (COPY, buckets) reads
            # the offset of a datetime.timezone several times faster than pydantic's.
            env.event_time.astimezone(UTC),
            env.schema_name,
            env.schema_version,
            env.body,
            partition,
            offset,
            source=source,
            body_json=env.body_json if isinstance(env, Telemetry) else None,
        )

    @property
    def key(self) -> tuple[str, str, int, datetime]:
        """The row's identity in the table: (device, boot, seq, event time)."""
        return (self.device_id, self.boot_id, self.seq, self.event_time)

    def record(self) -> tuple[Any, ...]:
        """The row in `COLUMNS` order, for COPY (the body as JSON text)."""
        return (
            self.device_id,
            self.boot_id,
            self.seq,
            self.event_time,
            self.schema,
            self.schema_version,
            orjson.dumps(self.body).decode() if self.body_json is None else self.body_json,
            self.model,
            self.firmware,
            self.region,
            self.kafka_partition,
            self.kafka_offset,
            self.category,
            self.membership_tier,
            self.purchase_channel,
            self.analytics_consent,
            self.owner_key,
        )


@dataclass(frozen=True, slots=True)
class SourceOffset:
    """Where a consumer group is in one Kafka partition: the next offset to read, and
    the Kafka timestamp of the record just before it (to recognise the same log)."""

    topic: str
    partition: int
    next_offset: int
    last_timestamp: int | None


@dataclass(frozen=True, slots=True)
class Batch:
    """One `getmany()` result, validated: rows to store, letters to dead-letter."""

    rows: list[UsageRow]
    dead: list[DeadLetter]
    offsets: dict[TopicPartition, OffsetAndMetadata]
    records: int
    positions: list[SourceOffset]


def validate_batch(
    records: dict[TopicPartition, list[ConsumerRecord]],
    *,
    now: datetime,
    settings: Settings,
    limiter: DeviceRateLimiter | None = None,
) -> Batch:
    """Split Kafka records into storable rows and dead letters, and note the offsets.

    With `limiter`, a record over its device's rate is dead-lettered `rate_limited`
    before it is parsed (`ingest.rate_limit`)."""
    rows: list[UsageRow] = []
    dead: list[DeadLetter] = []
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    positions: list[SourceOffset] = []
    skew = settings.consumer.max_future_skew
    max_bytes = settings.bridge.max_payload_bytes
    # Retention drops older rows: at least one partition of time left for a refresh to
    # count an event before its partition goes (see ingest.rollups).
    max_age = settings.postgres.retention - settings.postgres.partition_interval
    count = 0
    for tp, batch in records.items():
        for record in batch:
            count += 1
            if limiter is not None and not limiter.admit(tp, record):
                dead.append(DeadLetter.for_record(limiter.refusal(record), record))
                continue
            value: bytes = record.value if record.value is not None else b""
            try:
                env = parse_message(
                    value, now=now, max_future_skew=skew, max_bytes=max_bytes, max_age=max_age
                )
            except InvalidTelemetry as error:
                dead.append(DeadLetter.for_record(error, record))
                continue
            try:
                rows.append(UsageRow.from_envelope(env, tp.partition, record.offset, record))
            except Exception as exc:  # one record's fault is a letter, never a crash
                dead.append(
                    DeadLetter.for_record(unstorable(exc, "could not be made a row"), record)
                )
        if batch:
            last = batch[-1]
            offsets[tp] = OffsetAndMetadata(last.offset + 1, "")
            positions.append(SourceOffset(tp.topic, tp.partition, last.offset + 1, last.timestamp))
    return Batch(rows, dead, offsets, count, positions)


def unstorable(exc: BaseException, what: str) -> InvalidTelemetry:
    """The refusal (`unstorable`) of a valid message the store cannot hold: `what`
    happened, and `exc` says why."""
    return InvalidTelemetry(Reason.UNSTORABLE, f"{what}: {type(exc).__name__}: {exc}")


def row_letter(row: UsageRow, error: InvalidTelemetry) -> DeadLetter:
    """The dead letter for a row refused after validation, from the record it came from."""
    if row.source is None:
        raise ValueError(f"row {row.key} has no Kafka record to dead-letter")
    return DeadLetter.for_record(error, row.source)


def unstorable_letters(refused: list[tuple[UsageRow, str]]) -> list[DeadLetter]:
    """Dead letters (`unstorable`) for rows PostgreSQL refused, each with its message."""
    return [
        row_letter(row, InvalidTelemetry(Reason.UNSTORABLE, f"PostgreSQL refused the row: {why}"))
        for row, why in refused
    ]


def conflict_letters(conflicts: list[tuple[UsageRow, str]]) -> list[DeadLetter]:
    """Dead letters (`conflicting_duplicate`) for resends whose message id is stored
    with other content, each saying what differs."""
    return [
        row_letter(row, InvalidTelemetry(Reason.CONFLICTING_DUPLICATE, why))
        for row, why in conflicts
    ]


def unregistered_letters(rows: list[UsageRow]) -> list[DeadLetter]:
    """Dead letters (`unregistered_device`) for `rows`, from the records they came from."""
    return [
        row_letter(
            r,
            InvalidTelemetry(
                Reason.UNREGISTERED_DEVICE,
                f"device_id: {r.device_id!r} is not registered in the device registry",
            ),
        )
        for r in rows
    ]
