"""Owners: consent audit, dormancy and reactivation, marketing audience, erasure."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from devices.errors import Rejected, RejectReason
from devices.records import (
    ConsentChange,
    ConsentPurpose,
    MembershipTier,
    OwnerStatus,
    Purchase,
    PurchaseChannel,
)
from devices.registry import Registry
from ingest.erasure_proof import prove_erasure
from ingest.personal_data import holdings
from tests.devices.catalog import T0, new_owner
from tests.devices.fakes import RecordingBroker, RecordingPublisher

SHOP = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)


async def test_consent_changes_are_audited(registry: Registry) -> None:
    ada = await registry.create_owner(new_owner(marketing=False), source="signup", at=T0)
    t1, t2 = T0 + timedelta(days=1), T0 + timedelta(days=2)
    owner = await registry.set_consent(ada, marketing=True, source="web", at=t1)
    assert (owner.analytics_consent, owner.marketing_consent) == (True, True)
    owner = await registry.set_consent(ada, analytics=False, marketing=False, source="app", at=t2)
    assert (owner.analytics_consent, owner.marketing_consent) == (False, False)
    assert owner.last_active_at == t2

    assert await registry.consent_history(ada) == [
        ConsentChange(ConsentPurpose.ANALYTICS, True, T0, "signup", "initial"),
        ConsentChange(ConsentPurpose.MARKETING, False, T0, "signup", "initial"),
        ConsentChange(ConsentPurpose.MARKETING, True, t1, "web", "initial"),
        ConsentChange(ConsentPurpose.ANALYTICS, False, t2, "app", "initial"),
        ConsentChange(ConsentPurpose.MARKETING, False, t2, "app", "initial"),
    ]


async def test_attribution_follows_analytics_consent(
    registry: Registry, reg_schema: str, pg: asyncpg.Connection
) -> None:
    """The one rule of who usage may be attributed to: the view `analytics_owners`,
    which enrichment joins (tests/ingest/test_enrich.py follows it through the consumer)."""
    ada = await registry.create_owner(new_owner(), source="signup", at=T0)
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    view = f"SELECT owner_id, region, membership_tier FROM {reg_schema}.analytics_owners"
    assert [tuple(r) for r in await pg.fetch(view)] == [(ada, "JP-13", MembershipTier.GOLD.value)]
    await registry.set_consent(ada, analytics=False, source="app", at=T0 + timedelta(days=1))
    assert await pg.fetch(view) == []
    # Ownership itself is unchanged.
    assert await registry.owner_at(done.device_id, T0 + timedelta(hours=1)) == ada


async def test_dormancy_and_reactivation(registry: Registry) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="signup", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="signup", at=T0)
    cy = await registry.create_owner(new_owner("Cy Quiet", marketing=False), source="signup", at=T0)
    await registry.record_activity(bob, at=T0 + timedelta(days=200))
    assert {c.owner_id for c in await registry.marketing_audience()} == {ada, bob}

    # Exactly 365 days idle: dormant. Bob was active 165 days ago: stays active.
    now = T0 + timedelta(days=365)
    assert await registry.mark_dormant(now - timedelta(seconds=1)) == []
    assert await registry.mark_dormant(now) == sorted([ada, cy])
    assert await registry.mark_dormant(now) == []
    assert (await registry.get_owner(ada)).status is OwnerStatus.DORMANT
    audience = await registry.marketing_audience()
    assert [(c.owner_id, c.name, c.email) for c in audience] == [
        (bob, "Bob Other", "bob@example.com")
    ]

    # A dormant owner may withdraw consent, not grant it, nor count as active.
    later = now + timedelta(days=1)
    with pytest.raises(Rejected) as grant:
        await registry.set_consent(ada, marketing=True, source="web", at=later)
    assert grant.value.reason is RejectReason.OWNER_NOT_ACTIVE
    with pytest.raises(Rejected) as touch:
        await registry.record_activity(ada, at=later)
    assert touch.value.reason is RejectReason.OWNER_NOT_ACTIVE
    await registry.set_consent(cy, analytics=False, source="web", at=later)

    with pytest.raises(Rejected) as noauth:
        await registry.reactivate(
            ada,
            reauthenticated=False,
            analytics_consent=True,
            marketing_consent=True,
            source="web",
            at=later,
        )
    assert noauth.value.reason is RejectReason.REAUTHENTICATION_REQUIRED
    with pytest.raises(Rejected) as active:
        await registry.reactivate(
            bob,
            reauthenticated=True,
            analytics_consent=True,
            marketing_consent=True,
            source="web",
            at=later,
        )
    assert active.value.reason is RejectReason.NOT_DORMANT

    back = await registry.reactivate(
        ada,
        reauthenticated=True,
        analytics_consent=True,
        marketing_consent=False,
        source="web-reauth",
        at=later,
    )
    assert (back.status, back.analytics_consent, back.marketing_consent, back.last_active_at) == (
        OwnerStatus.ACTIVE,
        True,
        False,
        later,
    )
    # Fresh consent was recorded for both purposes, with the reactivation's time.
    assert (await registry.consent_history(ada))[-2:] == [
        ConsentChange(ConsentPurpose.ANALYTICS, True, later, "web-reauth", "initial"),
        ConsentChange(ConsentPurpose.MARKETING, False, later, "web-reauth", "initial"),
    ]
    assert [c.owner_id for c in await registry.marketing_audience()] == [bob]


async def test_erasure_leaves_no_personal_data(
    registry: Registry,
    pg: asyncpg.Connection,
    broker: RecordingBroker,
    publisher: RecordingPublisher,
) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="signup", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="signup", at=T0)
    sold = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    kept = await registry.register(ada, "DR-200", "SN0003", "CODE-0003-7KQ2-M9DX", SHOP, at=T0)
    with pytest.raises(Rejected):
        await registry.register(ada, "WM-100", "SN0002", "WRONG", SHOP, at=T0)
    handover = T0 + timedelta(days=10)
    await registry.transfer(sold.device_id, ada, bob, SHOP, at=handover)
    erased_at = T0 + timedelta(days=20)
    schema = registry.settings.db_schema
    # The proof (`usagepipe erasure prove`, here on the registry's tables alone) finds
    # Ada's data before her erasure, and nothing after it but what stays by design.
    before = await prove_erasure(pg, ada, keys=[], registry_schema=schema, usage_table=None)
    assert (before.status, before.proven) == ("active", False)
    assert {c.holding.name: (c.linked, c.kept) for c in before.checked if c.linked} == {
        "owners": (1, 0),
        "owner_contacts": (1, 0),
        "consent_events": (2, 0),
        "ownership_periods": (2, 0),
        "devices": (2, 0),
        "registration_attempts": (3, 0),
        "event_outbox": (3, 0),
    }

    assert await registry.erase_owner(ada, at=erased_at) == [kept.device_id]
    assert await registry.erase_owner(ada, at=erased_at) == []

    after = await prove_erasure(pg, ada, keys=[], registry_schema=schema, usage_table=None)
    assert (after.status, after.proven, after.left) == ("erased", True, 0)
    assert {c.holding.name: (c.linked, c.kept) for c in after.checked if c.linked} == {
        "owners": (1, 1),
        "event_outbox": (1, 1),  # owner.erased
    }
    assert [c.holding.name for c in after.checked] == [h.name for h in holdings("registry")]
    assert (
        await pg.fetchval(f"SELECT count(*) FROM {schema}.owner_contacts WHERE owner_id = $1", ada)
        == 0
    )
    row = await pg.fetchrow(f"SELECT * FROM {schema}.owners WHERE owner_id = $1", ada)
    assert row is not None
    assert {k: v for k, v in row.items() if v not in (None, False)} == {
        "owner_id": ada,
        "status": "erased",
        "created_at": erased_at,
        "last_active_at": erased_at,
        "erased_at": erased_at,
    }
    for table in ("consent_events", "registration_attempts", "ownership_periods"):
        count = await pg.fetchval(f"SELECT count(*) FROM {schema}.{table} WHERE owner_id = $1", ada)
        assert (table, count) == (table, 0)
    assert (
        await pg.fetchval(
            f"SELECT count(*) FROM {schema}.event_outbox WHERE payload::text LIKE '%' || $1 || '%'"
            " AND event_type <> 'owner.erased'",
            str(ada),
        )
        == 0
    )
    # Bob's ownership of the sold washer is untouched; Ada's periods point to no one.
    assert await registry.owner_at(sold.device_id, T0) is None
    assert await registry.owner_at(sold.device_id, handover) == bob
    history = await registry.ownership_history(kept.device_id)
    assert [(p.owner_id, p.valid_to, p.ended_reason) for p in history] == [
        (None, erased_at, "owner_erased")
    ]
    assert await registry.verify_device_secret(kept.device_id, kept.mqtt_secret) is False
    assert kept.device_id not in broker.accounts
    assert publisher.types()[-2:] == ["device.credentials_revoked", "owner.erased"]
    erased_type, erased_key, erased_payload = publisher.events[-1]
    assert (erased_type, erased_key) == ("owner.erased", str(ada))
    assert set(erased_payload) == {"event_id", "event_type", "occurred_at", "owner_id"}
    assert (await registry.get_owner(ada)).status is OwnerStatus.ERASED
    assert [c.owner_id for c in await registry.marketing_audience()] == [bob]
    with pytest.raises(Rejected) as again:
        await registry.reactivate(
            ada,
            reauthenticated=True,
            analytics_consent=True,
            marketing_consent=True,
            source="web",
            at=erased_at,
        )
    assert again.value.reason is RejectReason.OWNER_NOT_ACTIVE
    # The unit Ada still had can be registered again by someone holding its code.
    await registry.register(bob, "DR-200", "SN0003", "CODE-0003-7KQ2-M9DX", SHOP, at=erased_at)
