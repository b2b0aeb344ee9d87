"""The usage store: one row per (device, boot, seq), written in idempotent batches.

A batch goes in with COPY into a per-connection staging table, then one
`INSERT ... SELECT ... ON CONFLICT DO NOTHING` into the usage table, in one transaction:
COPY is the fastest way into PostgreSQL, and the conflict clause makes a redelivered
message (the pipeline is at-least-once) cost nothing and change nothing.

The usage table is created by `migrate()`; later issues turn it into a TimescaleDB
hypertable (or a natively partitioned table) with rollups.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import asyncpg
import orjson

from ingest.errors import StoreUnavailable
from ingest.settings import PostgresSettings
from schemas.envelope import Envelope

log = logging.getLogger(__name__)

COLUMNS = (
    "device_id",
    "boot_id",
    "seq",
    "event_time",
    "schema",
    "schema_version",
    "body",
    "kafka_partition",
    "kafka_offset",
)

_STAGING = "usagepipe_staging"

# One lock key for every process that changes usagepipe's tables.
_MIGRATION_LOCK = 0x75736167  # "usag"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One stored usage event, as the consumer hands it to the store."""

    device_id: str
    boot_id: str
    seq: int
    event_time: datetime
    schema: str
    schema_version: int
    body_json: str
    kafka_partition: int
    kafka_offset: int

    @classmethod
    def from_envelope(cls, env: Envelope, partition: int, offset: int) -> UsageRow:
        return cls(
            env.device_id,
            env.boot_id,
            env.seq,
            env.event_time,
            env.schema_name,
            env.schema_version,
            orjson.dumps(env.body).decode(),
            partition,
            offset,
        )


class UsageStore:
    """The usage table in PostgreSQL, behind a small asyncpg pool."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self.table = settings.table
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> Self:
        try:
            self._pool = await asyncpg.create_pool(
                self._settings.dsn.get_secret_value(),
                min_size=1,
                max_size=self._settings.pool_size,
                init=self._prepare_connection,
            )
        except (OSError, asyncpg.PostgresError) as exc:
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

    @staticmethod
    async def _prepare_connection(conn: asyncpg.Connection) -> None:
        # A temporary table lives as long as its connection, and the pool keeps
        # connections: created once per connection, emptied by every commit.
        await conn.execute(
            f"""
            CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (
                device_id text, boot_id text, seq bigint, event_time timestamptz,
                schema text, schema_version integer, body jsonb,
                kafka_partition integer, kafka_offset bigint
            ) ON COMMIT DELETE ROWS
            """
        )

    async def migrate(self) -> None:
        """Create the usage table and its indexes where they do not exist. Idempotent."""
        t = self.table
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                f"""
                CREATE TABLE IF NOT EXISTS {t} (
                    device_id       text        NOT NULL,
                    boot_id         text        NOT NULL,
                    seq             bigint      NOT NULL,
                    event_time      timestamptz NOT NULL,
                    schema          text        NOT NULL,
                    schema_version  integer     NOT NULL,
                    body            jsonb       NOT NULL,
                    kafka_partition integer     NOT NULL,
                    kafka_offset    bigint      NOT NULL,
                    ingested_at     timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (device_id, boot_id, seq)
                );
                CREATE INDEX IF NOT EXISTS {t}_event_time_idx ON {t} (event_time);
                """
            )

    async def write(self, rows: Sequence[UsageRow]) -> int:
        """Store `rows` in one transaction; returns how many were new (not duplicates)."""
        if not rows:
            return 0
        records = [
            (
                r.device_id,
                r.boot_id,
                r.seq,
                r.event_time,
                r.schema,
                r.schema_version,
                r.body_json,
                r.kafka_partition,
                r.kafka_offset,
            )
            for r in rows
        ]
        cols = ", ".join(COLUMNS)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(_STAGING, records=records, columns=COLUMNS)
                status = await conn.execute(
                    f"INSERT INTO {self.table} ({cols}) SELECT {cols} FROM {_STAGING} "
                    "ON CONFLICT DO NOTHING"
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"writing {len(rows)} rows failed: {exc!r}") from exc
        return int(status.rsplit(" ", 1)[1])

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run a read-only query (`{table}` in it names the usage table)."""
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(query.format(table=self.table), *args))
