"""Each simulated unit's history (no servers): bought, made and registered before the
played span, in realistic shares, a few units changing hands inside it, and the usage
following the household that owns the unit at each moment."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from devices.records import PurchaseChannel
from simulators.history import CHANNELS, HistoryError, earliest_start, unit_history
from simulators.owners import buyer_profile, profile
from simulators.plan import FleetPlan, plan_device
from simulators.traffic import Message
from simulators.units import LAUNCHED_ON, fleet_units


@pytest.fixture(scope="session", autouse=True)
def running_services() -> None:
    """These tests need no server."""


CLOCK = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PLAN = FleetPlan(
    devices=1200, messages_per_device=0, seed=7, window=timedelta(days=28), clock=CLOCK
)


def test_units_are_an_installed_base_bought_before_the_span_in_realistic_shares() -> None:
    assert PLAN.sim_start is not None
    histories = [unit_history(PLAN, i, u) for i, u in enumerate(fleet_units(PLAN))]
    for h in histories:
        bought = h.purchase.purchased_on
        assert bought is not None
        assert LAUNCHED_ON[h.unit.category] <= h.manufactured_on <= bought
        assert bought <= h.registered_at.date() <= bought + timedelta(days=3)
        assert h.registered_at < PLAN.sim_start
        assert CLOCK - timedelta(days=3) <= h.last_active <= CLOCK
        with_store = h.purchase.channel in (
            PurchaseChannel.OWN_STORE,
            PurchaseChannel.THIRD_PARTY_RETAILER,
        )
        assert (h.purchase.store_id is not None) == with_store
        if with_store:
            assert h.purchase.store_id is not None and h.owner.region in h.purchase.store_id
    years = Counter(h.purchase.purchased_on.year for h in histories if h.purchase.purchased_on)
    assert len(years) >= 5 and max(years.values()) < 0.3 * len(histories)  # not a launch day
    channels = Counter(h.purchase.channel for h in histories)
    for channel, percent in CHANNELS.items():
        assert abs(channels[channel] / len(histories) - percent / 100) < 0.04, channel


def test_a_few_percent_change_hands_inside_the_span_to_a_household_of_their_own() -> None:
    assert PLAN.sim_start is not None and PLAN.window is not None
    end = PLAN.sim_start + PLAN.window
    histories = [unit_history(PLAN, i, u) for i, u in enumerate(fleet_units(PLAN))]
    moving = [h for h in histories if h.handover is not None]
    assert 0.02 < len(moving) / len(histories) < 0.045
    assert {h.handover.kind for h in moving if h.handover} == {"resale", "gift"}
    for h in moving:
        assert h.handover is not None and h.buyer is not None
        assert h.handover_purchase is not None
        assert PLAN.sim_start < h.handover.at < end
        assert h.handover_purchase.store_id is None
        assert h.handover_purchase.channel is (
            PurchaseChannel.GIFT
            if h.handover.kind == "gift"
            else PurchaseChannel.THIRD_PARTY_RETAILER
        )
        assert h.buyer.email != h.owner.email and h.current_owner is h.buyer
        assert h.last_active >= h.handover.at
    buyers = [buyer_profile(PLAN, h.unit.device_id, h.unit.category) for h in moving]
    sellers = [profile(PLAN, h.unit.device_id, h.unit.category) for h in moving]
    assert any(b.household != s.household for b, s in zip(buyers, sellers, strict=True))
    assert all(b.firmware == s.firmware for b, s in zip(buyers, sellers, strict=True))


def test_histories_follow_from_the_seed_and_a_larger_share_only_adds_handovers() -> None:
    units = fleet_units(PLAN)
    assert [unit_history(PLAN, i, u) for i, u in enumerate(units[:50])] == [
        unit_history(replace(PLAN), i, u) for i, u in enumerate(units[:50])
    ]
    other = replace(PLAN, seed=8)
    assert (
        unit_history(other, 0, fleet_units(other)[0]).purchase
        != unit_history(PLAN, 0, units[0]).purchase
    )
    more = replace(PLAN, handover_share=0.3)
    base = {u.device_id: unit_history(PLAN, i, u).handover for i, u in enumerate(units)}
    wider = {u.device_id: unit_history(more, i, u).handover for i, u in enumerate(units)}
    assert {d: h for d, h in wider.items() if base.get(d)} == {d: h for d, h in base.items() if h}
    assert sum(1 for h in wider.values() if h) > 5 * sum(1 for h in base.values() if h)


def test_usage_after_a_handover_follows_the_buyers_household() -> None:
    """The same events as without a handover up to it; the buyer's habits after it."""
    plan = replace(PLAN, devices=60, handover_share=1.0, window=timedelta(days=7), sim_start=None)
    alone = replace(plan, handover_share=0.0)
    changed = 0
    for i, unit in enumerate(fleet_units(plan)):
        passes = unit_history(plan, i, unit).handover
        assert passes is not None
        with_it, without = plan_device(plan, unit.device_id), plan_device(alone, unit.device_id)

        def before(messages: list[Message], at: datetime = passes.at) -> list[bytes]:
            return [
                m.payload
                for m in messages
                if datetime.fromisoformat(orjson.loads(m.payload)["event_time"]) < at
            ]

        assert before(with_it) == before(without)
        changed += [m.payload for m in with_it] != [m.payload for m in without]
    assert changed > 30


def test_a_span_before_the_models_could_be_bought_is_refused_with_the_date_to_use() -> None:
    early = FleetPlan(
        devices=6,
        messages_per_device=0,
        window=timedelta(days=7),
        clock=datetime(2023, 3, 1, tzinfo=UTC),
    )
    with pytest.raises(HistoryError, match=f"start on {earliest_start():%Y-%m-%d} or later"):
        [unit_history(early, i, u) for i, u in enumerate(fleet_units(early))]
    ok = replace(early, clock=earliest_start() + timedelta(days=7), sim_start=None)
    assert all(unit_history(ok, i, u) for i, u in enumerate(fleet_units(ok)))


def test_each_device_first_sends_the_installation_of_the_firmware_it_runs() -> None:
    """After its registration, before the window, on a boot of its own: so the pipeline
    knows every device's firmware from its first event in the window on."""
    plan = replace(PLAN, devices=60, window=timedelta(days=3), sim_start=None)
    assert plan.sim_start is not None
    for i, unit in enumerate(fleet_units(plan)):
        first, *rest = plan_device(plan, unit.device_id)
        doc = orjson.loads(first.payload)
        at = datetime.fromisoformat(doc["event_time"])
        assert doc["schema"] == f"{unit.category}.firmware" and doc["seq"] == 0
        assert doc["body"]["to_version"] == profile(plan, unit.device_id, unit.category).firmware
        assert doc["body"]["outcome"] == "installed"
        assert unit_history(plan, i, unit).registered_at < at < plan.sim_start
        assert first.send_at == plan.sim_start
        assert all(m.key[1] != first.key[1] for m in rest)
