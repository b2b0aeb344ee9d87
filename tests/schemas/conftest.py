"""Fixtures for the contract tests, which are pure functions of bytes: no servers."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from schemas.envelope import Envelope, envelope_dict
from schemas.parse import parse_telemetry

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
MAX_BYTES = 16 * 1024


@pytest.fixture(scope="session", autouse=True)
def running_services() -> None:
    """Overrides the root conftest's server start-up: these tests need no servers."""


def envelope(
    schema_name: str = "washer.cycle",
    version: int = 2,
    body: dict[str, Any] | None = None,
    *,
    event_time: datetime = NOW,
    seq: int = 7,
) -> dict[str, Any]:
    """A valid envelope as a device sends it (a fixed washer cycle unless told otherwise)."""
    if body is None:
        body = washer_cycle_body()
    return envelope_dict(
        device_id="wm-000017",
        boot_id="b7f3c2",
        seq=seq,
        event_time=event_time,
        schema_name=schema_name,
        schema_version=version,
        body=body,
    )


def washer_cycle_body() -> dict[str, Any]:
    return {
        "program": "cotton",
        "temperature_c": 40,
        "spin_rpm": 1200,
        "duration_s": 7200,
        "energy_wh": 950,
        "water_l": 48.5,
        "options": ["prewash"],
        "outcome": "completed",
        "trigger": "app_remote",
    }


def encode(document: object) -> bytes:
    return orjson.dumps(document)


def parse(raw: bytes, *, skew: timedelta = timedelta(0), max_bytes: int = MAX_BYTES) -> Envelope:
    """`parse_telemetry` with the tests' fixed receive time."""
    return parse_telemetry(raw, now=NOW, max_future_skew=skew, max_bytes=max_bytes)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(20261123)
