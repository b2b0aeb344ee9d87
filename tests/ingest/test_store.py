"""The usage store on the real PostgreSQL: partitions, the dedup key, offsets stored
with the rows, rollups against a direct aggregate, retention, and TimescaleDB where
the extension exists."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

import ingest
from ingest.errors import ConfigurationError, ConflictingDuplicates, RowsRefused
from ingest.rollups import (
    DETAIL,
    RefreshReport,
    Rollup,
    bucket_start,
    device_daily_source,
    direct_rollup_query,
    materialised_rows,
    usage_rollup,
)
from ingest.rows import SourceOffset, UsageRow
from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from schemas.envelope import Envelope
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.conftest import require_timescaledb
from usagepipe.cli import main

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SEC = timedelta(seconds=1)
Connection = asyncpg.Connection | PoolConnectionProxy


def pg(settings: Settings, **changes: object) -> PostgresSettings:
    return PostgresSettings(
        **{**settings.postgres.model_dump(), "use_timescaledb": False, **changes}
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[UsageStore]:
    async with UsageStore(pg(settings)) as s:
        await s.migrate()
        yield s


async def refresh(store: UsageStore, *, now: datetime, days: bool = True) -> RefreshReport | None:
    """The consumers' periodic refresh at `now`, on the store's layout."""
    return await store.refresh_rollups(settled_only=True, days=days, now=now)


async def materialised(conn: Connection, store: UsageStore, rollup: Rollup) -> list[datetime]:
    """The buckets `rollup` holds materialised (on TimescaleDB, not the real-time part)."""
    source = await materialised_rows(conn, store.table, rollup)
    return [r[0] for r in await conn.fetch(f"SELECT bucket FROM {source} ORDER BY 1")]


def plan_rows(plan: FleetPlan, *, offset: int = 0) -> list[UsageRow]:
    """The plan's messages as the consumer would store them (duplicates included)."""
    rows = []
    for device in device_ids(plan):
        for i, msg in enumerate(plan_device(plan, device)):
            env = Envelope.model_validate_json(msg.payload)
            rows.append(UsageRow.from_envelope(env, 0, offset + i))
    return rows


def row(device: str, seq: int, at: datetime, *, boot: str = "b1") -> UsageRow:
    return UsageRow(device, boot, seq, at, "washer.energy", 1, {"energy_wh": 2.5}, 0, seq)


async def where_rows_are(store: UsageStore) -> list[tuple[str, int, str]]:
    records = await store.fetch(
        "SELECT device_id, seq, tableoid::regclass::text AS part FROM {table} ORDER BY 1, 2"
    )
    return [(r["device_id"], r["seq"], r["part"]) for r in records]


async def test_migrate_is_versioned_idempotent_and_reports_the_layout(
    settings: Settings,
) -> None:
    async with UsageStore(pg(settings)) as store:
        first = await store.migrate()
        second = await store.migrate()
    assert (first.layout.kind, first.layout.partition_interval) == ("partitioned", DAY)
    assert first.applied == [
        "001_usage",
        "002_enrichment",
        "003_rollup_refresh",
        "004_device_daily",
        "005_settled_refresh",
        "006_erasure_checks",
        "007_message_ids",
        "008_dead_letters",
        "009_dead_letter_traces",
        "010_ids_by_trigger",
        "012_dp_releases",
        "015_hourly_owners",
        "016_consent_unlinks",
    ]
    assert second.applied == []
    t = settings.postgres.table
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = $1", t)
        default = await conn.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1",
            f"{t}_default",
        )
        keys = await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS key FROM pg_constraint"
            " WHERE conname = ANY($1::text[]) ORDER BY 1",
            [f"{t}_pkey", f"{t}_ids_pkey"],
        )
        migrations = await conn.fetch(
            "SELECT version, name FROM schema_migrations WHERE component = $1", f"store.{t}"
        )
    finally:
        await conn.close()
    assert (kind, default) == ("p", "DEFAULT")
    # The message id is the key (007): of the ids table; the usage table has none.
    assert [tuple(k) for k in keys] == [(f"{t}_ids_pkey", "PRIMARY KEY (device_id, boot_id, seq)")]
    assert [tuple(m) for m in migrations] == [
        (1, "001_usage"),
        (2, "002_enrichment"),
        (3, "003_rollup_refresh"),
        (4, "004_device_daily"),
        (5, "005_settled_refresh"),
        (6, "006_erasure_checks"),
        (7, "007_message_ids"),
        (8, "008_dead_letters"),
        (9, "009_dead_letter_traces"),
        (10, "010_ids_by_trigger"),
        (12, "012_dp_releases"),
        (15, "015_hourly_owners"),
        (16, "016_consent_unlinks"),
    ]


def test_db_migrate_command_prints_the_layout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", settings.postgres.table)
    monkeypatch.setenv("USAGEPIPE_POSTGRES__USE_TIMESCALEDB", "false")
    assert main(["db", "migrate"]) == 0
    assert main(["db", "migrate"]) == 0
    assert main(["db", "refresh"]) == 0
    out = capsys.readouterr().out.splitlines()
    t = settings.postgres.table
    layout = "layout: partitioned, partitions of 24 h"
    applied = (
        "001_usage, 002_enrichment, 003_rollup_refresh, 004_device_daily,"
        " 005_settled_refresh, 006_erasure_checks, 007_message_ids, 008_dead_letters,"
        " 009_dead_letter_traces,"
        " 010_ids_by_trigger, 012_dp_releases, 015_hourly_owners, 016_consent_unlinks"
    )
    assert out[:2] == [
        f"usage table '{t}' is up to date ({applied}); {layout}",
        f"usage table '{t}' is up to date (none pending); {layout}",
    ]
    assert out[2].startswith(
        f"rollups of '{t}' refreshed: 0 hours and 0 days recomputed, 0 hours before the"
        " retained data skipped, in "
    )


async def test_partitions_are_created_across_an_interval_boundary(store: UsageStore) -> None:
    t = store.table
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    before = [row("d1", 1, midnight - timedelta(microseconds=1))]
    across = [row("d1", 2, midnight), row("d2", 1, midnight + DAY - timedelta(seconds=1))]
    assert await store.write(before) == 1
    assert await store.write(across) == 2
    assert await where_rows_are(store) == [
        ("d1", 1, f"{t}_p2026022800"),
        ("d1", 2, f"{t}_p2026030100"),
        ("d2", 1, f"{t}_p2026030100"),
    ]
    bounds = await store.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_class c"
        " WHERE c.relname IN ('{table}_p2026022800', '{table}_p2026030100') ORDER BY 1"
    )
    assert [r["bound"] for r in bounds] == [
        "FOR VALUES FROM ('2026-02-28 00:00:00+00') TO ('2026-03-01 00:00:00+00')",
        "FOR VALUES FROM ('2026-03-01 00:00:00+00') TO ('2026-03-02 00:00:00+00')",
    ]


async def test_the_default_partition_takes_what_has_no_partition_until_one_is_made(
    store: UsageStore,
) -> None:
    t = store.table
    at = datetime(2025, 6, 1, 12, tzinfo=UTC)
    # A writer that does not create partitions (say, a manual backfill, whose ids the
    # table's trigger writes, migration 010) lands in DEFAULT.
    async with store.pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {t} (device_id, boot_id, seq, event_time, schema, schema_version,"
            " body, kafka_partition, kafka_offset)"
            " VALUES ('d9', 'b1', 7, $1, 'washer.energy', 1, '{\"energy_wh\": 2.5}', 0, 0)",
            at,
        )
    assert await where_rows_are(store) == [("d9", 7, f"{t}_default")]
    # The store needs that day's partition: the row moves into it, nothing is refused.
    assert await store.write([row("d9", 8, at + HOUR), row("d9", 7, at)]) == 1
    assert await where_rows_are(store) == [
        ("d9", 7, f"{t}_p2025060100"),
        ("d9", 8, f"{t}_p2025060100"),
    ]


async def test_dedup_key_is_device_boot_seq(either: UsageStore) -> None:
    store = either
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    first = [row("d1", 1, at), row("d1", 2, at), row("d1", 1, at, boot="b2")]
    assert await store.write(first) == 3
    assert await store.write(first) == 0  # redelivered batch: all duplicates
    # Within one batch too, and mixed with new rows.
    assert await store.write([row("d1", 3, at), row("d1", 3, at), row("d1", 2, at)]) == 1
    # The same (device, boot, seq) with another event time is the same message, resent
    # with other content: refused, and nothing of its write is kept.
    later = row("d1", 1, at + timedelta(seconds=1))
    with pytest.raises(ConflictingDuplicates) as caught:
        await store.write([row("d1", 4, at), later])
    assert [(r, why) for r, why in caught.value.rows] == [
        (
            later,
            "(device_id, boot_id, seq) = ('d1', 'b1', 1) is already stored with other"
            " content; this message differs in event_time (2026-02-01T08:00:01+00:00, not"
            " 2026-02-01T08:00:00+00:00). One id names one message: the first stays",
        )
    ]
    keys = await store.fetch("SELECT device_id, boot_id, seq, event_time FROM {table}")
    assert sorted(tuple(k) for k in keys) == [
        ("d1", "b1", 1, at),
        ("d1", "b1", 2, at),
        ("d1", "b1", 3, at),
        ("d1", "b2", 1, at),
    ]


async def test_offsets_are_stored_in_the_rows_transaction(either: UsageStore) -> None:
    store = either
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    written = await store.write(
        [row("d1", 1, at)],
        [SourceOffset("raw", 0, 11, 1000), SourceOffset("raw", 2, 5, 1001)],
        group_id="g1",
    )
    assert written == 1
    # A batch of dead letters only still moves the offsets.
    assert await store.write([], [SourceOffset("raw", 0, 12, 1002)], group_id="g1") == 0
    assert await store.load_offsets("g1", "raw", [0, 1, 2]) == {
        0: SourceOffset("raw", 0, 12, 1002),
        2: SourceOffset("raw", 2, 5, 1001),
    }
    assert await store.load_offsets("g2", "raw", [0, 1, 2]) == {}
    # A transaction that fails stores neither the rows nor the offsets. A row refused
    # for what it holds is named: PostgreSQL's jsonb refuses a NUL character, which JSON
    # itself allows (validation refuses it before; this row was made by hand).
    bad = UsageRow("d1", "b1", 9, at, "washer.energy", 1, {"note": "\u0000"}, 0, 12)
    with pytest.raises(RowsRefused) as refused:
        await store.write(
            [row("d1", 2, at), bad], [SourceOffset("raw", 0, 14, 1003)], group_id="g1"
        )
    assert [(r, m.splitlines()[0]) for r, m in refused.value.rows] == [
        (bad, "UntranslatableCharacterError: unsupported Unicode escape sequence")
    ]
    assert (await store.load_offsets("g1", "raw", [0]))[0].next_offset == 12
    assert [(d, s) for d, s, _ in await where_rows_are(store)] == [("d1", 1)]


async def test_rollups_equal_a_direct_aggregate_after_duplicates_and_late_events(
    either: UsageStore,
) -> None:
    store = either
    now = datetime(2026, 4, 10, 12, 30, tzinfo=UTC)
    recent = FleetPlan(
        devices=18, messages_per_device=40, seed=3, duplicate_rate=0.2, start=now - 2 * HOUR
    )
    late = FleetPlan(
        devices=12,
        messages_per_device=25,
        seed=3,
        run_id="late",
        duplicate_rate=0.1,
        start=now - DAY - 10 * HOUR,
    )
    rows = plan_rows(recent)
    late_rows = plan_rows(late)
    rng = random.Random(5)
    rng.shuffle(rows)
    # Recent events first, then the late ones, then everything again (a replay).
    batches = [rows[i : i + 200] for i in range(0, len(rows), 200)]
    batches += [late_rows[i : i + 150] for i in range(0, len(late_rows), 150)]
    batches += [rows[:300] + late_rows[:100]]
    stored = 0
    for batch in batches:
        stored += await store.write(batch)
    unique = {(r.device_id, r.boot_id, r.seq, r.event_time) for r in rows + late_rows}
    assert stored == len(unique) == 18 * 40 + 12 * 25
    span = (now - 3 * DAY, now + DAY)
    async with store.pool.acquire() as conn:
        # Exact before any refresh (noted buckets read live), after one, and after a
        # late batch lands in buckets already materialised.
        for step in ("noted", "refreshed", "late", "refreshed again"):
            if step == "late":
                more = plan_rows(
                    FleetPlan(
                        devices=3,
                        messages_per_device=10,
                        seed=9,
                        run_id="later",
                        start=now - DAY - 9 * HOUR,
                    )
                )
                assert await store.write(more) == len(more)
                unique |= {(r.device_id, r.boot_id, r.seq, r.event_time) for r in more}
            elif step.startswith("refreshed"):
                done = await store.refresh_rollups()
                assert done is not None and done.hours > 0 and done.skipped == 0
                assert (
                    await conn.fetchval(f"SELECT count(*) FROM {store.table}_rollup_invalidations")
                    == 0
                )
            for granularity in ("hourly", "daily"):
                rollup = await usage_rollup(conn, store.table, granularity, *span)
                direct = await conn.fetch(direct_rollup_query(store.table, granularity), *span)
                assert [tuple(vars_of(r)) for r in rollup] == [tuple(d) for d in direct], step
                assert sum(r.events for r in rollup) == len(unique)
        # Spot checks of the shape: several schemas, energy summed where present.
        daily = await usage_rollup(conn, store.table, "daily", *span, category="washer")
    assert {r.schema for r in daily} >= {"washer.cycle", "washer.energy"}
    assert all(r.model is None and r.region is None for r in daily)
    assert any(r.energy_wh is not None and r.energy_wh > 0 for r in daily)


# Device-days straight from the raw rows, written from the rollup's definition (detail:
# the program or mode, or an error's code while raised), not from ingest/rollups.py.
DIRECT_DEVICE_DAYS = """
    SELECT (event_time AT TIME ZONE 'UTC')::date AS day, device_id, boot_id, schema,
           model, firmware, region, membership_tier, purchase_channel, owner_key,
           CASE WHEN schema LIKE '%.error'
                THEN CASE WHEN body ->> 'state' = 'raised' THEN body ->> 'code' END
                ELSE coalesce(body ->> 'program', body ->> 'mode') END AS detail,
           body ->> 'trigger' AS trigger, count(*) AS events, min(seq), max(seq)
    FROM {t} WHERE event_time >= $1 AND event_time < $2
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
"""


async def device_days(
    conn: Connection, t: str, start: datetime, end: datetime
) -> list[tuple[Any, ...]]:
    """What the reports read: `device_daily_source`, in DIRECT_DEVICE_DAYS' columns."""
    source = await device_daily_source(conn, t, start, end, days_parameter=3)
    rows = await conn.fetch(
        f"""SELECT (bucket AT TIME ZONE 'UTC')::date AS day, device_id, boot_id, schema,
                   model, firmware, region, membership_tier, purchase_channel, owner_key,
                   detail, trigger, events, min_seq, max_seq FROM {source.sql} d""",
        start,
        end,
        source.live_days,
    )
    return multiset(rows)


async def direct_device_days(
    conn: Connection, t: str, start: datetime, end: datetime
) -> list[tuple[Any, ...]]:
    return multiset(await conn.fetch(DIRECT_DEVICE_DAYS.format(t=t), start, end))


def multiset(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return sorted((tuple(r) for r in rows), key=repr)


async def test_device_daily_rollup_equals_a_direct_aggregate_after_duplicates_and_late_events(
    either: UsageStore,
) -> None:
    store = either
    t = store.table
    midnight = datetime(2026, 4, 10, tzinfo=UTC)
    # Each device's messages cross midnight; every tenth is sent twice.
    recent = FleetPlan(
        devices=15, messages_per_device=60, seed=4, duplicate_rate=0.1, start=midnight - 90 * SEC
    )
    late = FleetPlan(
        devices=8,
        messages_per_device=30,
        seed=4,
        run_id="late",
        start=midnight - DAY - 5 * HOUR - 40 * SEC,
    )
    rows, late_rows = plan_rows(recent), plan_rows(late)
    random.Random(6).shuffle(rows)
    # Owner keys and registry facts on some rows, as enrichment stores them.
    rows = [
        dataclasses.replace(r, owner_key=f"k{hash(r.device_id) % 4}", region="KR-11",
                            membership_tier="gold", purchase_channel="gift")
        if i % 3 else r
        for i, r in enumerate(rows)
    ]  # fmt: skip
    for i in range(0, len(rows), 250):
        await store.write(rows[i : i + 250])
    await store.write(late_rows)
    await store.write(rows[:200] + late_rows[:50])  # a replay: duplicates only
    span = (midnight - 3 * DAY, midnight + DAY)
    # Not whole days: the late fleet's messages straddle the start.
    cut = (midnight - DAY - 5 * HOUR, midnight + 7 * HOUR)
    async with store.pool.acquire() as conn:
        for step in ("noted", "refreshed", "late", "refreshed again"):
            if step == "late":
                more = plan_rows(
                    FleetPlan(devices=3, messages_per_device=10, seed=8, run_id="later",
                              start=midnight - 2 * DAY + 21 * HOUR)
                )  # fmt: skip
                assert await store.write(more) == len(more)
            elif step.startswith("refreshed"):
                done = await store.refresh_rollups()
                assert done is not None and done.days > 0
                # The table itself now holds exactly the direct aggregate.
                whole = await conn.fetch(
                    f"SELECT (bucket AT TIME ZONE 'UTC')::date AS day, device_id, boot_id,"
                    " schema, model, firmware, region, membership_tier, purchase_channel,"
                    " owner_key, detail, trigger, events, min_seq, max_seq"
                    f" FROM {t}_device_daily"
                )
                assert multiset(whole) == await direct_device_days(conn, t, *span), step
            for start, end in (span, cut):
                expected = await direct_device_days(conn, t, start, end)
                assert await device_days(conn, t, start, end) == expected, (step, start)
            days = {r[0] for r in expected}
            assert len(days) == 3 and sum(r[12] for r in expected) > 0
        schemas = await conn.fetch(
            f"SELECT DISTINCT schema, detail IS NOT NULL AS detailed FROM {t}_device_daily"
        )
    assert {tuple(r) for r in schemas} >= {("washer.cycle", True), ("washer.energy", False)}


def test_the_timescaledb_device_daily_aggregate_groups_on_the_same_expressions() -> None:
    """TimescaleDB is not installed here: at least its definition must say what the
    plain layout computes (`device_daily_query`), in its SELECT list and GROUP BY."""
    sql = (Path(ingest.__file__).parent / "sql/timescaledb/003_device_daily.sql").read_text()
    one_line = " ".join(sql.split())
    assert one_line.count(f"{DETAIL} AS detail") == 1
    assert one_line.count(f"{DETAIL},") == 1  # in the GROUP BY
    assert one_line.count("body ->> 'trigger'") == 2
    assert "count(*) AS events, min(seq) AS min_seq, max(seq) AS max_seq" in one_line


def vars_of(r: object) -> list[object]:
    return [getattr(r, f) for f in r.__slots__]  # type: ignore[attr-defined]


async def notes(conn: Connection, table: str) -> list[tuple[datetime, bool]]:
    """The plain layout's rollup notes: (hour, hourly_done), sorted."""
    found = await conn.fetch(f"SELECT bucket, hourly_done FROM {table}_rollup_invalidations")
    return sorted((n["bucket"], n["hourly_done"]) for n in found)


async def assert_reads_exact(conn: Connection, table: str, span: tuple[datetime, datetime]) -> None:
    """Both rollups, as `usage_rollup` reads them, equal a direct aggregate."""
    for granularity in ("hourly", "daily"):
        rollup = await usage_rollup(conn, table, granularity, *span)
        direct = await conn.fetch(direct_rollup_query(table, granularity), *span)
        assert [tuple(vars_of(r)) for r in rollup] == [tuple(d) for d in direct]


async def test_the_periodic_refresh_materialises_only_ended_buckets(either: UsageStore) -> None:
    store = either
    now = datetime(2026, 4, 10, 12, 30, tzinfo=UTC)
    await store.write(
        [
            row("d1", 1, datetime(2026, 4, 8, 10, 10, tzinfo=UTC)),  # a day that ended
            row("d1", 2, datetime(2026, 4, 10, 9, 15, tzinfo=UTC)),  # an hour that ended
            row("d2", 1, datetime(2026, 4, 10, 12, 5, tzinfo=UTC)),  # the open hour
        ]
    )
    t = store.table
    span = (now - 3 * DAY, now + DAY)

    async with store.pool.acquire() as conn:
        done = await refresh(store, now=now)
        assert done == RefreshReport(2, 1, 0, ANY)
        assert await materialised(conn, store, "hourly") == [
            datetime(2026, 4, 8, 10, tzinfo=UTC),
            datetime(2026, 4, 10, 9, tzinfo=UTC),
        ]
        assert await materialised(conn, store, "daily") == [datetime(2026, 4, 8, tzinfo=UTC)]
        assert await notes(conn, t) == [
            (datetime(2026, 4, 10, 9, tzinfo=UTC), True),
            (datetime(2026, 4, 10, 12, tzinfo=UTC), False),
        ]
        await assert_reads_exact(conn, t, span)  # meanwhile
        again = await refresh(store, now=now)
        assert again == RefreshReport(0, 0, 0, ANY)
        next_day = await refresh(store, now=datetime(2026, 4, 11, 0, 30, tzinfo=UTC))
        assert next_day == RefreshReport(1, 1, 0, ANY)
        assert await conn.fetchval(f"SELECT count(*) FROM {t}_rollup_invalidations") == 0
        assert len(await materialised(conn, store, "hourly")) == 3
        assert len(await materialised(conn, store, "daily")) == 2


async def test_a_periodic_refresh_without_days_leaves_ended_days_noted_and_reads_exact(
    either: UsageStore,
) -> None:
    store = either
    now = datetime(2026, 4, 10, 12, 30, tzinfo=UTC)
    await store.write(
        [
            row("d1", 1, datetime(2026, 4, 8, 10, 10, tzinfo=UTC)),  # a day that ended
            row("d2", 1, datetime(2026, 4, 8, 11, 20, tzinfo=UTC)),
            row("d1", 2, datetime(2026, 4, 10, 9, 15, tzinfo=UTC)),  # an hour that ended
        ]
    )
    t = store.table
    span = (now - 3 * DAY, now + DAY)
    async with store.pool.acquire() as conn:
        hours_only = await refresh(store, now=now, days=False)
        assert hours_only == RefreshReport(3, 0, 0, ANY)
        assert len(await materialised(conn, store, "hourly")) == 3
        assert await materialised(conn, store, "daily") == []
        assert await materialised(conn, store, "device_daily") == []
        assert await notes(conn, t) == [
            (datetime(2026, 4, 8, 10, tzinfo=UTC), True),
            (datetime(2026, 4, 8, 11, tzinfo=UTC), True),
            (datetime(2026, 4, 10, 9, tzinfo=UTC), True),
        ]
        await assert_reads_exact(conn, t, span)  # meanwhile
        # A late event for the ended day, then the days' turn: its hour and the day.
        await store.write([row("d3", 1, datetime(2026, 4, 8, 23, 59, tzinfo=UTC))])
        with_days = await refresh(store, now=now)
        assert with_days == RefreshReport(1, 1, 0, ANY)
        daily = await usage_rollup(conn, t, "daily", *span)
        assert [(r.bucket, r.events, r.devices) for r in daily] == [
            (datetime(2026, 4, 8, tzinfo=UTC), 3, 3),
            (datetime(2026, 4, 10, tzinfo=UTC), 1, 1),
        ]
        assert len(await materialised(conn, store, "daily")) == 1
        assert await conn.fetchval(f"SELECT count(*) FROM {t}_rollup_invalidations") == 1


async def test_retention_drops_only_partitions_wholly_older_than_the_cutoff(
    settings: Settings,
) -> None:
    hourly = pg(settings, partition_interval_s=3600, allowed_lateness_s=0, retention_days=1)
    now = datetime(2026, 1, 10, 12, 30, tzinfo=UTC)
    cutoff = now - DAY  # 2026-01-09 12:30
    async with UsageStore(hourly) as store:
        await store.migrate()
        t = store.table
        await store.write(
            [
                row("d1", 1, cutoff - 3 * HOUR),  # 09:30: partition 09:00-10:00, dropped
                row("d1", 2, cutoff - HOUR),  # 11:30: partition 11:00-12:00, dropped
                row("d1", 3, cutoff - timedelta(minutes=20)),  # 12:10: 12:00-13:00 straddles
                row("d1", 4, cutoff + HOUR),  # 13:30: kept
            ]
        )
        async with store.pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {t}_default (device_id, boot_id, seq, event_time, schema,"
                " schema_version, body, kafka_partition, kafka_offset) VALUES"
                " ('d2', 'b1', 1, $1, 'washer.energy', 1, '{}', 0, 0),"
                " ('d2', 'b1', 2, $2, 'washer.energy', 1, '{}', 0, 0)",
                datetime(2025, 1, 1, tzinfo=UTC),
                datetime(2027, 1, 1, tzinfo=UTC),
            )
            noted = await conn.fetchval(f"SELECT count(*) FROM {t}_rollup_invalidations")
            assert noted == 5  # every hour from the first to the last: 09 to 13 h
            hourly_before = await conn.fetch(
                direct_rollup_query(t, "hourly"), cutoff - DAY, cutoff + DAY
            )
            days_before = await direct_device_days(conn, t, cutoff - DAY, cutoff + DAY)
        dropped = await store.drop_expired(now)
        assert dropped == [f"{t}_p2026010909", f"{t}_p2026010911"]
        assert await store.drop_expired(now) == []
        assert await where_rows_are(store) == [
            ("d1", 3, f"{t}_p2026010912"),
            ("d1", 4, f"{t}_p2026010913"),
            ("d2", 2, f"{t}_default"),
        ]
        # The ids of the dropped rows go too (those written around the store had none).
        ids = await store.fetch("SELECT device_id, seq FROM {table}_ids ORDER BY 1, 2")
        assert [tuple(i) for i in ids] == [("d1", 3), ("d1", 4)]
        async with store.pool.acquire() as conn:
            hourly_after = await conn.fetch(f"SELECT * FROM {t}_hourly ORDER BY bucket")
            assert await conn.fetchval(f"SELECT retained_from FROM {t}_layout") == cutoff
            # A very late event before the retained data: stored raw, never aggregated
            # (a refresh of its bucket would count it alone, erasing that history).
            await store.write([row("d3", 1, cutoff - 2 * HOUR)])
            assert await store.refresh_rollups() == RefreshReport(0, 0, 1, ANY)
            again = await conn.fetch(f"SELECT * FROM {t}_hourly ORDER BY bucket")
            days_after = await device_days(conn, t, cutoff - DAY, cutoff + DAY)
        # The rollups were materialised before the drop, and keep their history.
        assert [tuple(r) for r in hourly_after] == [tuple(r) for r in hourly_before]
        assert again == hourly_after
        assert days_after == days_before and sum(r[12] for r in days_after) == 4


async def test_settings_that_would_let_retention_outrun_late_events_are_refused(
    settings: Settings,
) -> None:
    unsafe = pg(settings, allowed_lateness_s=10 * 86400, retention_days=5)
    async with UsageStore(unsafe) as store:
        with pytest.raises(ConfigurationError, match="retention_days must exceed"):
            await store.migrate()
    async with UsageStore(pg(settings, partition_interval_s=5400)) as store:
        with pytest.raises(ConfigurationError, match="must be whole hours"):
            await store.migrate()


def test_partition_start_aligns_to_the_epoch() -> None:
    """The store cuts partitions where `bucket_start` puts a bucket's start."""
    at = datetime(2026, 3, 1, 5, 59, tzinfo=UTC)
    assert bucket_start(at, DAY) == datetime(2026, 3, 1, tzinfo=UTC)
    assert bucket_start(at, 6 * HOUR) == datetime(2026, 3, 1, tzinfo=UTC)
    assert bucket_start(at + 2 * timedelta(minutes=1), 6 * HOUR) == datetime(
        2026, 3, 1, 6, tzinfo=UTC
    )


@pytest.mark.timescale
async def test_timescaledb_hypertable_rollups_and_late_event_into_a_compressed_chunk(
    settings: Settings,
) -> None:
    await require_timescaledb(settings)
    async with UsageStore(pg(settings, use_timescaledb=True)) as store:
        report = await store.migrate()
        assert report.layout.kind == "timescaledb"
        t = store.table
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        plan = FleetPlan(
            devices=6, messages_per_device=20, seed=9, duplicate_rate=0.2, start=now - 10 * DAY
        )
        rows = plan_rows(plan)
        unique = {(r.device_id, r.boot_id, r.seq, r.event_time) for r in rows}
        assert await store.write(rows) == len(unique)
        async with store.pool.acquire() as c:
            dims = await c.fetchval(
                "SELECT count(*) FROM timescaledb_information.dimensions"
                " WHERE hypertable_name = $1 AND column_name = 'event_time'",
                t,
            )
            assert dims == 1
            # Compress the old chunk, then deliver its events again: still duplicates
            # (ON CONFLICT DO NOTHING on compressed chunks: TimescaleDB 2.11+).
            await c.execute(f"SELECT compress_chunk(c) FROM show_chunks('{t}') c")
            assert await store.write(rows[:50]) == 0
            span = (now - 20 * DAY, now + DAY)
            for granularity in ("hourly", "daily"):
                rollup = await usage_rollup(c, t, granularity, *span)
                direct = await c.fetch(direct_rollup_query(t, granularity), *span)
                assert [tuple(vars_of(r)) for r in rollup] == [tuple(d) for d in direct]
            assert await device_days(c, t, *span) == await direct_device_days(c, t, *span)


NEW_ORDERBY = "device_id,boot_id,seq,event_time"
"""The compression order of migration 006 (no segmentby), as TimescaleDB lists it."""


async def compression_of(
    c: Connection, table: str
) -> tuple[set[tuple[str, str]], dict[str, tuple[int, int, int]]]:
    """The (segmentby, orderby) pairs the table's compressed chunks carry, and each
    one's rows and bytes before and after compression (TimescaleDB's own records)."""
    chunks = await c.fetch(
        "SELECT segmentby, orderby FROM timescaledb_information.chunk_compression_settings"
        " WHERE hypertable = $1::regclass",
        table,
    )
    rows = await c.fetch(
        f"SELECT tableoid::regclass::text AS chunk, count(*) AS n FROM {table} GROUP BY 1"
    )
    count = {r["chunk"]: r["n"] for r in rows}
    sizes = await c.fetch(
        "SELECT format('%I.%I', chunk_schema, chunk_name) AS chunk,"
        " before_compression_total_bytes AS b, after_compression_total_bytes AS a"
        " FROM chunk_compression_stats($1::regclass) WHERE compression_status = 'Compressed'",
        table,
    )
    found = {(r["segmentby"], r["orderby"]) for r in chunks}
    return found, {s["chunk"]: (count[s["chunk"]], s["b"], s["a"]) for s in sizes}


@pytest.mark.timescale
async def test_timescaledb_compression_shrinks_chunks_recompresses_old_ones_and_refuses_duplicates(
    settings: Settings,
) -> None:
    """Migration 006's settings on a table compressed before it: its chunks shrink
    from the old settings' size, and compressed chunks still refuse redeliveries,
    take late events and let erasure clear an owner's key."""
    await require_timescaledb(settings)
    t = settings.postgres.table
    # Three days of household usage of 150 appliances, at a fixed date: about 600
    # rows a chunk, the demo's rate (4 a device a day).
    plan = FleetPlan(
        devices=150,
        messages_per_device=0,
        seed=3,
        window=timedelta(days=3),
        clock=datetime(2026, 6, 4, 12, tzinfo=UTC),
    )
    rows = [
        dataclasses.replace(r, owner_key="owner-a") if r.device_id == device_ids(plan)[0] else r
        for r in plan_rows(plan)
    ]
    async with UsageStore(pg(settings, use_timescaledb=True)) as store:
        assert "006_compression" in (await store.migrate()).applied
        async with store.pool.acquire() as c:
            # Nothing but this test compresses: the policies would act on today's date.
            await c.execute(
                "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
                " WHERE hypertable_name = $1",
                t,
            )
            configured = await c.fetchrow(
                "SELECT segmentby, orderby"
                " FROM timescaledb_information.hypertable_compression_settings"
                " WHERE hypertable = $1::regclass",
                t,
            )
            assert configured is not None
            assert (configured["segmentby"], configured["orderby"]) == ("", NEW_ORDERBY)
            # The table as 001 left it: segmented by device, its chunks compressed so.
            await c.execute(
                f"ALTER TABLE {t} SET (timescaledb.compress_segmentby = 'device_id',"
                " timescaledb.compress_orderby = 'event_time DESC, boot_id, seq')"
            )
            assert await store.write(rows) == len({r.key for r in rows})
            total = await c.fetchval(f"SELECT count(*) FROM {t}")
            chunks = await c.fetchval(f"SELECT count(*) FROM show_chunks('{t}')")
            assert chunks >= 3
            await c.execute(f"SELECT compress_chunk(c) FROM show_chunks('{t}') c")
            old, old_sizes = await compression_of(c, t)
            assert old == {("device_id", "event_time DESC,boot_id,seq")}
            assert len(old_sizes) == chunks
            await c.execute(
                "DELETE FROM schema_migrations WHERE component = $1 AND name = '006_compression'",
                f"store.{t}",
            )
        assert (await store.migrate()).applied == ["006_compression"]
        async with store.pool.acquire() as c:
            new, sizes = await compression_of(c, t)
            assert new == {("", NEW_ORDERBY)} and len(sizes) == chunks  # all recompressed
            # The days of the window (400-750 rows; the others hold the few firmware
            # installations a unit reports before it, and gain a page or two).
            full = [chunk for chunk, (n, _, _) in sizes.items() if n >= 400]
            assert len(full) == 3
            assert all(2 * sizes[f][2] < sizes[f][1] for f in full), sizes
            # Half the size they had compressed by device, 4 rows a batch.
            assert 2 * sum(sizes[f][2] for f in full) < sum(old_sizes[f][2] for f in full)
            assert await c.fetchval(f"SELECT count(*) FROM {t}") == total
            # Redelivered into compressed chunks: nothing new (the slow path's ON CONFLICT).
            assert await store.write(rows[:300]) == 0
            late = dataclasses.replace(rows[0], seq=rows[0].seq + 10_000, kafka_offset=10_000)
            assert await store.write([late, *rows[300:310]]) == 1
            assert await c.fetchval(f"SELECT count(*) FROM {t}") == total + 1
            # Erasure's statement (ingest.erasure) on compressed chunks, with no cap on
            # the rows it may decompress (an owner's year would pass TimescaleDB's).
            limit = "SHOW timescaledb.max_tuples_decompressed_per_dml_transaction"
            assert await c.fetchval(limit) == "0"
            owned = sum(1 for r in rows if r.owner_key == "owner-a") + 1  # with the late row
            status = await c.execute(
                f"UPDATE {t} SET owner_key = NULL, membership_tier = NULL WHERE owner_key = $1",
                "owner-a",
            )
            assert status == f"UPDATE {owned}"
            assert await c.fetchval(f"SELECT count(*) FROM {t} WHERE owner_key IS NOT NULL") == 0
