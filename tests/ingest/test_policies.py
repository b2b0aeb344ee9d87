"""The TimescaleDB policies on a real TimescaleDB: created once, kept across migrates
with an operator's changes, changed in place only by `db migrate --update-policies`,
and, run with `CALL run_job`, compressing and dropping exactly the chunks past their
windows. Plain PostgreSQL has none, whatever the command says."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest.policies import ROLLUP_NOTES, PolicyReport, apply_policies
from ingest.rows import UsageRow
from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables
from tests.conftest import connection, require_timescaledb
from usagepipe.cli import main

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def pg(settings: Settings, **changes: object) -> PostgresSettings:
    return PostgresSettings(
        **{**settings.postgres.model_dump(), "use_timescaledb": True, **changes}
    )


async def jobs(conn: asyncpg.Connection, t: str) -> dict[str, tuple[int, dict[str, str], bool]]:
    """The table's and its aggregates' jobs: procedure -> (job id, config, scheduled)."""
    rows = await conn.fetch(
        "SELECT job_id, proc_name, config, scheduled FROM timescaledb_information.jobs"
        " WHERE hypertable_name = ANY($1::text[]) ORDER BY job_id",
        [t, f"{t}_hourly", f"{t}_daily", f"{t}_device_daily"],
    )
    found: dict[str, tuple[int, dict[str, str], bool]] = {}
    for r in rows:
        config = json.loads(r["config"])
        config.pop("hypertable_id", None)
        config.pop("mat_hypertable_id", None)
        key = r["proc_name"] if r["proc_name"] not in found else f"{r['proc_name']}#{r['job_id']}"
        found[key] = (r["job_id"], config, r["scheduled"])
    return found


def jobs_now(settings: Settings) -> dict[str, tuple[int, dict[str, str], bool]]:
    """`jobs` from a test that cannot await (it runs the CLI, which has its own loop)."""

    async def read() -> dict[str, tuple[int, dict[str, str], bool]]:
        async with connection(settings.postgres.dsn.get_secret_value()) as c:
            return await jobs(c, settings.postgres.table)

    return asyncio.run(read())


def pause(settings: Settings, job_id: int) -> None:
    """What an operator does: `SELECT alter_job(id, scheduled => false)`."""

    async def alter() -> None:
        async with connection(settings.postgres.dsn.get_secret_value()) as c:
            await c.execute("SELECT alter_job($1, scheduled => false)", job_id)

    asyncio.run(alter())


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    async with connection(settings.postgres.dsn.get_secret_value()) as c:
        yield c


@pytest.mark.timescale
async def test_a_second_migrate_keeps_the_jobs_and_what_an_operator_changed(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    await require_timescaledb(settings)
    t = settings.postgres.table
    async with UsageStore(pg(settings)) as store:
        first = await store.migrate()
    assert [(p.policy, p.action, p.setting) for p in first.policies] == [
        ("compression policy", "created", "4 days"),
        ("retention policy", "created", "400 days"),
    ]
    before = await jobs(conn, t)
    # Two policies, no refresh policy: the consumers refresh the aggregates.
    assert {k: v[1] for k, v in before.items()} == {
        "policy_compression": {"compress_after": "4 days"},
        "policy_retention": {"drop_after": "400 days"},
    }
    compression, retention = before["policy_compression"][0], before["policy_retention"][0]
    await conn.execute("SELECT alter_job($1, scheduled => false)", retention)
    await conn.execute("SELECT alter_job($1, schedule_interval => '7 hours')", compression)

    async with UsageStore(pg(settings)) as store:  # a consumer starting, say
        second = await store.migrate()
    assert [(p.policy, p.action, p.job_ids) for p in second.policies] == [
        ("compression policy", "unchanged", (compression,)),
        ("retention policy", "unchanged", (retention,)),
    ]
    after = await jobs(conn, t)
    assert after == {
        "policy_compression": (compression, {"compress_after": "4 days"}, True),
        "policy_retention": (retention, {"drop_after": "400 days"}, False),
    }
    interval = await conn.fetchval(
        "SELECT schedule_interval FROM timescaledb_information.jobs WHERE job_id = $1",
        compression,
    )
    assert interval == 7 * HOUR


@pytest.mark.timescale
def test_a_changed_setting_is_kept_with_a_warning_until_db_migrate_update_policies(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    asyncio.run(require_timescaledb(settings))
    t = settings.postgres.table
    monkeypatch.setenv("USAGEPIPE_POSTGRES__DSN", settings.postgres.dsn.get_secret_value())
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", t)
    monkeypatch.setenv("USAGEPIPE_POSTGRES__USE_TIMESCALEDB", "true")
    assert main(["db", "migrate"]) == 0
    created = jobs_now(settings)
    compression, retention = created["policy_compression"][0], created["policy_retention"][0]
    pause(settings, retention)  # an operator's

    monkeypatch.setenv("USAGEPIPE_POSTGRES__RETENTION_DAYS", "30")
    monkeypatch.setenv("USAGEPIPE_POSTGRES__ALLOWED_LATENESS_S", "3600")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ingest.policies"):
        assert main(["db", "migrate"]) == 0
    kept = [
        f"compression policy (job {compression}): differs: kept compress_after 4 days;"
        " USAGEPIPE_POSTGRES__ALLOWED_LATENESS_S (3600) plus the table's partition interval"
        " says 1 day 01:00:00, run `usagepipe db migrate --update-policies` to apply it",
        f"retention policy (job {retention}): differs: kept drop_after 400 days;"
        " USAGEPIPE_POSTGRES__RETENTION_DAYS (30) says 30 days, run"
        " `usagepipe db migrate --update-policies` to apply it",
    ]
    warned = [r.getMessage() for r in caplog.records if r.name == "ingest.policies"]
    assert warned == [f"{t}: {line}" for line in kept]
    assert jobs_now(settings) == {
        "policy_compression": (compression, {"compress_after": "4 days"}, True),
        "policy_retention": (retention, {"drop_after": "400 days"}, False),
    }

    assert main(["db", "migrate", "--update-policies"]) == 0
    assert jobs_now(settings) == {
        "policy_compression": (compression, {"compress_after": "1 day 01:00:00"}, True),
        "policy_retention": (retention, {"drop_after": "30 days"}, False),
    }
    assert main(["db", "migrate"]) == 0
    assert main(["db", "retention", "--update-policies"]) == 2

    out = capsys.readouterr().out.splitlines()
    head = f"usage table '{t}' is up to date"
    layout = "layout: timescaledb, partitions of 24 h"
    migrated = (
        "001_usage, 002_enrichment, 003_device_daily, 004_rollup_notes, 005_erasure_checks,"
        " 006_compression, 007_message_ids, 008_dead_letters,"
        " 009_dead_letter_traces, 011_dp_releases, 014_hourly_owners, 015_consent_unlinks"
    )
    assert out == [
        f"{head} ({migrated}); {layout}",
        f"compression policy (job {compression}): created, compress_after 4 days",
        f"retention policy (job {retention}): created, drop_after 400 days",
        f"{head} (none pending); {layout}",
        *kept,
        f"{head} (none pending); {layout}",
        f"compression policy (job {compression}): updated compress_after 4 days -> 1 day 01:00:00",
        f"retention policy (job {retention}): updated drop_after 400 days -> 30 days",
        f"{head} (none pending); {layout}",
        f"compression policy (job {compression}): unchanged, compress_after 1 day 01:00:00",
        f"retention policy (job {retention}): unchanged, drop_after 30 days",
    ]


@pytest.mark.timescale
def test_db_retention_with_another_retention_leaves_the_policy(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(require_timescaledb(settings))
    t = settings.postgres.table
    monkeypatch.setenv("USAGEPIPE_POSTGRES__DSN", settings.postgres.dsn.get_secret_value())
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", t)
    monkeypatch.setenv("USAGEPIPE_POSTGRES__USE_TIMESCALEDB", "true")
    assert main(["db", "migrate"]) == 0
    created = jobs_now(settings)
    monkeypatch.setenv("USAGEPIPE_POSTGRES__RETENTION_DAYS", "5")
    assert main(["db", "retention"]) == 0
    assert main(["db", "refresh"]) == 0
    assert jobs_now(settings) == created
    assert created["policy_retention"][1] == {"drop_after": "400 days"}
    assert f"retention on '{t}' dropped: nothing" in capsys.readouterr().out.splitlines()


@pytest.mark.timescale
async def test_the_refresh_policies_are_removed_by_the_migrate_that_applies_the_notes(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """A table from before the notes had a refresh policy per aggregate (the form the
    store used to add); the migrate applying `ROLLUP_NOTES` removes them, any other
    leaves the jobs alone."""
    await require_timescaledb(settings)
    t = settings.postgres.table
    s = pg(settings)
    async with UsageStore(s) as store:
        await store.migrate()
    views = [f"{t}_hourly", f"{t}_daily", f"{t}_device_daily"]
    refresh = [
        await conn.fetchval(
            "SELECT add_continuous_aggregate_policy($1::regclass, start_offset => $2::interval,"
            " end_offset => $3::interval, schedule_interval => $4::interval)",
            view,
            5 * DAY,
            DAY,
            timedelta(minutes=30),
        )
        for view in views
    ]
    kept = await jobs(conn, t)
    assert len(kept) == 5
    assert [p.action for p in await apply_policies(conn, t, s, DAY, ["003_device_daily"])] == [
        "unchanged",
        "unchanged",
    ]
    assert await jobs(conn, t) == kept

    reports = await apply_policies(conn, t, s, DAY, [ROLLUP_NOTES])
    assert [(p.policy, p.action, p.job_ids) for p in reports] == [
        ("refresh policy", "removed", tuple(refresh)),
        ("compression policy", "unchanged", (kept["policy_compression"][0],)),
        ("retention policy", "unchanged", (kept["policy_retention"][0],)),
    ]
    assert reports[0].describe() == (
        f"refresh policy (jobs {', '.join(map(str, refresh))}): removed"
        " (the consumers refresh the continuous aggregates)"
    )
    assert await jobs(conn, t) == {
        k: v for k, v in kept.items() if k in ("policy_compression", "policy_retention")
    }
    # Once: a later migrate that applies it again (it cannot) would find nothing to remove.
    reports = await apply_policies(conn, t, s, DAY, [ROLLUP_NOTES])
    assert [p.action for p in reports] == ["unchanged", "unchanged"]


async def hold(conn: asyncpg.Connection, job_ids: list[int]) -> None:
    """Keep TimescaleDB's scheduler off `job_ids`, so that only the test's `CALL
    run_job` runs them: a new policy's first run starts at once, and it would compress
    or drop the test's chunks before the test looks. Pauses them, then waits for a run
    that started before the pause to end (a run of an empty table: milliseconds)."""
    names = []
    for job_id in job_ids:
        job = await conn.fetchrow("SELECT * FROM alter_job($1, scheduled => false)", job_id)
        assert job is not None and not job["scheduled"]
        names.append(job["application_name"])
    running = "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1::text[])"
    async with asyncio.timeout(30):
        while await conn.fetchval(running, names):  # noqa: ASYNC110 - a server's state
            await asyncio.sleep(0.05)


def usage(device: str, seq: int, at: datetime) -> UsageRow:
    return UsageRow(device, "b1", seq, at, "washer.energy", 1, {"energy_wh": 2.5}, 0, seq)


@pytest.mark.timescale
async def test_run_job_compresses_and_drops_exactly_the_chunks_past_each_window(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """One-day chunks, compress_after = 1 day of lateness + 1 day = 2 days, drop_after =
    6 days. Each row is an hour or more from where its chunk could straddle a window's
    edge, counted from now, as the policies count: a chunk is compressed (dropped) when
    it ends before now - compress_after (now - drop_after)."""
    await require_timescaledb(settings)
    t = settings.postgres.table
    s = pg(settings, allowed_lateness_s=86400, retention_days=6)
    compress_after, drop_after = 2 * DAY, 6 * DAY
    now = datetime.now(UTC)
    # A chunk holding a row at `at` ends after `at` and no later than `at` + 1 day.
    at = {
        "recent": now - HOUR,
        "inside compress_after": now - compress_after + HOUR,
        "past compress_after": now - compress_after - DAY - HOUR,
        "inside drop_after": now - drop_after + HOUR,
        "past drop_after": now - drop_after - DAY - HOUR,
    }
    async with UsageStore(s) as store:
        report = await store.migrate()
        assert report.layout.kind == "timescaledb"
        policy = await jobs(conn, t)
        await hold(conn, [job_id for job_id, _, _ in policy.values()])
        rows = [usage(f"d{i}", k, when) for i, when in enumerate(at.values()) for k in (1, 2)]
        assert await store.write(rows) == 10
    chunk_of = {
        label: await conn.fetchval(
            f"SELECT DISTINCT tableoid::regclass::text FROM {t} WHERE device_id = $1", f"d{i}"
        )
        for i, label in enumerate(at)
    }
    assert len(set(chunk_of.values())) == 5

    async def chunks() -> dict[str, bool]:
        found = await conn.fetch(
            "SELECT format('%I.%I', chunk_schema, chunk_name) AS chunk, is_compressed"
            " FROM timescaledb_information.chunks WHERE hypertable_name = $1",
            t,
        )
        by_chunk = {r["chunk"]: r["is_compressed"] for r in found}
        return {label: by_chunk[c] for label, c in chunk_of.items() if c in by_chunk}

    assert policy["policy_compression"][1] == {"compress_after": "2 days"}
    assert policy["policy_retention"][1] == {"drop_after": "6 days"}
    await conn.execute(f"CALL run_job({policy['policy_compression'][0]})")
    assert await chunks() == {
        "recent": False,
        "inside compress_after": False,
        "past compress_after": True,
        "inside drop_after": True,
        "past drop_after": True,
    }
    await conn.execute(f"CALL run_job({policy['policy_retention'][0]})")
    assert await chunks() == {
        "recent": False,
        "inside compress_after": False,
        "past compress_after": True,
        "inside drop_after": True,
    }
    left = await conn.fetch(f"SELECT device_id, count(*) FROM {t} GROUP BY 1 ORDER BY 1")
    assert [tuple(r) for r in left] == [("d0", 2), ("d1", 2), ("d2", 2), ("d3", 2)]


def test_plain_postgresql_has_no_policies_whatever_the_command_says(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    t = settings.postgres.table
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", t)
    monkeypatch.setenv("USAGEPIPE_POSTGRES__USE_TIMESCALEDB", "false")
    assert main(["db", "migrate", "--update-policies"]) == 0
    assert main(["db", "refresh", "--update-policies"]) == 2
    captured = capsys.readouterr()
    applied = (
        "001_usage, 002_enrichment, 003_rollup_refresh, 004_device_daily,"
        " 005_settled_refresh, 006_erasure_checks, 007_message_ids, 008_dead_letters,"
        " 009_dead_letter_traces,"
        " 010_ids_by_trigger, 012_dp_releases, 015_hourly_owners, 016_consent_unlinks"
    )
    assert captured.out.splitlines() == [
        f"usage table '{t}' is up to date ({applied}); layout: partitioned, partitions of 24 h"
    ]
    assert captured.err == "usagepipe db refresh: --update-policies goes with migrate\n"

    async def policies() -> list[PolicyReport]:
        async with UsageStore(pg(settings, use_timescaledb=False)) as store:
            return (await store.migrate(update_policies=True)).policies

    assert asyncio.run(policies()) == []


@pytest.mark.timescale
async def test_consumers_starting_together_create_each_policy_once(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    await require_timescaledb(settings)
    t = settings.postgres.table

    async def start() -> list[tuple[str, str]]:
        async with UsageStore(pg(settings)) as store:
            return [(p.policy, p.action) for p in (await store.migrate()).policies]

    reports = await asyncio.gather(*(start() for _ in range(4)))
    created = [("compression policy", "created"), ("retention policy", "created")]
    unchanged = [("compression policy", "unchanged"), ("retention policy", "unchanged")]
    assert sorted(reports) == [created, unchanged, unchanged, unchanged]
    assert sorted(await jobs(conn, t)) == ["policy_compression", "policy_retention"]


@pytest.mark.timescale
async def test_teardown_deletes_the_jobs_and_leaves_no_compressed_chunk_behind(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """`ingest.tables.drop_usage_tables`, which every test's teardown runs: the table's
    and its aggregates' jobs go first, then every table, compressed chunks included."""
    await require_timescaledb(settings)
    t = settings.postgres.table
    async with UsageStore(pg(settings)) as store:
        await store.migrate()
        await hold(conn, [job_id for job_id, _, _ in (await jobs(conn, t)).values()])
        now = datetime.now(UTC)
        assert await store.write([usage("d1", k, now - k * DAY) for k in range(1, 6)]) == 5
    await conn.execute(f"SELECT count(compress_chunk(c)) FROM show_chunks('{t}') c")
    await conn.execute(  # the refresh policy a table from before the notes has
        "SELECT add_continuous_aggregate_policy($1::regclass, start_offset => $2::interval,"
        " end_offset => $3::interval, schedule_interval => $4::interval)",
        f"{t}_hourly",
        5 * DAY,
        HOUR,
        timedelta(minutes=30),
    )
    assert len(await jobs(conn, t)) == 3
    internal = await conn.fetch(
        "SELECT format('%I.%I', z.schema_name, z.table_name) AS name"
        " FROM _timescaledb_catalog.chunk c"
        " JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id"
        " JOIN _timescaledb_catalog.chunk z ON z.id = c.compressed_chunk_id"
        " WHERE h.table_name = $1",
        t,
    )
    assert len(internal) == 5  # one compressed chunk per day

    await drop_usage_tables(conn, t)
    assert await jobs(conn, t) == {}
    left = await conn.fetchval(
        "SELECT count(*) FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NOT NULL",
        [r["name"] for r in internal],
    )
    assert left == 0
    mine = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
        " AND (relname = $1 OR relname LIKE $1 || '\\_%')",
        t,
    )
    assert [r["relname"] for r in mine] == []
