"""The usage store: one row per message id `(device_id, boot_id, seq)`, written in
idempotent batches, together with the Kafka offsets the batch ends at.

A batch is one transaction. Its rows go in with COPY straight into the usage table, and
their ids (with the event time and a digest of the content of each) into `<table>_ids`
(migration 007: the id is its primary key, which the range-partitioned usage table
cannot hold), under one savepoint: on plain PostgreSQL the database writes the ids
itself, from the rows the COPY inserted (a statement-level trigger, the partitioned
migration 010), on TimescaleDB the store COPYs them too (`ingest.rows.content_digest`).
If an id is already stored (a redelivery, a replay, a resend), or comes twice in the
batch, that savepoint is undone and the batch takes the slow path: COPY into a staging
table (temporary, per connection, emptied at commit), then one statement inserts the
ids `ON CONFLICT DO NOTHING RETURNING` and the rows whose id went in, which tells which
rows were new. The fast path is the common case and costs one copy of the data instead
of two. Then one statement notes the hours the new rows
fall in for the rollups (see `ingest.rollups`) and upserts the
consumer group's next offsets into `<table>_offsets`, and the batch's dead letters go
into `<table>_dead_letters` (`ingest.dead_letter_table`). A redelivered
message costs little and changes nothing, and the offsets can never disagree with the
rows: the consumer seeks to them when it is given a partition.

A resend of a stored id with another event time or content (or two such rows in one
batch: the first stays) is a conflicting duplicate: the store raises
`ConflictingDuplicates` naming each with what differs, nothing of the write is kept,
and the consumer dead-letters them (`conflicting_duplicate`) and writes the rest. An
identical resend is a duplicate, counted and dropped.

A row PostgreSQL refuses for what it holds (a data exception, an integrity violation)
fails the whole transaction, and retrying it would fail forever while every partition
waits. So such a failure is not an outage: the store finds the rows at fault
(`UsageStore._refused`) and raises `RowsRefused` naming them; the consumer
dead-letters them (`unstorable`) and writes the rest. Only connection-level failures
and the server's other refusals are `StoreUnavailable`, retried.

The table's lifecycle (migrations, layout, partitions, TimescaleDB policies, retention)
is in `ingest.tables`, the row type in `ingest.rows`, erasure in `ingest.erasure`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import asyncpg

from ingest.caggs import refresh_aggregates
from ingest.dead_letter_table import LetterRow, expire_letters, insert_letters
from ingest.errors import ConflictingDuplicates, RowsRefused, StoreUnavailable
from ingest.migrations import Connection
from ingest.postgres import translated
from ingest.rollups import RefreshReport, hours_of, invalidation_cte, refresh_rollups
from ingest.rows import COLUMNS, ID_COLUMNS, SourceOffset, UsageRow, content_digest
from ingest.settings import PostgresSettings
from ingest.tables import Layout, MigrationReport, UsageTables, partition_probes

log = logging.getLogger(__name__)

SERVER_SETTINGS = {"timescaledb.max_tuples_decompressed_per_dml_transaction": "0"}
"""No cap on the rows one UPDATE may decompress (TimescaleDB's default: 100,000, per
statement; plain PostgreSQL keeps the setting as an unused placeholder). Erasure's
UPDATE (`ingest.erasure`) decompresses the compressed batches holding an owner's rows:
with compressed batches of up to 1,000 rows (migration 006), about 1,000 rows per
one-day chunk the owner has rows in, so an owner with more than about three months of
history would otherwise be refused ("tuple decompression limit exceeded by operation")
and never erased. The store's other statements decompress nothing: redeliveries into
compressed chunks are checked in memory."""


REFUSED_DATA_CLASSES = ("22", "23", "54")
"""SQLSTATE classes that refuse what a row holds rather than report an outage: data
exception (a NUL in text, a value out of range), integrity constraint violation (a
check), program limit exceeded (a value too large to index)."""


def refuses_data(exc: asyncpg.PostgresError) -> bool:
    """Whether PostgreSQL refused `exc`'s statement for the data it was given."""
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] in REFUSED_DATA_CLASSES


class UsageStore:
    """The usage table in PostgreSQL, behind a small asyncpg pool."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self.table = settings.table
        self._pool: asyncpg.Pool | None = None
        self.tables = UsageTables(settings)
        self._insert_sql = ""
        self._after_insert_sql = ""
        self._ids_by_trigger = False

    async def __aenter__(self) -> Self:
        with translated(StoreUnavailable, "PostgreSQL unreachable", detail=str):
            self._pool = await asyncpg.create_pool(
                self._settings.dsn.get_secret_value(),
                min_size=1,
                max_size=self._settings.pool_size,
                server_settings=SERVER_SETTINGS,
            )
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
        return self.tables.layout

    # -- schema ------------------------------------------------------------------------

    async def migrate(self, *, update_policies: bool = False) -> MigrationReport:
        """Bring the usage tables up to date (idempotent) and load the layout; with
        `update_policies`, also change TimescaleDB policies the settings no longer match
        (see `ingest.policies`)."""
        report = await self.tables.migrate(self.pool, update_policies=update_policies)
        self._build_statements()
        return report

    async def ensure_partitions(self, times: Iterable[datetime]) -> list[str]:
        """See `UsageTables.ensure_partitions`."""
        return await self.tables.ensure_partitions(self.pool, times)

    async def drop_expired(self, now: datetime | None = None) -> list[str]:
        """See `UsageTables.drop_expired`."""
        return await self.tables.drop_expired(self.pool, now)

    def _build_statements(self) -> None:
        t = self.table
        cols = ", ".join(COLUMNS)
        # The slow path, for a batch that holds rows the table already has: COPY into
        # this connection's staging table (emptied at commit), then insert what is new.
        self._staging = f"{t}_staging"
        self._staging_sql = (
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {self._staging}"
            f" (LIKE {t} INCLUDING DEFAULTS, digest bytea) ON COMMIT DELETE ROWS"
        )
        ids = ", ".join(ID_COLUMNS)
        staged = ", ".join(f"s.{c}" for c in COLUMNS)
        same_id = 'n.device_id = s.device_id COLLATE "C" AND n.boot_id = s.boot_id COLLATE "C"'
        # On plain PostgreSQL the database writes the ids and their digests (migration
        # 010), here too: the staged rows' digests are computed as its trigger does.
        self._ids_by_trigger = self.layout.kind == "partitioned"
        digest = f"{t}_content_digest(s.schema, s.schema_version, s.body)"
        if not self._ids_by_trigger:
            digest = "s.digest"
        # A row goes in only if its id did (on TimescaleDB the hypertable keeps its own
        # key too, see its migration 007). The trigger stands aside for this statement
        # (`usagepipe.ids_written`, set around it by `_insert`).
        self._insert_sql = f"""
            WITH n AS (
                INSERT INTO {t}_ids ({ids})
                SELECT s.device_id, s.boot_id, s.seq, s.event_time, {digest}
                FROM {self._staging} s
                ON CONFLICT DO NOTHING
                RETURNING device_id, boot_id, seq
            )
            INSERT INTO {t} ({cols})
            SELECT {staged} FROM {self._staging} s JOIN n ON {same_id} AND n.seq = s.seq
            ON CONFLICT DO NOTHING
            RETURNING device_id, boot_id, seq, event_time
        """
        # The staged rows whose id is stored with other content (a statement of its
        # own, so that it sees ids another writer committed while ours waited on them;
        # those just inserted are their own stored ids). An id stored before migration
        # 007 has no digest: its event time decides.
        self._conflicts_sql = f"""
            SELECT s.device_id, s.boot_id, s.seq, n.event_time AS stored_time,
                   s.event_time <> n.event_time AS other_time,
                   n.digest IS NOT NULL AND n.digest <> {digest} AS other_content
            FROM {self._staging} s JOIN {t}_ids n ON {same_id} AND n.seq = s.seq
            WHERE s.event_time <> n.event_time OR n.digest <> {digest}
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
        ctes.append(invalidation_cte(t, 6))
        self._after_insert_sql = "WITH " + ",\n".join(ctes) + "\nSELECT count(*) FROM offsets"

    # -- writing ---------------------------------------------------------------------------

    async def write(
        self,
        rows: Sequence[UsageRow],
        offsets: Sequence[SourceOffset] = (),
        *,
        group_id: str = "",
        letters: Sequence[LetterRow] = (),
    ) -> int:
        """Store `rows`, `group_id`'s `offsets` and the batch's dead `letters` in one
        transaction (letters: `ingest.dead_letter_table`; a redelivered one changes nothing).

        Returns how many rows were new (not duplicates). The rows go in with COPY, the
        fastest way into PostgreSQL, their ids too; only if one of the ids is already
        stored (a redelivery across batches, a replay, a resend) is the COPY undone, to
        its savepoint, and the batch's ids inserted with `ON CONFLICT DO NOTHING`
        instead, then the rows whose id went in. Either way the store knows which rows
        were new, and only those reach the rollups. Raises `ConflictingDuplicates`
        (keeping nothing) for rows whose id is stored, or earlier in `rows`, with other
        content (see `_insert`)."""
        if not rows and not offsets and not letters:
            return 0
        if not self._after_insert_sql:
            raise StoreUnavailable("the store is not migrated yet (call migrate())")
        if rows and self.layout.kind == "partitioned":
            await self.ensure_partitions(partition_probes(rows, self.layout.partition_interval))
        committing = False
        try:
            with translated(StoreUnavailable, f"writing {len(rows)} rows failed"):
                try:
                    async with self.pool.acquire() as conn, conn.transaction():
                        inserted = await self._insert(conn, rows) if rows else []
                        parameters: list[Any] = [
                            group_id,
                            [o.topic for o in offsets],
                            [o.partition for o in offsets],
                            [o.next_offset for o in offsets],
                            [o.last_timestamp for o in offsets],
                        ]
                        parameters.append(hours_of([r.event_time for r in inserted]))
                        await conn.fetchval(self._after_insert_sql, *parameters)
                        await insert_letters(conn, self.table, letters)
                        committing = True
                except asyncpg.PostgresError as exc:
                    if not refuses_data(exc):
                        raise
                    refused = await self._refused(rows)
                    if not refused:  # not a row's fault (the offsets, the notes): retried
                        raise
                    raise RowsRefused(refused) from exc
        except StoreUnavailable as exc:
            # The connection failed while COMMIT was under way: the transaction may have
            # committed with its reply lost. Retried, its rows would all count as
            # duplicates; so look: the offsets stored are this batch's only if it did.
            if committing and offsets and await self._offsets_stored(group_id, offsets):
                log.warning(
                    "%s, but the transaction had committed: %d rows new", exc, len(inserted)
                )
                return len(inserted)
            raise
        return len(inserted)

    async def write_letters(self, letters: Sequence[LetterRow]) -> int:
        """Store dead `letters` alone (the bridge's, `ingest.dead_letter_table`);
        returns how many were new."""
        with translated(StoreUnavailable, f"writing {len(letters)} dead letters failed"):
            async with self.pool.acquire() as conn, conn.transaction():
                return await insert_letters(conn, self.table, letters)

    async def expire_letters(self, now: datetime | None = None) -> int:
        """Delete the dead letters older than the retention (`drop_expired` does it
        too); returns how many."""
        cutoff = (now or datetime.now(UTC)) - self._settings.retention
        with translated(StoreUnavailable, f"expiring the dead letters of {self.table} failed"):
            async with self.pool.acquire() as conn:
                return await expire_letters(conn, self.table, cutoff)

    async def _offsets_stored(self, group_id: str, offsets: Sequence[SourceOffset]) -> bool:
        """Whether `group_id`'s stored offsets are `offsets` (False if that cannot be read)."""
        try:
            for topic in {o.topic for o in offsets}:
                mine = [o for o in offsets if o.topic == topic]
                stored = await self.load_offsets(group_id, topic, [o.partition for o in mine])
                if any(stored.get(o.partition) != o for o in mine):
                    return False
        except StoreUnavailable:
            return False
        return True

    async def _refused(self, rows: Sequence[UsageRow]) -> list[tuple[UsageRow, str]]:
        """Which of `rows` PostgreSQL refuses for what they hold, each with its message:
        found by halving, each half tried in a savepoint of a transaction that is rolled
        back at the end (a batch with one bad row of 5,000 takes some 26 tries). Rare: it
        runs only after a write failed that way."""
        refused: list[tuple[UsageRow, str]] = []
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                pending = [list(rows)]
                while pending:
                    chunk = pending.pop()
                    try:
                        async with conn.transaction():  # a savepoint
                            await self._insert(conn, chunk)
                    except ConflictingDuplicates:
                        pass  # PostgreSQL took the chunk: its conflicts are another matter
                    except asyncpg.PostgresError as exc:
                        if not refuses_data(exc):
                            raise
                        if len(chunk) == 1:
                            refused.append((chunk[0], f"{type(exc).__name__}: {exc}"))
                        else:
                            half = len(chunk) // 2
                            pending += [chunk[half:], chunk[:half]]
            finally:
                await transaction.rollback()
        return refused

    async def refresh_rollups(
        self,
        *,
        wait: bool = False,
        settled_only: bool = False,
        days: bool = True,
        now: datetime | None = None,
    ) -> RefreshReport | None:
        """Materialise the noted rollup buckets (see `ingest.rollups`): every one, or
        with `settled_only` those whose hour or day has ended by `now` (with `days`
        False, hours only). On TimescaleDB always those that have ended (`ingest.caggs`:
        it never materialises an open bucket; reads take it from the raw rows meanwhile).

        None, unless `wait`, when another process is refreshing the same table now.
        """
        with translated(StoreUnavailable, f"refreshing the rollups of {self.table} failed"):
            async with self.pool.acquire() as conn:
                if self.layout.kind == "timescaledb":
                    return await refresh_aggregates(conn, self.table, wait=wait, days=days, now=now)
                return await refresh_rollups(
                    conn, self.table, wait=wait, settled_only=settled_only, days=days, now=now
                )

    async def _insert(self, conn: Connection, rows: Sequence[UsageRow]) -> list[UsageRow]:
        """Insert `rows` and their ids; returns those the table did not have yet (the
        first of each id, if one comes more than once). Raises `ConflictingDuplicates`
        (the caller's transaction must then roll back) for those whose id is stored, or
        earlier in `rows`, with other content.

        On TimescaleDB the ids go in by COPY after the rows, in their savepoint, sorted
        by id (each goes into the ids' btree beside the one before; measured 0.1-0.2 s
        per 100,000 rows cheaper than unsorted and first, bench/store.py)."""
        records = [r.record() for r in rows]
        try:
            async with conn.transaction():  # a savepoint
                await conn.copy_records_to_table(self.table, records=records, columns=COLUMNS)
                if not self._ids_by_trigger:
                    await conn.copy_records_to_table(
                        f"{self.table}_ids",
                        records=sorted(
                            (*r.key, content_digest(x)) for r, x in zip(rows, records, strict=True)
                        ),
                        columns=ID_COLUMNS,
                    )
            return list(rows)
        except asyncpg.UniqueViolationError:
            pass
        unique, found = first_of_each(rows)
        if len(unique) < len(rows):
            records = [r.record() for r in unique]
        await conn.execute(self._staging_sql)
        staged: list[tuple[Any, ...]] = records
        columns: tuple[str, ...] = COLUMNS
        if not self._ids_by_trigger:
            staged = [(*x, content_digest(x)) for x in records]
            columns = (*COLUMNS, "digest")
        await conn.copy_records_to_table(self._staging, records=staged, columns=columns)
        if self._ids_by_trigger:
            await conn.execute("SELECT set_config('usagepipe.ids_written', 'on', true)")
        returned = await conn.fetch(self._insert_sql)
        if self._ids_by_trigger:
            await conn.execute("SELECT set_config('usagepipe.ids_written', 'off', true)")
        new = {(r["device_id"], r["boot_id"], r["seq"], r["event_time"]) for r in returned}
        if len(new) < len(unique):
            by_id = {r.key[:3]: r for r in unique}
            for c in await conn.fetch(self._conflicts_sql):
                if not (c["other_time"] or c["other_content"]):
                    continue
                row = by_id[(c["device_id"], c["boot_id"], c["seq"])]
                found.append((row, conflict_message(row, c["stored_time"], dict(c))))
        if found:
            raise ConflictingDuplicates(found)
        return [r for r in unique if r.key in new]

    async def load_offsets(
        self, group_id: str, topic: str, partitions: Iterable[int]
    ) -> dict[int, SourceOffset]:
        """The stored positions of `group_id` in `topic`'s `partitions` (those it has)."""
        with translated(StoreUnavailable, "reading offsets failed"):
            rows = await self.pool.fetch(
                f"SELECT partition, next_offset, last_timestamp FROM {self.table}_offsets"
                " WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::integer[])",
                group_id,
                topic,
                list(partitions),
            )
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


def first_of_each(rows: Sequence[UsageRow]) -> tuple[list[UsageRow], list[tuple[UsageRow, str]]]:
    """The first row of each message id in `rows`, and the later ones of an id that
    differ from its first, each with what differs (identical later ones, redeliveries
    inside one batch, are dropped: duplicates)."""
    first: dict[tuple[str, str, int], UsageRow] = {}
    conflicts: list[tuple[UsageRow, str]] = []
    for row in rows:
        seen = first.setdefault((row.device_id, row.boot_id, row.seq), row)
        if seen is row:
            continue
        differs = {
            "other_time": row.event_time != seen.event_time,
            "other_content": (row.schema, row.schema_version, row.body)
            != (seen.schema, seen.schema_version, seen.body),
        }
        if any(differs.values()):
            conflicts.append((row, conflict_message(row, seen.event_time, differs, batch=True)))
    if len(first) == len(rows):
        return list(rows), conflicts
    return list(first.values()), conflicts


def conflict_message(
    row: UsageRow, stored_time: datetime, differs: Mapping[str, bool], *, batch: bool = False
) -> str:
    """Why `row` is a conflicting duplicate: its id is stored (or, `batch`, earlier in
    the same batch) with `stored_time`, and `differs` (a mapping: `other_time`,
    `other_content`) says in what it differs."""
    what = []
    if differs["other_time"]:
        what.append(f"event_time ({row.event_time.isoformat()}, not {stored_time.isoformat()})")
    if differs["other_content"]:
        what.append("schema, schema_version or body")
    where = "earlier in the same batch" if batch else "already stored"
    return (
        f"(device_id, boot_id, seq) = ({row.device_id!r}, {row.boot_id!r}, {row.seq}) is"
        f" {where} with other content; this message differs in {', '.join(what)}."
        " One id names one message: the first stays"
    )
