"""The consumer's full check of one Kafka message value: bytes in, a valid Envelope out.

The rules run in a fixed order and the first one that fails names the reason, so every
refused message carries exactly one reason code:

    1. size > max_bytes                          -> OVERSIZE
    2. not valid UTF-8                           -> INVALID_UTF8
    3. not JSON, or not a JSON object            -> INVALID_JSON
       the same key twice in one object          -> DUPLICATE_KEY
    4. NaN, Infinity, -Infinity or a number that
       overflows a double (1e400) anywhere       -> NON_FINITE_NUMBER
    5. envelope fields wrong, or a NUL character
       (\\u0000) in any string or key            -> SCHEMA_VIOLATION
    6. event_time > now + max_future_skew        -> EVENT_TIME_IN_FUTURE
       event_time < now - max_age                -> EVENT_TIME_EXPIRED
    7. body wrong for its schema and version     -> UNKNOWN_SCHEMA,
                                                    UNKNOWN_SCHEMA_VERSION,
                                                    SCHEMA_VIOLATION

Speed: a valid message is parsed once, by pydantic's own JSON parser, straight into the
typed envelope of its schema's current version (`schemas.catalog.current_envelopes`: a
union discriminated by `schema`, so envelope and body are validated in one pass, with no
dict in between); `parse_message` returns it as a `Telemetry` tuple with the body's JSON
text, which the store writes as it is. Decoding with orjson first and then validating the
dict measured slower, because the envelope's `event_time` then has to be converted from
a string in a second step. That parser accepts NaN and Infinity and turns 1e400 into
inf; the body models refuse them. Only a message that one pass refuses (or one of an
older schema version, which is validated as that version and upgraded) goes through the
rules one by one (`_parse_by_rules`: the envelope, then its body from a dict) to name
the first rule it breaks. That is slower, but refused and old messages are rare.
`python bench/validate.py` prints the cost of each stage.

A NUL character is valid JSON but PostgreSQL stores it in neither text nor jsonb: a
message holding one would be refused by the store after it passed here. It can only
be written as the escape `\\u0000`, so only a message whose bytes hold that escape is
searched for one (a byte scan, free for every other message).

A key given twice in one object (`{"seq": 14, "seq": 1014}`) is refused: the parser
keeps the last value, other JSON readers the first, so the message has no one meaning.
Finding one costs two byte counts, not a second parse: a message holds twice as many
`"` as the keys and strings it parses into, and each key dropped by a repeat leaves two
more (`_may_repeat_keys`, which also says when that count cannot be trusted). Only a
message whose count disagrees is parsed again, key by key, to name the repeated key
and where.

Integers are kept exact: a body value of 10**30 reaches the model unchanged and is
refused by its range check. Numbers with more than 4300 digits, and JSON nested deeper
than 200 levels, are refused by the parser as INVALID_JSON.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError
from pydantic_core import from_json

from schemas.catalog import current_envelopes, validate_body, violation_message
from schemas.envelope import Envelope, Telemetry
from schemas.errors import InvalidTelemetry, Reason


def parse_telemetry(
    raw: bytes,
    *,
    now: datetime,
    max_future_skew: timedelta,
    max_bytes: int,
    max_age: timedelta | None = None,
) -> Envelope:
    """Validate one message value and return its envelope with a current-version body.

    `now` is the receive time (timezone-aware) that `event_time` is compared with;
    `max_future_skew` is how far ahead a device's clock may run, `max_age` how far back
    an event may lie (None: any age; an event time before year 1 in UTC is refused
    whatever it is, since no timestamp holds it). The returned envelope's
    `schema_version` is the schema's current version and `body` is the validated,
    upgraded body as JSON-ready data; `event_time` is the instant the device wrote, in
    UTC. Raises `InvalidTelemetry` with exactly one reason.
    """
    t = parse_message(
        raw, now=now, max_future_skew=max_future_skew, max_bytes=max_bytes, max_age=max_age
    )
    return Envelope.model_construct(
        device_id=t.device_id,
        boot_id=t.boot_id,
        seq=t.seq,
        event_time=t.event_time,
        schema_name=t.schema_name,
        schema_version=t.schema_version,
        body=t.body,
    )


def parse_message(
    raw: bytes,
    *,
    now: datetime,
    max_future_skew: timedelta,
    max_bytes: int,
    max_age: timedelta | None = None,
) -> Telemetry:
    """`parse_telemetry`, for the consumer: the same checks, the same refusals, and the
    valid message as a `Telemetry` tuple with its body's JSON text and its event time
    in UTC (the same instant)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if len(raw) > max_bytes:
        raise InvalidTelemetry(
            Reason.OVERSIZE, f"payload is {len(raw)} bytes, more than the {max_bytes} allowed"
        )
    try:
        typed: Any = _ONE_PASS.validate_json(raw)  # its schema's envelope, the body a model
    except ValidationError:
        env = _parse_by_rules(raw, now=now, max_future_skew=max_future_skew, max_age=max_age)
        return _telemetry(
            (
                env.device_id,
                env.boot_id,
                env.seq,
                env.event_time.astimezone(UTC),
                env.schema_name,
                env.schema_version,
                env.body,
                orjson.dumps(env.body).decode(),
            )
        )
    body = typed.body
    # The body model's own serializer: the same text as orjson's of its dump (fields in
    # order, compact), a third of the cost. A body holds only JSON scalars and lists of
    # them (`schemas.appliance`), so the model's field values are its JSON-ready dump.
    text: bytes = body.__pydantic_serializer__.to_json(body)
    if raw.count(b'"') != _ENVELOPE_QUOTES + text.count(b'"') or b"\\" in text:
        _refuse_duplicate_key(raw)
    if b"\\u0000" in raw:
        _refuse_nul(raw)
    # A body its model accepts holds only finite numbers: rule 4 has nothing to find.
    # Compared in UTC, as the row keeps it: two datetimes of one tzinfo compare without
    # asking it for offsets (pydantic's asks Rust, each time). The messages say the
    # time as the device wrote it.
    event_time = typed.event_time
    try:
        at = event_time.astimezone(UTC)
    except OverflowError:  # beyond either end of the calendar in UTC: refused below
        at = event_time
    if at > now + max_future_skew:
        raise _in_future(event_time, now, max_future_skew)
    if event_time.year == 1 or (max_age is not None and at < now - max_age):
        expired = _expired(event_time, now, max_age)
        if expired is not None:
            raise InvalidTelemetry(Reason.EVENT_TIME_EXPIRED, expired)
    return _telemetry(
        (
            typed.device_id,
            typed.boot_id,
            typed.seq,
            at,
            typed.schema_name,
            typed.schema_version,
            dict(body.__dict__),
            text.decode(),
        )
    )


_ONE_PASS = current_envelopes().validator
"""The TypeAdapter's validator itself: its `validate_json` wrapper sorts out options
this call does not pass, on every message."""


def _telemetry(fields: tuple[Any, ...]) -> Telemetry:
    """A Telemetry of its fields in order: the tuple made in one call, without the
    named tuple's generated `__new__` (a Python frame a message)."""
    return tuple.__new__(Telemetry, fields)


def _parse_by_rules(
    raw: bytes, *, now: datetime, max_future_skew: timedelta, max_age: timedelta | None
) -> Envelope:
    """The rules one at a time, for a message the one-pass validator refused (or of an
    older version): the first rule it breaks is raised, else its envelope with the
    body upgraded to the current version."""
    try:
        envelope = Envelope.model_validate_json(raw)
    except ValidationError as exc:
        raise _first_failed_rule(raw, exc) from None
    if _may_repeat_keys(raw, envelope.body):
        _refuse_duplicate_key(raw)
    if b"\\u0000" in raw:
        _refuse_nul(raw)

    # A body its model accepts holds only finite numbers (every body model refuses NaN
    # and infinity and has no free-form fields), so rule 4's scan of the body only runs
    # for messages that break a later rule, to report the earlier one first.
    if envelope.event_time > now + max_future_skew:
        _refuse_non_finite(envelope.body)
        raise _in_future(envelope.event_time, now, max_future_skew)
    expired = _expired(envelope.event_time, now, max_age)
    if expired is not None:
        _refuse_non_finite(envelope.body)
        raise InvalidTelemetry(Reason.EVENT_TIME_EXPIRED, expired)
    try:
        version, body = validate_body(envelope.schema_name, envelope.schema_version, envelope.body)
    except InvalidTelemetry:
        _refuse_non_finite(envelope.body)
        raise

    if version == envelope.schema_version:
        # The envelope was built from `raw` a moment ago and nobody else holds it, so its
        # body dict takes the validated body in place: model_copy() costs about as much
        # as validating the body itself, on every message.
        envelope.body.clear()
        envelope.body.update(body)
        return envelope
    return envelope.model_copy(update={"schema_version": version, "body": body})


def _in_future(event_time: datetime, now: datetime, skew: timedelta) -> InvalidTelemetry:
    return InvalidTelemetry(
        Reason.EVENT_TIME_IN_FUTURE,
        f"event_time: {event_time.isoformat()} is {event_time - now} ahead of the receive"
        f" time {now.isoformat()}, more than the allowed skew of {skew}",
    )


def _expired(event_time: datetime, now: datetime, max_age: timedelta | None) -> str | None:
    """Why `event_time` is too old, or None: before year 1 in UTC
    (`0001-01-01T00:00:00+14:00`, which converting to UTC overflows), or more than
    `max_age` before `now`."""
    if event_time.year == 1:  # the one year where the conversion can overflow
        try:
            event_time.astimezone(UTC)
        except OverflowError:
            return f"event_time: {event_time.isoformat()} is before year 1 in UTC"
    if max_age is not None and event_time < now - max_age:
        return (
            f"event_time: {event_time.isoformat()} is older than the {max_age} before the"
            f" receive time {now.isoformat()} that the store keeps"
        )
    return None


_ENVELOPE_QUOTES = 2 * (7 + 4)
"""The `"` of a valid envelope outside its body: 7 keys, 4 strings (device_id, boot_id,
event_time, schema; strict, so each is a JSON string and no other field is)."""


def _may_repeat_keys(raw: bytes, body: dict[str, Any]) -> bool:
    """Whether `raw`, which parsed into a valid envelope with `body`, may hold a key
    twice in one object; False means it holds none.

    Every key and string in raw is delimited by two `"`; raw's other `"` are escaped
    ones inside strings. orjson writes the parsed body the same way, escaping each `"`
    inside a string. So where the parsed body's strings hold no `"`, raw holds at least
    the envelope's and the dump's count, more exactly when a repeated key was dropped
    (with two `"` at least) or boot_id holds an escaped `"` (then the slow check finds
    nothing). A body whose dump holds a backslash (a string holding a `"`, which raw
    may write `\\u0022` so that no count sees it) always takes the slow check. About
    0.7 us of a valid message's 8 (measured against the same parse without it).
    """
    try:
        dumped = orjson.dumps(body)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, which the body refuses
        return True
    return raw.count(b'"') != _ENVELOPE_QUOTES + dumped.count(b'"') or b"\\" in dumped


def _refuse_duplicate_key(raw: bytes) -> None:
    """Raise DUPLICATE_KEY naming the first object of `raw` that holds a key twice, and
    the key; nothing if none does."""
    found = _duplicate_key(raw)
    if found is not None:
        raise InvalidTelemetry(Reason.DUPLICATE_KEY, found)


class _Repeated(dict[str, Any]):
    """A parsed JSON object that held `key` more than once."""

    key = ""


def _repeated_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`'s object hook: the object, marked if a key repeats."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            break
        seen.add(key)
    marked = _Repeated(obj)
    marked.key = key
    return marked


def _duplicate_key(raw: bytes) -> str | None:
    """Where the first key given twice in one object of `raw` is, as a message, or None
    (also for bytes that are not JSON: other rules name that)."""
    try:
        document = json.loads(raw, object_pairs_hook=_repeated_pairs)
    except (ValueError, RecursionError):
        return None
    return _repeated_path(document, "")


def _repeated_path(value: Any, path: str) -> str | None:
    if isinstance(value, _Repeated):
        where = f"{path}.{value.key}" if path else value.key
        return (
            f"{where}: the key {value.key!r} appears more than once in"
            f" {path or 'the envelope'}; a key may be given once"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            found = _repeated_path(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _repeated_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _refuse_nul(raw: bytes) -> None:
    """Raise SCHEMA_VIOLATION naming the first string or key of `raw` (a JSON object)
    that holds a NUL character; nothing if none does (the bytes held an escaped
    backslash followed by `u0000`)."""
    found = _nul_path(from_json(raw), "")
    if found is not None:
        raise InvalidTelemetry(
            Reason.SCHEMA_VIOLATION,
            f"{found}: holds a NUL character (\\u0000), which the store cannot keep",
        )


def _nul_path(value: Any, path: str) -> str | None:
    """Where the first NUL character in a parsed JSON value is (a string, or a key)."""
    if isinstance(value, str):
        return path or "envelope" if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else key
            if "\x00" in key:
                return f"{inner!r} (a key)"
            found = _nul_path(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _refuse_non_finite(body: dict[str, Any]) -> None:
    """Raise NON_FINITE_NUMBER if the envelope's body holds NaN or an infinity."""
    found = _non_finite_path(body, "body")
    if found is not None:
        raise InvalidTelemetry(Reason.NON_FINITE_NUMBER, found)


def _first_failed_rule(raw: bytes, exc: ValidationError) -> InvalidTelemetry:
    """Why a message the envelope model refused is invalid: the first rule it breaks."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as decode_error:
        return InvalidTelemetry(
            Reason.INVALID_UTF8,
            f"byte {decode_error.start}: {decode_error.reason} "
            f"({raw[decode_error.start : decode_error.start + 1]!r})",
        )
    try:
        document = from_json(raw)
    except ValueError as json_error:
        return InvalidTelemetry(Reason.INVALID_JSON, str(json_error))
    if not isinstance(document, dict):
        return InvalidTelemetry(
            Reason.INVALID_JSON,
            f"expected a JSON object, got a JSON {_json_type(document)}",
        )
    repeated = _duplicate_key(raw)
    if repeated is not None:
        return InvalidTelemetry(Reason.DUPLICATE_KEY, repeated)
    non_finite = _non_finite_path(document, "")
    if non_finite is not None:
        return InvalidTelemetry(Reason.NON_FINITE_NUMBER, non_finite)
    return InvalidTelemetry(Reason.SCHEMA_VIOLATION, violation_message(exc))


def _non_finite_path(value: Any, path: str) -> str | None:
    """Where the first NaN or infinite number in a parsed JSON value is, as a message.

    Paths are only built for nested containers and for a hit, so a flat clean body
    costs one type check per value.
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else _non_finite_message(path, value)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, float):
                if not math.isfinite(item):
                    return _non_finite_message(f"{path}.{key}" if path else key, item)
            elif isinstance(item, dict | list):
                found = _non_finite_path(item, f"{path}.{key}" if path else key)
                if found is not None:
                    return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, float | dict | list):
                found = _non_finite_path(item, f"{path}[{index}]")
                if found is not None:
                    return found
    return None


def _non_finite_message(path: str, value: float) -> str:
    what = "NaN" if math.isnan(value) else "Infinity (or a number too large for a double)"
    return f"{path or 'envelope'}: {what} is not a finite number"


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
