"""The envelope every device publishes, whatever its category.

A device publishes one JSON object per message to `devices/{device_id}/telemetry`:

    {"device_id": "wm-000017", "boot_id": "b7f3c2", "seq": 42,
     "event_time": "2026-11-23T19:04:05.120+09:00",
     "schema": "washer.cycle", "schema_version": 2, "body": {...}}

`(device_id, boot_id, seq)` names a message for good: a device restarts its sequence at
0 with a new boot id, so the pair survives reboots. The pipeline is at-least-once end
to end, and the store keeps exactly one row per key; `event_time` is the device's clock,
never the time the message arrived.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, cast

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, create_model

# Safe inside an MQTT topic level and a Kafka key: no '/', '+', '#', spaces or NUL.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
SCHEMA_NAME_PATTERN = r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$"

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
BootId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Seq = Annotated[int, Field(ge=0, lt=2**63)]
SchemaName = Annotated[str, StringConstraints(pattern=SCHEMA_NAME_PATTERN)]


class Envelope(BaseModel):
    """One telemetry message as the device sent it (body not yet checked by category)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        populate_by_name=True,
    )

    device_id: DeviceId
    boot_id: BootId
    seq: Seq
    event_time: AwareDatetime
    schema_name: SchemaName = Field(alias="schema")
    schema_version: Annotated[int, Field(ge=1, le=1000)]
    body: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, int]:
        """The message's identity: at most one stored row per key."""
        return (self.device_id, self.boot_id, self.seq)

    @property
    def category(self) -> str:
        """The appliance category, the schema name's first part (`washer`)."""
        return self.schema_name.split(".", 1)[0]


class Telemetry(NamedTuple):
    """A valid message as the consumer uses it (`schemas.parse.parse_message`): the
    envelope's fields (`event_time` in UTC), the body at its schema's current version
    as JSON-ready data, and that body as JSON text (fields in the model's order, so the
    same message always gives the same text). A tuple: cheaper to make than a model,
    by a microsecond a message."""

    device_id: str
    boot_id: str
    seq: int
    event_time: datetime
    schema_name: str
    schema_version: int
    body: dict[str, Any]
    body_json: str

    @property
    def key(self) -> tuple[str, str, int]:
        """The message's identity: at most one stored row per key."""
        return (self.device_id, self.boot_id, self.seq)


def typed_envelope(schema_name: str, version: int, body: type[BaseModel]) -> type[Envelope]:
    """The envelope of one version of one schema, its body validated as `body` in the
    same pass: `schema` and `schema_version` are literals, so a union of these
    discriminated by `schema` picks the one body model a message needs (see
    `schemas.catalog.current_envelopes`). The other fields are the `Envelope`'s own."""
    name = "".join(part.title() for part in schema_name.replace(".", "_").split("_"))
    typed: type[Envelope] = create_model(
        f"{name}V{version}Envelope",
        __base__=Envelope,
        schema_name=(cast(Any, Literal)[schema_name], Field(alias="schema")),
        schema_version=(cast(Any, Literal)[version], ...),
        body=(body, ...),
    )
    return typed


def telemetry_topic(device_id: str, prefix: str = "") -> str:
    """The MQTT topic a device publishes to (`prefix` isolates test runs)."""
    return f"{prefix}devices/{device_id}/telemetry"


def envelope_dict(
    *,
    device_id: str,
    boot_id: str,
    seq: int,
    event_time: datetime,
    schema_name: str,
    schema_version: int,
    body: dict[str, Any],
) -> dict[str, Any]:
    """The JSON object a device sends, with the envelope's wire names."""
    return {
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": seq,
        "event_time": event_time.isoformat(),
        "schema": schema_name,
        "schema_version": schema_version,
        "body": body,
    }
