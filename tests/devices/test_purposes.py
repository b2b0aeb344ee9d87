"""Purposes, legal bases and policy versions: consent in force per purpose, re-asking
after a material change, refusals (stale or unknown version, bundled grant, contract
purpose), erasure of the decisions, and the migration of consents recorded before."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timedelta
from importlib.resources import as_file, files
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest

from devices.errors import Rejected, RejectReason
from devices.records import (
    ConsentChange,
    ConsentPurpose,
    ConsentState,
    LegalBasis,
    Purchase,
    PurchaseChannel,
)
from devices.registry import Registry
from devices.schema import migrate_registry
from ingest.migrations import migrate
from tests.devices.catalog import T0, new_owner

A, M = ConsentPurpose.ANALYTICS, ConsentPurpose.MARKETING
SHOP = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
V2_AT = T0 + timedelta(days=30)


async def states(registry: Registry, owner: UUID, at: datetime | None = None) -> dict[str, str]:
    status = await registry.consent_status(owner, at=at)
    return {p.value: s.state.value for p, s in status.items()}


async def test_the_catalogue_and_the_initial_policy(registry: Registry) -> None:
    catalogue = await registry.purposes()
    assert [(p.purpose, p.legal_basis) for p in catalogue] == [
        ("service", LegalBasis.CONTRACT),
        ("analytics", LegalBasis.CONSENT),
        ("marketing", LegalBasis.CONSENT),
    ]
    assert catalogue[0].title == "Service operation and diagnostics"
    assert catalogue[1].title == "Product planning analytics"
    current = await registry.current_policy(T0)
    assert (current.version, current.reasks) == ("initial", frozenset())
    assert [v.version for v in await registry.policy_versions()] == ["initial"]


async def test_a_material_change_asks_again_for_that_purpose_only(
    registry: Registry, reg_schema: str, pg: asyncpg.Connection
) -> None:
    ada = await registry.create_owner(new_owner(), source="signup", at=T0)
    assert await states(registry, ada, T0) == {"analytics": "granted", "marketing": "granted"}
    analytics = f"SELECT owner_id FROM {reg_schema}.analytics_owners"
    assert [r["owner_id"] for r in await pg.fetch(analytics)] == [ada]

    v2 = await registry.publish_policy(
        "2026-02", effective_at=V2_AT, text="New analytics text.", reasks={"analytics"}, at=T0
    )
    assert v2.reasks == frozenset({A})
    # Before it takes effect nothing changes; from then on the analytics grant lapsed.
    assert await states(registry, ada, V2_AT - timedelta(seconds=1)) == {
        "analytics": "granted",
        "marketing": "granted",
    }
    status = await registry.consent_status(ada, at=V2_AT)
    assert (status[A].state, status[A].policy_version, status[A].decided_at) == (
        ConsentState.LAPSED,
        "initial",
        T0,
    )
    assert status[A].state.pending and not status[M].state.pending
    # The gates read now (V2 is in the past of the real clock): analytics stops.
    assert await pg.fetch(analytics) == []
    owner = await registry.get_owner(ada)
    assert (owner.analytics_consent, owner.marketing_consent) == (False, True)
    assert [c.owner_id for c in await registry.marketing_audience()] == [ada]

    # The old text cannot be consented to any more; the new one can.
    later = V2_AT + timedelta(days=1)
    with pytest.raises(Rejected) as stale:
        await registry.decide(
            ada, ["analytics"], granted=True, source="app", policy_version="initial", at=later
        )
    assert stale.value.reason is RejectReason.STALE_POLICY_VERSION
    assert "has been replaced; the current one is '2026-02'" in stale.value.message
    owner = await registry.decide(
        ada, ["analytics"], granted=True, source="app", policy_version="2026-02", at=later
    )
    assert owner.analytics_consent
    assert await states(registry, ada, later) == {"analytics": "granted", "marketing": "granted"}
    assert [r["owner_id"] for r in await pg.fetch(analytics)] == [ada]
    assert (await registry.consent_history(ada))[-1] == ConsentChange(
        A, True, later, "app", "2026-02"
    )


async def test_a_version_without_material_changes_leaves_consents_standing(
    registry: Registry,
) -> None:
    ada = await registry.create_owner(new_owner(), source="signup", at=T0)
    await registry.publish_policy(
        "2026-02", effective_at=V2_AT, text="Typo fixed.", reasks=set(), at=T0
    )
    assert await states(registry, ada, V2_AT) == {"analytics": "granted", "marketing": "granted"}


async def test_decisions_are_refused_with_the_reason(registry: Registry) -> None:
    ada = await registry.create_owner(new_owner(marketing=False), source="signup", at=T0)
    at = T0 + timedelta(hours=1)
    await registry.publish_policy("2027-01", effective_at=V2_AT, text="Later.", reasks=set(), at=T0)

    async def refused(purposes: list[str], granted: bool, version: str | None) -> Rejected:
        with pytest.raises(Rejected) as caught:
            await registry.decide(
                ada, purposes, granted=granted, source="app", policy_version=version, at=at
            )
        return caught.value

    bundled = await refused(["analytics", "marketing"], True, "initial")
    assert bundled.reason is RejectReason.BUNDLED_CONSENT
    assert "grant 'analytics' and 'marketing' in decisions of their own" in bundled.message
    assert (await refused(["service"], False, None)).reason is RejectReason.CONSENT_NOT_NEEDED
    assert (await refused(["profiling"], True, None)).reason is RejectReason.UNKNOWN_PURPOSE
    unknown = await refused(["marketing"], True, "v9")
    assert unknown.reason is RejectReason.UNKNOWN_POLICY_VERSION
    future = await refused(["marketing"], True, "2027-01")
    assert future.reason is RejectReason.STALE_POLICY_VERSION
    assert "'2027-01' is not in effect yet" in future.message
    # The old PUT /consents form: two booleans are two decisions, under the named version.
    with pytest.raises(Rejected) as stale:
        await registry.set_consent(
            ada, marketing=True, source="web", policy_version="2027-01", at=at
        )
    assert stale.value.reason is RejectReason.STALE_POLICY_VERSION
    # Nothing of the refused ones was recorded.
    assert len(await registry.consent_history(ada)) == 2

    # Withdrawing several at once is allowed, and never refused for an older version.
    owner = await registry.decide(
        ada, ["analytics", "marketing"], granted=False, source="app", at=at
    )
    assert (owner.analytics_consent, owner.marketing_consent) == (False, False)
    assert [
        (c.purpose, c.granted, c.policy_version) for c in (await registry.consent_history(ada))[2:]
    ] == [
        (A, False, "initial"),
        (M, False, "initial"),
    ]
    assert await states(registry, ada, at) == {"analytics": "declined", "marketing": "declined"}


async def test_publishing_is_checked(registry: Registry) -> None:
    async def refused(version: str, offset: timedelta, reasks: set[str], text: str = "x") -> str:
        with pytest.raises(Rejected) as caught:
            await registry.publish_policy(
                version, effective_at=T0 + offset, text=text, reasks=reasks, at=T0
            )
        return f"{caught.value.reason.value}: {caught.value.message}"

    await registry.publish_policy("2026-02", effective_at=V2_AT, text="x", reasks=set(), at=T0)
    assert await refused("2026-01", -timedelta(days=1), set()) == (
        "invalid_policy: policy version '2026-01': it would take effect in the past"
        " (2026-01-09T09:00:00+00:00)"
    )
    assert (await refused("2026-01b", timedelta(days=2), set())).startswith(
        "invalid_policy: policy version '2026-01b': it must take effect after the latest"
        " version '2026-02'"
    )
    assert await refused("2026-02", timedelta(days=40), set()) == (
        "invalid_policy: policy version '2026-02': a version of that name exists"
    )
    assert (await refused("v3", timedelta(days=40), set(), "  ")).endswith(
        "the policy text is empty"
    )
    assert (await refused("v3", timedelta(days=40), {"service"})).startswith("consent_not_needed")
    assert (await refused("bad name", timedelta(days=40), set())).startswith(
        "invalid_policy: policy version 'bad name': a name is 1 to 40"
    )
    assert [v.version for v in await registry.policy_versions()] == ["initial", "2026-02"]


async def test_reactivation_and_signup_record_the_version_seen(registry: Registry) -> None:
    await registry.publish_policy(
        "2026-02", effective_at=T0 + timedelta(minutes=1), text="x", reasks={"marketing"}, at=T0
    )
    at = T0 + timedelta(hours=1)
    ada = await registry.create_owner(new_owner(), source="signup", at=at)
    assert {c.policy_version for c in await registry.consent_history(ada)} == {"2026-02"}
    bob = replace(new_owner("Bob Owner"), policy_version="initial")
    with pytest.raises(Rejected) as stale:
        await registry.create_owner(bob, source="signup", at=at)
    assert stale.value.reason is RejectReason.STALE_POLICY_VERSION


async def test_erasure_deletes_the_decisions(
    registry: Registry, reg_schema: str, pg: asyncpg.Connection
) -> None:
    ada = await registry.create_owner(new_owner(), source="signup", at=T0)
    await registry.decide(ada, ["marketing"], granted=False, source="app", at=T0)
    await registry.erase_owner(ada, at=T0 + timedelta(days=1))
    count = f"SELECT count(*) FROM {reg_schema}.consent_events WHERE owner_id = $1"
    assert await pg.fetchval(count, ada) == 0
    assert await registry.consent_history(ada) == []
    assert await states(registry, ada) == {"analytics": "undecided", "marketing": "undecided"}
    # The policy tables hold no owner's data: they stay as they were.
    assert [v.version for v in await registry.policy_versions()] == ["initial"]


async def test_consents_recorded_before_versions_migrate_without_loss(
    reg_schema: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A registry at 007 with owners' booleans and their consent trail: after 008 each
    owner keeps exactly their decisions (ids, times, answers, sources), under
    `initial`, and the same owners are attributed and marketed to."""
    with as_file(files("devices") / "sql") as sql:
        for n in range(1, 8):
            for f in sql.iterdir():
                if f.name.startswith(f"00{n}_"):
                    shutil.copy(f, tmp_path / f.name)
    await migrate(pg, schema=reg_schema, component="registry", directory=tmp_path)
    ada, bob, cy = uuid4(), uuid4(), uuid4()
    t1, t2 = T0 + timedelta(days=1), T0 + timedelta(days=2)
    await pg.executemany(
        f"INSERT INTO {reg_schema}.owners (owner_id, region, analytics_consent,"
        " analytics_consent_at, marketing_consent, marketing_consent_at, created_at,"
        " last_active_at) VALUES ($1, 'KR-11', $2, $3, $4, $5, $3, $3)",
        [(ada, True, t2, True, t1), (bob, False, t2, False, T0), (cy, True, T0, False, T0)],
    )
    trail = [
        (ada, "analytics", True, T0, "signup"),
        (ada, "marketing", False, T0, "signup"),
        (ada, "marketing", True, t1, "web"),
        (bob, "analytics", True, T0, "signup"),
        (bob, "marketing", False, T0, "signup"),
        (bob, "analytics", False, t2, "app"),
        (cy, "analytics", True, T0, "signup"),
        (cy, "marketing", False, T0, "signup"),
    ]
    await pg.executemany(
        f"INSERT INTO {reg_schema}.consent_events (owner_id, purpose, granted, changed_at,"
        " source) VALUES ($1, $2, $3, $4, $5)",
        trail,
    )
    history = f"SELECT * FROM {reg_schema}.consent_events ORDER BY consent_event_id"
    before = [dict(r) for r in await pg.fetch(history)]
    owners = f"SELECT * FROM {reg_schema}.owners ORDER BY owner_id"
    owners_before = [dict(r) for r in await pg.fetch(owners)]

    assert await migrate_registry(pg, reg_schema) == [
        "008_purposes_policies",
        "011_analytics_consent_ends",
    ]

    after = [dict(r) for r in await pg.fetch(history)]
    assert after == [{**r, "policy_version": "initial"} for r in before]
    assert [dict(r) for r in await pg.fetch(owners)] == owners_before
    attributed = f"SELECT owner_id FROM {reg_schema}.analytics_owners ORDER BY owner_id"
    assert [r["owner_id"] for r in await pg.fetch(attributed)] == sorted([ada, cy])
    marketed = f"SELECT owner_id FROM {reg_schema}.marketing_owners"
    assert [r["owner_id"] for r in await pg.fetch(marketed)] == [ada]


async def test_the_marketing_audience_needs_marketing_consent_in_force(
    registry: Registry,
) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="signup", at=T0)
    bob = await registry.create_owner(new_owner("Bob Owner"), source="signup", at=T0)
    assert [c.owner_id for c in await registry.marketing_audience()] == sorted([ada, bob])
    await registry.publish_policy(
        "2026-02", effective_at=V2_AT, text="Partner offers.", reasks={"marketing"}, at=T0
    )
    assert await registry.marketing_audience() == []
    later = V2_AT + timedelta(hours=1)
    await registry.decide(
        bob, ["marketing"], granted=True, source="app", policy_version="2026-02", at=later
    )
    assert [(c.owner_id, c.name) for c in await registry.marketing_audience()] == [
        (bob, "Bob Owner")
    ]
    assert await states(registry, ada, later) == {"analytics": "granted", "marketing": "lapsed"}
