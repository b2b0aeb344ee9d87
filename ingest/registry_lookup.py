"""What the registry says about a device, as enrichment reads it: its ownership periods
and its firmware installations, resolved by event time."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Period:
    """One ownership period, with what enrichment may take from its owner (now)."""

    valid_from: datetime
    valid_to: datetime | None
    purchase_channel: str
    linked: bool
    """The owner is in the registry's `analytics_owners` (consents, not erased) now."""
    region: str | None
    membership_tier: str | None
    owner_key: str | None


Install = tuple[datetime, str, str]
"""A firmware installation: when, from which version, to which."""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the registry says about one device, as of when it was read."""

    device_key: int
    model: str
    category: str
    firmware: str | None
    periods: tuple[Period, ...]
    owners: frozenset[UUID]
    installs: tuple[Install, ...] = ()
    """Oldest first."""

    def firmware_at(self, t: datetime) -> str | None:
        """The firmware the device ran at `t` (see the module docstring)."""
        if not self.installs:
            return self.firmware
        # The last installation at or before t (installs are sorted by time).
        i = bisect.bisect_right(self.installs, t, key=_installed_at)
        return self.installs[i - 1][2] if i else self.installs[0][1]

    def period_at(self, t: datetime) -> Period | None:
        """The period covering `t` ([valid_from, valid_to)), if any."""
        for p in self.periods:
            if p.valid_from <= t and (p.valid_to is None or t < p.valid_to):
                return p
        return None


def merged_installs(installs: tuple[Install, ...], reported: list[Install]) -> tuple[Install, ...]:
    """`installs` (sorted by time) with the `reported` ones it lacks, still sorted; the
    same tuple if it lacks none. Of two reports of one time the first counts, as the
    firmware history's key keeps it. Costs a binary search per report, and a copy of
    the history only when something is added."""
    fresh: dict[datetime, Install] = {}
    for install in reported:
        i = bisect.bisect_left(installs, install[0], key=_installed_at)
        if i == len(installs) or installs[i][0] != install[0]:
            fresh.setdefault(install[0], install)
    if not fresh:
        return installs
    later = sorted(fresh.values())
    if not installs or later[0][0] > installs[-1][0]:  # the usual case: all newer
        return installs + tuple(later)
    return tuple(sorted((*installs, *later)))


def _installed_at(install: Install) -> datetime:
    return install[0]
