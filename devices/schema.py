"""The registry's schema: its migrations (`devices/sql`), applied by the registry on
start-up and by the composition root before the consumer, which reads the schema but
never creates it."""

from __future__ import annotations

from importlib.resources import files

import asyncpg

from devices.errors import MigrationError, RegistryUnavailable
from ingest.errors import MigrationError as StoreMigrationError
from ingest.errors import StoreUnavailable
from ingest.migrations import Connection, migrate
from ingest.postgres import translated

MIGRATIONS_COMPONENT = "registry"
# The notification triggers and the firmware history (now 002_notify, 003_firmware)
# were applied by the consumer as their own component, numbered 001 and 002; the
# registry owns them now and takes their records over (see `ingest.migrations`).
_FORMER_COMPONENTS = {"enrich.notify": 1}


async def migrate_registry(conn: Connection, schema: str) -> list[str]:
    """Apply the registry's pending migrations (`devices/sql`) in `schema`: its tables,
    the change notifications the consumer's cache listens to, the firmware history.

    The runner is the data path's; its errors are translated into the registry's own,
    which the registry's callers handle.
    """
    try:
        return await migrate(
            conn,
            schema=schema,
            component=MIGRATIONS_COMPONENT,
            directory=files("devices") / "sql",
            absorbs=_FORMER_COMPONENTS,
        )
    except StoreMigrationError as exc:
        raise MigrationError(str(exc)) from exc
    except StoreUnavailable as exc:
        raise RegistryUnavailable(str(exc)) from exc


async def migrate_registry_at(dsn: str, schema: str) -> list[str]:
    """`migrate_registry` on a connection of its own: what the composition root runs
    before the consumer, which enriches from the registry's schema but never creates it."""
    with translated(RegistryUnavailable, "PostgreSQL unreachable", detail=str):
        conn = await asyncpg.connect(dsn)
    try:
        return await migrate_registry(conn, schema)
    finally:
        await conn.close()
