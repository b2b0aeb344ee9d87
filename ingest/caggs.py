"""The TimescaleDB layout's rollups: continuous aggregates refreshed from the notes.

`<table>_hourly`, `<table>_daily`, `<table>_device_daily` and `<table>_hourly_owners`
(the heat map's owners per UTC hour, refreshed with `_hourly`'s hours) are continuous aggregates
(ingest/sql/timescaledb) with real-time aggregation. The store notes the hours every
batch wrote (`<table>_rollup_invalidations`), as on plain PostgreSQL, and a read takes
the noted buckets from the raw rows (`ingest.rollups.usage_rollup`,
`device_daily_source`): one read path for both layouts, exact at any moment.

`refresh_aggregates` is this layout's `refresh_rollups`: it reads the notes of buckets
that have ended, `CALL refresh_continuous_aggregate` over each run of them, and then
removes the notes the aggregates' watermarks show materialised. TimescaleDB recomputes
only what its own invalidation log says changed inside a window, so a note costs a
recompute of its bucket at most once. No refresh policy: a policy reaches back only
its window (history older than it was never materialised and fell out of every read),
it cannot know which buckets were written, and it runs from a scheduler whose failures
(on Debian's PostgreSQL 15.20 every job ends with `cannot drop portal ""`) would then
decide what the planners see.

The refreshes run under the rollup lock (`ingest.rollups.lock_rollups`, taken here for
the session, since the procedure commits as it goes) so that erasure
(`ingest.erasure`) never interleaves with one of ours; a refresh someone else runs
beside it is refused by TimescaleDB or refused ours ("due to a concurrent refresh"):
the notes stay and the next refresh takes them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from ingest.migrations import Connection
from ingest.rollups import (
    DAY,
    HOUR,
    ROLLUPS,
    RefreshReport,
    Rollup,
    bucket_start,
    due_buckets,
    rollup_lock_key,
    spans,
)

STEPS: dict[Rollup, timedelta] = {
    "hourly": HOUR,
    "daily": DAY,
    "device_daily": DAY,
    "hourly_owners": HOUR,
}


async def watermark(conn: Connection, table: str, rollup: Rollup) -> datetime | None:
    """Where `<table>_<rollup>`'s materialised part ends (None: nothing materialised):
    buckets before it are read from the materialisation, later ones from the raw rows."""
    # Nothing materialised: the lowest timestamptz (4714 BC), which Python cannot hold.
    value: datetime | None = await conn.fetchval(
        "SELECT _timescaledb_functions.to_timestamp(w) FROM ("
        "SELECT _timescaledb_functions.cagg_watermark(c.mat_hypertable_id) AS w"
        " FROM _timescaledb_catalog.continuous_agg c"
        " WHERE c.user_view_schema = current_schema() AND c.user_view_name = $1) m"
        " WHERE w > _timescaledb_functions.to_unix_microseconds(timestamptz '0001-01-02Z')",
        f"{table}_{rollup}",
    )
    return value


async def refresh_window(
    conn: Connection, table: str, rollup: Rollup, start: datetime, end: datetime
) -> None:
    """`CALL refresh_continuous_aggregate` over `[start, end)` (outside any transaction
    block, as the procedure requires; literals, not parameters: its window arguments
    are declared "any")."""
    await conn.execute(
        f"CALL refresh_continuous_aggregate('{table}_{rollup}',"
        f" timestamptz '{start.isoformat()}', timestamptz '{end.isoformat()}')"
    )


def _earliest(*marks: datetime | None) -> datetime | None:
    """The watermark that every one of `marks`' aggregates has passed (None: one of
    them has nothing materialised)."""
    return None if any(m is None for m in marks) else min(m for m in marks if m is not None)


async def refresh_aggregates(
    conn: Connection,
    table: str,
    *,
    wait: bool = False,
    days: bool = True,
    now: datetime | None = None,
) -> RefreshReport | None:
    """Materialise the noted buckets that have ended (the TimescaleDB layout's
    `refresh_rollups`); None if another refresh of ours holds the lock, unless `wait`.

    Always "settled only": TimescaleDB never materialises a bucket that is still open
    (it stays above the watermark, read from the raw rows), so its notes stay. With
    `days` False only hours are refreshed, as on the plain layout. A note is removed
    only once the watermark of every aggregate it feeds has passed its bucket.
    """
    started = time.perf_counter()
    end = now or datetime.now(UTC)
    hour_end = bucket_start(end, HOUR)
    day_end = bucket_start(end, DAY) if days else datetime.min.replace(tzinfo=UTC)
    key = rollup_lock_key(table)
    lock = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
    got = await conn.fetchval(f"SELECT {lock}(hashtext($1))::text", key)
    if got == "false":
        return None
    try:
        # The retention policy drops chunks on a schedule: buckets before its cutoff
        # are not recomputed any more, as after `drop_expired` (ingest.tables).
        await conn.execute(
            f"UPDATE {table}_layout l SET retained_from = j.cutoff FROM ("
            "SELECT now() - (config ->> 'drop_after')::interval AS cutoff"
            " FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
            " AND hypertable_schema = current_schema() AND hypertable_name = $1) j"
            " WHERE l.retained_from IS NULL OR l.retained_from < j.cutoff",
            table,
        )
        notes = await conn.fetch(
            f"SELECT id, bucket, hourly_done FROM {table}_rollup_invalidations WHERE bucket < $1",
            hour_end,
        )
        retained_from = await conn.fetchval(f"SELECT retained_from FROM {table}_layout")
        due = due_buckets([(n["bucket"], n["hourly_done"]) for n in notes], day_end, retained_from)
        work: dict[Rollup, set[datetime]] = {
            "hourly": due.hours,
            "daily": due.days,
            "device_daily": due.days,
            "hourly_owners": due.hours,
        }
        for rollup in ROLLUPS:
            for lo, hi in spans(work[rollup], STEPS[rollup]):
                await refresh_window(conn, table, rollup, lo, hi)
        marks = {r: await watermark(conn, table, r) for r in ROLLUPS}
        hourly_mark = _earliest(marks["hourly"], marks["hourly_owners"])
        day_mark = _earliest(marks["daily"], marks["device_daily"])

        def passed(mark: datetime | None, bucket_end: datetime) -> bool:
            return mark is not None and bucket_end <= mark

        done: list[int] = []
        marked: list[int] = []
        for n in notes:
            bucket, day = n["bucket"], bucket_start(n["bucket"], DAY)
            if bucket in due.skipped:
                done.append(n["id"])
            elif day < day_end:  # its day has ended: both granularities refreshed
                hour_ok = n["hourly_done"] or passed(hourly_mark, bucket + HOUR)
                if hour_ok and passed(day_mark, day + DAY):
                    done.append(n["id"])
            elif not n["hourly_done"] and passed(hourly_mark, bucket + HOUR):
                marked.append(n["id"])
        async with conn.transaction():
            await conn.execute(
                f"DELETE FROM {table}_rollup_invalidations WHERE id = ANY($1::bigint[])", done
            )
            await conn.execute(
                f"UPDATE {table}_rollup_invalidations SET hourly_done = true"
                " WHERE id = ANY($1::bigint[])",
                marked,
            )
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
    return RefreshReport(
        len(due.hours), len(due.days), len(due.skipped_hours), time.perf_counter() - started
    )
