"""Trace context: following one message from the device to its row, by W3C Trace Context.

A device may send its MQTT v5 PUBLISH with a user property `traceparent` in the W3C
format (https://www.w3.org/TR/trace-context/, the MQTT binding names the property the
same):

    00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
    version  trace id (32 hex)           parent id (16)  flags (01: sampled)

The bridge reads it (`ingest.mqtt_wire` finds it among the packet's properties) and
puts it on the Kafka record as the header `traceparent`, the same trace id with the
bridge's own span id as the new parent (a `tracestate` property rides along as it
is). A message without one gets a trace the bridge starts, sampled, for a fraction
`bridge.trace_sample_ratio` of them; the rest carry no header at all, which costs
nothing. A malformed traceparent is never a reason to refuse or hold a message: the
bridge counts it and starts a new trace in its place. The consumer logs the traced
records of each stored batch with the trace id beside the row's key and Kafka
position (`ingest.consumer`), and a refused one keeps its header on the dead-letter
topic (`ingest.dead_letter`).

Why sampled and not every message: at 150k msg/s a header on every record is about 70
bytes more per ~300-byte message into Kafka (some 10 MB/s before replication, random
hex that compresses poorly) and the id's making on the bridge's one core
(`bench/trace.py` measures both). A device that sends its own traceparent has decided
for itself and is always followed.

Parsing is strict, as the specification asks: lowercase hex only, version `ff`
refused, trace and parent ids not all zeros, exactly 55 characters for version 00; a
later version is read by its first four fields when the 56th character is `-`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import NamedTuple

TRACEPARENT = "traceparent"
"""The Kafka header and the MQTT user property, by the W3C name."""
TRACESTATE = "tracestate"
"""Vendor trace state, carried as it came beside a valid traceparent (W3C)."""
TRACESTATE_MAX_BYTES = 512
"""A tracestate longer than this is dropped (W3C: vendors may drop one over 512)."""

SAMPLED = 0x01

_FORMAT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
_LENGTH = 55
_DASH = 0x2D
_ODD_HEX = frozenset(b"13579bdf")

_getrandbits = random.Random().getrandbits
"""Ids need to be unique, not secret: Mersenne Twister (seeded from the OS) makes one
in a fraction of a microsecond, `os.urandom` costs a system call a message."""


def valid(raw: bytes) -> bool:
    """Whether `raw` is a traceparent the specification accepts (see the module's
    docstring); one regular expression and a few slices, no objects."""
    if len(raw) < _LENGTH or _FORMAT.match(raw) is None:
        return False
    version = raw[:2]
    if version == b"ff" or (len(raw) > _LENGTH and (version == b"00" or raw[_LENGTH] != _DASH)):
        return False
    return raw[3:35] != _ZERO_TRACE and raw[36:52] != _ZERO_PARENT


def start_header() -> bytes:
    """A `traceparent` for a new sampled trace and its first span (the bridge's)."""
    return b"00-%032x-%016x-01" % (_getrandbits(128) or 1, _getrandbits(64) or 1)


def child_header(raw: bytes) -> bytes | None:
    """The `traceparent` to send on for the received `raw`: the same trace id and flags
    with a new span id as the parent (written as version 00); None if `raw` is
    malformed. The bridge's per-message path: bytes in, bytes out."""
    if not valid(raw):
        return None
    return b"00%s%016x%s" % (raw[2:36], _getrandbits(64) or 1, raw[52:55])


def sampled_header(raw: bytes) -> bool:
    """Whether a `traceparent` value's flags say sampled, read without parsing it (the
    flags' last hex digit is odd); only meaningful for a valid one."""
    return len(raw) >= _LENGTH and raw[54] in _ODD_HEX


class TraceParent(NamedTuple):
    """One parsed W3C traceparent (version 00 as written here)."""

    trace_id: str
    parent_id: str
    flags: int

    @classmethod
    def parse(cls, value: bytes) -> TraceParent | None:
        """The traceparent in `value`, or None if it is not one the specification accepts."""
        if not valid(value):
            return None
        return cls(value[3:35].decode(), value[36:52].decode(), int(value[53:55], 16))

    @classmethod
    def start(cls, *, sampled: bool = True) -> TraceParent:
        """A new trace, with its first span."""
        return cls(f"{_getrandbits(128) or 1:032x}", f"{_getrandbits(64) or 1:016x}", int(sampled))

    def child(self) -> TraceParent:
        """The same trace, with a new span as the parent of what comes next (the flags
        as they were: the sampling decision is the trace's)."""
        return TraceParent(self.trace_id, f"{_getrandbits(64) or 1:016x}", self.flags)

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def header(self) -> bytes:
        """The value for a `traceparent` header (version 00)."""
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags & 0xFF:02x}".encode()


def header_value(headers: Sequence[tuple[str, bytes]], name: str = TRACEPARENT) -> bytes | None:
    """The value of the header `name` among a Kafka record's headers, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def record_traceparent(headers: Sequence[tuple[str, bytes]] | None) -> TraceParent | None:
    """The traceparent among a Kafka record's headers (a sequence of (name, bytes)), or
    None if it has none or a malformed one."""
    raw = header_value(headers) if headers else None
    return None if raw is None else TraceParent.parse(raw)


def trace_headers(headers: Sequence[tuple[str, bytes]] | None) -> tuple[tuple[str, bytes], ...]:
    """The trace headers (traceparent, tracestate) among a Kafka record's headers, to
    carry onto a record made from it (a dead letter)."""
    if not headers:
        return ()
    return tuple(
        (name, value)
        for name, value in headers
        if name in (TRACEPARENT, TRACESTATE) and isinstance(value, bytes)
    )
