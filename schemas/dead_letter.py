"""The dead letter: what the consumer writes to `telemetry.dlq` for a refused message.

It keeps the original bytes (base64, since they may not even be UTF-8) and where they
came from, so a fixed consumer can replay them, and says why they were refused in a
machine-readable `reason` and a `message` for the person reading it. Declared here so
the AsyncAPI document and the code that writes dead letters share one definition.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.errors import Reason


class DeadLetterSource(BaseModel):
    """Where the refused message was read: its Kafka topic, partition and offset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]


class DeadLetterMessage(BaseModel):
    """One refused message on `telemetry.dlq`, keyed like the original (the device id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: Reason
    message: str
    source: DeadLetterSource
    original_b64: str
    failed_at: AwareDatetime
