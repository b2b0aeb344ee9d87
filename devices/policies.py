"""Purposes, legal bases and privacy-policy versions: the catalogue owners decide on.

Functions here run inside a transaction the caller (`devices.registry.Registry`) has
opened, with `search_path` set to the registry schema (devices/sql/008).

The catalogue (`purposes`): `service` (service operation and diagnostics) on the legal
basis of the contract, needing no consent; `analytics` (product planning analytics) and
`marketing`, each on consent of its own. The privacy office publishes policy versions
(`publish`): a text, the time it takes effect (later than now and than every earlier
version), and the consent purposes whose text it changed materially (`reasks`). From
that time on, a grant made under an earlier version is no longer in force for those
purposes (`lapsed`) until the owner decides again under the current version; the other
purposes' consents stand. A version that changes nothing material re-asks nothing.

Which grant is in force is one SQL function, `consent_in_force(owner, purpose)`, which
the registry's views for analytics (`analytics_owners`) and marketing
(`marketing_owners`), the insights' marketing population and `consent_status` read.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from devices.errors import Rejected, RejectReason
from devices.records import (
    ConsentPurpose,
    ConsentState,
    ConsentStatus,
    LegalBasis,
    PolicyVersion,
    Purpose,
)
from ingest.migrations import Connection

_VERSIONS = (
    "SELECT v.version, v.effective_at, v.policy_text, v.published_at,"
    " coalesce(array_agg(r.purpose ORDER BY r.purpose) FILTER (WHERE r.purpose IS NOT NULL),"
    " '{}') AS reasks FROM policy_versions v LEFT JOIN policy_reasks r USING (version)"
)


def _version(row: asyncpg.Record) -> PolicyVersion:
    return PolicyVersion(
        row["version"],
        row["effective_at"],
        row["policy_text"],
        row["published_at"],
        frozenset(ConsentPurpose(p) for p in row["reasks"]),
    )


async def catalogue(conn: Connection) -> list[Purpose]:
    """Every purpose, contract-based first, then by name."""
    rows = await conn.fetch(
        "SELECT purpose, legal_basis, title, description FROM purposes"
        " ORDER BY legal_basis = 'consent', purpose"
    )
    return [
        Purpose(r["purpose"], LegalBasis(r["legal_basis"]), r["title"], r["description"])
        for r in rows
    ]


async def versions(conn: Connection) -> list[PolicyVersion]:
    """Every policy version, oldest first (those not yet in effect last)."""
    rows = await conn.fetch(f"{_VERSIONS} GROUP BY v.version ORDER BY v.effective_at")
    return [_version(r) for r in rows]


async def current(conn: Connection, at: datetime) -> PolicyVersion:
    """The version in effect at `at` (the latest whose `effective_at` is not after it)."""
    row = await conn.fetchrow(
        f"{_VERSIONS} WHERE v.effective_at <= $1 GROUP BY v.version"
        " ORDER BY v.effective_at DESC LIMIT 1",
        at,
    )
    if row is None:  # the migration's `initial` is effective since 1970
        raise Rejected(RejectReason.UNKNOWN_POLICY_VERSION, f"no policy version in effect at {at}")
    return _version(row)


async def check_seen(conn: Connection, seen: str | None, at: datetime) -> str:
    """The version a decision at `at` is recorded under: `seen`, which must be the
    current one, or the current one when the caller names none."""
    now = await current(conn, at)
    if seen is None or seen == now.version:
        return now.version
    effective_at = await conn.fetchval(
        "SELECT effective_at FROM policy_versions WHERE version = $1", seen
    )
    if effective_at is None:
        raise Rejected(
            RejectReason.UNKNOWN_POLICY_VERSION,
            f"no policy version {seen!r}; the current one is {now.version!r} (GET /purposes)",
        )
    when = "is not in effect yet" if effective_at > at else "has been replaced"
    raise Rejected(
        RejectReason.STALE_POLICY_VERSION,
        f"policy version {seen!r} {when}; the current one is {now.version!r}: show the"
        " owner its text, then record their decision under it",
    )


def consent_purpose(name: str, catalogue: list[Purpose]) -> ConsentPurpose:
    """`name` as a consent purpose; `unknown_purpose`, or `consent_not_needed` for a
    purpose on the contract."""
    known = {p.purpose: p for p in catalogue}
    purpose = known.get(name)
    if purpose is None:
        raise Rejected(
            RejectReason.UNKNOWN_PURPOSE,
            f"no purpose {name!r}; the purposes are {', '.join(sorted(known))}",
        )
    if purpose.legal_basis is LegalBasis.CONTRACT:
        raise Rejected(
            RejectReason.CONSENT_NOT_NEEDED,
            f"{name!r} ({purpose.title}) runs under the service contract: there is no"
            " consent to give or withdraw",
        )
    return ConsentPurpose(name)


async def publish(
    conn: Connection,
    version: str,
    *,
    effective_at: datetime,
    text: str,
    reasks: set[str],
    at: datetime,
) -> PolicyVersion:
    """Add a policy version taking effect at `effective_at` (not before `at`, and after
    every version already published), re-asking consent for `reasks`.

    Refused (`invalid_policy`, or `unknown_purpose` / `consent_not_needed` for a purpose
    in `reasks`): a name taken or not of the allowed form, an empty text, a time in the
    past or not after the latest version's.
    """
    known = await catalogue(conn)
    purposes = sorted(consent_purpose(p, known) for p in reasks)
    await conn.execute("LOCK TABLE policy_versions IN SHARE ROW EXCLUSIVE MODE")
    latest = await conn.fetchrow(
        "SELECT version, effective_at FROM policy_versions ORDER BY effective_at DESC LIMIT 1"
    )
    problem = None
    if not text.strip():
        problem = "the policy text is empty"
    elif effective_at < at:
        problem = f"it would take effect in the past ({effective_at.isoformat()})"
    elif latest is not None and effective_at <= latest["effective_at"]:
        problem = (
            f"it must take effect after the latest version {latest['version']!r}"
            f" ({latest['effective_at'].isoformat()})"
        )
    elif await conn.fetchval("SELECT 1 FROM policy_versions WHERE version = $1", version):
        problem = "a version of that name exists"
    if problem is not None:
        raise Rejected(RejectReason.INVALID_POLICY, f"policy version {version!r}: {problem}")
    try:
        await conn.execute(
            "INSERT INTO policy_versions (version, effective_at, policy_text, published_at)"
            " VALUES ($1, $2, $3, $4)",
            version,
            effective_at,
            text,
            at,
        )
    except asyncpg.CheckViolationError:
        raise Rejected(
            RejectReason.INVALID_POLICY,
            f"policy version {version!r}: a name is 1 to 40 letters, digits, '.', '_' or"
            " '-', starting with a letter or digit",
        ) from None
    await conn.executemany(
        "INSERT INTO policy_reasks (version, purpose) VALUES ($1, $2)",
        [(version, p.value) for p in purposes],
    )
    return PolicyVersion(version, effective_at, text, at, frozenset(purposes))


async def consent_status(
    conn: Connection, owner_id: UUID, at: datetime
) -> dict[ConsentPurpose, ConsentStatus]:
    """Where the owner stands on each consent purpose at `at` (see `ConsentState`)."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (e.purpose) e.purpose, e.granted, e.changed_at, e.source,"
        " e.policy_version, EXISTS (SELECT 1 FROM policy_reasks r"
        "  JOIN policy_versions w ON w.version = r.version WHERE r.purpose = e.purpose"
        "  AND w.effective_at > v.effective_at AND w.effective_at <= $2) AS reasked"
        " FROM consent_events e JOIN policy_versions v ON v.version = e.policy_version"
        " WHERE e.owner_id = $1"
        " ORDER BY e.purpose, e.changed_at DESC, e.consent_event_id DESC",
        owner_id,
        at,
    )
    latest = {ConsentPurpose(r["purpose"]): r for r in rows}
    status: dict[ConsentPurpose, ConsentStatus] = {}
    for purpose in ConsentPurpose:
        r = latest.get(purpose)
        if r is None:
            status[purpose] = ConsentStatus(purpose, ConsentState.UNDECIDED, None, None, None)
            continue
        if not r["granted"]:
            state = ConsentState.DECLINED
        elif r["reasked"]:
            state = ConsentState.LAPSED
        else:
            state = ConsentState.GRANTED
        status[purpose] = ConsentStatus(
            purpose, state, r["changed_at"], r["policy_version"], r["source"]
        )
    return status
