"""Why a telemetry message was refused: machine-readable reason codes and one exception.

Every refused message ends in the dead-letter topic carrying one of these codes, so the
codes are part of the published contract: add new ones, never rename or reuse one.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Reason codes carried by dead letters (`telemetry.dlq`)."""

    OVERSIZE = "oversize"
    """The payload is larger than the configured limit."""
    INVALID_UTF8 = "invalid_utf8"
    """The payload is not valid UTF-8."""
    INVALID_JSON = "invalid_json"
    """The payload is not a JSON document (or not a JSON object)."""
    NON_FINITE_NUMBER = "non_finite_number"
    """A number is NaN or +/-Infinity, which JSON does not allow."""
    SCHEMA_VIOLATION = "schema_violation"
    """A field is missing, has the wrong type, or is out of range."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """The envelope names a schema that does not exist."""
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    """The schema exists, but not in the version the envelope names."""
    EVENT_TIME_IN_FUTURE = "event_time_in_future"
    """The device's event time is further ahead than the allowed clock skew."""
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    """The payload's device id differs from the one in its MQTT topic."""
    UNREGISTERED_DEVICE = "unregistered_device"
    """No registered device has this id."""


class InvalidTelemetry(ValueError):
    """A message that can never become a row, whatever is retried.

    `reason` is the machine-readable code, `message` says in words what was wrong and
    where (the field path for schema errors), for the person reading the dead letter.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
