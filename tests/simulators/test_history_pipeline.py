"""History-true fleets on the real servers: every event a simulated fleet sends falls in
an ownership period the provisioning recorded, a unit that changes hands is attributed
to the seller before and the buyer after, and provisioning is deterministic and can be
run again (the same span, or one that has moved on)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from devices.records import Owner, OwnershipPeriod, OwnerStatus
from devices.registry import Registry
from ingest.kafka import ensure_topics
from ingest.owner_keys import owner_key
from ingest.settings import Settings
from simulators.faults import parse_faults
from simulators.history import UnitHistory, unit_history
from simulators.plan import FleetPlan, plan_device
from simulators.provision import CollectedAccounts, open_registry, provision
from simulators.units import fleet_units
from tests.conftest import TEST_OWNER_KEY, drop_registry
from tests.pipeline import pipeline, publish, wait_for

# Seeds chosen so that several units change hands at the raised share.
USAGE = FleetPlan(
    devices=18,
    messages_per_device=0,
    seed=4,
    run_id="history",
    window=timedelta(days=3),
    faults=parse_faults("dup=0.02"),
    handover_share=0.25,
)
PLAIN = FleetPlan(devices=24, messages_per_device=60, seed=4, run_id="plain", handover_share=0.25)


def histories(plan: FleetPlan) -> dict[str, UnitHistory]:
    return {u.device_id: unit_history(plan, i, u) for i, u in enumerate(fleet_units(plan))}


async def usage_rows(settings: Settings) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        return await conn.fetch(
            "SELECT device_id, boot_id, seq, event_time, purchase_channel, owner_key, region,"
            f" membership_tier FROM {settings.postgres.table}"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("plan", [USAGE, PLAIN], ids=["usage", "plain"])
async def test_every_stored_row_falls_in_the_ownership_period_of_its_time(
    settings: Settings, plan: FleetPlan
) -> None:
    """Through MQTT, bridge, Kafka and the consumer: purchase channel on every row, the
    owner key (and region, tier) of the period's owner where that owner consents, and
    a handed-over unit's rows split at the handover between seller and buyer."""
    expected = histories(plan)
    moving = {d for d, h in expected.items() if h.handover is not None}
    assert len(moving) >= 3
    async with pipeline(settings) as run:
        report = await publish(settings, plan)
        await wait_for(lambda: run.consumer.report.stored >= report.unique_keys, "every row", 90)
    rows = await usage_rows(settings)
    assert len(rows) == report.unique_keys

    async with open_registry(settings, broker=CollectedAccounts()) as registry:
        periods = {d: await registry.ownership_history(d) for d in expected}
        owners = {
            p.owner_id: await registry.get_owner(p.owner_id)
            for ps in periods.values()
            for p in ps
            if p.owner_id is not None
        }
    for device, history in expected.items():
        got = [(p.valid_from, p.valid_to, p.purchase_channel, p.store_id, p.purchased_on)
               for p in periods[device]]  # fmt: skip
        bought = history.purchase
        first = (history.registered_at, None, bought.channel, bought.store_id, bought.purchased_on)
        if history.handover is None:
            assert got == [first]
            continue
        handed = history.handover_purchase
        assert handed is not None
        at = history.handover.at
        assert got == [
            (*first[:1], at, *first[2:]),
            (at, None, handed.channel, None, handed.purchased_on),
        ]
        seller, buyer = (owners[p.owner_id] for p in periods[device] if p.owner_id)
        assert history.buyer is not None
        assert (seller.region, buyer.region) == (history.owner.region, history.buyer.region)

    # The handed-over units: the seller's rows are exactly the events planned before
    # the handover (a unit may have none: a washer idle until then).
    sellers: dict[str, set[tuple[str, int]]] = {d: set() for d in moving}
    for row in rows:
        period = _covering(periods[row["device_id"]], row["event_time"])
        assert period is not None, row
        assert row["purchase_channel"] == period.purchase_channel.value
        assert period.owner_id is not None
        owner = owners[period.owner_id]
        assert _attribution(row) == _expected_attribution(owner)
        if row["device_id"] in moving and period.valid_to is not None:
            sellers[row["device_id"]].add((row["boot_id"], row["seq"]))
    planned = {d: _planned_before(plan, d, expected[d]) for d in moving}
    assert sellers == planned
    # And some units have rows on both sides of their handover. Not every one: a unit
    # handed over late in the window may send nothing after it, depending on the day
    # the test runs (the window ends now); over 40 days of clocks at least 4 do.
    both = [d for d in moving if 0 < len(planned[d]) < sum(r["device_id"] == d for r in rows)]
    assert len(both) >= 2


def _planned_before(plan: FleetPlan, device: str, history: UnitHistory) -> set[tuple[str, int]]:
    assert history.handover is not None
    before = set()
    for msg in plan_device(plan, device):
        if datetime.fromisoformat(orjson.loads(msg.payload)["event_time"]) < history.handover.at:
            before.add(msg.key[1:])
    return before


def _covering(periods: list[OwnershipPeriod], t: Any) -> OwnershipPeriod | None:
    return next(
        (p for p in periods if p.valid_from <= t and (p.valid_to is None or t < p.valid_to)),
        None,
    )


def _attribution(row: asyncpg.Record) -> tuple[str | None, str | None, str | None]:
    return row["owner_key"], row["region"], row["membership_tier"]


def _expected_attribution(owner: Owner) -> tuple[str | None, str | None, str | None]:
    if not owner.analytics_consent:
        return None, None, None
    tier = owner.membership_tier.value if owner.membership_tier else None
    return owner_key(TEST_OWNER_KEY.encode(), owner.owner_id), owner.region, tier


@pytest.fixture
async def registry(settings: Settings) -> AsyncIterator[Registry]:
    """The test's registry, its broker accounts collected rather than made."""
    await ensure_topics(settings.kafka, settings.registry.events_topic)
    async with open_registry(settings, broker=CollectedAccounts()) as reg:
        yield reg


async def snapshot(registry: Registry, plan: FleetPlan) -> dict[str, list[tuple[Any, ...]]]:
    """Each device's periods as (from, to, channel, store, purchased on, ended, owner's
    region, tier, consents, status): everything but the random owner ids."""
    out = {}
    for device in histories(plan):
        rows = []
        for p in await registry.ownership_history(device):
            assert p.owner_id is not None
            o = await registry.get_owner(p.owner_id)
            rows.append((p.valid_from, p.valid_to, p.purchase_channel, p.store_id,
                         p.purchased_on, p.ended_reason, o.region, o.membership_tier,
                         o.analytics_consent, o.marketing_consent, o.status))  # fmt: skip
        out[device] = rows
    return out


async def test_provisioning_is_deterministic_and_runs_again_on_the_same_or_a_later_span(
    settings: Settings, registry: Registry
) -> None:
    plan = USAGE
    moving = sum(h.handover is not None for h in histories(plan).values())
    first = await provision(registry, plan)
    assert (first.registered, first.reissued, first.transferred) == (18, 0, moving)
    before = await snapshot(registry, plan)

    # Another registry, the same plan: the same history, owner for owner.
    schema = "x" + settings.registry.db_schema
    other = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"db_schema": schema})}
    )
    try:
        async with open_registry(other, broker=CollectedAccounts()) as elsewhere:
            await provision(elsewhere, plan)
            assert await snapshot(elsewhere, plan) == before
    finally:
        await drop_registry(other)

    # Again: nothing new, the current owners' secrets reissued (the buyers' after a
    # handover), every owner still active.
    owners = await registry.current_owners(list(before))
    again = await provision(registry, plan)
    assert (again.registered, again.reissued, again.transferred) == (0, 18, 0)
    assert again.credentials != first.credentials
    assert await registry.current_owners(list(before)) == owners
    assert await snapshot(registry, plan) == before
    assert await registry.mark_dormant(plan.clock) == []

    # Two days later (a span that has moved on): a handover the new span starts after
    # is made again, at its new instant, from whoever owns the unit now; one inside the
    # new span stands.
    later = replace(plan, clock=plan.clock + timedelta(days=2), sim_start=None)
    assert later.sim_start is not None
    again_moving = {
        d
        for d, h in histories(later).items()
        if h.handover is not None and before[d][-1][0] < later.sim_start
    }
    assert 0 < len(again_moving) < moving
    after = await provision(registry, later)
    assert (after.registered, after.reissued, after.transferred) == (0, 18, len(again_moving))
    now = await snapshot(registry, later)
    for device, history in histories(later).items():
        if device not in again_moving:
            assert now[device] == before[device]
            continue
        assert history.handover is not None
        seller, buyer, next_buyer = now[device]
        assert seller == before[device][0]
        assert (buyer[0], buyer[1], buyer[5]) == (before[device][1][0], history.handover.at,
                                                  "transferred")  # fmt: skip
        assert next_buyer[:2] == (history.handover.at, None)
    assert await registry.mark_dormant(later.clock + timedelta(days=300)) == []
    for device in now:
        assert now[device][-1][10] is OwnerStatus.ACTIVE
