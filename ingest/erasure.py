"""Erasure on the usage side: an owner the registry has erased loses their pseudonymous
key, and the membership tier stored with it, from every stored row and rollup.

The registry erases the owner itself (`devices.owners.erase`) and says so on its
notification channel; the consumer (`ingest.enrich.Enricher.apply_erasures`) then calls
`unlink_owners` here, and at start-up and periodically asks `erasures_pending` for
erased owners it has not applied yet. `<table>_erasures` records each owner applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from uuid import UUID

from ingest import migrations
from ingest.errors import StoreUnavailable
from ingest.migrations import Connection
from ingest.postgres import translated
from ingest.rollups import lock_rollups
from ingest.store import UsageStore


async def unlink_owners(store: UsageStore, erased: Sequence[tuple[UUID, str]]) -> int:
    """Remove erased owners' keys, and the membership tier stored with them, from
    every row and from the device-daily rollup; record each owner in
    `<table>_erasures`. Returns the raw rows changed.

    `erased` pairs each owner id with its key (`ingest.owner_keys.owner_key`). The
    region stays: it is a rollup key, and without the key a row no longer leads to
    a person (see README, Privacy). Idempotent. The plain layout's rollup rows are
    updated in place (its days may be older than the raw rows retention keeps); on
    TimescaleDB the continuous aggregate is refreshed over the changed rows' days.
    """
    if not erased:
        return 0
    t = store.table
    timescale = store.layout.kind == "timescaledb"
    with translated(StoreUnavailable, "removing erased owners' keys failed"):
        changed = 0
        days: list[datetime] = []
        async with store.pool.acquire() as conn:
            async with conn.transaction():
                if not timescale:
                    # A refresh running now could put the key back from its snapshot.
                    await lock_rollups(conn, t, wait=True)
                changed += await _unlink(store, conn, erased, days)
            if days:
                # The raw rows' update invalidated these days; a refresh policy only
                # reaches back its window, so refresh them now (outside a transaction
                # block, as the procedure requires; literals, not parameters: its
                # window arguments are declared "any").
                lo, hi = min(days), max(days) + timedelta(days=1)
                await conn.execute(
                    f"CALL refresh_continuous_aggregate('{t}_device_daily',"
                    f" timestamptz '{lo.isoformat()}', timestamptz '{hi.isoformat()}')"
                )
    return changed


async def _unlink(
    store: UsageStore, conn: Connection, erased: Sequence[tuple[UUID, str]], days: list[datetime]
) -> int:
    """`unlink_owners`' statements, in the caller's transaction; on TimescaleDB adds
    the first and last device-day of each owner's to `days`."""
    t = store.table
    timescale = store.layout.kind == "timescaledb"
    changed = 0
    for owner, key in erased:
        status = await conn.execute(
            f"UPDATE {t} SET owner_key = NULL, membership_tier = NULL WHERE owner_key = $1",
            key,
        )
        unlinked = int(status.split()[-1])
        changed += unlinked
        if timescale:
            span = await conn.fetchrow(
                f"SELECT min(bucket) AS lo, max(bucket) AS hi"
                f" FROM {t}_device_daily WHERE owner_key = $1",
                key,
            )
            if span is not None:  # an aggregate without GROUP BY: always a row
                days += [d for d in (span["lo"], span["hi"]) if d is not None]
        else:
            await conn.execute(
                f"UPDATE {t}_device_daily SET owner_key = NULL,"
                " membership_tier = NULL WHERE owner_key = $1",
                key,
            )
        await conn.execute(
            f"INSERT INTO {t}_erasures (owner_id, unlinked) VALUES ($1, $2)"
            " ON CONFLICT (owner_id) DO UPDATE SET applied_at = now(),"
            f" unlinked = {t}_erasures.unlinked + excluded.unlinked",
            owner,
            unlinked,
        )
    return changed


async def erasures_pending(
    store: UsageStore, registry_schema: str, limit: int = 10_000
) -> list[UUID]:
    """Owners the registry in `registry_schema` has erased (its view `erased_owners`)
    whose keys this table has not had removed yet (see `unlink_owners`)."""
    schema = migrations.quote_schema(registry_schema)
    with translated(StoreUnavailable, "reading erased owners failed"):
        rows = await store.pool.fetch(
            f"SELECT o.owner_id FROM {schema}.erased_owners o"
            f" WHERE NOT EXISTS (SELECT 1 FROM {store.table}_erasures e"
            " WHERE e.owner_id = o.owner_id) LIMIT $1",
            limit,
        )
    return [r["owner_id"] for r in rows]
