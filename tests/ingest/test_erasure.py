"""Erasure on the usage side: erased owners' keys leave stored rows and rollups, and
the owners the registry has erased are found until each has been applied."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from ingest.enrich import Enricher
from ingest.erasure import erasure_backlog, erasures_pending, unlink_owners
from ingest.erasure_proof import Proof, prove_erasure
from ingest.errors import StoreUnavailable
from ingest.metrics import ConsumerMetrics
from ingest.owner_keys import keys_for, load_secrets
from ingest.personal_data import CATALOGUE
from ingest.rollups import Rollup, materialised_rows
from ingest.settings import Settings
from ingest.store import UsageStore
from tests.conftest import connection, require_timescaledb
from tests.ingest.test_store import Connection, device_days, direct_device_days, pg, row

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


async def add_owner(
    store: UsageStore, schema: str, owner: uuid.UUID, at: datetime, *, erased: bool
) -> None:
    """An owner in the registry's table, erased (as `devices.owners.erase` leaves one)
    or active."""
    await store.pool.execute(
        f"INSERT INTO {schema}.owners (owner_id, status, created_at, last_active_at,"
        " erased_at) VALUES ($1, $2, $3, $3, CASE WHEN $4 THEN $3::timestamptz END)",
        owner,
        "erased" if erased else "active",
        at,
        erased,
    )


async def test_erasure_removes_owner_keys_from_the_device_daily_rollup(either: UsageStore) -> None:
    store = either
    t = store.table
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    keyed = [dataclasses.replace(row("d1", s, at + s * HOUR), owner_key="gone") for s in range(30)]
    other = [dataclasses.replace(row("d2", 1, at), owner_key="stays")]
    await store.write(keyed + other)
    await store.refresh_rollups()
    assert await unlink_owners(store, [(uuid.uuid4(), ["gone"])]) == 30
    span = (at - DAY, at + 3 * DAY)
    async with store.pool.acquire() as conn:
        keys = await conn.fetch(f"SELECT DISTINCT owner_key FROM {t}_device_daily")
        assert {r[0] for r in keys} == {None, "stays"}
        # Still what the raw rows say, materialised and live alike.
        assert await device_days(conn, t, *span) == await direct_device_days(conn, t, *span)
        await store.write([dataclasses.replace(row("d1", 99, at), owner_key=None)])
        assert await device_days(conn, t, *span) == await direct_device_days(conn, t, *span)


async def test_pending_erasures_are_the_registrys_erased_owners_not_verified_yet(
    settings: Settings, either: UsageStore
) -> None:
    """The registry's schema is the `settings` fixture's (migrated); an erased owner is
    pending until a pass of `unlink_owners` after the first found nothing left."""
    store = either
    schema = settings.registry.db_schema
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    erased, active = uuid.uuid4(), uuid.uuid4()
    await add_owner(store, schema, erased, at, erased=True)
    await add_owner(store, schema, active, at, erased=False)
    await store.write([dataclasses.replace(row("d1", 1, at), owner_key="k-erased")])
    assert await erasures_pending(store, schema) == [erased]
    assert await unlink_owners(store, [(erased, ["k-erased"])]) == 1
    assert await erasures_pending(store, schema) == [erased]  # applied, not verified
    # Applying it again is harmless, changes nothing more, and verifies it.
    assert await unlink_owners(store, [(erased, ["k-erased"])]) == 0
    assert await erasures_pending(store, schema) == []
    recorded = await store.fetch("SELECT owner_id, unlinked, verified FROM {table}_erasures")
    assert [tuple(r) for r in recorded] == [(erased, 1, True)]


async def test_the_consumer_reports_the_erasures_left_after_each_check(
    settings: Settings, either: UsageStore
) -> None:
    """`usagepipe_consumer_erasures_pending` and the oldest one's erasure time: after
    the pass that applies two erasures both are still pending (not verified); after the
    next pass (a consumer's check at its start) none is."""
    store, schema = either, settings.registry.db_schema
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    await add_owner(store, schema, uuid.uuid4(), at, erased=True)
    await add_owner(store, schema, uuid.uuid4(), at + HOUR, erased=True)
    await add_owner(store, schema, uuid.uuid4(), at, erased=False)
    assert await erasure_backlog(store, schema) == (2, at)
    dsn = settings.postgres.dsn.get_secret_value()
    for expected in ((2.0, at.timestamp()), (0.0, 0.0)):  # applied; then verified
        metrics = CollectorRegistry()
        enricher = Enricher(
            settings.enrich, registry_schema=schema, dsn=dsn, metrics=ConsumerMetrics(metrics)
        )
        async with enricher:
            await enricher.apply_erasures(store)
        assert (
            metrics.get_sample_value("usagepipe_consumer_erasures_pending"),
            metrics.get_sample_value("usagepipe_consumer_erasure_oldest_pending_timestamp_seconds"),
        ) == expected
    assert await erasure_backlog(store, schema) == (0, None)


async def test_a_key_put_back_after_the_first_pass_is_removed_by_the_next(
    settings: Settings, either: UsageStore
) -> None:
    """A batch enriched before the erasure and committed after it, and a refresh run
    from a snapshot older than the erasure, both put the key back: the erasure stays
    pending until a pass finds nothing, and the rollup ends without the key."""
    store, t, schema = either, either.table, settings.registry.db_schema
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    owner = uuid.uuid4()
    await add_owner(store, schema, owner, at, erased=True)
    keyed = [dataclasses.replace(row("d1", s, at + s * HOUR), owner_key="k1") for s in range(5)]
    await store.write(keyed)
    await store.refresh_rollups(wait=True)
    assert await unlink_owners(store, [(owner, ["k1"])]) == 5
    # Late: a batch enriched before the erasure; stale: a device-day with the key
    # written into the rollup as a refresh from an older snapshot would.
    await store.write([dataclasses.replace(row("d1", 9, at + DAY), owner_key="k1")])
    async with store.pool.acquire() as conn:
        rollup = await materialised_rows(conn, t, "device_daily")
        await conn.execute(
            f"INSERT INTO {rollup} SELECT * FROM {rollup} WHERE bucket = $1 LIMIT 1",
            datetime(2026, 2, 1, tzinfo=UTC),
        )
        await conn.execute(f"UPDATE {rollup} SET owner_key = 'k1' WHERE ctid = "
                           f"(SELECT max(ctid) FROM {rollup})")  # fmt: skip
    assert await erasures_pending(store, schema) == [owner]
    # The proof sees both: the late row and the stale device-day.
    proof = await proved(store, schema, owner, "k1")
    assert {c.holding.name: c.left for c in proof.checked if c.left} == {
        "usage_rows": 1,
        "device_daily": 1,
    }
    assert await unlink_owners(store, [(owner, ["k1"])]) == 1  # the late row
    assert await erasures_pending(store, schema) == [owner]  # that pass found some
    assert await unlink_owners(store, [(owner, ["k1"])]) == 0
    assert await erasures_pending(store, schema) == []
    await store.refresh_rollups(wait=True)
    span = (at - DAY, at + 3 * DAY)
    async with store.pool.acquire() as conn:
        for source in (t, f"{t}_device_daily"):
            assert await conn.fetchval(f"SELECT count(*) FROM {source} WHERE owner_key = 'k1'") == 0
        assert await device_days(conn, t, *span) == await direct_device_days(conn, t, *span)
    assert (await proved(store, schema, owner, "k1")).proven


async def proved(store: UsageStore, schema: str, owner: uuid.UUID, key: str) -> Proof:
    """`prove_erasure` of `owner`, whose rows carry `key`."""
    async with store.pool.acquire() as conn:
        return await prove_erasure(
            conn, owner, keys=[key], registry_schema=schema, usage_table=store.table
        )


@pytest.mark.timescale
async def test_an_erasure_beside_a_concurrent_timescaledb_refresh_ends_with_no_key(
    settings: Settings,
) -> None:
    """A refresh of the device-daily aggregate run beside the consumers (by hand, by a
    policy) is held in progress where it writes the materialisation. TimescaleDB
    refuses ours meanwhile ("due to a concurrent refresh"): its notes stay. The
    erasure runs into that refresh, which may write device-days read before the
    erasure committed. Once both are done, refreshes and erasure passes until the
    erasure is verified leave no key anywhere, and reads are exact throughout."""
    await require_timescaledb(settings)
    async with UsageStore(pg(settings, use_timescaledb=True)) as store:
        await store.migrate()
        t, schema, dsn = store.table, settings.registry.db_schema, settings.postgres.dsn
        at = datetime(2026, 2, 1, 8, tzinfo=UTC)
        span = (at - DAY, at + 5 * DAY)
        owner = uuid.uuid4()
        keyed = [
            dataclasses.replace(row("d1", s, at + s * 3 * HOUR), owner_key="k1") for s in range(20)
        ]
        await store.write([*keyed, dataclasses.replace(row("d2", 1, at), owner_key="k2")])
        await store.refresh_rollups(wait=True)
        await store.write([dataclasses.replace(row("d2", 2, at + DAY), owner_key="k2")])  # late

        async def waiting_for(conn: Connection, relation: str, count: int) -> None:
            for _ in range(600):
                query = (
                    "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted"
                )
                if await conn.fetchval(query, relation) == count:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"nobody waits for {relation}")

        async with (
            connection(dsn.get_secret_value()) as holder,
            connection(dsn.get_secret_value()) as other,
        ):
            await add_owner(store, schema, owner, at, erased=True)
            mat = await materialised_rows(holder, t, "device_daily")
            lock = holder.transaction()
            await lock.start()
            await holder.execute(f"LOCK TABLE {mat} IN EXCLUSIVE MODE")
            concurrent = asyncio.create_task(
                other.execute(
                    f"CALL refresh_continuous_aggregate('{t}_device_daily',"
                    " timestamptz '2026-01-25Z', timestamptz '2026-02-10Z')"
                )
            )
            await waiting_for(holder, mat, 1)
            with pytest.raises(StoreUnavailable, match="due to a concurrent refresh"):
                await store.refresh_rollups(wait=True)
            async with store.pool.acquire() as conn:
                assert await conn.fetchval(f"SELECT count(*) FROM {t}_rollup_invalidations") == 1
            erasing = asyncio.create_task(unlink_owners(store, [(owner, ["k1"])]))
            await waiting_for(holder, mat, 2)
            await lock.commit()
            await concurrent
            assert await erasing == 20
        async with store.pool.acquire() as conn:
            live = await device_days(conn, t, *span)
            assert live == await direct_device_days(conn, t, *span)
            assert [r for r in live if r[9] == "k1"] == []
        passes = 0
        while await erasures_pending(store, schema) == [owner]:
            assert passes < 3
            done = await store.refresh_rollups(wait=True)
            assert done is not None
            await unlink_owners(store, [(owner, ["k1"])])
            passes += 1
        async with store.pool.acquire() as conn:
            for source in (t, f"{t}_device_daily", mat):
                count = f"SELECT count(*) FROM {source} WHERE owner_key = 'k1'"
                assert await conn.fetchval(count) == 0, source
            assert await conn.fetchval(f"SELECT count(*) FROM {t}_rollup_invalidations") == 0
            assert await device_days(conn, t, *span) == await direct_device_days(conn, t, *span)


async def add_letter(store: UsageStore, key: str | None, offset: int, at: datetime) -> None:
    """A dead letter of a device whose owner had `key` when it failed."""
    await store.pool.execute(
        f"INSERT INTO {store.table}_dead_letters (letter_key, reason, message, device_id,"
        " original, source_kind, source_topic, source_partition, source_offset, failed_at,"
        " owner_key) VALUES ($1, 'schema_violation', 'bad', 'd1', $2, 'kafka', 'raw', 0, $3,"
        " $4, $5)",
        f"letter-{offset}".encode(),
        b'{"bad": true}',
        offset,
        at,
        key,
    )


async def proof_of(store: UsageStore, settings: Settings, owner: uuid.UUID) -> Proof:
    async with store.pool.acquire() as conn:
        return await prove_erasure(
            conn,
            owner,
            keys=keys_for(load_secrets(settings.enrich), owner),
            registry_schema=settings.registry.db_schema,
            usage_table=store.table,
        )


def counts(proof: Proof) -> dict[str, tuple[int, int]]:
    """Linked and kept rows per table the proof found any in."""
    return {c.holding.name: (c.linked, c.kept) for c in proof.checked if c.linked}


async def test_the_proof_finds_the_owners_data_until_the_erasure_is_applied(
    settings: Settings, either: UsageStore
) -> None:
    """`prove_erasure` (`usagepipe erasure prove`) before the registry erases the
    owner, after it but before the consumer has applied it, and after: it counts the
    owner's rows, rollup rows and dead letters by the owner's key (`keys_for`) and the
    registry's rows by id, and proves the erasure only at the end."""
    store, t, schema = either, either.table, settings.registry.db_schema
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    owner, other = uuid.uuid4(), uuid.uuid4()
    [key] = keys_for(load_secrets(settings.enrich), owner)
    [other_key] = keys_for(load_secrets(settings.enrich), other)
    await add_owner(store, schema, owner, at, erased=False)
    await add_owner(store, schema, other, at, erased=False)
    mine = [dataclasses.replace(row("d1", s, at + s * HOUR), owner_key=key) for s in range(3)]
    await store.write([*mine, dataclasses.replace(row("d2", 1, at), owner_key=other_key)])
    await store.refresh_rollups(wait=True)
    await add_letter(store, key, 1, at)
    await add_letter(store, other_key, 2, at)

    before = await proof_of(store, settings, owner)
    assert (before.status, before.layout, before.keys) == ("active", store.layout.kind, 1)
    assert counts(before) == {
        "owners": (1, 0),
        "usage_rows": (3, 0),
        "device_daily": (1, 0),
        "hourly_owners": (3, 0),
        "dead_letters": (1, 0),
    }
    assert not before.proven
    assert before.lines()[-1] == "not erased: the owner is active; 9 row(s) linked to them"

    await store.pool.execute(
        f"UPDATE {schema}.owners SET status = 'erased', erased_at = $2 WHERE owner_id = $1",
        owner,
        at + DAY,
    )
    pending = await proof_of(store, settings, owner)
    assert counts(pending) == {
        "owners": (1, 1),
        "usage_rows": (3, 0),
        "device_daily": (1, 0),
        "hourly_owners": (3, 0),
        "dead_letters": (1, 0),
    }
    assert pending.left == 8
    assert pending.lines()[-1] == (
        f"NOT PROVEN: 8 row(s) still linked, in {t},"
        f" {await materialised(store, 'device_daily')},"
        f" {await materialised(store, 'hourly_owners')}, {t}_dead_letters"
    )

    assert await unlink_owners(store, [(owner, [key])]) == 3
    after = await proof_of(store, settings, owner)
    assert counts(after) == {"owners": (1, 1), "erasures": (1, 1)}
    assert after.proven
    report = after.lines()
    assert report[0] == (
        f"owner {owner}: erased; usage layout {store.layout.kind}; 1 owner key(s) looked for"
    )
    assert report[-1] == f"erasure proven: {len(after.checked)} tables checked, nothing left"
    assert [c.holding.name for c in after.checked] == [h.name for h in CATALOGUE]
    # The other owner's data is untouched, and found.
    assert counts(await proof_of(store, settings, other))["usage_rows"] == (1, 0)


async def materialised(store: UsageStore, rollup: Rollup) -> str:
    async with store.pool.acquire() as conn:
        return (await materialised_rows(conn, store.table, rollup)).replace('"', "")
