"""The telemetry contract: the envelope every device sends, the body models of each
appliance category and their versions, and the consumer's validation of raw message
bytes (`parse_telemetry`), which refuses bad input with exactly one `Reason`; and
`errors.UsagepipeError`, the base of every usagepipe error, whose module draws the tree."""

from schemas.envelope import Envelope
from schemas.errors import InvalidTelemetry, Reason
from schemas.parse import parse_telemetry

__all__ = ["Envelope", "InvalidTelemetry", "Reason", "parse_telemetry"]
