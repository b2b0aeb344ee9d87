"""The usage table's lifecycle: created and upgraded by migrations, its storage layout,
partitions, TimescaleDB policies and retention.

Two storage layouts, detected once when the table is first migrated and recorded in
`<table>_layout` (`usagepipe db migrate` prints which):

- `timescaledb` where the server has TimescaleDB installed and preloaded
  (`shared_preload_libraries`; installed alone, `CREATE EXTENSION` would fail and close
  the connection: the table is then partitioned, with a warning saying how to enable
  it) and `CREATE EXTENSION IF NOT EXISTS timescaledb` succeeds: a hypertable,
  continuous aggregates, compression and retention policies;
- `partitioned` otherwise: native range partitions on event_time that the store
  creates before a COPY needs them (plus a DEFAULT partition, so nothing is refused),
  rollup tables maintained in the write transaction, and `drop_expired()` for retention.

Migrations are versioned SQL files (ingest/sql/<layout>/NNN_*.sql) applied by
`ingest.migrations` as component `store.<table>`, with `{table}` filled in.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from ingest import migrations
from ingest.caggs import refresh_aggregates
from ingest.dead_letter_table import expire_letters
from ingest.errors import ConfigurationError, MigrationError, StoreUnavailable
from ingest.migrations import Connection
from ingest.policies import PolicyReport, apply_policies
from ingest.postgres import DB_ERRORS, translated
from ingest.rollups import ROLLUPS, refresh_rollups
from ingest.rollups import bucket_start as partition_start
from ingest.rows import UsageRow
from ingest.settings import PostgresSettings
from ingest.sql import Kind, migration_directory

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Layout:
    """How the usage table is stored; fixed when the table is created."""

    kind: Kind
    partition_interval: timedelta


@dataclass(frozen=True, slots=True)
class MigrationReport:
    layout: Layout
    applied: list[str] = field(default_factory=list)
    policies: list[PolicyReport] = field(default_factory=list)


class UsageTables:
    """The usage table's layout and partitions; the store (`ingest.store`) hands it the
    pool."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self.table = settings.table
        self._layout: Layout | None = None
        self._partitions: set[datetime] = set()

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise StoreUnavailable("the store is not migrated yet (call migrate())")
        return self._layout

    # -- schema ------------------------------------------------------------------------

    async def migrate(
        self, pool: asyncpg.Pool, *, update_policies: bool = False
    ) -> MigrationReport:
        """Bring the usage tables up to date (idempotent) and load the layout.

        `update_policies`: change TimescaleDB policies that exist but differ from the
        settings (only `usagepipe db migrate --update-policies` does).
        """
        s = self._settings
        policies: list[PolicyReport] = []
        if s.partition_interval_s % 3600:
            # Partition names carry their start to the hour (`<table>_pYYYYMMDDHH`).
            raise ConfigurationError("postgres.partition_interval_s must be whole hours")
        if s.retention <= s.allowed_lateness + s.partition_interval:
            raise ConfigurationError(
                "postgres.retention_days must exceed allowed_lateness_s plus one "
                "partition_interval_s: a refresh or a late event must never reach "
                "data that retention has already dropped"
            )
        try:
            async with pool.acquire() as conn:
                kind = await self._detect_kind(conn)
                # Read by the migration files (see ingest/sql/*/001_usage.sql).
                await conn.execute(
                    "SELECT set_config('usagepipe.partition_interval', $1, false)",
                    f"{int(s.partition_interval.total_seconds())} seconds",
                )
                schema = await conn.fetchval("SELECT current_schema()")
                applied = await migrations.migrate(
                    conn,
                    schema=schema,
                    component=f"store.{self.table}",
                    directory=migration_directory(kind, self.table),
                )
                row = await conn.fetchrow(
                    f"SELECT kind, partition_interval FROM {self.table}_layout"
                )
                if row is None:
                    raise StoreUnavailable(f"{self.table}_layout is empty")
                self._layout = Layout(row["kind"], row["partition_interval"])
                if self._layout.partition_interval != s.partition_interval:
                    log.warning(
                        "%s keeps its partition interval %s; the setting (%s) applies to "
                        "new tables only",
                        self.table,
                        self._layout.partition_interval,
                        s.partition_interval,
                    )
                if kind == "timescaledb":
                    # A table with history gets its hours noted by 004_rollup_notes:
                    # the next refresh materialises them, reads are exact meanwhile.
                    policies = await apply_policies(
                        conn,
                        self.table,
                        s,
                        self._layout.partition_interval,
                        applied,
                        update=update_policies,
                    )
                else:
                    self._partitions = await self._existing_partitions(conn)
        except (MigrationError, StoreUnavailable) as exc:
            raise StoreUnavailable(f"migrating {self.table} failed: {exc}") from exc
        except DB_ERRORS as exc:
            raise StoreUnavailable(f"migrating {self.table} failed: {exc!r}") from exc
        if kind == "partitioned":
            now = datetime.now(UTC)
            await self.ensure_partitions(pool, [now, now + self.layout.partition_interval])
        return MigrationReport(self.layout, applied, policies)

    async def _detect_kind(self, conn: Connection) -> Kind:
        """The table's recorded layout, or, for a new table, whether TimescaleDB loads."""
        if await conn.fetchval("SELECT to_regclass($1)", f"{self.table}_layout") is not None:
            kind: Kind = await conn.fetchval(f"SELECT kind FROM {self.table}_layout")
            return kind
        if not self._settings.use_timescaledb:
            return "partitioned"
        # Asked before trying: CREATE EXTENSION of a TimescaleDB that is installed but not
        # preloaded fails FATAL, and the server closes the connection under the migration.
        available: str | None = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        preload: str = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        kind, why = timescaledb_choice(available, preload)
        if kind == "partitioned":
            log.log(logging.INFO if available is None else logging.WARNING, "%s", why)
            return kind
        try:
            async with conn.transaction():
                await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            # Preloaded, but this role may not create it (or another refusal).
            log.warning("TimescaleDB could not be created (%s); using native partitions", exc)
            return "partitioned"
        return "timescaledb"

    # -- partitions (plain PostgreSQL) ----------------------------------------------------

    def _partition_name(self, start: datetime) -> str:
        return f"{self.table}_p{start.astimezone(UTC):%Y%m%d%H}"

    async def _existing_partitions(self, conn: Connection) -> set[datetime]:
        names = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = $1::regclass",
            self.table,
        )
        pattern = re.compile(rf"^{re.escape(self.table)}_p(\d{{10}})$")
        found = set()
        for row in names:
            match = pattern.match(row["relname"])
            if match:
                found.add(datetime.strptime(match.group(1), "%Y%m%d%H").replace(tzinfo=UTC))
        return found

    async def ensure_partitions(self, pool: asyncpg.Pool, times: Iterable[datetime]) -> list[str]:
        """Create the partitions `times` fall in where missing; returns the names created.

        Rows already in the DEFAULT partition for a new partition's range are moved into
        it in the same transaction (PostgreSQL would otherwise refuse the partition).
        """
        interval = self.layout.partition_interval
        missing = {partition_start(t, interval) for t in times} - self._partitions
        if not missing:
            return []
        t = self.table
        created: list[str] = []
        with translated(StoreUnavailable, f"creating partitions of {t} failed"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)",
                    migrations.advisory_lock_key("partitions", t),
                )
                existing = await self._existing_partitions(conn)
                for start in sorted(missing - existing):
                    name = self._partition_name(start)
                    end = start + interval
                    await conn.execute(f"CREATE TABLE {name} (LIKE {t} INCLUDING DEFAULTS)")
                    await conn.execute(
                        f"WITH moved AS (DELETE FROM {t}_default"
                        " WHERE event_time >= $1 AND event_time < $2 RETURNING *)"
                        f" INSERT INTO {name} SELECT * FROM moved",
                        start,
                        end,
                    )
                    await conn.execute(
                        f"ALTER TABLE {t} ATTACH PARTITION {name}"
                        f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                    )
                    created.append(name)
        self._partitions |= missing
        if created:
            log.info("created partitions %s", ", ".join(created))
        return created

    async def drop_expired(self, pool: asyncpg.Pool, now: datetime | None = None) -> list[str]:
        """Drop raw data older than the retention; returns what was dropped.

        Plain PostgreSQL: partitions wholly older than `now - retention` (a partition
        with any younger row stays) and old rows in the DEFAULT partition, after
        materialising every noted rollup bucket; `retained_from` then tells later
        refreshes not to recompute buckets whose rows may be gone, so the rollups keep
        their history. TimescaleDB: the same with `drop_chunks` (its retention policy
        drops chunks on a schedule; the refresh then skips buckets before the
        retention, see `ingest.caggs`). Either way the dead letters that failed before
        the cutoff go too (`ingest.dead_letter_table`).
        """
        cutoff = (now or datetime.now(UTC)) - self._settings.retention
        t = self.table
        with translated(StoreUnavailable, f"retention on {t} failed"):
            if self.layout.kind == "timescaledb":
                async with pool.acquire() as conn:
                    return await self._drop_chunks(conn, cutoff)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)",
                    migrations.advisory_lock_key("partitions", t),
                )
                # Every noted bucket into the rollups while its rows are all still here.
                await refresh_rollups(conn, t, wait=True)
                interval = self.layout.partition_interval
                expired = sorted(
                    s for s in await self._existing_partitions(conn) if s + interval <= cutoff
                )
                for start in expired:
                    await conn.execute(f"DROP TABLE {self._partition_name(start)}")
                await conn.execute(f"DELETE FROM {t}_default WHERE event_time < $1", cutoff)
                # Every partition before the one the cutoff falls in is gone.
                await forget_ids(conn, t, partition_start(cutoff, interval))
                await self._expire_letters(conn, cutoff)
                await conn.execute(
                    f"UPDATE {t}_layout SET retained_from = $1"
                    " WHERE retained_from IS NULL OR retained_from < $1",
                    cutoff,
                )
        self._partitions -= set(expired)
        return [self._partition_name(s) for s in expired]

    async def _expire_letters(self, conn: Connection, cutoff: datetime) -> None:
        expired = await expire_letters(conn, self.table, cutoff)
        if expired:
            log.info("retention on %s: %d dead letters expired", self.table, expired)

    async def _drop_chunks(self, conn: Connection, cutoff: datetime) -> list[str]:
        """TimescaleDB's `drop_expired`: the noted buckets that have ended are
        materialised first (the procedure commits as it goes, so outside the caller's
        transaction: `conn` is in none), then the chunks wholly older than `cutoff` go
        and `retained_from` records it, as on the plain layout."""
        t = self.table
        await refresh_aggregates(conn, t, wait=True)
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)", t, cutoff
            )
            # A chunk holding an earlier row ends before the cutoff: it is gone.
            await forget_ids(conn, t, cutoff - self.layout.partition_interval)
            await self._expire_letters(conn, cutoff)
            await conn.execute(
                f"UPDATE {t}_layout SET retained_from = $1"
                " WHERE retained_from IS NULL OR retained_from < $1",
                cutoff,
            )
        return [str(r[0]) for r in rows]


async def forget_ids(conn: Connection, t: str, before: datetime) -> None:
    """Delete the message ids of rows before `before` from `<t>_ids` (migration 007),
    in the caller's transaction, once retention has dropped those rows. The partition
    (or chunk) the cutoff falls in stays, with its rows older than the cutoff, and so
    must their ids: `before` is never after its start."""
    await conn.execute(f"DELETE FROM {t}_ids WHERE event_time < $1", before)


def timescaledb_choice(available: str | None, preload: str) -> tuple[Kind, str]:
    """The layout a new usage table gets on a server whose `pg_available_extensions`
    offers TimescaleDB at version `available` (None: not installed) and whose
    `shared_preload_libraries` is `preload`; and why, in words for the log."""
    if available is None:
        return "partitioned", "TimescaleDB is not installed on this server; using native partitions"
    libraries = {Path(entry.strip().strip('"')).stem for entry in preload.split(",")}
    if "timescaledb" not in libraries:
        return "partitioned", (
            f"TimescaleDB {available} is installed but not preloaded (shared_preload_libraries"
            f" = {preload!r}); using native partitions. To use it, add timescaledb to"
            " shared_preload_libraries in postgresql.conf, restart PostgreSQL, and migrate"
            " a new table (a table keeps the layout it was created with)"
        )
    return "timescaledb", f"TimescaleDB {available} is preloaded"


def partition_probes(rows: Sequence[UsageRow], interval: timedelta) -> Iterable[datetime]:
    """Event times covering every partition `rows` need: the batch's min and max when
    they share a partition (the usual case), else every row's."""
    times = [r.event_time for r in rows]
    low, high = min(times), max(times)
    if partition_start(low, interval) == partition_start(high, interval):
        return (low,)
    return times


_DROP_ATTEMPTS = 5


async def drop_usage_tables(conn: Connection, t: str) -> None:
    """Drop usage table `t`, everything its migrations made and their record, on
    either layout. No command calls it: the tests' teardown and the benchmarks do.

    On TimescaleDB a policy job of the table or of its continuous aggregates may be
    running: its jobs are deleted first (in their own transaction, so the scheduler
    starts none of them again; `delete_job` also cancels a running one), then the drops
    are retried while that job's catalog updates still collide with them (`tuple
    concurrently updated`, a deadlock). Everything is dropped with CASCADE: a plain
    DROP of a compressed hypertable leaves its compressed chunk tables behind in
    _timescaledb_internal (TimescaleDB 2.28.3).
    """
    views = [f"{t}_{rollup}" for rollup in ROLLUPS]
    derived = (
        "layout",
        "offsets",
        "hourly",
        "daily",
        "device_daily",
        "hourly_owners",
        "rollup_invalidations",
        "erasures",
        "consent_unlinks",
        "dead_letters",
        "ids",
        "dp_spend",
        "dp_releases",
    )
    tables = ", ".join([t, *(f"{t}_{suffix}" for suffix in derived)])
    for attempt in range(1, _DROP_ATTEMPTS + 1):
        try:
            if await conn.fetchval("SELECT to_regclass('timescaledb_information.jobs')"):
                async with conn.transaction():
                    for job in await conn.fetch(
                        "SELECT job_id FROM timescaledb_information.jobs"
                        " WHERE hypertable_schema = current_schema()"
                        " AND hypertable_name = ANY($1::text[])",
                        [t, *views],
                    ):
                        await conn.execute("SELECT delete_job($1)", job["job_id"])
            async with conn.transaction():
                # On TimescaleDB the rollups are continuous aggregates (views).
                for view in await conn.fetch(
                    "SELECT relname FROM pg_class WHERE relname = ANY($1::text[])"
                    " AND relkind = 'v' AND relnamespace = current_schema()::regnamespace",
                    views,
                ):
                    await conn.execute(
                        f"DROP MATERIALIZED VIEW IF EXISTS {view['relname']} CASCADE"
                    )
                await conn.execute(f"DROP TABLE IF EXISTS {tables} CASCADE")  # partitions too
                # The partitioned migration 010's, which the tables do not take along.
                await conn.execute(
                    f"DROP FUNCTION IF EXISTS {t}_write_ids(),"
                    f" {t}_content_digest(text, integer, jsonb)"
                )
                if await conn.fetchval("SELECT to_regclass('schema_migrations')") is not None:
                    await conn.execute(
                        "DELETE FROM schema_migrations WHERE component = $1", f"store.{t}"
                    )
            return
        except (asyncpg.DeadlockDetectedError, asyncpg.InternalServerError) as exc:
            raced = isinstance(exc, asyncpg.DeadlockDetectedError) or (
                "tuple concurrently updated" in str(exc)
            )
            if not raced or attempt == _DROP_ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * attempt)
