"""Erasure on the usage side: an owner the registry has erased loses their pseudonymous
key, and the membership tier stored with it, from every stored row and rollup.

The registry erases the owner itself (`devices.owners.erase`) and says so on its
notification channel; the consumer (`ingest.enrich.Enricher.apply_erasures`) then calls
`unlink_owners` here, and at start-up and periodically asks `erasures_pending` for
erased owners it has not applied, or not verified, yet. `<table>_erasures` records each
owner applied, and whether a later pass found nothing left. The dead letters linked to
the owner (those whose device the owner had, with the link, when they failed) are
deleted in the same pass. `ingest.erasure_proof` (`usagepipe erasure prove`) checks
afterwards that nothing linked to the owner is left in any table that could hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from ingest.dead_letter_table import erase_letters
from ingest.errors import StoreUnavailable
from ingest.migrations import Connection
from ingest.postgres import translated
from ingest.rollups import EPOCH, lock_rollups, materialised_rows
from ingest.sql_names import quote_schema
from ingest.store import UsageStore


async def unlink_owners(store: UsageStore, erased: Sequence[tuple[UUID, Sequence[str]]]) -> int:
    """Remove erased owners' keys, and the membership tier stored with them, from
    every row and from the rollups that keep them (device-daily; the heat map's owners
    per hour, which has the key only), and delete the dead letters linked to
    them; record each owner in
    `<table>_erasures`. Returns the raw rows changed.

    `erased` pairs each owner id with its keys under every version of the owner-key
    secret still configured (`ingest.owner_keys.keys_for`): a rotation keys only new
    rows, so an owner's older rows carry an older version's key. The
    region stays: it is a rollup key, and without the key a row no longer leads to
    a person (see README, Privacy). Idempotent.

    One transaction under the rollup lock, so no refresh of ours runs beside it:
    the raw rows are updated, their days noted (reads take them from the raw rows
    until a refresh has recomputed them, which also merges the rows the update made
    alike), and the rollup's rows updated in place, so days whose raw rows retention
    has dropped lose the key too. On TimescaleDB the rollup's rows are those of the
    aggregate's materialisation hypertable; its real-time part reads the raw rows.

    An owner's erasure is verified by a later pass that finds nothing to change:
    until then `erasures_pending` lists it again, so whatever put a key back after
    this pass (a batch enriched before the erasure, a refresh someone else ran from
    an older snapshot) is undone by the next.
    """
    if any(isinstance(keys, str) for _, keys in erased):  # a str is a Sequence[str] too
        raise TypeError("unlink_owners takes each owner's keys as a list, not one str")
    if not erased:
        return 0
    t = store.table
    with translated(StoreUnavailable, "removing erased owners' keys failed"):
        changed = 0
        async with store.pool.acquire() as conn, conn.transaction():
            await lock_rollups(conn, t, wait=True)
            rollups = [
                await materialised_rows(conn, t, r) for r in ("device_daily", "hourly_owners")
            ]
            for owner, keys in erased:
                changed += await _unlink(conn, t, rollups, owner, list(keys))
    return changed


async def unlink_rows(
    conn: Connection, table: str, key: str, stored_before: datetime | None = None
) -> int:
    """The raw rows carrying `key` (stored before `stored_before`: all if None) lose it
    and the membership tier, in the caller's transaction, their days noted for the next
    refresh; how many. Erasure's and ended consents' (`ingest.withdrawal`) one step on
    the raw rows."""
    changed: int = await conn.fetchval(
        f"""WITH changed AS (
                UPDATE {table} SET owner_key = NULL, membership_tier = NULL
                WHERE owner_key = $1 AND ($2::timestamptz IS NULL OR ingested_at < $2)
                RETURNING event_time
            ), noted AS (
                INSERT INTO {table}_rollup_invalidations (bucket)
                SELECT DISTINCT date_bin('1 day', event_time, {EPOCH}) FROM changed
                RETURNING 1
            )
            SELECT count(*) FROM changed""",
        key,
        stored_before,
    )
    return changed


async def _unlink(
    conn: Connection, table: str, rollups: Sequence[str], owner: UUID, keys: list[str]
) -> int:
    """`unlink_owners` for one owner, in the caller's transaction: the raw rows
    changed."""
    # One statement a key, each `owner_key = $1`: the form TimescaleDB's bloom filter on
    # owner_key prunes compressed batches by (ingest/sql/timescaledb/006_compression.sql),
    # which `= ANY(...)` is not promised to be. An owner has a key a version, a few.
    unlinked = 0
    in_rollups = 0
    for key in keys:
        unlinked += await unlink_rows(conn, table, key)
        # The device-daily rollup keeps the tier beside the key; the owners per hour,
        # the key only.
        for rollup, tier in zip(rollups, (", membership_tier = NULL", ""), strict=True):
            status = await conn.execute(
                f"UPDATE {rollup} SET owner_key = NULL{tier} WHERE owner_key = $1", key
            )
            in_rollups += int(status.split()[-1])
    # A dead letter holds a message as the device sent it, which may be anything:
    # the letters linked to the owner go whole (`ingest.dead_letter_table`).
    letters = await erase_letters(conn, table, keys)
    found = unlinked + in_rollups + letters
    # A pass that found nothing verifies an erasure an earlier pass recorded.
    await conn.execute(
        f"INSERT INTO {table}_erasures (owner_id, unlinked) VALUES ($1, $2)"
        " ON CONFLICT (owner_id) DO UPDATE SET applied_at = now(),"
        f" unlinked = {table}_erasures.unlinked + excluded.unlinked, verified = $3 = 0",
        owner,
        unlinked,
        found,
    )
    return unlinked


def _pending(store: UsageStore, registry_schema: str) -> str:
    """FROM and WHERE of the owners `registry_schema` has erased (`o`) whose erasure
    `store`'s table has not applied and verified yet."""
    schema = quote_schema(registry_schema)
    return (
        f"FROM {schema}.erased_owners o WHERE NOT EXISTS (SELECT 1 FROM {store.table}_erasures e"
        " WHERE e.owner_id = o.owner_id AND e.verified)"
    )


async def erasures_pending(
    store: UsageStore, registry_schema: str, limit: int = 10_000
) -> list[UUID]:
    """Owners the registry in `registry_schema` has erased (its view `erased_owners`)
    whose erasure this table has not applied and verified yet (see `unlink_owners`)."""
    with translated(StoreUnavailable, "reading erased owners failed"):
        rows = await store.pool.fetch(
            f"SELECT o.owner_id {_pending(store, registry_schema)} LIMIT $1", limit
        )
    return [r["owner_id"] for r in rows]


async def erasure_backlog(store: UsageStore, registry_schema: str) -> tuple[int, datetime | None]:
    """How many of the owners the registry has erased this table has not applied and
    verified yet (those `erasures_pending` lists, uncapped), and when the registry
    erased the longest-waiting of them (None: none is pending): the consumer's
    `usagepipe_consumer_erasures_pending` gauges."""
    with translated(StoreUnavailable, "reading erased owners failed"):
        row = await store.pool.fetchrow(
            "SELECT count(*) AS pending, min(o.erased_at) AS oldest"
            f" {_pending(store, registry_schema)}"
        )
    assert row is not None
    return int(row["pending"]), row["oldest"]
