"""Erasure on the usage side: erased owners' keys leave stored rows and rollups, and
the owners the registry has erased are found until each has been applied."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from ingest.erasure import erasures_pending, unlink_owners
from ingest.settings import Settings
from ingest.store import UsageStore
from tests.ingest.test_store import device_days, direct_device_days, pg, row

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[UsageStore]:
    async with UsageStore(pg(settings)) as s:
        await s.migrate()
        yield s


async def test_erasure_removes_owner_keys_from_the_device_daily_rollup(store: UsageStore) -> None:
    t = store.table
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    keyed = [dataclasses.replace(row("d1", s, at + s * HOUR), owner_key="gone") for s in range(30)]
    other = [dataclasses.replace(row("d2", 1, at), owner_key="stays")]
    await store.write(keyed + other)
    await store.refresh_rollups()
    assert await unlink_owners(store, [(uuid.uuid4(), "gone")]) == 30
    span = (at - DAY, at + 3 * DAY)
    async with store.pool.acquire() as conn:
        keys = await conn.fetch(f"SELECT DISTINCT owner_key FROM {t}_device_daily")
        assert {r[0] for r in keys} == {None, "stays"}
        # Still what the raw rows say, materialised and live alike.
        assert await device_days(conn, t, *span) == await direct_device_days(conn, t, *span)
        await store.write([dataclasses.replace(row("d1", 99, at), owner_key=None)])
        assert await device_days(conn, t, *span) == await direct_device_days(conn, t, *span)


async def test_pending_erasures_are_the_registrys_erased_owners_not_applied_yet(
    settings: Settings, store: UsageStore
) -> None:
    """The registry's schema is the `settings` fixture's (migrated); an erased owner is
    pending until `unlink_owners` has recorded it, whether or not it had any rows."""
    schema = settings.registry.db_schema
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    erased, active = uuid.uuid4(), uuid.uuid4()
    async with store.pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {schema}.owners (owner_id, status, created_at, last_active_at,"
            " erased_at) VALUES ($1, 'erased', $3, $3, $3), ($2, 'active', $3, $3, NULL)",
            erased,
            active,
            at,
        )
    await store.write([dataclasses.replace(row("d1", 1, at), owner_key="k-erased")])
    assert await erasures_pending(store, schema) == [erased]
    assert await unlink_owners(store, [(erased, "k-erased")]) == 1
    assert await erasures_pending(store, schema) == []
    # Applying it again is harmless and changes nothing more.
    assert await unlink_owners(store, [(erased, "k-erased")]) == 0
    recorded = await store.fetch("SELECT owner_id, unlinked FROM {table}_erasures")
    assert [tuple(r) for r in recorded] == [(erased, 1)]
