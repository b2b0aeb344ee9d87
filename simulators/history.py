"""A simulated unit's life before and during the played span, as the registry records it.

The fleet plays events from the past (usage mode: the window before now; the plain
mode: from `FleetPlan.start`), so its units must have been made, bought and registered
before that: an installed base, not a launch day. `unit_history` gives, for unit `i` of
a plan, deterministic from the seed and the span (nothing here reads a clock):

- the purchase: a day between the model's launch (`simulators.units.LAUNCHED_ON`; at
  most `INSTALLED_BASE_YEARS` back) and two weeks before the span, at a steady rate
  of sales; through a channel in realistic shares (`CHANNELS`: retailers, the maker's
  online shop, its own stores, gifts), from a store in the household's region for the
  stores and retailers (`store_id`), the gift's buyer's day as `purchased_on`;
- `manufactured_on`: 2 to 20 weeks before the purchase, never before the launch;
- the household (`simulators.owners.profile`) creating its account and registering
  the unit the evening it is set up, 0 to 3 days after the purchase;
- for `FleetPlan.handover_share` of units (3 %), a change of hands inside the span
  (`simulators.owners.handover`): resold (recorded as bought from a third party, no
  store: a second-hand market) or given away (a gift), to a new household with its own
  region, tier and consents (`simulators.owners.buyer_profile`), who creates its
  account then; the seller's last activity is the handover;
- `last_active`: the current owner's last use of the maker's app, within the
  `ACTIVE_WITHIN` before the plan's clock, so `usagepipe registry dormancy` finds the
  fleet active.

`simulators.provision` turns a history into registry calls (`create_owner`,
`register`, `transfer`, `record_activity`, each with its `at`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from devices.records import MembershipTier, NewOwner, Purchase, PurchaseChannel
from schemas.errors import UsagepipeError
from simulators.owners import (
    KST,
    Handover,
    Profile,
    buyer_profile,
    handover,
    played_span,
    profile,
)
from simulators.plan import FleetPlan
from simulators.units import SIM_MODELS, FleetUnit

CHANNELS: dict[PurchaseChannel, int] = {
    PurchaseChannel.THIRD_PARTY_RETAILER: 45,
    PurchaseChannel.OWN_ONLINE_SHOP: 25,
    PurchaseChannel.OWN_STORE: 22,
    PurchaseChannel.GIFT: 8,
}
"""Where households bought their units, in percent: electronics chains and marts sell
most appliances in Korea, then the maker's online shop and its own stores."""

RETAIL_CHAINS = {"RA": 45, "RB": 35, "RC": 20}
"""The retail chains (ids only), by share of the retailers' sales."""

INSTALLED_BASE_YEARS = 6
"""The oldest purchase: appliances live about ten years; older ones send no telemetry."""
ON_SALE_AFTER = timedelta(days=30)
"""A model's first units reach households about a month after its launch."""
REGISTERED_BEFORE = timedelta(days=14)
"""The latest purchase is this long before the span: setup takes up to 3 days, and the
unit's last firmware update (`simulators.traffic`: 1 to 9 days before the span) comes
after it."""
ACTIVE_WITHIN = timedelta(days=3)


class HistoryError(UsagepipeError, ValueError):
    """The plan's span starts before its units could have been bought."""


@dataclass(frozen=True, slots=True)
class UnitHistory:
    """What the registry must know about one unit before the fleet plays its span."""

    unit: FleetUnit
    manufactured_on: date
    owner: NewOwner
    """The household that bought the unit."""
    purchase: Purchase
    registered_at: datetime
    """When that household created its account and registered the unit."""
    handover: Handover | None
    buyer: NewOwner | None
    """The household the unit passes to at the handover."""
    handover_purchase: Purchase | None
    last_active: datetime
    """The current owner's last activity (the buyer's after a handover)."""
    span_start: datetime
    """Where the plan's events start."""

    @property
    def current_owner(self) -> NewOwner:
        return self.buyer if self.buyer is not None else self.owner


def earliest_start() -> datetime:
    """The earliest span start at which every simulated unit can have been bought."""
    launched = max(m.launched_on for m in SIM_MODELS.values())
    return datetime.combine(launched, time(), KST) + ON_SALE_AFTER + REGISTERED_BEFORE


def unit_history(plan: FleetPlan, index: int, unit: FleetUnit) -> UnitHistory:
    """Unit `index` of `plan`'s history (see the module docstring)."""
    first = played_span(plan)[0]
    rng = random.Random(f"{plan.seed}:{unit.device_id}:history")
    launched = unit.model.launched_on
    latest = (first - REGISTERED_BEFORE).date()
    earliest = max(
        launched + ON_SALE_AFTER, latest - timedelta(days=round(365.25 * INSTALLED_BASE_YEARS))
    )
    if earliest > latest:
        raise HistoryError(
            f"the fleet's events start {first:%Y-%m-%d %H:%M %Z}, before its units could"
            f" have been bought: {unit.model.model_number} was launched on {launched}; start"
            f" on {earliest_start():%Y-%m-%d} or later"
        )
    bought = earliest + timedelta(days=rng.randint(0, (latest - earliest).days))
    manufactured = max(launched, bought - timedelta(days=rng.randint(14, 140)))
    setup_days = rng.choices((0, 1, 2, 3), (50, 30, 15, 5))[0]
    registered = datetime.combine(bought, time(18), KST) + timedelta(
        days=setup_days, seconds=rng.randint(0, 4 * 3600)
    )

    seller = profile(plan, unit.device_id, unit.category)
    channel = rng.choices(list(CHANNELS), list(CHANNELS.values()))[0]
    purchase = Purchase(channel, _store(rng, channel, seller.region_code), bought)
    last_active = (plan.clock - ACTIVE_WITHIN * rng.random()).replace(microsecond=0)

    passes = handover(plan, unit.device_id)
    buyer: NewOwner | None = None
    handed: Purchase | None = None
    if passes is not None:
        buyer = _owner(plan, index, buyer_profile(plan, unit.device_id, unit.category), "b")
        channel = (
            PurchaseChannel.GIFT if passes.kind == "gift" else PurchaseChannel.THIRD_PARTY_RETAILER
        )
        handed = Purchase(channel, None, passes.at.astimezone(KST).date())
    return UnitHistory(
        unit=unit,
        manufactured_on=manufactured,
        owner=_owner(plan, index, seller, ""),
        purchase=purchase,
        registered_at=registered,
        handover=passes,
        buyer=buyer,
        handover_purchase=handed,
        last_active=max(last_active, passes.at) if passes is not None else last_active,
        span_start=first,
    )


def _store(rng: random.Random, channel: PurchaseChannel, region: str) -> str | None:
    """A store of the household's region (ids only): bigger regions have more stores."""
    stores = 8 if region in ("KR-11", "KR-41") else 3
    if channel is PurchaseChannel.OWN_STORE:
        return f"OWN-{region}-{rng.randint(1, stores):02d}"
    if channel is PurchaseChannel.THIRD_PARTY_RETAILER:
        chain = rng.choices(list(RETAIL_CHAINS), list(RETAIL_CHAINS.values()))[0]
        return f"{chain}-{region}-{rng.randint(1, 2 * stores):02d}"
    return None


def _owner(plan: FleetPlan, index: int, prof: Profile, suffix: str) -> NewOwner:
    """The simulated household's account (no real person's data)."""
    name = f"{plan.fleet}-{plan.seed}-{index}{suffix}"
    return NewOwner(
        name=f"Simulated household {name}",
        email=f"household-{name.lower()}@example.invalid",
        phone=None,
        region=prof.region_code,
        membership_tier=MembershipTier(prof.membership_tier),
        analytics_consent=prof.analytics_consent,
        marketing_consent=prof.marketing_consent,
    )
