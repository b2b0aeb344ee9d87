"""The dead letter: what the pipeline writes to `telemetry.dlq` for a refused message.

It keeps the original bytes (base64, since they may not even be UTF-8) and where they
came from, so a fixed consumer can replay them, and says why they were refused in a
machine-readable `reason` and a `message` for the person reading it. Declared here so
the AsyncAPI document and the code that writes dead letters share one definition.

Two places refuse messages, so a source is one of two kinds:

    refused by the consumer (read from Kafka):
        {"topic": "telemetry.raw", "partition": 3, "offset": 1234}
    refused by the bridge (never reached Kafka):
        {"topic": "devices/wm-000017/telemetry", "partition": null, "offset": null}

`partition` and `offset` are both set or both null; `DeadLetterSource.kind` names the
kind ("kafka" or "mqtt") from that, so the Kafka-sourced shape stays the one already
published.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.errors import Reason

SourceKind = Literal["kafka", "mqtt"]

# Standard base64 with padding, as `base64.b64encode` writes it (no line breaks).
_BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class DeadLetterSource(BaseModel):
    """Where the refused message was read.

    A Kafka record (refused by the consumer): its topic, partition and offset. An MQTT
    message (refused by the bridge before it reached Kafka): its MQTT topic, with
    `partition` and `offset` null.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        # What `_both_or_neither` checks, for readers of the JSON Schema.
        json_schema_extra={
            "oneOf": [
                {
                    "title": "kafka",
                    "properties": {"partition": {"type": "integer"}, "offset": {"type": "integer"}},
                },
                {
                    "title": "mqtt",
                    "properties": {"partition": {"type": "null"}, "offset": {"type": "null"}},
                },
            ]
        },
    )

    topic: Annotated[
        str, Field(description="The Kafka topic, or the MQTT topic the device published to.")
    ]
    partition: Annotated[
        int | None, Field(ge=0, description="The Kafka partition; null for an MQTT source.")
    ]
    offset: Annotated[
        int | None, Field(ge=0, description="The Kafka offset; null for an MQTT source.")
    ]

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if (self.partition is None) != (self.offset is None):
            raise ValueError("partition and offset are both set (Kafka) or both null (MQTT)")
        return self

    @property
    def kind(self) -> SourceKind:
        """The source's kind: `kafka` (read by the consumer) or `mqtt` (by the bridge)."""
        return "mqtt" if self.partition is None else "kafka"


class DeadLetterMessage(BaseModel):
    """One refused message on `telemetry.dlq`, keyed like the original (the device id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: Reason
    message: str
    source: DeadLetterSource
    original_b64: Annotated[
        str, Field(pattern=_BASE64_PATTERN, json_schema_extra={"contentEncoding": "base64"})
    ]
    failed_at: AwareDatetime
