"""The usage store: one row per (device, boot, seq, event time), written in idempotent
batches, together with the Kafka offsets the batch ends at.

A batch is one transaction. Its rows go in with COPY straight into the usage table,
under a savepoint; if the table already has one of them (a redelivery, a replay), that
COPY is undone and the batch takes the slow path: COPY into a staging table (temporary,
per connection, emptied at commit), then `INSERT ... SELECT ... ON CONFLICT DO NOTHING
RETURNING`, which tells which rows were new. The fast path is the common case and costs
one copy of the data instead of two. Then one statement notes the hours the new rows
fall in for the rollups (plain PostgreSQL; see `ingest.rollups`) and upserts the
consumer group's next offsets into `<table>_offsets`. A redelivered
message costs little and changes nothing, and the offsets can never disagree with the
rows: the consumer seeks to them when it is given a partition.

Two storage layouts, detected once when the table is first migrated and recorded in
`<table>_layout` (`usagepipe db migrate` prints which):

- `timescaledb` where `CREATE EXTENSION IF NOT EXISTS timescaledb` succeeds: a
  hypertable, continuous aggregates, compression and retention policies;
- `partitioned` otherwise: native range partitions on event_time that the store
  creates before a COPY needs them (plus a DEFAULT partition, so nothing is refused),
  rollup tables maintained in the write transaction, and `drop_expired()` for retention.

Migrations are versioned SQL files (ingest/sql/<layout>/NNN_*.sql) applied by
`ingest.migrations` as component `store.<table>`, with `{table}` filled in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from ingest import migrations
from ingest.errors import ConfigurationError, MigrationError, StoreUnavailable
from ingest.rollups import (
    RefreshReport,
    hours_of,
    invalidation_cte,
    lock_rollups,
    refresh_rollups,
)
from ingest.rollups import bucket_start as partition_start
from ingest.settings import PostgresSettings
from ingest.sql import Kind, migration_directory
from schemas.envelope import Envelope

log = logging.getLogger(__name__)

Connection = asyncpg.Connection | PoolConnectionProxy

COLUMNS = (
    "device_id",
    "boot_id",
    "seq",
    "event_time",
    "schema",
    "schema_version",
    "body",
    "model",
    "firmware",
    "region",
    "kafka_partition",
    "kafka_offset",
    "category",
    "membership_tier",
    "purchase_channel",
    "analytics_consent",
    "owner_key",
)

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One stored usage event, as the consumer hands it to the store.

    The fields after `kafka_offset` are filled by `ingest.enrich` from the device
    registry (None where the registry has nothing, or the owner does not consent):
    model, firmware and region are also the rollups' grouping keys.
    """

    device_id: str
    boot_id: str
    seq: int
    event_time: datetime
    schema: str
    schema_version: int
    body_json: str
    kafka_partition: int
    kafka_offset: int
    model: str | None = None
    firmware: str | None = None
    region: str | None = None
    category: str | None = None
    membership_tier: str | None = None
    purchase_channel: str | None = None
    analytics_consent: bool | None = None
    owner_key: str | None = None

    @classmethod
    def from_envelope(cls, env: Envelope, partition: int, offset: int) -> UsageRow:
        return cls(
            env.device_id,
            env.boot_id,
            env.seq,
            # In UTC, with the standard library's tzinfo: the device's own offset says
            # nothing the instant does not, and every later use (COPY, buckets) reads
            # the offset of a datetime.timezone several times faster than pydantic's.
            env.event_time.astimezone(UTC),
            env.schema_name,
            env.schema_version,
            orjson.dumps(env.body).decode(),
            partition,
            offset,
        )

    @property
    def key(self) -> tuple[str, str, int, datetime]:
        """The row's identity in the table: (device, boot, seq, event time)."""
        return (self.device_id, self.boot_id, self.seq, self.event_time)

    def record(self) -> tuple[Any, ...]:
        """The row in `COLUMNS` order, for COPY."""
        return (
            self.device_id,
            self.boot_id,
            self.seq,
            self.event_time,
            self.schema,
            self.schema_version,
            self.body_json,
            self.model,
            self.firmware,
            self.region,
            self.kafka_partition,
            self.kafka_offset,
            self.category,
            self.membership_tier,
            self.purchase_channel,
            self.analytics_consent,
            self.owner_key,
        )


@dataclass(frozen=True, slots=True)
class SourceOffset:
    """Where a consumer group is in one Kafka partition: the next offset to read, and
    the Kafka timestamp of the record just before it (to recognise the same log)."""

    topic: str
    partition: int
    next_offset: int
    last_timestamp: int | None


@dataclass(frozen=True, slots=True)
class Layout:
    """How the usage table is stored; fixed when the table is created."""

    kind: Kind
    partition_interval: timedelta


@dataclass(frozen=True, slots=True)
class MigrationReport:
    layout: Layout
    applied: list[str] = field(default_factory=list)


class UsageStore:
    """The usage table in PostgreSQL, behind a small asyncpg pool."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self.table = settings.table
        self._pool: asyncpg.Pool | None = None
        self._layout: Layout | None = None
        self._partitions: set[datetime] = set()
        self._insert_sql = ""
        self._after_insert_sql = ""

    async def __aenter__(self) -> Self:
        try:
            self._pool = await asyncpg.create_pool(
                self._settings.dsn.get_secret_value(),
                min_size=1,
                max_size=self._settings.pool_size,
            )
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pool. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        return self._pool

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise StoreUnavailable("the store is not migrated yet (call migrate())")
        return self._layout

    # -- schema ------------------------------------------------------------------------

    async def migrate(self) -> MigrationReport:
        """Bring the usage tables up to date (idempotent) and load the layout."""
        s = self._settings
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
            async with self.pool.acquire() as conn:
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
                    await self._apply_policies(conn)
                    if "003_device_daily" in applied:
                        # Created WITH NO DATA on a table that may hold history older
                        # than the refresh policy's window, which the policy would never
                        # materialise. NULL, NULL: the whole range; a procedure that
                        # cannot run inside a transaction block, hence here.
                        await conn.execute(
                            f"CALL refresh_continuous_aggregate('{self.table}_device_daily',"
                            " NULL, NULL)"
                        )
                else:
                    self._partitions = await self._existing_partitions(conn)
        except (MigrationError, StoreUnavailable) as exc:
            raise StoreUnavailable(f"migrating {self.table} failed: {exc}") from exc
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"migrating {self.table} failed: {exc!r}") from exc
        self._build_statements()
        if kind == "partitioned":
            now = datetime.now(UTC)
            await self.ensure_partitions([now, now + self.layout.partition_interval])
        return MigrationReport(self.layout, applied)

    async def _detect_kind(self, conn: Connection) -> Kind:
        """The table's recorded layout, or, for a new table, whether TimescaleDB loads."""
        if await conn.fetchval("SELECT to_regclass($1)", f"{self.table}_layout") is not None:
            kind: Kind = await conn.fetchval(f"SELECT kind FROM {self.table}_layout")
            return kind
        if not self._settings.use_timescaledb:
            return "partitioned"
        try:
            async with conn.transaction():
                await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            # Not installed, or not in shared_preload_libraries: plain PostgreSQL.
            log.info("TimescaleDB is not available (%s); using native partitions", exc)
            return "partitioned"
        return "timescaledb"

    async def _apply_policies(self, conn: Connection) -> None:
        """TimescaleDB's jobs, from the current settings (replaced on every migrate).

        Documented forms: add_retention_policy(relation, drop_after),
        add_compression_policy(hypertable, compress_after),
        add_continuous_aggregate_policy(cagg, start_offset, end_offset, schedule_interval);
        the remove_* functions with if_exists (named so since 2.8). The offsets are
        declared "any" (interval or integer), hence the casts: a bare parameter there
        has no type PostgreSQL could infer.
        """
        s = self._settings
        t = self.table
        # Late events up to allowed_lateness are re-aggregated by the refresh window;
        # start_offset bounds how far back a refresh reaches, so a very late event can
        # never make a refresh rescan the whole history.
        refresh = {
            f"{t}_hourly": (s.allowed_lateness + timedelta(hours=2), timedelta(hours=1)),
            f"{t}_daily": (s.allowed_lateness + timedelta(days=2), timedelta(days=1)),
            f"{t}_device_daily": (s.allowed_lateness + timedelta(days=2), timedelta(days=1)),
        }
        async with conn.transaction():
            for view, (start, end) in refresh.items():
                await conn.execute(
                    "SELECT remove_continuous_aggregate_policy($1::regclass, if_exists => true)",
                    view,
                )
                await conn.execute(
                    "SELECT add_continuous_aggregate_policy($1::regclass,"
                    " start_offset => $2::interval, end_offset => $3::interval,"
                    " schedule_interval => $4::interval)",
                    view,
                    start,
                    end,
                    timedelta(minutes=30),
                )
            # Compress only chunks no late event is expected in any more.
            await conn.execute(
                "SELECT remove_compression_policy($1::regclass, if_exists => true)", t
            )
            await conn.execute(
                "SELECT add_compression_policy($1::regclass, compress_after => $2::interval)",
                t,
                s.allowed_lateness + s.partition_interval,
            )
            await conn.execute("SELECT remove_retention_policy($1::regclass, if_exists => true)", t)
            await conn.execute(
                "SELECT add_retention_policy($1::regclass, drop_after => $2::interval)",
                t,
                s.retention,
            )

    def _build_statements(self) -> None:
        t = self.table
        cols = ", ".join(COLUMNS)
        # The slow path, for a batch that holds rows the table already has: COPY into
        # this connection's staging table (emptied at commit), then insert what is new.
        self._staging = f"{t}_staging"
        self._staging_sql = (
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {self._staging}"
            f" (LIKE {t} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        self._insert_sql = f"""
            INSERT INTO {t} ({cols}) SELECT {cols} FROM {self._staging}
            ON CONFLICT DO NOTHING
            RETURNING device_id, boot_id, seq, event_time
        """
        ctes = [
            f"""offsets AS (
                INSERT INTO {t}_offsets (group_id, topic, partition, next_offset, last_timestamp)
                SELECT $1, * FROM unnest($2::text[], $3::integer[], $4::bigint[], $5::bigint[])
                ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                    next_offset = excluded.next_offset,
                    last_timestamp = excluded.last_timestamp,
                    updated_at = now()
                RETURNING 1
            )"""
        ]
        if self.layout.kind == "partitioned":
            ctes.append(invalidation_cte(t, 6))
        self._after_insert_sql = "WITH " + ",\n".join(ctes) + "\nSELECT count(*) FROM offsets"

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

    async def ensure_partitions(self, times: Iterable[datetime]) -> list[str]:
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
        try:
            async with self.pool.acquire() as conn, conn.transaction():
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
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"creating partitions of {t} failed: {exc!r}") from exc
        self._partitions |= missing
        if created:
            log.info("created partitions %s", ", ".join(created))
        return created

    async def drop_expired(self, now: datetime | None = None) -> list[str]:
        """Drop raw data older than the retention; returns what was dropped.

        Plain PostgreSQL: partitions wholly older than `now - retention` (a partition
        with any younger row stays) and old rows in the DEFAULT partition, after
        materialising every noted rollup bucket; `retained_from` then tells later
        refreshes not to recompute buckets whose rows may be gone, so the rollups keep
        their history. TimescaleDB: `drop_chunks` (its retention policy
        does the same on a schedule).
        """
        cutoff = (now or datetime.now(UTC)) - self._settings.retention
        t = self.table
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if self.layout.kind == "timescaledb":
                    rows = await conn.fetch(
                        "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)",
                        t,
                        cutoff,
                    )
                    return [str(r[0]) for r in rows]
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
                await conn.execute(
                    f"UPDATE {t}_layout SET retained_from = $1"
                    " WHERE retained_from IS NULL OR retained_from < $1",
                    cutoff,
                )
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"retention on {t} failed: {exc!r}") from exc
        self._partitions -= set(expired)
        return [self._partition_name(s) for s in expired]

    # -- writing ---------------------------------------------------------------------------

    async def write(
        self,
        rows: Sequence[UsageRow],
        offsets: Sequence[SourceOffset] = (),
        *,
        group_id: str = "",
    ) -> int:
        """Store `rows` and `group_id`'s `offsets` in one transaction.

        Returns how many rows were new (not duplicates). The rows go in with COPY, the
        fastest way into PostgreSQL; only if the table already has one of them (a
        redelivery across batches, a replay) is the COPY undone, to its savepoint, and
        the batch inserted with `ON CONFLICT DO NOTHING` instead. Either way the store
        knows which rows were new, and only those reach the rollups.
        """
        if not rows and not offsets:
            return 0
        if not self._after_insert_sql:
            raise StoreUnavailable("the store is not migrated yet (call migrate())")
        unique = list(rows)
        keys = {(r.device_id, r.boot_id, r.seq, r.event_time) for r in rows}
        if len(keys) < len(rows):  # a redelivery inside the batch
            unique = list({r.key: r for r in reversed(rows)}.values())  # first of each
        if unique and self.layout.kind == "partitioned":
            await self.ensure_partitions(_partition_probes(unique, self.layout.partition_interval))
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                inserted = await self._insert(conn, unique) if unique else []
                parameters: list[Any] = [
                    group_id,
                    [o.topic for o in offsets],
                    [o.partition for o in offsets],
                    [o.next_offset for o in offsets],
                    [o.last_timestamp for o in offsets],
                ]
                if self.layout.kind == "partitioned":
                    parameters.append(hours_of([r.event_time for r in inserted]))
                await conn.fetchval(self._after_insert_sql, *parameters)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"writing {len(rows)} rows failed: {exc!r}") from exc
        return len(inserted)

    async def refresh_rollups(
        self, *, wait: bool = False, settled_only: bool = False, days: bool = True
    ) -> RefreshReport | None:
        """Materialise the plain layout's noted rollup buckets (see `ingest.rollups`):
        every one, or with `settled_only` those whose hour or day has ended (with `days`
        False, hours only).

        None on TimescaleDB (its refresh policies do this) and, unless `wait`, when
        another process is refreshing the same table right now.
        """
        if self.layout.kind != "partitioned":
            return None
        try:
            async with self.pool.acquire() as conn:
                return await refresh_rollups(
                    conn, self.table, wait=wait, settled_only=settled_only, days=days
                )
        except _DB_ERRORS as exc:
            raise StoreUnavailable(
                f"refreshing the rollups of {self.table} failed: {exc!r}"
            ) from exc

    async def _insert(self, conn: Connection, rows: list[UsageRow]) -> list[UsageRow]:
        """Insert `rows` (unique keys); returns those the table did not have yet."""
        records = [r.record() for r in rows]
        try:
            async with conn.transaction():  # a savepoint
                await conn.copy_records_to_table(self.table, records=records, columns=COLUMNS)
            return rows
        except asyncpg.UniqueViolationError:
            pass
        await conn.execute(self._staging_sql)
        await conn.copy_records_to_table(self._staging, records=records, columns=COLUMNS)
        returned = await conn.fetch(self._insert_sql)
        new = {(r["device_id"], r["boot_id"], r["seq"], r["event_time"]) for r in returned}
        return [r for r in rows if r.key in new]

    async def unlink_owners(self, erased: Sequence[tuple[UUID, str]]) -> int:
        """Remove erased owners' keys, and the membership tier stored with them, from
        every row and from the device-daily rollup; record each owner in
        `<table>_erasures`. Returns the raw rows changed.

        `erased` pairs each owner id with its key (`ingest.enrich.owner_key`). The
        region stays: it is a rollup key, and without the key a row no longer leads to
        a person (see README, Privacy). Idempotent. The plain layout's rollup rows are
        updated in place (its days may be older than the raw rows retention keeps); on
        TimescaleDB the continuous aggregate is refreshed over the changed rows' days.
        """
        if not erased:
            return 0
        t = self.table
        timescale = self.layout.kind == "timescaledb"
        try:
            changed = 0
            days: list[datetime] = []
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    if not timescale:
                        # A refresh running now could put the key back from its snapshot.
                        await lock_rollups(conn, t, wait=True)
                    changed += await self._unlink(conn, erased, days)
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
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"removing erased owners' keys failed: {exc!r}") from exc
        return changed

    async def _unlink(
        self, conn: Connection, erased: Sequence[tuple[UUID, str]], days: list[datetime]
    ) -> int:
        """`unlink_owners`' statements, in the caller's transaction; on TimescaleDB adds
        the first and last device-day of each owner's to `days`."""
        t = self.table
        timescale = self.layout.kind == "timescaledb"
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

    async def erasures_pending(self, registry_schema: str, limit: int = 10_000) -> list[UUID]:
        """Owners the registry in `registry_schema` has erased whose keys this table has
        not had removed yet (see `unlink_owners`)."""
        schema = migrations.quote_schema(registry_schema)
        try:
            rows = await self.pool.fetch(
                f"SELECT o.owner_id FROM {schema}.owners o WHERE o.status = 'erased'"
                f" AND NOT EXISTS (SELECT 1 FROM {self.table}_erasures e"
                " WHERE e.owner_id = o.owner_id) LIMIT $1",
                limit,
            )
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"reading erased owners failed: {exc!r}") from exc
        return [r["owner_id"] for r in rows]

    async def load_offsets(
        self, group_id: str, topic: str, partitions: Iterable[int]
    ) -> dict[int, SourceOffset]:
        """The stored positions of `group_id` in `topic`'s `partitions` (those it has)."""
        try:
            rows = await self.pool.fetch(
                f"SELECT partition, next_offset, last_timestamp FROM {self.table}_offsets"
                " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::integer[])",
                group_id,
                topic,
                list(partitions),
            )
        except _DB_ERRORS as exc:
            raise StoreUnavailable(f"reading offsets failed: {exc!r}") from exc
        return {
            r["partition"]: SourceOffset(
                topic, r["partition"], r["next_offset"], r["last_timestamp"]
            )
            for r in rows
        }

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run a read-only query (`{table}` in it names the usage table)."""
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(query.format(table=self.table), *args))


def _partition_probes(rows: Sequence[UsageRow], interval: timedelta) -> Iterable[datetime]:
    """Event times covering every partition `rows` need: the batch's min and max when
    they share a partition (the usual case), else every row's."""
    times = [r.event_time for r in rows]
    low, high = min(times), max(times)
    if partition_start(low, interval) == partition_start(high, interval):
        return (low,)
    return times
