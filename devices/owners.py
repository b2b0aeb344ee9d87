"""Owner rules: consent with an audit trail, dormancy, reactivation and erasure.

Functions here run inside a transaction the caller (`devices.registry.Registry`) has
opened, with `search_path` set to the registry schema.

Consent: each stated purpose (analytics, marketing: the consent purposes of the
catalogue, `devices.policies`) is recorded in `consent_events` with the policy version
the owner decided under, even when it restates the current value, because a restated
consent has a new date and may put a lapsed one back in force. A grant must name the
current version, or none (the current one is recorded); an unknown version is refused,
an older or future one too for a grant (`stale_policy_version`). Withdrawing is always
allowed (recorded under the current version); granting needs an active owner. One grant
covers one purpose (`decide` refuses a grant naming several: `bundled_consent`).
The `Owner` record's consents are those in force (`consent_in_force`), not the latest
decision: a grant lapsed by a newer policy version reads as not given.

Dormancy: an owner idle for the dormancy period becomes dormant. Marketing skips them;
coming back needs a fresh sign-in (`reauthenticated`: the API checks the token's
`auth_time`) and fresh consent for both
purposes, so consent given years ago is never silently revived.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID, uuid4

import asyncpg

from devices import policies
from devices.errors import Rejected, RejectReason
from devices.events import OWNER_ERASED
from devices.outbox import enqueue
from devices.ownership import revoke_live
from devices.records import (
    ConsentChange,
    ConsentPurpose,
    MarketingContact,
    MembershipTier,
    NewOwner,
    Owner,
    OwnerStatus,
)
from ingest.migrations import Connection

# Consents as in force now (devices/sql/008), not the latest decision's booleans.
_OWNER_COLUMNS = (
    "owner_id, status, region, membership_tier,"
    " consent_in_force(owner_id, 'analytics') AS analytics_consent,"
    " consent_in_force(owner_id, 'marketing') AS marketing_consent, last_active_at"
)


def _owner(row: asyncpg.Record) -> Owner:
    tier = row["membership_tier"]
    return Owner(
        owner_id=row["owner_id"],
        status=OwnerStatus(row["status"]),
        region=row["region"],
        membership_tier=None if tier is None else MembershipTier(tier),
        analytics_consent=row["analytics_consent"],
        marketing_consent=row["marketing_consent"],
        last_active_at=row["last_active_at"],
    )


async def _locked(conn: Connection, owner_id: UUID) -> Owner:
    row = await conn.fetchrow(
        f"SELECT {_OWNER_COLUMNS} FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id
    )
    if row is None:
        raise Rejected(RejectReason.UNKNOWN_OWNER, f"no owner {owner_id}")
    return _owner(row)


async def _audit(
    conn: Connection,
    owner_id: UUID,
    *,
    purpose: ConsentPurpose,
    granted: bool,
    source: str,
    at: datetime,
    policy_version: str,
) -> None:
    await conn.execute(
        f"UPDATE owners SET {purpose.value}_consent = $2, {purpose.value}_consent_at = $3"
        " WHERE owner_id = $1",
        owner_id,
        granted,
        at,
    )
    await conn.execute(
        "INSERT INTO consent_events (owner_id, purpose, granted, changed_at, source,"
        " policy_version) VALUES ($1, $2, $3, $4, $5, $6)",
        owner_id,
        purpose.value,
        granted,
        at,
        source,
        policy_version,
    )


async def _version_for(
    conn: Connection, seen: str | None, decisions: list[tuple[ConsentPurpose, bool]], at: datetime
) -> str:
    """The version `decisions` are recorded under (`policies.check_seen`); only
    withdrawals: an older named version is no reason to refuse them."""
    if seen is not None and not any(granted for _, granted in decisions):
        known = await conn.fetchval("SELECT 1 FROM policy_versions WHERE version = $1", seen)
        if known:
            return (await policies.current(conn, at)).version
    return await policies.check_seen(conn, seen, at)


async def create(
    conn: Connection, new: NewOwner, *, subject: str | None, source: str, at: datetime
) -> UUID:
    """Insert an owner (linked to the sign-in `subject`, if given) and their contacts;
    record the initial consents. A subject that has an owner: `Rejected(owner_exists)`."""
    owner_id = uuid4()
    if subject is not None:
        existing = await conn.fetchval(
            "INSERT INTO owners (owner_id, region, membership_tier, created_at,"
            " last_active_at, subject) VALUES ($1, $2, $3, $4, $4, $5)"
            " ON CONFLICT (subject) DO NOTHING RETURNING owner_id",
            owner_id,
            new.region,
            new.membership_tier.value,
            at,
            subject,
        )
        if existing is None:
            raise Rejected(RejectReason.OWNER_EXISTS, "this sign-in already has an owner account")
    else:
        await conn.execute(
            "INSERT INTO owners (owner_id, region, membership_tier, created_at, last_active_at)"
            " VALUES ($1, $2, $3, $4, $4)",
            owner_id,
            new.region,
            new.membership_tier.value,
            at,
        )
    await conn.execute(
        "INSERT INTO owner_contacts (owner_id, name, email, phone) VALUES ($1, $2, $3, $4)",
        owner_id,
        new.name,
        new.email,
        new.phone,
    )
    decisions = [
        (ConsentPurpose.ANALYTICS, new.analytics_consent),
        (ConsentPurpose.MARKETING, new.marketing_consent),
    ]
    version = await _version_for(conn, new.policy_version, decisions, at)
    for purpose, granted in decisions:
        await _audit(
            conn, owner_id, purpose=purpose, granted=granted, source=source, at=at,
            policy_version=version,
        )  # fmt: skip
    return owner_id


async def of_subject(conn: Connection, subject: str) -> UUID | None:
    """The owner linked to the sign-in `subject` (None: no account; erased owners have
    no link)."""
    owner_id: UUID | None = await conn.fetchval(
        "SELECT owner_id FROM owners WHERE subject = $1", subject
    )
    return owner_id


async def get(conn: Connection, owner_id: UUID) -> Owner:
    """The owner's non-personal data, or `Rejected(unknown_owner)`."""
    row = await conn.fetchrow(f"SELECT {_OWNER_COLUMNS} FROM owners WHERE owner_id = $1", owner_id)
    if row is None:
        raise Rejected(RejectReason.UNKNOWN_OWNER, f"no owner {owner_id}")
    return _owner(row)


async def touch(conn: Connection, owner_id: UUID, at: datetime) -> None:
    """Move an active owner's `last_active_at` forward; a dormant one must reactivate."""
    owner = await _locked(conn, owner_id)
    if owner.status is not OwnerStatus.ACTIVE:
        raise Rejected(RejectReason.OWNER_NOT_ACTIVE, "dormant or erased owners must reactivate")
    await conn.execute(
        "UPDATE owners SET last_active_at = greatest(last_active_at, $2) WHERE owner_id = $1",
        owner_id,
        at,
    )


async def set_consent(
    conn: Connection,
    owner_id: UUID,
    *,
    analytics: bool | None,
    marketing: bool | None,
    source: str,
    at: datetime,
    policy_version: str | None = None,
) -> Owner:
    """Record each stated consent (each its own decision) under `policy_version`;
    grants need an active owner, withdrawals do not."""
    stated = [
        (purpose, granted)
        for purpose, granted in (
            (ConsentPurpose.ANALYTICS, analytics),
            (ConsentPurpose.MARKETING, marketing),
        )
        if granted is not None
    ]
    return await _record(conn, owner_id, stated, source=source, at=at, seen=policy_version)


async def decide(
    conn: Connection,
    owner_id: UUID,
    purposes: list[str],
    *,
    granted: bool,
    source: str,
    at: datetime,
    policy_version: str | None,
) -> Owner:
    """One decision for each of `purposes` (names of the catalogue). A grant names one
    purpose only (`bundled_consent`); a withdrawal may name several. Purposes on the
    contract are refused (`consent_not_needed`), unknown ones too (`unknown_purpose`)."""
    catalogue = await policies.catalogue(conn)
    named = list(dict.fromkeys(purposes))
    if not named:
        raise Rejected(RejectReason.UNKNOWN_PURPOSE, "name the purpose decided on")
    chosen = [policies.consent_purpose(name, catalogue) for name in named]
    if granted and len(chosen) > 1:
        raise Rejected(
            RejectReason.BUNDLED_CONSENT,
            f"one grant covers one purpose: grant {' and '.join(repr(p.value) for p in chosen)}"
            " in decisions of their own, each asked separately (withdrawing several at once"
            " is allowed)",
        )
    stated = [(purpose, granted) for purpose in chosen]
    return await _record(conn, owner_id, stated, source=source, at=at, seen=policy_version)


async def _record(
    conn: Connection,
    owner_id: UUID,
    stated: list[tuple[ConsentPurpose, bool]],
    *,
    source: str,
    at: datetime,
    seen: str | None,
) -> Owner:
    owner = await _locked(conn, owner_id)
    if owner.status is OwnerStatus.ERASED:
        raise Rejected(RejectReason.OWNER_NOT_ACTIVE, "the owner has been erased")
    if owner.status is OwnerStatus.DORMANT and any(granted for _, granted in stated):
        raise Rejected(
            RejectReason.OWNER_NOT_ACTIVE, "a dormant owner must reactivate to grant consent"
        )
    version = await _version_for(conn, seen, stated, at)
    for purpose, granted in stated:
        await _audit(
            conn, owner_id, purpose=purpose, granted=granted, source=source, at=at,
            policy_version=version,
        )  # fmt: skip
    if owner.status is OwnerStatus.ACTIVE:
        await conn.execute(
            "UPDATE owners SET last_active_at = greatest(last_active_at, $2) WHERE owner_id = $1",
            owner_id,
            at,
        )
    return await get(conn, owner_id)


async def consent_history(conn: Connection, owner_id: UUID) -> list[ConsentChange]:
    """The owner's consent audit trail, oldest first (empty once erased)."""
    rows = await conn.fetch(
        "SELECT purpose, granted, changed_at, source, policy_version FROM consent_events"
        " WHERE owner_id = $1 ORDER BY changed_at, consent_event_id",
        owner_id,
    )
    return [
        ConsentChange(
            ConsentPurpose(r["purpose"]),
            r["granted"],
            r["changed_at"],
            r["source"],
            r["policy_version"],
        )
        for r in rows
    ]


async def mark_dormant(conn: Connection, now: datetime, idle: timedelta) -> list[UUID]:
    """Active owners whose last activity is `idle` or longer ago become dormant."""
    rows = await conn.fetch(
        "UPDATE owners SET status = 'dormant', dormant_since = $1"
        " WHERE status = 'active' AND last_active_at <= $2 RETURNING owner_id",
        now,
        now - idle,
    )
    return sorted(row["owner_id"] for row in rows)


async def marketing_audience(conn: Connection) -> list[MarketingContact]:
    """Active owners whose marketing consent is in force (the registry's view
    `marketing_owners`), with the contacts marketing needs."""
    rows = await conn.fetch(
        "SELECT m.owner_id, c.name, c.email FROM marketing_owners m"
        " JOIN owner_contacts c USING (owner_id) ORDER BY m.owner_id"
    )
    return [MarketingContact(r["owner_id"], r["name"], r["email"]) for r in rows]


async def reactivate(
    conn: Connection,
    owner_id: UUID,
    *,
    reauthenticated: bool,
    analytics_consent: bool,
    marketing_consent: bool,
    source: str,
    at: datetime,
    policy_version: str | None = None,
) -> Owner:
    """Dormant -> active, with both consents given afresh (each its own decision,
    under `policy_version`) and audited."""
    owner = await _locked(conn, owner_id)
    if owner.status is OwnerStatus.ERASED:
        raise Rejected(RejectReason.OWNER_NOT_ACTIVE, "an erased owner cannot come back")
    if owner.status is not OwnerStatus.DORMANT:
        raise Rejected(RejectReason.NOT_DORMANT, "the owner is not dormant")
    if not reauthenticated:
        raise Rejected(
            RejectReason.REAUTHENTICATION_REQUIRED, "the owner must sign in again to reactivate"
        )
    await conn.execute(
        "UPDATE owners SET status = 'active', dormant_since = NULL,"
        " last_active_at = greatest(last_active_at, $2) WHERE owner_id = $1",
        owner_id,
        at,
    )
    decisions = [
        (ConsentPurpose.ANALYTICS, analytics_consent),
        (ConsentPurpose.MARKETING, marketing_consent),
    ]
    version = await _version_for(conn, policy_version, decisions, at)
    for purpose, granted in decisions:
        await _audit(
            conn, owner_id, purpose=purpose, granted=granted, source=source, at=at,
            policy_version=version,
        )  # fmt: skip
    return await get(conn, owner_id)


async def erase(conn: Connection, owner_id: UUID, at: datetime) -> list[str]:
    """Erase an owner; return the devices they still owned (secrets now revoked).

    What goes: the contacts row; region, tier, consents and the sign-in subject on the
    owner row; the
    consent audit trail and registration attempts (nothing is processed for this
    person any more, so there is no consent left to prove); the owner's link in every
    ownership period; outbox events that name the owner. Devices they still owned are
    released (period ended, secret revoked), so the unit can be registered again.

    What remains, anonymous: the owner row with only its random id, status `erased`
    and the erasure time (so a late request for this id is answered "erased", not
    "unknown"); ownership periods with no owner (the device had *an* owner then, and
    through which channel it was bought); devices and their usage telemetry, which
    are keyed by device id and say how appliances are used, not by whom. The usage
    store's copies of the link (its pseudonymous `owner_key`) are removed by the
    consumer on the database notification this change sends (`ingest.enrich`), with a
    periodic sweep as backstop; `owner.erased` on Kafka tells any other system.
    """
    owner = await _locked(conn, owner_id)
    if owner.status is OwnerStatus.ERASED:
        return []
    current = await conn.fetch(
        "UPDATE ownership_periods p"
        " SET valid_to = greatest($2, p.valid_from + interval '1 microsecond'),"
        " ended_reason = 'owner_erased' FROM devices d"
        " WHERE p.device_key = d.device_key AND p.owner_id = $1 AND p.valid_to IS NULL"
        " RETURNING d.device_key, d.device_id",
        owner_id,
        at,
    )
    released = sorted(row["device_id"] for row in current)
    for row in current:
        await revoke_live(conn, row["device_key"], row["device_id"], "owner_erased", at)
    await conn.execute("UPDATE ownership_periods SET owner_id = NULL WHERE owner_id = $1", owner_id)
    await conn.execute("DELETE FROM owner_contacts WHERE owner_id = $1", owner_id)
    await conn.execute("DELETE FROM consent_events WHERE owner_id = $1", owner_id)
    await conn.execute("DELETE FROM registration_attempts WHERE owner_id = $1", owner_id)
    await conn.execute(
        "DELETE FROM event_outbox WHERE payload->>'owner_id' = $1"
        " OR payload->>'from_owner_id' = $1 OR payload->>'to_owner_id' = $1",
        str(owner_id),
    )
    await conn.execute(
        "UPDATE owners SET status = 'erased', region = NULL, membership_tier = NULL,"
        " analytics_consent = false, analytics_consent_at = NULL,"
        " marketing_consent = false, marketing_consent_at = NULL,"
        " dormant_since = NULL, created_at = $2, last_active_at = $2, erased_at = $2,"
        " subject = NULL"
        " WHERE owner_id = $1",
        owner_id,
        at,
    )
    await enqueue(conn, OWNER_ERASED, str(owner_id), at, {"owner_id": str(owner_id)})
    return released
