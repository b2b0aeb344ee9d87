"""Which owner-key versions the usage store still holds, and how much of each: what
`usagepipe owner-keys versions` prints, and when an old version's secret may go.

A rotation keys only new rows (`ingest.owner_keys`, README Privacy): a version stays
stored while a row, device-day, owner-hour or dead letter carries it (retention drops
rows, but the rollups keep their history: `retire_version` unlinks those), and
erasure can find an owner's rows under it only while its secret is configured. So a
version is retired (its secret removed from `enrich.owner_key_secrets_file`) once it is
stored nowhere; a version stored but no longer configured is what `unconfigured` names,
the case an operator must fix (put the secret back) before any erasure is trusted.

Retiring early (`retire_version`, `usagepipe owner-keys retire`): every key of an old
version unlinked now, as erasure unlinks one owner's, for all its owners: to end the
linkage before retention does, or when the version's secret is lost (erasure could not
find its owners any more). In bounded batches of keys, each its own transaction, with
progress; stopped, it is run again and carries on (what it unlinked is gone).

Each count reads the whole of its table's owner-key index (an index-only scan where the
visibility map allows): a command for an operator, not for the data path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from ingest.dead_letter_table import erase_letters
from ingest.errors import ConfigurationError, StoreUnavailable
from ingest.migrations import Connection
from ingest.owner_keys import KEY_VERSION_SQL
from ingest.postgres import translated
from ingest.rollups import EPOCH, lock_rollups, materialised_rows
from ingest.store import UsageStore


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One owner-key version as the store holds it."""

    version: int
    rows: int
    """Raw usage rows carrying a key of this version."""
    device_days: int
    """Materialised device-daily rollup rows carrying one."""
    dead_letters: int
    """Dead letters linked to an owner by one."""
    oldest: datetime | None
    """The earliest event time (of a row) or day (of a device-day) carrying one: what
    `postgres.retention_days` drops by (None: only dead letters carry it)."""
    newest: datetime | None
    owner_hours: int = 0
    """Materialised rows of the heat map's owners per hour carrying one."""


async def stored_versions(store: UsageStore) -> list[StoredVersion]:
    """Every owner-key version some row, device-day or dead letter of `store`'s table
    carries, by version; `ConfigurationError` if the table does not exist."""
    t = store.table
    version = KEY_VERSION_SQL.format(column="owner_key")
    counts = (
        f"SELECT {version} AS version, count(*) AS n, min({{at}}) AS oldest,"
        f" max({{at}}) AS newest FROM {{relation}} WHERE owner_key IS NOT NULL GROUP BY 1"
    )
    with translated(StoreUnavailable, "counting stored owner-key versions failed"):
        async with store.pool.acquire() as conn:
            rollup = await _rollup_of(conn, t)
            hours_rollup = await materialised_rows(conn, t, "hourly_owners")
            rows = await conn.fetch(counts.format(at="event_time", relation=t))
            days = await conn.fetch(counts.format(at="bucket", relation=rollup))
            hours = await conn.fetch(counts.format(at="bucket", relation=hours_rollup))
            letters = await conn.fetch(counts.format(at="failed_at", relation=f"{t}_dead_letters"))
    found: dict[int, StoredVersion] = {}
    kinds = (
        ("rows", rows),
        ("device_days", days),
        ("owner_hours", hours),
        ("dead_letters", letters),
    )
    for kind, records in kinds:
        for r in records:
            v = int(r["version"])
            seen = found.get(v) or StoredVersion(v, 0, 0, 0, None, None)
            found[v] = StoredVersion(
                v,
                seen.rows + (r["n"] if kind == "rows" else 0),
                seen.device_days + (r["n"] if kind == "device_days" else 0),
                seen.dead_letters + (r["n"] if kind == "dead_letters" else 0),
                # A letter's time is when it failed, not the data's: retention of
                # rows and device-days is what the dates are for.
                seen.oldest if kind == "dead_letters" else _earliest(seen.oldest, r["oldest"]),
                seen.newest if kind == "dead_letters" else _latest(seen.newest, r["newest"]),
                seen.owner_hours + (r["n"] if kind == "owner_hours" else 0),
            )
    return [found[v] for v in sorted(found)]


async def _rollup_of(conn: Connection, table: str) -> str:
    """The device-daily rollup's materialised rows (`materialised_rows`);
    `ConfigurationError` when `table` is no usage table."""
    if await conn.fetchval("SELECT to_regclass($1)", f"{table}_layout") is None:
        raise ConfigurationError(
            f"there is no usage table {table!r} (USAGEPIPE_POSTGRES__TABLE);"
            " `usagepipe db migrate` creates it"
        )
    return await materialised_rows(conn, table, "device_daily")


def unconfigured(stored: Iterable[StoredVersion], configured: Iterable[int]) -> list[int]:
    """The stored versions whose secret is not configured: erasure cannot find an owner's
    rows under them."""
    known = set(configured)
    return [s.version for s in stored if s.version not in known]


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(frozen=True, slots=True)
class Retired:
    """What `retire_version` has unlinked so far."""

    keys: int
    rows: int
    device_days: int
    dead_letters: int


async def retire_version(
    store: UsageStore,
    version: int,
    *,
    batch_keys: int = 1000,
    progress: Callable[[Retired], None] | None = None,
) -> Retired:
    """Unlink every owner key of `version` from `store`'s rows, device-daily rollup
    (key and membership tier to NULL) and owners-per-hour rollup (key to NULL), the
    days noted for the next refresh as erasure does, and delete the dead letters linked
    by one; `progress` after each batch of `batch_keys` keys. The caller refuses the
    current version (new rows would carry it again). Idempotent, and resumable: a batch
    is one transaction under the rollup lock, and a later run finds only what is left."""
    t = store.table
    version_of = KEY_VERSION_SQL.format(column="owner_key")
    done = Retired(0, 0, 0, 0)
    with translated(StoreUnavailable, f"retiring owner-key version {version} failed", detail=str):
        async with store.pool.acquire() as conn:
            rollup = await _rollup_of(conn, t)
            hours_rollup = await materialised_rows(conn, t, "hourly_owners")
        # Keys are found in each relation in turn: a device-day or a letter may outlive
        # the rows its key was on. The cursor walks the owner-key index past the keys
        # of other versions, which stay.
        for relation in (t, rollup, hours_rollup, f"{t}_dead_letters"):
            after = ""
            while True:
                async with store.pool.acquire() as conn, conn.transaction():
                    keys = [
                        r[0]
                        for r in await conn.fetch(
                            f"SELECT DISTINCT owner_key FROM {relation}"
                            f" WHERE owner_key IS NOT NULL AND owner_key > $1"
                            f" AND {version_of} = $2 ORDER BY 1 LIMIT $3",
                            after,
                            version,
                            batch_keys,
                        )
                    ]
                    if not keys:
                        break
                    await lock_rollups(conn, t, wait=True)
                    rows = await conn.fetchval(
                        f"""WITH changed AS (
                                UPDATE {t} SET owner_key = NULL, membership_tier = NULL
                                WHERE owner_key = ANY($1::text[]) RETURNING event_time
                            ), noted AS (
                                INSERT INTO {t}_rollup_invalidations (bucket)
                                SELECT DISTINCT date_bin('1 day', event_time, {EPOCH})
                                FROM changed RETURNING 1
                            )
                            SELECT count(*) FROM changed""",
                        keys,
                    )
                    status = await conn.execute(
                        f"UPDATE {rollup} SET owner_key = NULL, membership_tier = NULL"
                        " WHERE owner_key = ANY($1::text[])",
                        keys,
                    )
                    await conn.execute(
                        f"UPDATE {hours_rollup} SET owner_key = NULL"
                        " WHERE owner_key = ANY($1::text[])",
                        keys,
                    )
                    letters = await erase_letters(conn, t, keys)
                after = keys[-1]
                done = Retired(
                    done.keys + len(keys),
                    done.rows + rows,
                    done.device_days + int(status.split()[-1]),
                    done.dead_letters + letters,
                )
                if progress is not None:
                    progress(done)
    return done
