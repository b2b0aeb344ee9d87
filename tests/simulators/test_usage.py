"""The usage model (no servers): its events for a fixed seed are pinned, so a change to
how the model is written (not what it does) is proven not to change a byte; a change to
what it does updates these digests on purpose."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime

import pytest

from simulators.usage import device_days, device_events, new_household

START = datetime(2025, 1, 1, tzinfo=UTC)
END = datetime(2026, 1, 1, tzinfo=UTC)

# How many events, and the sha256 of repr() of each (event time, schema, body) in turn,
# five households' devices of the category make over 2025 (seeds f"{category}:{n}").
PINNED: dict[str, tuple[int, str]] = {
    "washer": (3019, "b4ec73ddc84933cb0e9992541659127e100b8c13f8cfa3eb162ca1a05cb2394c"),
    "dryer": (2426, "c437211c3b6deaa661ae19802effde8accf125e89f9fa6840b20227633ac4834"),
    "refrigerator": (16815, "f2010ec1f1de5629d955b844164c25ef7d4b00b5468dfcd82719610419331e76"),
    "air_conditioner": (7727, "3c38d50e4a44dc6d93811078999225a34b56cbbd302eb6bae6ce08dc92f7dec8"),
    "air_purifier": (17010, "051c8ef2b5c0d05ea7bce0ec990f990f57922cdb7d22bcf14c075f820cd1ce58"),
    "robot_vacuum": (3613, "1fd882237516dc4141f826b77a3cfd6954ad74f11d7668974020f90309cdddbe"),
}


@pytest.fixture(scope="session", autouse=True)
def running_services() -> None:
    """These tests need no server."""


def _digest(category: str, lazily: bool) -> tuple[int, str]:
    events = device_days if lazily else device_events
    h = hashlib.sha256()
    count = 0
    for n in range(5):
        rng = random.Random(f"{category}:{n}")
        household = new_household(rng)
        for event in events(category, household, rng, START, END):
            h.update(repr(event).encode())
            count += 1
    return count, h.hexdigest()


@pytest.mark.parametrize("category", sorted(PINNED))
def test_a_years_events_for_a_fixed_seed_are_pinned(category: str) -> None:
    assert _digest(category, lazily=False) == PINNED[category]
    assert _digest(category, lazily=True) == PINNED[category]  # the same, a day at a time
