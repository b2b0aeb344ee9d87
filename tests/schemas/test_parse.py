"""parse_telemetry: valid messages round-trip, and each kind of bad input gets exactly
the reason (and message) the contract promises."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from schemas import InvalidTelemetry, Reason, parse_telemetry
from schemas.catalog import SCHEMA_NAMES, current_version
from schemas.examples import example_body
from tests.schemas.conftest import (
    MAX_BYTES,
    NOW,
    encode,
    envelope,
    parse,
    washer_cycle_body,
)

VALID = encode(envelope())


def refused(
    raw: bytes, *, skew: timedelta = timedelta(0), max_bytes: int = MAX_BYTES
) -> InvalidTelemetry:
    with pytest.raises(InvalidTelemetry) as caught:
        parse(raw, skew=skew, max_bytes=max_bytes)
    return caught.value


def with_body(**changes: object) -> bytes:
    body = washer_cycle_body()
    body.update(changes)
    return encode(envelope(body=body))


@pytest.mark.parametrize("schema_name", SCHEMA_NAMES)
def test_every_schema_round_trips(schema_name: str) -> None:
    rng = random.Random(schema_name)
    for seq in range(50):
        body = example_body(schema_name, rng)
        document = envelope(schema_name, current_version(schema_name), body, seq=seq)

        parsed = parse(encode(document))

        assert parsed.device_id == "wm-000017"
        assert parsed.key == ("wm-000017", "b7f3c2", seq)
        assert parsed.event_time == NOW
        assert parsed.schema_name == schema_name
        assert parsed.category == schema_name.split(".", maxsplit=1)[0]
        assert parsed.schema_version == current_version(schema_name)
        assert parsed.body == body


def test_valid_message_at_the_size_limit_is_accepted() -> None:
    assert parse(VALID, max_bytes=len(VALID)).body == washer_cycle_body()


def test_oversize() -> None:
    error = refused(VALID, max_bytes=len(VALID) - 1)
    assert error.reason is Reason.OVERSIZE
    assert error.message == f"payload is {len(VALID)} bytes, more than the {len(VALID) - 1} allowed"


@pytest.mark.parametrize(
    "raw",
    [
        VALID.replace(b'"cotton"', b'"cott\xffn"'),
        # UTF-8-encoded surrogate: the stdlib's json would let it through.
        VALID.replace(b'"cotton"', b'"\xed\xa0\x80"'),
        # Broken UTF-8 in otherwise broken JSON: the encoding rule comes first.
        b'{"device_id": \xc3',
    ],
)
def test_invalid_utf8(raw: bytes) -> None:
    assert refused(raw).reason is Reason.INVALID_UTF8


def test_invalid_utf8_message_names_the_byte() -> None:
    raw = VALID.replace(b'"cotton"', b'"cott\xffn"')
    position = raw.index(b"\xff")
    error = refused(raw)
    assert error.message == f"byte {position}: invalid start byte (b'\\xff')"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        VALID[:-1],
        VALID + b"{}",
        b"{device_id: 1}",
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "\\ud800"}',
        b"[" * 300 + b"]" * 300,
        b'{"seq": ' + b"9" * 5000 + b"}",
    ],
    ids=["empty", "truncated", "trailing", "bare-key", "bom", "lone-surrogate", "deep", "digits"],
)
def test_invalid_json(raw: bytes) -> None:
    assert refused(raw).reason is Reason.INVALID_JSON


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(b"[1, 2]", "array"), (b'"washer"', "string"), (b"null", "null"), (b"42", "number")],
)
def test_json_that_is_not_an_object(raw: bytes, kind: str) -> None:
    error = refused(raw)
    assert error.reason is Reason.INVALID_JSON
    assert error.message == f"expected a JSON object, got a JSON {kind}"


@pytest.mark.parametrize(
    ("token", "what"),
    [
        (b"NaN", "NaN"),
        (b"Infinity", "Infinity (or a number too large for a double)"),
        (b"-Infinity", "Infinity (or a number too large for a double)"),
        (b"1e400", "Infinity (or a number too large for a double)"),
        (b"-1e400", "Infinity (or a number too large for a double)"),
    ],
)
def test_non_finite_number_in_body(token: bytes, what: str) -> None:
    raw = VALID.replace(b'"water_l":48.5', b'"water_l":' + token)
    error = refused(raw)
    assert error.reason is Reason.NON_FINITE_NUMBER
    assert error.message == f"body.water_l: {what} is not a finite number"


def test_non_finite_number_comes_before_envelope_errors() -> None:
    raw = VALID.replace(b'"seq":7', b'"seq":NaN')
    error = refused(raw)
    assert error.reason is Reason.NON_FINITE_NUMBER
    assert error.message == "seq: NaN is not a finite number"


def test_non_finite_number_in_a_field_the_schema_does_not_have() -> None:
    raw = VALID.replace(b'"options":["prewash"]', b'"options":["prewash",[{"x":NaN}]]')
    error = refused(raw)
    assert error.reason is Reason.NON_FINITE_NUMBER
    assert error.message == "body.options[1][0].x: NaN is not a finite number"


def test_non_finite_number_comes_before_event_time() -> None:
    raw = encode(envelope(event_time=NOW + timedelta(hours=1))).replace(b"48.5", b"NaN")
    assert refused(raw).reason is Reason.NON_FINITE_NUMBER


def test_non_finite_number_comes_before_unknown_schema() -> None:
    raw = encode(envelope("washer.spin", 1, {"x": 1.5})).replace(b"1.5", b"-Infinity")
    error = refused(raw)
    assert error.reason is Reason.NON_FINITE_NUMBER
    assert (
        error.message
        == "body.x: Infinity (or a number too large for a double) is not a finite number"
    )


def test_nan_inside_a_string_is_just_a_string() -> None:
    error = refused(with_body(program="NaN"))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message.startswith("body.program: Input should be 'cotton', ")


def test_huge_integer_is_kept_exact_and_refused_by_its_range() -> None:
    raw = VALID.replace(b'"spin_rpm":1200', b'"spin_rpm":' + b"9" * 30)
    error = refused(raw)
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == (
        f"body.spin_rpm: Input should be less than or equal to 1800 (got {'9' * 30})"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            with_body(spin_rpm=99999),
            "body.spin_rpm: Input should be less than or equal to 1800 (got 99999)",
        ),
        (
            with_body(spin_rpm="1200"),
            "body.spin_rpm: Input should be a valid integer (got '1200')",
        ),
        (with_body(spin_rpm=1200.0), "body.spin_rpm: Input should be a valid integer (got 1200.0)"),
        (with_body(spin_rpm=True), "body.spin_rpm: Input should be a valid integer (got True)"),
        (
            with_body(options="prewash"),
            "body.options: Input should be a valid list (got 'prewash')",
        ),
        (
            with_body(options=["prewash", "turbo"]),
            "body.options[1]: Input should be 'prewash', 'extra_rinse', 'steam', 'intensive', "
            "'time_saver' or 'anti_crease' (got 'turbo')",
        ),
        (
            with_body(trigger="alexa"),
            "body.trigger: Input should be 'panel', 'app_remote', 'voice' or 'schedule' "
            "(got 'alexa')",
        ),
        (with_body(colour="red"), "body.colour: Extra inputs are not permitted (got 'red')"),
    ],
    ids=[
        "range",
        "string-for-int",
        "float-for-int",
        "bool-for-int",
        "list",
        "item",
        "literal",
        "extra",
    ],
)
def test_body_schema_violation(raw: bytes, message: str) -> None:
    error = refused(raw)
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == message


def test_body_missing_field() -> None:
    body = washer_cycle_body()
    del body["trigger"]
    error = refused(encode(envelope(body=body)))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == "body.trigger: Field required"


def test_body_cross_field_check() -> None:
    body = {"interval_s": 60, "energy_wh": 500.0}
    error = refused(encode(envelope("washer.energy", 1, body)))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == (
        "body: Value error, energy_wh=500.0 over interval_s=60 means an average of "
        "30000 W, more than 10000 W"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq": "7"}, "seq: Input should be a valid integer (got '7')"),
        ({"seq": -1}, "seq: Input should be greater than or equal to 0 (got -1)"),
        ({"seq": 2**63}, f"seq: Input should be less than {2**63} (got {2**63})"),
        (
            {"device_id": "wm/17"},
            "device_id: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' "
            "(got 'wm/17')",
        ),
        (
            {"event_time": "2026-11-23T10:00:00"},
            "event_time: Input should have timezone info (got '2026-11-23T10:00:00')",
        ),
        (
            {"schema_version": 0},
            "schema_version: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"body": [1]}, "body: Input should be an object (got [1])"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted (got 'red')"),
    ],
    ids=[
        "string-seq",
        "negative-seq",
        "huge-seq",
        "device-id",
        "naive-time",
        "version-0",
        "body",
        "extra",
    ],
)
def test_envelope_schema_violation(change: dict[str, object], message: str) -> None:
    document = envelope()
    document.update(change)
    error = refused(encode(document))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == message


def test_envelope_missing_field() -> None:
    document = envelope()
    del document["event_time"]
    error = refused(encode(document))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == "event_time: Field required"


def test_unknown_schema() -> None:
    error = refused(encode(envelope("washer.spin", 1)))
    assert error.reason is Reason.UNKNOWN_SCHEMA
    assert error.message == "schema: 'washer.spin' is not in the catalog"


@pytest.mark.parametrize("version", [3, 1000])
def test_unknown_schema_version(version: int) -> None:
    error = refused(encode(envelope(version=version)))
    assert error.reason is Reason.UNKNOWN_SCHEMA_VERSION
    assert error.message == f"schema_version: washer.cycle has version(s) 1, 2, not {version}"


def test_v1_body_sent_as_v2_is_a_violation() -> None:
    body = {**washer_cycle_body(), "energy_kwh": 0.95}
    del body["energy_wh"], body["trigger"]
    error = refused(encode(envelope(version=2, body=body)))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == (
        "body.energy_wh: Field required; body.trigger: Field required; "
        "body.energy_kwh: Extra inputs are not permitted (got 0.95)"
    )


def test_event_time_in_future_without_skew() -> None:
    error = refused(encode(envelope(event_time=NOW + timedelta(seconds=1))))
    assert error.reason is Reason.EVENT_TIME_IN_FUTURE
    assert error.message == (
        "event_time: 2026-11-23T10:00:01+00:00 is 0:00:01 ahead of the receive time "
        "2026-11-23T10:00:00+00:00, more than the allowed skew of 0:00:00"
    )


def test_event_time_within_skew_is_accepted() -> None:
    raw = encode(envelope(event_time=NOW + timedelta(seconds=30)))
    assert parse(raw, skew=timedelta(seconds=30)).event_time == NOW + timedelta(seconds=30)


def test_event_time_beyond_skew() -> None:
    raw = encode(envelope(event_time=NOW + timedelta(seconds=31)))
    assert refused(raw, skew=timedelta(seconds=30)).reason is Reason.EVENT_TIME_IN_FUTURE


def test_event_time_in_another_zone_is_compared_as_an_instant() -> None:
    # 19:00 in Seoul is 10:00 UTC, exactly the receive time.
    raw = VALID.replace(b"2026-11-23T10:00:00+00:00", b"2026-11-23T19:00:00+09:00")
    assert parse(raw).event_time == NOW


def test_event_time_is_checked_before_the_body() -> None:
    document = envelope("washer.spin", 1, {"x": 1}, event_time=NOW + timedelta(days=1))
    assert refused(encode(document)).reason is Reason.EVENT_TIME_IN_FUTURE


def test_past_event_time_is_accepted() -> None:
    raw = encode(envelope(event_time=NOW - timedelta(days=30)))
    assert parse(raw).event_time == NOW - timedelta(days=30)


def test_an_event_older_than_the_store_keeps_is_expired() -> None:
    day = timedelta(days=1)
    kept = encode(envelope(event_time=NOW - 399 * day))
    at = parse_telemetry(kept, now=NOW, max_future_skew=day, max_bytes=MAX_BYTES, max_age=399 * day)
    assert at.event_time == NOW - 399 * day
    old = encode(envelope(event_time=NOW - 399 * day - timedelta(seconds=1)))
    with pytest.raises(InvalidTelemetry) as caught:
        parse_telemetry(old, now=NOW, max_future_skew=day, max_bytes=MAX_BYTES, max_age=399 * day)
    assert caught.value.reason is Reason.EVENT_TIME_EXPIRED
    assert caught.value.message == (
        "event_time: 2025-10-20T09:59:59+00:00 is older than the 399 days, 0:00:00 before"
        " the receive time 2026-11-23T10:00:00+00:00 that the store keeps"
    )


@pytest.mark.parametrize("event_time", ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z"])
def test_an_event_time_at_year_one_is_expired_not_a_crash(event_time: str) -> None:
    """Before year 1 in UTC no timestamp can hold it (converting it overflows)."""
    raw = VALID.replace(b"2026-11-23T10:00:00+00:00", event_time.encode())
    with pytest.raises(InvalidTelemetry) as caught:
        parse_telemetry(
            raw, now=NOW, max_future_skew=timedelta(0), max_bytes=MAX_BYTES,
            max_age=timedelta(days=399) if event_time.endswith("Z") else None,
        )  # fmt: skip
    assert caught.value.reason is Reason.EVENT_TIME_EXPIRED
    if event_time.endswith("+14:00"):
        assert caught.value.message == (
            "event_time: 0001-01-01T00:00:00+14:00 is before year 1 in UTC"
        )


def test_v1_message_is_returned_upgraded() -> None:
    body = {**washer_cycle_body(), "energy_kwh": 0.95}
    del body["energy_wh"], body["trigger"]

    parsed = parse(encode(envelope(version=1, body=body)))

    assert parsed.schema_version == 2
    assert parsed.body == {**washer_cycle_body(), "trigger": "panel"}


def test_naive_receive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_telemetry(
            VALID, now=NOW.replace(tzinfo=None), max_future_skew=timedelta(0), max_bytes=MAX_BYTES
        )


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"boot_id": "b\u0000oot"}, "boot_id"),
        ({"body": {**washer_cycle_body(), "options": ["pre\u0000wash"]}}, "body.options[0]"),
        ({"body": {**washer_cycle_body(), "no\u0000te": 1}}, "'body.no\\x00te' (a key)"),
    ],
    ids=["envelope-field", "body-value", "body-key"],
)
def test_a_nul_character_is_refused_where_it_is(change: dict[str, object], where: str) -> None:
    """PostgreSQL holds no NUL in text or jsonb: refused here, never by the store."""
    document = envelope()
    document.update(change)
    error = refused(encode(document))
    assert error.reason is Reason.SCHEMA_VIOLATION
    assert error.message == f"{where}: holds a NUL character (\\u0000), which the store cannot keep"


def test_an_escaped_backslash_before_u0000_is_no_nul() -> None:
    document = envelope()
    document["boot_id"] = "b\\u0000oot"  # a backslash, then u0000
    raw = encode(document)
    assert b"\\\\u0000" in raw
    assert parse(raw).boot_id == "b\\u0000oot"


def repeat_in_envelope(raw: bytes, repeat: bytes) -> bytes:
    """`raw` with `repeat` (`"key":value`) added as the envelope's first member."""
    assert raw.startswith(b"{")
    return b"{" + repeat + b"," + raw[1:]


def repeat_in_body(raw: bytes, repeat: bytes) -> bytes:
    """`raw` with `repeat` added as its body's first member."""
    assert raw.count(b'"body":{') == 1
    return raw.replace(b'"body":{', b'"body":{' + repeat + b",")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            repeat_in_envelope(VALID, b'"seq":1014'),
            "seq: the key 'seq' appears more than once in the envelope",
        ),
        (  # the last value is the valid one: refused all the same
            repeat_in_envelope(VALID, b'"seq":"fourteen"'),
            "seq: the key 'seq' appears more than once in the envelope",
        ),
        (  # the last value is not: the repeat is named, not the schema violation
            VALID.replace(b'"seq":', b'"seq":-1,"seq":'),
            "seq: the key 'seq' appears more than once in the envelope",
        ),
        (
            repeat_in_body(VALID, b'"energy_wh":1'),
            "body.energy_wh: the key 'energy_wh' appears more than once in body",
        ),
        (  # at any depth, before the body's own checks (no such field)
            repeat_in_body(VALID, b'"phases":[{"spin":1},{"spin":2,"spin":3}]'),
            "body.phases[1].spin: the key 'spin' appears more than once in body.phases[1]",
        ),
        (  # whitespace around the colons changes nothing
            repeat_in_envelope(VALID, b'"boot_id" : "other"'),
            "boot_id: the key 'boot_id' appears more than once in the envelope",
        ),
        (  # a `"` in a body string, written so that no `"` byte shows it
            repeat_in_body(VALID, b'"note":"\\u0022","energy_wh":1'),
            "body.energy_wh: the key 'energy_wh' appears more than once in body",
        ),
    ],
    ids=[
        "envelope",
        "envelope-last-valid",
        "envelope-last-invalid",
        "body",
        "nested",
        "whitespace",
        "escaped-quote",
    ],
)
def test_a_repeated_key_is_refused_where_it_is(raw: bytes, message: str) -> None:
    """JSON readers disagree on which of two values of one key wins: a message holding
    a key twice in one object means nothing for sure, and is refused naming the key."""
    error = refused(raw)
    assert error.reason is Reason.DUPLICATE_KEY
    assert error.message == f"{message}; a key may be given once"


def test_a_repeated_key_comes_before_a_nul_character() -> None:
    raw = repeat_in_envelope(VALID.replace(b'"boot_id":"', b'"boot_id":"\\u0000'), b'"seq":1')
    assert refused(raw).reason is Reason.DUPLICATE_KEY


@pytest.mark.parametrize("boot_id", ['b"oot', "b\\oot", 'b"', '"'])
def test_quotes_and_backslashes_in_strings_are_no_repeat(boot_id: str) -> None:
    document = envelope()
    document["boot_id"] = boot_id
    assert parse(encode(document)).boot_id == boot_id
