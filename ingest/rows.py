"""A usage row: one validated telemetry message as the usage table stores it, and the
Kafka position a batch of them ends at."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.envelope import Envelope

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


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One stored usage event, as the consumer hands it to the store.

    The fields after `kafka_offset` are filled by `ingest.enrich` from the device
    registry (None where the registry has nothing, or the owner does not consent):
    model, firmware and region are also the rollups' grouping keys.
    """

    device_id: str
    boot_id: str
    seq: int
    event_time: datetime
    schema: str
    schema_version: int
    body_json: str
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

    @classmethod
    def from_envelope(cls, env: Envelope, partition: int, offset: int) -> UsageRow:
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
            orjson.dumps(env.body).decode(),
            partition,
            offset,
        )

    @property
    def key(self) -> tuple[str, str, int, datetime]:
        """The row's identity in the table: (device, boot, seq, event time)."""
        return (self.device_id, self.boot_id, self.seq, self.event_time)

    def record(self) -> tuple[Any, ...]:
        """The row in `COLUMNS` order, for COPY."""
        return (
            self.device_id,
            self.boot_id,
            self.seq,
            self.event_time,
            self.schema,
            self.schema_version,
            self.body_json,
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
