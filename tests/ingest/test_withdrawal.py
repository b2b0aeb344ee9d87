"""Ended analytics consent on the usage side: a withdrawal, or a lapse by a re-asking
policy version, unlinks the rows, device-days and dead letters stored under the
consent; a new grant attributes only what is stored after it; other owners' rows are
untouched; applying again changes nothing and verifies."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from ingest.dead_letter_table import LetterRow
from ingest.rollups import materialised_rows
from ingest.rows import UsageRow
from ingest.settings import Settings
from ingest.store import UsageStore
from ingest.withdrawal import ConsentEnd, ends_pending, forget, unlink_ended
from schemas.errors import Reason
from tests.ingest.test_dead_letters import made_letter
from tests.ingest.test_erasure import add_owner
from tests.ingest.test_store import device_days, direct_device_days, row

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
AT = datetime(2026, 2, 1, 8, tzinfo=UTC)
SPAN = (AT - DAY, AT + 4 * DAY)


async def decide(
    store: UsageStore, schema: str, owner: uuid.UUID, granted: bool, at: datetime
) -> int:
    """An analytics decision in the registry's trail, as `devices.owners` records one."""
    event: int = await store.pool.fetchval(
        f"INSERT INTO {schema}.consent_events (owner_id, purpose, granted, changed_at, source,"
        " policy_version) VALUES ($1, 'analytics', $2, $3, 'test', $4) RETURNING consent_event_id",
        owner,
        granted,
        at,
        "initial",
    )
    return event


async def db_now(store: UsageStore) -> datetime:
    now: datetime = await store.pool.fetchval("SELECT clock_timestamp()")
    return now


async def linked(store: UsageStore) -> dict[tuple[str, int], tuple[str | None, str | None, str]]:
    """(device, seq) -> (owner key, tier, region) of every stored row."""
    found = await store.fetch(
        "SELECT device_id, seq, owner_key, membership_tier, region FROM {table}"
    )
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in found}


def keyed(device: str, seqs: range, key: str, *, day: int = 0) -> list[UsageRow]:
    return [
        dataclasses.replace(
            row(device, s, AT + day * DAY + s * HOUR),
            owner_key=key,
            membership_tier="gold",
            region="JP-13",
        )
        for s in seqs
    ]


async def test_a_withdrawal_unlinks_the_stored_rows_rollup_and_letters_once(
    settings: Settings, either: UsageStore
) -> None:
    """The owner who withdrew loses key and tier in every row (region stays), in the
    device-daily rollup and in their dead letter (which stays); the owner who did not
    withdraw keeps everything. A second pass finds nothing and verifies; a third is
    not asked for."""
    store, schema, t = either, settings.registry.db_schema, either.table
    ada, bob = uuid.uuid4(), uuid.uuid4()
    for owner in (ada, bob):
        await add_owner(store, schema, owner, AT - DAY, erased=False)
        await decide(store, schema, owner, True, AT - DAY)
    letters = [
        LetterRow(made_letter(Reason.SCHEMA_VIOLATION, 4), "WM-7", "k-ada"),
        LetterRow(made_letter(Reason.SCHEMA_VIOLATION, 5), "WM-7", "k-bob"),
    ]
    await store.write(
        keyed("d1", range(30), "k-ada") + keyed("d2", range(3), "k-bob"), letters=letters
    )
    await store.refresh_rollups(wait=True)
    assert await ends_pending(store, schema) == []

    withdrawn_at = await db_now(store)
    event = await decide(store, schema, ada, False, withdrawn_at)
    end = ConsentEnd(ada, f"withdrawn {event}", withdrawn_at, None)
    assert await ends_pending(store, schema) == [end]
    assert await ends_pending(store, schema, {ada}) == [end]  # an owner notification's
    assert await ends_pending(store, schema, {bob}) == []
    assert await unlink_ended(store, [(end, ["k-ada"])]) == 30

    stored = await linked(store)
    assert {stored[("d1", s)] for s in range(30)} == {(None, None, "JP-13")}
    assert {stored[("d2", s)] for s in range(3)} == {("k-bob", "gold", "JP-13")}
    async with store.pool.acquire() as conn:
        keys = await conn.fetch(f"SELECT DISTINCT owner_key FROM {t}_device_daily")
        assert {r[0] for r in keys} == {None, "k-bob"}
        assert await device_days(conn, t, *SPAN) == await direct_device_days(conn, t, *SPAN)
    kept = await store.fetch("SELECT owner_key FROM {table}_dead_letters ORDER BY owner_key")
    assert [r[0] for r in kept] == ["k-bob", None]

    assert await ends_pending(store, schema) == [end]  # applied, not verified yet
    assert await unlink_ended(store, [(end, ["k-ada"])]) == 0
    assert await ends_pending(store, schema) == []
    recorded = await store.fetch(
        "SELECT owner_id, event, ended_at, unlinked, verified FROM {table}_consent_unlinks"
    )
    assert [tuple(r) for r in recorded] == [(ada, end.event, withdrawn_at, 30, True)]
    assert await linked(store) == stored
    # Once erased, the owner's records go (erasure has unlinked everything).
    assert await forget(store, {bob}) == 0
    assert await forget(store, {ada}) == 1
    assert await store.fetch("SELECT * FROM {table}_consent_unlinks") == []


async def test_a_lapse_by_a_reasking_policy_unlinks_the_grants_made_before_it(
    settings: Settings, either: UsageStore
) -> None:
    """A version re-asking analytics ends the grants made under earlier versions when it
    takes effect; a version re-asking marketing only ends none, a declined owner has
    nothing to end, and a version not in effect yet ends nothing yet."""
    store, schema = either, settings.registry.db_schema
    ada, bob, cy = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for owner, granted in ((ada, True), (bob, True), (cy, False)):
        await add_owner(store, schema, owner, AT - DAY, erased=False)
        await decide(store, schema, owner, granted, AT - DAY)
    await store.write(keyed("d1", range(4), "k-ada") + keyed("d2", range(2), "k-bob"))
    now = await db_now(store)
    versions = (
        ("m-only", now - 2 * HOUR, "marketing"),
        ("2026-12", now - HOUR, "analytics"),
        ("2027-06", now + DAY, "analytics"),
    )
    for version, effective_at, reasks in versions:
        await store.pool.execute(
            f"INSERT INTO {schema}.policy_versions (version, effective_at, policy_text,"
            " published_at) VALUES ($1, $2, 'text', $2)",
            version,
            effective_at,
        )
        await store.pool.execute(
            f"INSERT INTO {schema}.policy_reasks (version, purpose) VALUES ($1, $2)",
            version,
            reasks,
        )
    ends = [ConsentEnd(o, "lapsed 2026-12", now - HOUR, None) for o in sorted((ada, bob))]
    assert await ends_pending(store, schema) == ends
    keys = {ada: ["k-ada"], bob: ["k-bob"]}
    assert await unlink_ended(store, [(e, keys[e.owner_id]) for e in ends]) == 6
    assert set((await linked(store)).values()) == {(None, None, "JP-13")}
    assert await unlink_ended(store, [(e, keys[e.owner_id]) for e in ends]) == 0
    assert await ends_pending(store, schema) == []


async def test_a_new_grant_attributes_only_the_rows_stored_after_it(
    settings: Settings, either: UsageStore
) -> None:
    """Withdrawn, then granted again before any consumer applied the withdrawal: the
    rows stored before the new grant lose the key, those stored after keep it, and the
    end is verified although keyed rows of the owner remain. The unlinking is one-way:
    a later pass gives nothing back."""
    store, schema, t = either, settings.registry.db_schema, either.table
    ada = uuid.uuid4()
    await add_owner(store, schema, ada, AT - DAY, erased=False)
    await decide(store, schema, ada, True, AT - DAY)
    await store.write(keyed("d1", range(3), "k-ada"))
    await store.refresh_rollups(wait=True)
    withdrawn_at = await db_now(store)
    event = await decide(store, schema, ada, False, withdrawn_at)
    granted_at = await db_now(store)
    await decide(store, schema, ada, True, granted_at)
    await store.write(keyed("d1", range(3, 5), "k-ada", day=1))  # under the new grant

    end = ConsentEnd(ada, f"withdrawn {event}", withdrawn_at, granted_at)
    assert await ends_pending(store, schema) == [end]
    assert await unlink_ended(store, [(end, ["k-ada"])]) == 3
    # In place too: the day stored before the new grant (the next one is noted only, so
    # not materialised yet; on TimescaleDB the aggregate's view would add it from the
    # raw rows, so its materialised rows are read).
    async with store.pool.acquire() as conn:
        rows_of = await materialised_rows(conn, t, "device_daily")
        materialised = await conn.fetch(f"SELECT bucket, owner_key FROM {rows_of}")
    assert [tuple(r) for r in materialised] == [(AT.replace(hour=0), None)]
    assert await unlink_ended(store, [(end, ["k-ada"])]) == 0
    assert await ends_pending(store, schema) == []
    stored = await linked(store)
    assert [stored[("d1", s)][0] for s in range(5)] == [None, None, None, "k-ada", "k-ada"]
    await store.refresh_rollups(wait=True)
    async with store.pool.acquire() as conn:
        assert await device_days(conn, t, *SPAN) == await direct_device_days(conn, t, *SPAN)
        days = await conn.fetch(
            f"SELECT bucket, owner_key FROM {t}_device_daily ORDER BY bucket, owner_key"
        )
    assert [(r[0], r[1]) for r in days] == [
        (AT.replace(hour=0), None),
        (AT.replace(hour=0) + DAY, "k-ada"),
    ]


async def test_the_registry_is_asked_since_the_latest_end_less_an_hour_or_from_the_start(
    settings: Settings, either: UsageStore
) -> None:
    """After an end is verified, the registry is asked only for ends from an hour before
    it: a withdrawal recorded with a time two hours earlier is found by the consumer's
    first pass (`whole_history`), which reads the whole history, or by an unverified
    end older than it keeping the window open."""
    store, schema = either, settings.registry.db_schema
    ada, bob = uuid.uuid4(), uuid.uuid4()
    for owner in (ada, bob):
        await add_owner(store, schema, owner, AT - DAY, erased=False)
        await decide(store, schema, owner, True, AT - DAY)
    now = await db_now(store)
    late = await decide(store, schema, ada, False, now)
    ada_end = ConsentEnd(ada, f"withdrawn {late}", now, None)
    for _ in range(2):  # applied, then verified
        await unlink_ended(store, [(ada_end, ["k-ada"])])
    early = await decide(store, schema, bob, False, now - 2 * HOUR)
    bob_end = ConsentEnd(bob, f"withdrawn {early}", now - 2 * HOUR, None)
    assert await ends_pending(store, schema) == []
    assert await ends_pending(store, schema, whole_history=True) == [bob_end]
    await unlink_ended(store, [(bob_end, ["k-bob"])])  # applied, not verified
    assert await ends_pending(store, schema) == [bob_end]
