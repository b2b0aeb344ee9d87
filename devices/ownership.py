"""Ownership rules in SQL: registration checks, periods, credentials, attribution.

Functions here run inside a transaction the caller (`devices.registry.Registry`) has
opened, with `search_path` set to the registry schema; the registry adds what must
happen around the transaction (hashing, the broker, publishing events).

Ownership of a device is a sequence of periods [valid_from, valid_to); the database's
exclusion constraint keeps them from overlapping, so "who owned it at t" has at most
one answer. A period ends when the owner releases the device, transfers it, a buyer
states a resale with the unit's code, or the owner is erased.

Registration checks the proof of purchase (`check_proof`) outside any lock, and only
then what ownership allows (`check_takeover`). Locking: the owner row first (FOR
UPDATE), then an advisory lock on the serial, then the device's rows, then the caller's
rate-limit buckets (`devices.limits`). Every path takes them in this order, so they
cannot deadlock.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from uuid import UUID

import asyncpg

from devices.credentials import verify_secret_async
from devices.errors import ProofFailure, Rejected, RejectReason
from devices.events import CREDENTIALS_REVOKED, DEVICE_REGISTERED, DEVICE_TRANSFERRED
from devices.outbox import enqueue
from devices.records import (
    OwnershipPeriod,
    Purchase,
    PurchaseChannel,
    device_id_for,
)
from ingest.migrations import Connection, advisory_lock_key

# The half-open range [valid_from, valid_to) of a period, as SQL.
_PERIOD = "tstzrange(p.valid_from, p.valid_to, '[)')"


async def owner_refusal(conn: Connection, owner_id: UUID) -> RejectReason | None:
    """Why `owner_id` may not register anything now (unknown, not active), or None."""
    status = await conn.fetchval("SELECT status FROM owners WHERE owner_id = $1", owner_id)
    if status is None:
        return RejectReason.UNKNOWN_OWNER
    if status != "active":
        return RejectReason.OWNER_NOT_ACTIVE
    return None


async def check_proof(
    conn: Connection, *, model: str, serial: str, code: str, dummy_hash: str
) -> ProofFailure | None:
    """Whether model, serial and code match a manufactured unit: None, or what is wrong.

    The same work whichever is wrong, so that neither the answer nor its time tells a
    guesser whether the serial exists or which model it is: one query, then one scrypt
    verification of the code, against the unit's hash, or `dummy_hash` (made at the
    same cost) when no unit has the serial; the model is compared in constant time.
    """
    unit = await conn.fetchrow(
        "SELECT model_number, code_hash FROM units WHERE serial_number = $1", serial
    )
    code_matches = await verify_secret_async(
        code.strip(), dummy_hash if unit is None else unit["code_hash"]
    )
    if unit is None:
        return ProofFailure.UNKNOWN_SERIAL
    if not hmac.compare_digest(unit["model_number"].encode(), model.encode()):
        return ProofFailure.MODEL_MISMATCH
    if not code_matches:
        return ProofFailure.WRONG_CODE
    return None


async def check_takeover(
    conn: Connection,
    owner_id: UUID,
    *,
    serial: str,
    resale: bool,
    at: datetime,
    schema: str,
) -> RejectReason | None:
    """After the proof: lock the owner and the serial, then decide whether the owner
    may take the unit: a reason to refuse, or None."""
    status = await conn.fetchval(
        "SELECT status FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id
    )
    # Concurrent registrations of one unit are decided one after the other.
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1)", advisory_lock_key("serial", schema, serial)
    )
    if status is None:  # erased and purged since the owner was checked
        return RejectReason.UNKNOWN_OWNER
    if status != "active":
        return RejectReason.OWNER_NOT_ACTIVE
    current = await conn.fetchrow(
        "SELECT p.owner_id, p.valid_from FROM ownership_periods p"
        " JOIN devices d USING (device_key)"
        " WHERE d.serial_number = $1 AND p.valid_to IS NULL FOR UPDATE OF p",
        serial,
    )
    if current is not None:
        if current["owner_id"] == owner_id:
            return RejectReason.ALREADY_OWNER
        if not resale or current["valid_from"] >= at:
            return RejectReason.OWNED_BY_OTHER
    return None


REJECT_MESSAGES = {
    RejectReason.REGISTRATION_REFUSED: "model, serial or code do not match",
    RejectReason.OWNED_BY_OTHER: (
        "another owner has registered this unit; they must release it, or state a resale"
    ),
    RejectReason.ALREADY_OWNER: "this unit is already registered to this owner",
    RejectReason.UNKNOWN_OWNER: "no owner has this id",
    RejectReason.OWNER_NOT_ACTIVE: "the owner is dormant or erased; reactivate first",
}
"""What a registration refused for `reason` tells the owner."""


async def record_attempt(
    conn: Connection,
    owner_id: UUID,
    *,
    model: str,
    serial: str,
    at: datetime,
    outcome: ProofFailure | RejectReason | None,
) -> None:
    """Note one registration attempt whose proof was checked (None: it succeeded), for
    support and for reviewing abuse; a failed proof `counts_as_failure`."""
    await conn.execute(
        "INSERT INTO registration_attempts (owner_id, serial_number, model_number,"
        " attempted_at, outcome, counts_as_failure) VALUES ($1, $2, $3, $4, $5, $6)",
        owner_id,
        serial,
        model,
        at,
        "registered" if outcome is None else outcome.value,
        isinstance(outcome, ProofFailure),
    )


async def prune_attempts(conn: Connection, before: datetime) -> int:
    """Delete the registration attempts made before `before`; returns how many."""
    status = await conn.execute("DELETE FROM registration_attempts WHERE attempted_at < $1", before)
    return int(status.split()[-1])


async def complete_registration(
    conn: Connection,
    owner_id: UUID,
    *,
    model: str,
    serial: str,
    purchase: Purchase,
    secret_hash: str,
    at: datetime,
) -> str:
    """Create the device if new, end a resold unit's current period, open the owner's
    period with new credentials, and enqueue the event; return the device id."""
    device_id = device_id_for(model, serial)
    device_key: int = await conn.fetchval(
        "INSERT INTO devices (device_id, serial_number, model_number, registered_at)"
        " VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (serial_number) DO UPDATE SET registered_at = devices.registered_at"
        " RETURNING device_key",
        device_id,
        serial,
        model,
        at,
    )
    previous: UUID | None = await conn.fetchval(
        "UPDATE ownership_periods SET valid_to = $2, ended_reason = 'resold'"
        " WHERE device_key = $1 AND valid_to IS NULL RETURNING owner_id",
        device_key,
        at,
    )
    await open_period(conn, device_key, owner_id, purchase=purchase, secret_hash=secret_hash, at=at)
    common = {
        "device_id": device_id,
        "model_number": model,
        "valid_from": at.isoformat(),
        "purchase_channel": purchase.channel.value,
    }
    if previous is None:
        await enqueue(conn, DEVICE_REGISTERED, device_id, at, {**common, "owner_id": str(owner_id)})
    else:
        await enqueue(
            conn,
            DEVICE_TRANSFERRED,
            device_id,
            at,
            {
                **common,
                "from_owner_id": str(previous),
                "to_owner_id": str(owner_id),
                "how": "resale",
            },
        )
    return device_id


async def open_period(
    conn: Connection,
    device_key: int,
    owner_id: UUID,
    *,
    purchase: Purchase,
    secret_hash: str,
    at: datetime,
) -> None:
    """Start `owner_id`'s period at `at` and replace the device's live credentials."""
    await conn.execute(
        "INSERT INTO ownership_periods (device_key, owner_id, valid_from, purchase_channel,"
        " store_id, purchased_on) VALUES ($1, $2, $3, $4, $5, $6)",
        device_key,
        owner_id,
        at,
        purchase.channel.value,
        purchase.store_id,
        purchase.purchased_on,
    )
    await issue_credentials(conn, device_key, secret_hash, at)
    await conn.execute(
        "UPDATE owners SET last_active_at = greatest(last_active_at, $2) WHERE owner_id = $1",
        owner_id,
        at,
    )


async def issue_credentials(
    conn: Connection, device_key: int, secret_hash: str, at: datetime
) -> None:
    """Make `secret_hash` the device's only live credential from `at`."""
    await conn.execute(
        "UPDATE device_credentials SET revoked_at = greatest($2, issued_at)"
        " WHERE device_key = $1 AND revoked_at IS NULL",
        device_key,
        at,
    )
    await conn.execute(
        "INSERT INTO device_credentials (device_key, secret_hash, issued_at) VALUES ($1, $2, $3)",
        device_key,
        secret_hash,
        at,
    )


async def current_period(
    conn: Connection, device_id: str, owner_id: UUID, at: datetime
) -> asyncpg.Record:
    """Lock the device and return its current period, which must be `owner_id`'s.

    Raises `Rejected`: unknown_device, or not_current_owner (also when `at` is not
    after the period's start, since a period cannot end before it begins)."""
    device = await conn.fetchrow(
        "SELECT d.device_key, d.model_number, d.serial_number, p.period_id, p.owner_id,"
        " p.valid_from FROM devices d LEFT JOIN ownership_periods p"
        " ON p.device_key = d.device_key AND p.valid_to IS NULL"
        " WHERE d.device_id = $1 FOR UPDATE OF d",
        device_id,
    )
    if device is None:
        raise Rejected(RejectReason.UNKNOWN_DEVICE, f"no registered device {device_id!r}")
    if device["owner_id"] != owner_id or device["valid_from"] >= at:
        raise Rejected(
            RejectReason.NOT_CURRENT_OWNER, "only the device's current owner may do this"
        )
    return device


async def hand_over(
    conn: Connection,
    device_id: str,
    from_owner_id: UUID,
    to_owner_id: UUID,
    *,
    purchase: Purchase,
    secret_hash: str,
    at: datetime,
) -> asyncpg.Record:
    """Transfer the device: the giver's period ends at `at`, the receiver's opens there
    with `secret_hash`, and the event is enqueued; return the device (`current_period`).

    Raises `Rejected`: the receiver is unknown or not active, the giver is not the
    current owner (`current_period`), or giver and receiver are the same owner.
    """
    for locked in sorted((from_owner_id, to_owner_id)):
        await conn.execute("SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", locked)
    receiver = await conn.fetchval("SELECT status FROM owners WHERE owner_id = $1", to_owner_id)
    if receiver is None:
        raise Rejected(RejectReason.UNKNOWN_OWNER, "the receiving owner does not exist")
    if receiver != "active":
        raise Rejected(RejectReason.OWNER_NOT_ACTIVE, "the receiving owner is not active")
    device = await current_period(conn, device_id, from_owner_id, at)
    if to_owner_id == from_owner_id:
        raise Rejected(RejectReason.ALREADY_OWNER, "the owner already owns the device")
    await end_period(conn, device["period_id"], at, "transferred")
    await open_period(
        conn,
        device["device_key"],
        to_owner_id,
        purchase=purchase,
        secret_hash=secret_hash,
        at=at,
    )
    await enqueue(
        conn,
        DEVICE_TRANSFERRED,
        device_id,
        at,
        {
            "device_id": device_id,
            "model_number": device["model_number"],
            "valid_from": at.isoformat(),
            "purchase_channel": purchase.channel.value,
            "from_owner_id": str(from_owner_id),
            "to_owner_id": str(to_owner_id),
            "how": "transfer",
        },
    )
    return device


async def end_period(conn: Connection, period_id: int, at: datetime, reason: str) -> None:
    """Close one period at `at` (reason: released, transferred, resold, owner_erased)."""
    await conn.execute(
        "UPDATE ownership_periods SET valid_to = $2, ended_reason = $3 WHERE period_id = $1",
        period_id,
        at,
        reason,
    )


async def revoke_live(
    conn: Connection, device_key: int, device_id: str, why: str, at: datetime
) -> bool:
    """Revoke the device's live secret, if any, and enqueue the event."""
    revoked = await conn.fetchval(
        "UPDATE device_credentials SET revoked_at = greatest($2, issued_at)"
        " WHERE device_key = $1 AND revoked_at IS NULL RETURNING credential_id",
        device_key,
        at,
    )
    if revoked is not None:
        await enqueue(
            conn, CREDENTIALS_REVOKED, device_id, at, {"device_id": device_id, "reason": why}
        )
    return revoked is not None


async def live_secret_hash(conn: Connection, device_id: str) -> str | None:
    """The stored hash of the device's live MQTT secret, if it has one."""
    stored: str | None = await conn.fetchval(
        "SELECT c.secret_hash FROM device_credentials c JOIN devices d USING (device_key)"
        " WHERE d.device_id = $1 AND c.revoked_at IS NULL",
        device_id,
    )
    return stored


async def owner_at(conn: Connection, device_id: str, event_time: datetime) -> UUID | None:
    """The owner whose period contains `event_time` (None: nobody, or erased)."""
    owner: UUID | None = await conn.fetchval(
        "SELECT p.owner_id FROM ownership_periods p JOIN devices d USING (device_key)"
        f" WHERE d.device_id = $1 AND {_PERIOD} @> $2::timestamptz",
        device_id,
        event_time,
    )
    return owner


async def current_owners(conn: Connection, device_ids: list[str]) -> dict[str, UUID]:
    """The current owner of each of `device_ids` that has one (unowned ones are left out)."""
    rows = await conn.fetch(
        "SELECT d.device_id, p.owner_id FROM devices d"
        " JOIN ownership_periods p USING (device_key)"
        " WHERE d.device_id = ANY($1::text[]) AND p.valid_to IS NULL"
        " AND p.owner_id IS NOT NULL",
        device_ids,
    )
    return {row["device_id"]: row["owner_id"] for row in rows}


async def history(conn: Connection, device_id: str) -> list[OwnershipPeriod]:
    """Every ownership period of the device, oldest first."""
    rows = await conn.fetch(
        "SELECT p.owner_id, p.valid_from, p.valid_to, p.purchase_channel, p.store_id,"
        " p.purchased_on, p.ended_reason FROM ownership_periods p"
        " JOIN devices d USING (device_key) WHERE d.device_id = $1 ORDER BY p.valid_from",
        device_id,
    )
    return [
        OwnershipPeriod(
            row["owner_id"],
            row["valid_from"],
            row["valid_to"],
            PurchaseChannel(row["purchase_channel"]),
            row["store_id"],
            row["purchased_on"],
            row["ended_reason"],
        )
        for row in rows
    ]
