"""Who owns each simulated unit: the household, the owner's account (region, tier,
consents), the firmware cohort it shipped on, and whether it changes hands inside the
played span. Everything follows from the plan's seed and the device id, through a
random generator of its own, so the traffic's faults never change who owns a unit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from simulators.usage import Household, new_household

if TYPE_CHECKING:
    from simulators.plan import FleetPlan

KST = timezone(timedelta(hours=9), "KST")
"""The households live in Korea: event times carry +09:00, and hours are local."""

# ISO 3166-2 code of each city or province the usage model's regions lie in; the
# registry keeps owners' regions in that form.
REGION_CODES = {
    "Seoul": "KR-11",
    "Busan": "KR-26",
    "Daegu": "KR-27",
    "Incheon": "KR-28",
    "Gwangju": "KR-29",
    "Daejeon": "KR-30",
    "Ulsan": "KR-31",
    "Gyeonggi": "KR-41",
    "Jeju": "KR-49",
}

# Firmware versions per model cohort, oldest first, with the share of units shipped
# on each; units not on the newest may upgrade during the run.
FIRMWARE: dict[str, tuple[tuple[str, int], ...]] = {
    "washer": (("3.10.1042", 30), ("3.11.1107", 50), ("3.12.1150", 20)),
    "dryer": (("2.4.880", 40), ("2.5.931", 60)),
    "refrigerator": (("5.1.2210", 25), ("5.2.2301", 45), ("5.3.2388", 30)),
    "air_conditioner": (("1.8.640", 35), ("1.9.702", 65)),
    "air_purifier": (("4.0.1500", 50), ("4.1.1566", 50)),
    "robot_vacuum": (("6.2.3010", 20), ("6.3.3105", 50), ("6.4.3190", 30)),
}


@dataclass(frozen=True)
class Profile:
    """Who owns a device and what it runs: the household, the owner's account, firmware."""

    household: Household
    region_code: str
    membership_tier: str
    analytics_consent: bool
    marketing_consent: bool
    firmware: str


_TIERS = ("standard", "silver", "gold", "platinum")
_TIER_SHARES = (55, 25, 14, 6)
HANDOVER_KINDS = {"resale": 65, "gift": 35}
"""How a unit changes hands inside the window, and how often each way (percent)."""


@dataclass(frozen=True, slots=True)
class Handover:
    """The unit passes to another household at `at`: resold (`kind` "resale") or given
    away ("gift"). The registry records it as a transfer at that instant."""

    at: datetime
    kind: str


def profile(plan: FleetPlan, device_id: str, category: str) -> Profile:
    """The device's household and owner, the same for the same seed and device."""
    rng = random.Random(f"{plan.seed}:{device_id}:household")
    versions, shares = zip(*FIRMWARE[category], strict=True)
    return _profile(rng, lambda: rng.choices(versions, shares)[0])


def buyer_profile(plan: FleetPlan, device_id: str, category: str) -> Profile:
    """The household the device passes to at its `handover`: its own region, size,
    habits, tier and consents; the firmware is the device's, as it was."""
    firmware = profile(plan, device_id, category).firmware
    return _profile(random.Random(f"{plan.seed}:{device_id}:buyer"), lambda: firmware)


def _profile(rng: random.Random, firmware: Callable[[], str]) -> Profile:
    household = new_household(rng)
    return Profile(
        household=household,
        region_code=REGION_CODES[household.region.split("/", 1)[0]],
        membership_tier=rng.choices(_TIERS, _TIER_SHARES)[0],
        analytics_consent=rng.random() < 0.82,
        marketing_consent=rng.random() < 0.31,
        firmware=firmware(),
    )


def played_span(plan: FleetPlan) -> tuple[datetime, timedelta]:
    """Where the plan's events start, and how long they typically run: usage mode its
    window; the plain mode a device's messages, a few seconds apart from `plan.start`."""
    if plan.window is not None:
        assert plan.sim_start is not None
        return plan.sim_start, plan.window
    return plan.start, timedelta(seconds=30 + 5.5 * plan.messages_per_device)


def handover(plan: FleetPlan, device_id: str) -> Handover | None:
    """Whether, when and how the unit changes hands inside the played span
    (`plan.handover_share` of units; between a tenth and nine tenths into the span).

    The draws come in the same order whatever the share, so a larger share only adds
    handovers: the units that change hands at 3 % do so, at the same instant, at 10 %."""
    rng = random.Random(f"{plan.seed}:{device_id}:handover")
    hands_over = rng.random() < plan.handover_share
    first, length = played_span(plan)
    at = (first + length * rng.uniform(0.1, 0.9)).replace(microsecond=0)
    hour, minute = rng.randint(10, 19), rng.randint(0, 59)
    kind = rng.choices(list(HANDOVER_KINDS), list(HANDOVER_KINDS.values()))[0]
    if length >= timedelta(days=2):  # in the daytime, local time, the same day
        local = at.astimezone(KST)
        daytime = local.replace(hour=hour, minute=minute)
        if first + timedelta(hours=1) <= daytime <= first + length - timedelta(hours=1):
            at = daytime
    return Handover(at, kind) if hands_over else None
