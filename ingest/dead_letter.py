"""Dead letters: messages that can never become rows, kept with why and where from.

Each dead letter is one JSON record on `kafka.dlq_topic`, keyed like the original:

    {"reason": "schema_violation", "message": "body.spin_rpm: ...",
     "source": {"topic": "telemetry.raw", "partition": 3, "offset": 1234},
     "original_b64": "...", "failed_at": "2026-11-23T10:00:00+00:00"}

The original bytes are kept whole, so a dead letter can be replayed after a fix. The
consumer commits a batch's offsets only after Kafka confirmed its dead letters: a poison
message is moved aside, never dropped, and never stops its partition.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from schemas.errors import InvalidTelemetry, Reason


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused message, its reason and its origin."""

    reason: Reason
    message: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    original: bytes
    failed_at: datetime

    @classmethod
    def from_error(
        cls,
        error: InvalidTelemetry,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        original: bytes,
    ) -> DeadLetter:
        return cls(
            error.reason,
            error.message,
            topic,
            partition,
            offset,
            key,
            original,
            datetime.now(UTC),
        )

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason.value,
                "message": self.message,
                "source": {
                    "topic": self.topic,
                    "partition": self.partition,
                    "offset": self.offset,
                },
                "original_b64": base64.b64encode(self.original).decode(),
                "failed_at": self.failed_at.isoformat(),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes, key: bytes | None = None) -> DeadLetter:
        doc: dict[str, Any] = orjson.loads(raw)
        source = doc["source"]
        return cls(
            Reason(doc["reason"]),
            doc["message"],
            source["topic"],
            int(source["partition"]),
            int(source["offset"]),
            key,
            base64.b64decode(doc["original_b64"]),
            datetime.fromisoformat(doc["failed_at"]),
        )


async def send_dead_letters(
    producer: AIOKafkaProducer, topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Send `letters` and return once Kafka confirmed every one (acks=all)."""
    if not letters:
        return
    pending = [
        await producer.send(topic, value=letter.to_json(), key=letter.key) for letter in letters
    ]
    await asyncio.gather(*pending)
