"""Consent ended on the usage side: when an owner's product-planning (analytics)
consent ends, by a withdrawal or by a lapse when a re-asking policy version takes
effect, the rows stored under it lose the owner's pseudonymous key and membership
tier, as erasure does (`ingest.erasure`), so the planners' reports stop counting that
owner's history.

The registry lists the ends (its function `analytics_consent_ends(since, among)`,
devices/sql/011), each with the time the consent ended and, if the owner granted it
again since, `resumed_at`, the first grant after the end. The consumer
(`ingest.enrich.Enricher.apply_erasures`) asks for the ends not verified yet on an
owner notification (that owner's), a policy notification, at start-up and every cache
TTL (everyone's), and calls `unlink_ended` here. `<table>_consent_unlinks` records
each (owner, end) applied, and whether a later pass found nothing left; `forget`
deletes an owner's records once their erasure is applied.

What goes, for an end: the key and the tier of every raw row stored (`ingested_at`)
before the owner granted again (all of them while they have not); the same in the
device-daily rollup's materialised rows (in place; the days whose raw rows changed are
noted and recomputed, which keeps the key of a day's rows stored after the new
grant); and the key of the owner's dead letters that failed before the new grant (a
letter is kept for replay: the service needs it, and it names no one without the
key). The region stays, as after erasure: without a key it no longer leads to a
person. The unlinking is one-way: an owner who grants again is attributed in the rows
stored from then on, never in those unlinked.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from ingest.dead_letter_table import unlink_letters
from ingest.erasure import unlink_rows
from ingest.errors import StoreUnavailable
from ingest.migrations import Connection
from ingest.postgres import translated
from ingest.rollups import lock_rollups, materialised_rows
from ingest.sql_names import quote_schema
from ingest.store import UsageStore

SINCE_MARGIN = timedelta(hours=1)
"""How far before the latest end recorded the consumer asks the registry again: a
decision is recorded with its own time and may commit a little after a later one."""


@dataclass(frozen=True, slots=True)
class ConsentEnd:
    """One end of an owner's analytics consent, as the registry lists it."""

    owner_id: UUID
    event: str
    """'withdrawn <consent event id>' or 'lapsed <policy version>'."""
    ended_at: datetime
    resumed_at: datetime | None
    """The owner's first analytics grant after the end; None: not granted again."""


async def ends_pending(
    store: UsageStore,
    registry_schema: str,
    among: Collection[UUID] | None = None,
    limit: int = 10_000,
    *,
    whole_history: bool = False,
) -> list[ConsentEnd]:
    """The ends of analytics consent in the registry in `registry_schema` that this
    table has not applied and verified yet, oldest first; of the owners `among` only
    (what an owner notification names), else of every owner.

    The registry is asked for the ends since the earliest one recorded here but not
    verified, or else since `SINCE_MARGIN` before the latest one recorded (the whole
    history for a table that has recorded none, or with `whole_history`: the
    consumer's first pass, which also finds a decision recorded with a time long
    past)."""
    schema = quote_schema(registry_schema)
    t = store.table
    with translated(StoreUnavailable, "reading ended consents failed"):
        rows = await store.pool.fetch(
            f"""WITH marker AS (
                    SELECT coalesce(
                        CASE WHEN $4 THEN '-infinity'::timestamptz END,
                        (SELECT min(ended_at) FROM {t}_consent_unlinks WHERE NOT verified),
                        (SELECT max(ended_at) FROM {t}_consent_unlinks) - $2::interval,
                        '-infinity') AS since
                )
                SELECT c.owner_id, c.event, c.ended_at, c.resumed_at
                FROM marker, {schema}.analytics_consent_ends(marker.since, $3::uuid[]) c
                WHERE NOT EXISTS (SELECT 1 FROM {t}_consent_unlinks u
                                  WHERE u.owner_id = c.owner_id AND u.event = c.event
                                    AND u.verified)
                ORDER BY c.ended_at, c.owner_id, c.event
                LIMIT $1""",
            limit,
            SINCE_MARGIN,
            None if among is None else sorted(among),
            whole_history,
        )
    return [ConsentEnd(r["owner_id"], r["event"], r["ended_at"], r["resumed_at"]) for r in rows]


async def unlink_ended(store: UsageStore, ends: Sequence[tuple[ConsentEnd, Sequence[str]]]) -> int:
    """Remove, for each end, the owner's keys (each key the owner's id has been stored
    under) and tier from what was stored before they granted again (see the module
    docstring); record each end in `<table>_consent_unlinks`. Returns the raw rows
    changed. Idempotent.

    One transaction under the rollup lock, as `ingest.erasure.unlink_owners`: an end is
    verified by a later pass that finds nothing to change, so a batch enriched before
    the end and committed after this pass loses the key on the next.
    """
    if not ends:
        return 0
    t = store.table
    with translated(StoreUnavailable, "removing ended consents' keys failed"):
        changed = 0
        async with store.pool.acquire() as conn, conn.transaction():
            await lock_rollups(conn, t, wait=True)
            rollup = await materialised_rows(conn, t, "device_daily")
            hours_rollup = await materialised_rows(conn, t, "hourly_owners")
            for end, keys in ends:
                unlinked = found = 0
                for key in keys:
                    rows, other = await _unlink(
                        conn, t, (rollup, hours_rollup), key, end.resumed_at
                    )
                    unlinked += rows
                    found += rows + other
                # A pass that found nothing verifies an end an earlier pass recorded;
                # the first never does, even when it found nothing: a batch enriched
                # before the end may commit after it.
                await conn.execute(
                    f"INSERT INTO {t}_consent_unlinks (owner_id, event, ended_at, unlinked)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (owner_id, event) DO UPDATE SET"
                    f" applied_at = now(), unlinked = {t}_consent_unlinks.unlinked"
                    " + excluded.unlinked, verified = $5 = 0",
                    end.owner_id,
                    end.event,
                    end.ended_at,
                    unlinked,
                    found,
                )
                changed += unlinked
    return changed


async def _unlink(
    conn: Connection,
    table: str,
    rollups: tuple[str, str],
    key: str,
    resumed_at: datetime | None,
) -> tuple[int, int]:
    """One key's rows stored before `resumed_at` (all: None) unlinked, in the caller's
    transaction: (raw rows changed, rollup rows and letters changed)."""
    unlinked = await unlink_rows(conn, table, key, resumed_at)
    # Not granted again: every device-day of the key goes, as after erasure. Granted
    # again: a device-day from before the new grant goes where none of the device's raw
    # rows of that day still carries the key (so it was all stored before the grant, or
    # retention dropped it); one that does is noted above and recomputed from them.
    rollup, hours_rollup = rollups
    status = await conn.execute(
        f"""UPDATE {rollup} d SET owner_key = NULL, membership_tier = NULL
            WHERE d.owner_key = $1 AND ($2::timestamptz IS NULL
                OR (d.bucket < $2 AND NOT EXISTS (
                    SELECT 1 FROM {table} r
                    WHERE r.owner_key = $1 AND r.device_id = d.device_id
                    AND r.event_time >= d.bucket
                    AND r.event_time < d.bucket + interval '1 day')))""",
        key,
        resumed_at,
    )
    # The owners per hour the same way, an hour for a day (and with no device: any of
    # the key's raw rows in the hour keeps it, to be recomputed from them).
    hours = await conn.execute(
        f"""UPDATE {hours_rollup} h SET owner_key = NULL
            WHERE h.owner_key = $1 AND ($2::timestamptz IS NULL
                OR (h.bucket < $2 AND NOT EXISTS (
                    SELECT 1 FROM {table} r
                    WHERE r.owner_key = $1
                    AND r.event_time >= h.bucket
                    AND r.event_time < h.bucket + interval '1 hour')))""",
        key,
        resumed_at,
    )
    letters = await unlink_letters(conn, table, key, resumed_at)
    return unlinked, int(status.split()[-1]) + int(hours.split()[-1]) + letters


async def forget(store: UsageStore, erased: Collection[UUID]) -> int:
    """Delete the records of erased owners from `<table>_consent_unlinks` (their
    erasure unlinks everything, and the registry keeps no consent of theirs to end);
    returns how many. Idempotent."""
    if not erased:
        return 0
    with translated(StoreUnavailable, "forgetting erased owners' ended consents failed"):
        status = await store.pool.execute(
            f"DELETE FROM {store.table}_consent_unlinks WHERE owner_id = ANY($1::uuid[])",
            sorted(erased),
        )
    return int(status.split()[-1])
