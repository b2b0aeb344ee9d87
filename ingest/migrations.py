"""Versioned SQL migrations, applied once each, in order, by any number of processes.

A component (the registry, the usage store, ...) keeps its migrations as numbered files
`NNN_name.sql` in one directory (a package resource or a plain path). `migrate()` applies
the ones not yet recorded in `<schema>.schema_migrations` for that component, all in one
transaction: either every pending file is applied or none is.

Two processes starting together both call `migrate()`; a transaction-level advisory lock
(one per schema) makes the second wait for the first and then find nothing to do. A file
that changed after it was applied is refused (its SHA-256 is recorded), because the
database would silently differ from what the file says.

A component may take over another's recorded history (`absorbs`) when the files move
to it unchanged: the records are renamed and renumbered in the same transaction, so a
database that applied them under the old name applies nothing again.

Migration files must not contain BEGIN/COMMIT, and create objects without a schema
prefix: the runner sets `search_path` to the target schema first (then `public`, where
extensions usually live).
"""

from __future__ import annotations

import hashlib
import importlib.resources.abc
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ingest.errors import MigrationError, StoreUnavailable
from ingest.postgres import translated
from ingest.sql_names import quote_schema

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_COMPONENT = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")

Directory = importlib.resources.abc.Traversable | Path

Connection = asyncpg.Connection | PoolConnectionProxy
"""A connection of its own or one borrowed from a pool: both work everywhere here."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its number, its name (`001_registry`) and its SQL."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def advisory_lock_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key for the given names."""
    digest = hashlib.sha256("\x1f".join(("usagepipe", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def load_migrations(directory: Directory) -> list[Migration]:
    """The migration files in `directory`, sorted by number; other files are ignored."""
    found: dict[int, Migration] = {}
    for entry in directory.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"migration number {version:03d} is used twice: "
                f"{found[version].name}.sql and {entry.name}"
            )
        found[version] = Migration(version, entry.name.removesuffix(".sql"), entry.read_text())
    return [found[version] for version in sorted(found)]


async def migrate(
    conn: Connection,
    *,
    schema: str,
    component: str,
    directory: Directory,
    absorbs: Mapping[str, int] | None = None,
) -> list[str]:
    """Apply `component`'s pending migrations in `schema`; return the names applied.

    Idempotent: a second call returns `[]`. Safe to run concurrently from several
    processes (they serialise on an advisory lock held until the transaction ends).

    `absorbs` maps an older component whose files are now `component`'s (moved
    unchanged, so their checksums still hold) to how many numbers later they come
    here: its records become `component`'s, renumbered, names included.
    """
    quoted = quote_schema(schema)
    for name in (component, *(absorbs or {})):
        if not _COMPONENT.match(name):
            raise ValueError(f"component {name!r} is not a plain name")
    migrations = load_migrations(directory)
    applied: list[str] = []
    with translated(StoreUnavailable, f"could not migrate schema {schema}", detail=str):
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", advisory_lock_key("migrate", schema)
            )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            await conn.execute(f"SET LOCAL search_path TO {quoted}, public")
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    component  text        NOT NULL,
                    version    integer     NOT NULL,
                    name       text        NOT NULL,
                    checksum   text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (component, version)
                )
                """
            )
            for former, shift in (absorbs or {}).items():
                await conn.execute(
                    "UPDATE schema_migrations SET component = $1, version = version + $3,"
                    " name = to_char(version + $3, 'FM000') || substr(name, 4)"
                    " WHERE component = $2",
                    component,
                    former,
                    shift,
                )
            rows = await conn.fetch(
                "SELECT version, name, checksum FROM schema_migrations WHERE component = $1",
                component,
            )
            done = {row["version"]: (row["name"], row["checksum"]) for row in rows}
            for migration in migrations:
                if migration.version in done:
                    name, checksum = done[migration.version]
                    if checksum != migration.checksum:
                        raise MigrationError(
                            f"{component} migration {name} was changed after it was applied "
                            f"in schema {schema}; add a new migration instead"
                        )
                    continue
                log.info("applying %s migration %s in schema %s", component, migration.name, schema)
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    # The file itself is wrong (or does not fit this database): trying
                    # again will not help, so not StoreUnavailable.
                    raise MigrationError(
                        f"{component} migration {migration.name} failed in schema {schema}: {exc}"
                    ) from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (component, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    component,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
                applied.append(migration.name)
    return applied
