"""parse_message's one pass (`schemas.catalog.current_envelopes`) against the rules one
by one (`schemas.parse._parse_by_rules`): the same messages accepted, with the same
body, and the body's JSON text exactly what the store wrote before it (orjson's of the
validated dump), since the message ids' digests are taken over that text."""

from __future__ import annotations

import random
from datetime import UTC, timedelta

import orjson
import pytest
from pydantic import ValidationError

from schemas.catalog import SCHEMA_NAMES, current_envelopes, current_version, validate_body
from schemas.errors import InvalidTelemetry
from schemas.examples import example_body
from schemas.parse import _parse_by_rules, parse_message
from tests.schemas.conftest import MAX_BYTES, NOW, encode, envelope


def by_rules(raw: bytes) -> tuple[str, object]:
    """What the rules alone make of `raw`: ("ok", body) or ("refused", reason)."""
    try:
        env = _parse_by_rules(raw, now=NOW, max_future_skew=timedelta(0), max_age=None)
    except InvalidTelemetry as error:
        return ("refused", error.reason)
    return ("ok", env.body)


@pytest.mark.parametrize("schema_name", SCHEMA_NAMES)
def test_the_body_text_is_the_dump_the_store_wrote(schema_name: str) -> None:
    rng = random.Random(f"text:{schema_name}")
    version = current_version(schema_name)
    for seq in range(100):
        body = example_body(schema_name, rng)
        parsed = parse_message(
            encode(envelope(schema_name, version, body, seq=seq)),
            now=NOW,
            max_future_skew=timedelta(0),
            max_bytes=MAX_BYTES,
        )
        _, dumped = validate_body(schema_name, version, body)
        assert parsed.body == dumped
        assert parsed.body_json == orjson.dumps(dumped).decode()
        assert parsed.event_time.tzinfo is UTC


@pytest.mark.parametrize("schema_name", SCHEMA_NAMES)
def test_the_one_pass_accepts_what_the_rules_accept(schema_name: str) -> None:
    """Every body field changed to values of other JSON types and out of range: the
    one pass refuses exactly those the rules refuse, and agrees on the rest."""
    rng = random.Random(f"same:{schema_name}")
    version = current_version(schema_name)
    body = example_body(schema_name, rng)
    strange: list[object] = [None, True, 0, -1, 1.5, 10**6, 1e300, "", "x", [], {}, ["x"]]
    for key in body:
        for value in strange:
            raw = encode(envelope(schema_name, version, {**body, key: value}))
            rules = by_rules(raw)
            try:
                current_envelopes().validate_json(raw)
            except ValidationError:
                assert rules[0] == "refused", (key, value)
                continue
            assert rules[0] == "ok", (key, value, rules)
            parsed = parse_message(raw, now=NOW, max_future_skew=timedelta(0), max_bytes=MAX_BYTES)
            assert parsed.body == rules[1]
