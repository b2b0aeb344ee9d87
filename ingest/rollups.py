"""Hourly and daily usage for planners, the same on both storage layouts.

One rollup row per (bucket, category, schema, model, firmware, region):

    events      how many events were stored
    devices     how many distinct devices sent them
    energy_wh   sum of body.energy_wh where the event has one (cycles, energy readings)
    duration_s  sum of body.duration_s where the event has one (cycles, cleaning runs)

model, firmware and region are the usage row's fields of the same names, filled by
enrichment (`ingest.enrich`) from the device registry: the product model, the device's
firmware, and the owner's region where the owner consents to analytics (NULL where
not, so those devices' usage is counted under a NULL region). The owner key and
membership tier are never grouped on: a rollup row describes many owners' appliances.

Buckets are UTC hours and days (`date_bin` from the epoch here, `time_bucket` in
TimescaleDB: the same boundaries). Both layouts compute a bucket with one aggregate
over the raw rows (`aggregate_query`), so they cannot disagree on what a bucket holds.

- Both layouts: the write transaction only notes which hours got new rows
  (`<table>_rollup_invalidations`, a row per hour per batch), which costs next to
  nothing, and reads take the noted buckets from the raw rows. What differs is how a
  noted bucket is materialised.
- TimescaleDB: `<table>_hourly` and `<table>_daily` are continuous aggregates (see
  ingest/sql/timescaledb) with real-time aggregation on; `ingest.caggs` refreshes the
  noted buckets that have ended with `refresh_continuous_aggregate`, driven by the
  consumers as below (no refresh policy).
- Plain PostgreSQL: rollup tables kept by the store; `refresh_rollups` recomputes
  exactly the noted hours and their days from the raw rows and clears their notes, in
  one transaction.
  Consumers run it every `postgres.rollup_refresh_s`, in a task beside the batches,
  for the buckets that have ended only (like a refresh policy's end_offset: the open
  hour and day would otherwise be recomputed whole every time), and take ended days
  at most every `postgres.rollup_day_refresh_s` (a day is recomputed from all its raw
  rows, and late events keep noting the days just ended); `usagepipe db refresh` and
  retention take every note.
  Distinct devices stay exact because a bucket is always recomputed whole, never
  incremented. Reads are exact at any moment: `usage_rollup` takes the buckets still
  noted from the raw rows and the others from the rollup tables, as TimescaleDB's
  real-time aggregation does above its watermark.
  Raw rows older than the retention are dropped while the rollups keep their history,
  so a bucket from before `<table>_layout.retained_from` is never recomputed (a very
  late event there is stored raw but not aggregated; retention soon drops it).

`usage_rollup()` reads either.

**Per device and day** (`<table>_device_daily`, for the planners' reports in
`insights.reports`): one row per (UTC day, device, boot, schema, category,
model, firmware, region, membership tier, purchase channel, owner key, detail,
trigger) with

    events      how many events were stored
    min_seq     the boot's lowest and highest sequence number that day in the group:
    max_seq     with `events`, the gaps in each boot's sequence (completeness)

`detail` is what the reports group uses and errors by (`DETAIL`): the program
(washer, dryer) or mode (vacuum, air conditioner, purifier, refrigerator) chosen, or
for an error the code when it was *raised* (a cleared error has none: the reports
count errors raised); `trigger` is who started a use (panel, app_remote, schedule,
voice). Unlike the rollups above it keeps the owner key and the device, which is what
makes it exact for the reports: distinct owners of a segment (k-anonymity) and
distinct devices, device-days and device-weeks over any range are `count(DISTINCT)`
over its rows. It is for the insights code only, which never shows either (see
`insights.privacy`); erasure removes keys from it as from the raw rows
(`ingest.erasure.unlink_owners`). Same design as the others: one aggregate
(`device_daily_query`) for the refresh, the live reads and the TimescaleDB continuous
aggregate; the plain layout recomputes the days of the noted hours; reads
(`device_daily_source`) take noted days from the raw rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from ingest.migrations import Connection

Granularity = Literal["hourly", "daily"]
Rollup = Literal["hourly", "daily", "device_daily", "hourly_owners"]

GROUP = ("bucket", "category", "schema", "model", "firmware", "region")
SUMMED = ("energy_wh", "duration_s")
"""The body fields summed per bucket, where an event has them."""

EPOCH = "timestamptz '1970-01-01 00:00:00+00'"
"""The origin of every `date_bin` here: buckets aligned as TimescaleDB's time_bucket's."""
_STEP: dict[Granularity, str] = {"hourly": "1 hour", "daily": "1 day"}
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
_COLUMNS = ", ".join((*GROUP, "events", "devices", "energy_wh", "duration_s"))


@dataclass(frozen=True, slots=True)
class RollupRow:
    """One bucket of one group."""

    bucket: datetime
    category: str
    schema: str
    model: str | None
    firmware: str | None
    region: str | None
    events: int
    devices: int
    energy_wh: Decimal | None
    duration_s: Decimal | None


def hours_of(times: Sequence[datetime]) -> list[datetime]:
    """The UTC hours to note for a batch with these event times: every hour from the
    earliest to the latest when they span a day or less (an hour noted without rows is
    recomputed as empty, at no harm), else exactly the hours they fall in. Two C-level
    passes instead of one Python step per row: this runs in the write path.
    """
    if not times:
        return []
    first, last = int(min(times).timestamp()) // 3600, int(max(times).timestamp()) // 3600
    if last - first <= 24:
        hours: Iterable[int] = range(first, last + 1)
    else:
        hours = sorted({int(t.timestamp()) // 3600 for t in times})
    return [datetime.fromtimestamp(h * 3600, UTC) for h in hours]


def invalidation_cte(table: str, parameter: int) -> str:
    """A CTE (for after `WITH`) noting the hours in `$parameter` (timestamptz[]) as
    needing a refresh. A plain insert, no key: concurrent writers never wait on it."""
    return f"""invalidated AS (
            INSERT INTO {table}_rollup_invalidations (bucket)
            SELECT unnest(${parameter}::timestamptz[])
            RETURNING 1
        )"""


def aggregate_query(table: str, granularity: Granularity) -> str:
    """A bucket computed straight from the raw rows, for `$1 <= event_time < $2`.

    What the rollups must equal, what the plain layout materialises, and the same
    expression as the TimescaleDB continuous aggregates' definition.
    """
    step = _STEP[granularity]
    return f"""
        SELECT date_bin('{step}', event_time, {EPOCH}) AS bucket,
               split_part(schema, '.', 1) AS category, schema, model, firmware, region,
               count(*) AS events, count(DISTINCT device_id) AS devices,
               sum((body ->> 'energy_wh')::numeric) AS energy_wh,
               sum((body ->> 'duration_s')::numeric) AS duration_s
        FROM {table}
        WHERE event_time >= $1 AND event_time < $2
        GROUP BY 1, 2, 3, 4, 5, 6
    """


DETAIL = (
    "coalesce(body ->> 'program', body ->> 'mode',"
    " CASE WHEN body ->> 'state' = 'raised' THEN body ->> 'code' END)"
)
"""The device-daily rollup's `detail`: program or mode chosen, or an error's code where
it was raised. Immutable (a continuous aggregate may group on it); written the same in
ingest/sql/timescaledb/003_device_daily.sql."""

DEVICE_DAILY_GROUP = (
    "bucket",
    "device_id",
    "boot_id",
    "schema",
    "category",
    "model",
    "firmware",
    "region",
    "membership_tier",
    "purchase_channel",
    "owner_key",
    "detail",
    "trigger",
)
DEVICE_DAILY_COLUMNS = (*DEVICE_DAILY_GROUP, "events", "min_seq", "max_seq")
_DEVICE_DAILY_COLUMNS = ", ".join(DEVICE_DAILY_COLUMNS)
_RANGE = "event_time >= $1 AND event_time < $2"


def device_daily_query(table: str, where: str = _RANGE) -> str:
    """Device-days computed straight from the raw rows chosen by `where` (by default
    `$1 <= event_time < $2`): what `<table>_device_daily` holds, what the plain layout
    materialises and the TimescaleDB continuous aggregate's definition."""
    return f"""
        SELECT date_bin('1 day', event_time, {EPOCH}) AS bucket,
               device_id, boot_id, schema, split_part(schema, '.', 1) AS category,
               model, firmware, region, membership_tier, purchase_channel, owner_key,
               {DETAIL} AS detail, body ->> 'trigger' AS trigger,
               count(*) AS events, min(seq) AS min_seq, max(seq) AS max_seq
        FROM {table}
        WHERE {where}
        GROUP BY {", ".join(str(i) for i in range(1, len(DEVICE_DAILY_GROUP) + 1))}
    """


HOURLY_OWNERS_GROUP = ("bucket", "category", "model", "firmware", "region", "owner_key")
HOURLY_OWNERS_COLUMNS = (*HOURLY_OWNERS_GROUP, "events")
_HOURLY_OWNERS_COLUMNS = ", ".join(HOURLY_OWNERS_COLUMNS)


def hourly_owners_query(table: str, where: str = _RANGE) -> str:
    """The owners of each UTC hour computed straight from the raw rows chosen by
    `where` (by default `$1 <= event_time < $2`): what `<table>_hourly_owners` holds,
    what the plain layout materialises and the TimescaleDB continuous aggregate's
    definition. Rows without a key are grouped under a NULL key."""
    return f"""
        SELECT date_bin('1 hour', event_time, {EPOCH}) AS bucket,
               split_part(schema, '.', 1) AS category, model, firmware, region, owner_key,
               count(*) AS events
        FROM {table}
        WHERE {where}
        GROUP BY 1, 2, 3, 4, 5, 6
    """


@dataclass(frozen=True, slots=True)
class RefreshReport:
    """What one `refresh_rollups` recomputed."""

    hours: int
    days: int
    skipped: int
    """Noted hours from before the retained data, dropped without recomputing."""
    seconds: float


def spans(buckets: Iterable[datetime], step: timedelta) -> list[tuple[datetime, datetime]]:
    """Sorted `buckets` merged into [start, end) runs of consecutive buckets."""
    out: list[tuple[datetime, datetime]] = []
    for b in sorted(set(buckets)):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + step)
        else:
            out.append((b, b + step))
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def bucket_start(t: datetime, step: timedelta) -> datetime:
    """The start of the epoch-aligned `step` that `t` falls in: an hour or day bucket
    here (`date_bin` from the epoch in SQL), a partition in `ingest.tables`."""
    return _EPOCH + ((t - _EPOCH) // step) * step


def _day(t: datetime) -> datetime:
    return bucket_start(t, DAY)


ROLLUPS: tuple[Rollup, ...] = ("hourly", "daily", "device_daily", "hourly_owners")


def rollup_lock_key(table: str) -> str:
    """The advisory lock (`hashtext` of this) that refreshes and erasure of `table`'s
    rollups take, on both layouts."""
    return f"{table}_rollups"


async def lock_rollups(conn: Connection, table: str, *, wait: bool) -> bool:
    """Take `table`'s rollup lock for the current transaction: refreshes, and erasure
    clearing keys in the device-daily rollup, run one at a time. Without `wait`,
    False at once when another transaction holds it."""
    key = rollup_lock_key(table)
    if wait:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
        return True
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", key))


@dataclass(frozen=True, slots=True)
class Due:
    """What a set of notes asks a refresh to recompute (`due_buckets`)."""

    hours: set[datetime]
    days: set[datetime]
    skipped: set[datetime]
    """Noted buckets before the retained raw rows: dropped, never recomputed."""
    skipped_hours: set[datetime]


def due_buckets(
    notes: Iterable[tuple[datetime, bool]], day_end: datetime, retained_from: datetime | None
) -> Due:
    """The hours and days to recompute for `notes` (bucket, hourly_done) of ended hours.

    A note of an ended day asks for its day and, unless marked `hourly_done`, its hour;
    a note of a day still open (at or after `day_end`) for its hour only, once. Nothing
    before `retained_from` is recomputed: its raw rows may be partly gone.
    """
    notes = list(notes)

    def kept(bucket: datetime) -> bool:
        return retained_from is None or _day(bucket) >= retained_from

    ended = [(b, done) for b, done in notes if b < day_end]
    hours = {b for b, done in ended if not done}
    hours |= {b for b, done in notes if b >= day_end and not done}
    fresh = {h for h in hours if kept(h)}
    return Due(
        hours=fresh,
        days={_day(b) for b, _ in ended if kept(b)},
        skipped={b for b, _ in notes if not kept(b)},
        skipped_hours=hours - fresh,
    )


async def refresh_rollups(
    conn: Connection,
    table: str,
    *,
    wait: bool = False,
    settled_only: bool = False,
    days: bool = True,
    now: datetime | None = None,
) -> RefreshReport | None:
    """Recompute the noted hours, and their days, from the raw rows (plain layout).

    One transaction (a savepoint inside the caller's) under an advisory lock; None if
    another process holds it, unless `wait`. The notes are taken first; a batch
    committed after that adds a note of its own, so whatever this refresh's aggregate
    may not see is refreshed next time.

    `settled_only` (the consumers' periodic refresh): only hours and days that ended
    before `now`; a note whose hour is done but whose day is open is kept, marked
    `hourly_done`, until its day is. Otherwise every noted bucket. With `days` False
    (settled only) no day is recomputed: every ended hour's note is handled as if its
    day were open.
    """
    started = time.perf_counter()
    if settled_only:
        end = now or datetime.now(UTC)
        hour_end = bucket_start(end, HOUR)
        day_end = _day(end) if days else datetime.min.replace(tzinfo=UTC)
    else:
        hour_end = day_end = datetime.max.replace(tzinfo=UTC)
    inv = f"{table}_rollup_invalidations"
    async with conn.transaction():
        if not await lock_rollups(conn, table, wait=wait):
            return None
        # Days that ended: their notes go; hours that ended in an open day: marked.
        ended = await conn.fetch(
            f"DELETE FROM {inv} WHERE bucket < $1 RETURNING bucket, hourly_done", day_end
        )
        marked = await conn.fetch(
            f"UPDATE {inv} SET hourly_done = true"
            " WHERE bucket >= $1 AND bucket < $2 AND NOT hourly_done RETURNING bucket",
            day_end,
            hour_end,
        )
        retained_from = await conn.fetchval(f"SELECT retained_from FROM {table}_layout")
        notes = [(r["bucket"], r["hourly_done"]) for r in ended]
        notes += [(r["bucket"], False) for r in marked]
        due = due_buckets(notes, day_end, retained_from)
        fresh, fresh_days = due.hours, due.days
        skipped = len(due.skipped_hours)
        work: tuple[tuple[Rollup, set[datetime], timedelta, str, str], ...] = (
            ("hourly", fresh, HOUR, _COLUMNS, aggregate_query(table, "hourly")),
            ("daily", fresh_days, DAY, _COLUMNS, aggregate_query(table, "daily")),
            ("device_daily", fresh_days, DAY, _DEVICE_DAILY_COLUMNS, device_daily_query(table)),
            ("hourly_owners", fresh, HOUR, _HOURLY_OWNERS_COLUMNS, hourly_owners_query(table)),
        )
        for rollup, buckets, step, columns, aggregate in work:
            target = f"{table}_{rollup}"
            for start, stop in spans(buckets, step):
                await conn.execute(
                    f"DELETE FROM {target} WHERE bucket >= $1 AND bucket < $2", start, stop
                )
                await conn.execute(f"INSERT INTO {target} ({columns}) {aggregate}", start, stop)
    return RefreshReport(len(fresh), len(fresh_days), skipped, time.perf_counter() - started)


async def materialised_rows(conn: Connection, table: str, rollup: Rollup) -> str:
    """The relation that holds `<table>_<rollup>`'s materialised rows: the plain
    layout's table, or on TimescaleDB the continuous aggregate's materialisation
    hypertable, schema-qualified.

    Reads take every bucket not noted from here and the noted ones from the raw rows:
    a bucket that got rows stays noted until a refresh has materialised it, so the
    aggregate's real-time part (raw rows above its watermark, all noted) would only
    be computed to be thrown away. Erasure updates rows here in place.
    """
    if await conn.fetchval(f"SELECT kind FROM {table}_layout") == "partitioned":
        return f"{table}_{rollup}"
    # TimescaleDB's own catalog, as `ingest.caggs.watermark` reads it: an index look-up
    # (0.3 ms), where the timescaledb_information view over it took 10 ms a read.
    name = await conn.fetchval(
        "SELECT format('%I.%I', h.schema_name, h.table_name)"
        " FROM _timescaledb_catalog.continuous_agg c"
        " JOIN _timescaledb_catalog.hypertable h ON h.id = c.mat_hypertable_id"
        " WHERE c.user_view_schema = current_schema() AND c.user_view_name = $1",
        f"{table}_{rollup}",
    )
    if name is None:
        raise LookupError(f"{table}_{rollup} is not a continuous aggregate")
    return str(name)


async def _noted(conn: Connection, table: str, granularity: Granularity) -> list[datetime]:
    """Buckets of `granularity` that have rows not yet in the rollups (either layout)."""
    rows = await conn.fetch(
        f"""SELECT DISTINCT date_bin('{_STEP[granularity]}', i.bucket, {EPOCH}) AS bucket
            FROM {table}_rollup_invalidations i, {table}_layout l
            WHERE (l.retained_from IS NULL
                   OR date_bin('1 day', i.bucket, {EPOCH}) >= l.retained_from)
              AND {"NOT i.hourly_done" if granularity == "hourly" else "true"}"""
    )
    return [r["bucket"] for r in rows]


async def usage_rollup(
    conn: Connection,
    table: str,
    granularity: Granularity,
    start: datetime,
    end: datetime,
    *,
    category: str | None = None,
    schema: str | None = None,
) -> list[RollupRow]:
    """Rollup rows with `start <= bucket < end`, optionally for one category or schema.

    Ordered by bucket and group. The same answer on TimescaleDB and plain PostgreSQL,
    before and after any refresh.
    """
    if granularity not in _STEP:
        raise ValueError(f"granularity must be 'hourly' or 'daily', not {granularity!r}")
    filters = "($3::text IS NULL OR category = $3) AND ($4::text IS NULL OR schema = $4)"
    noted = await _noted(conn, table, granularity)
    materialised = await materialised_rows(conn, table, granularity)
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM {materialised}
        WHERE bucket >= $1 AND bucket < $2 AND {filters} AND bucket <> ALL($5::timestamptz[])
        """,
        start,
        end,
        category,
        schema,
        noted,
    )
    step = HOUR if granularity == "hourly" else DAY
    for lo, hi in spans((b for b in noted if start <= b < end), step):
        rows += await conn.fetch(
            f"SELECT * FROM ({aggregate_query(table, granularity)}) live WHERE {filters}",
            lo,
            hi,
            category,
            schema,
        )
    out = [RollupRow(**dict(row)) for row in rows]
    out.sort(key=_sort_key)
    return out


@dataclass(frozen=True, slots=True)
class DeviceDailySource:
    """Where a report reads device-days from: `sql` is a parenthesised SELECT of
    `DEVICE_DAILY_COLUMNS` (for `FROM ... AS d`) over `[$1, $2)`, taking the days in
    `live_days` (bind them as `$days_parameter`) from the raw rows and every other day
    from `<table>_device_daily`."""

    sql: str
    live_days: list[datetime]


async def device_daily_source(
    conn: Connection, table: str, start: datetime, end: datetime, *, days_parameter: int
) -> DeviceDailySource:
    """The device-daily rollup for `start <= event_time < end` ($1 and $2 of the
    caller's statement), exact at any moment on either layout.

    Read live from the raw rows: the days still noted for a refresh (as `usage_rollup`
    does) and a day the range only partly covers (its start or end is
    not midnight UTC: the rollup's day holds the whole day). Every other day of the
    range comes from the rollup's materialised rows (`materialised_rows`).
    """
    noted = await _noted(conn, table, "daily")
    first, last = _day(start), _day(end - timedelta(microseconds=1))
    live = {d for d in noted if first <= d <= last}
    live |= {d for d in (start, end) if _day(d) != d and first <= _day(d) <= last}
    live_days = sorted({_day(d) for d in live})
    p = f"${days_parameter}::timestamptz[]"
    columns = _DEVICE_DAILY_COLUMNS
    live_where = (
        f"{_RANGE} AND {_within(spans(live_days, DAY))}"
        f" AND date_bin('1 day', event_time, {EPOCH}) = ANY({p})"
    )
    materialised = await materialised_rows(conn, table, "device_daily")
    sql = _materialised_or_live(columns, materialised, p, device_daily_query(table, live_where))
    return DeviceDailySource(sql, live_days)


def _materialised_or_live(columns: str, materialised: str, live: str, query: str) -> str:
    """A parenthesised SELECT of `columns` over `[$1, $2)`: the buckets not in the array
    `live` from the `materialised` rows, those in it from the raw rows' `query`."""
    return f"""(
        SELECT {columns} FROM {materialised}
        WHERE bucket >= $1 AND bucket < $2 AND bucket <> ALL({live})
        UNION ALL
        SELECT {columns} FROM ({query}) live
    )"""


def _within(runs: list[tuple[datetime, datetime]]) -> str:
    """A condition on `event_time` holding exactly inside `runs`, as literals: the raw
    rows' BRIN index then reads those runs' blocks only. With the days or hours to read
    live as an array parameter alone (`date_bin(...) = ANY($n)`), the planner can bound
    the scan by nothing but the report's range, and a month's report read every raw row
    of the month for the one day it had to take live (bench/report_scale.py, EXPLAIN).
    Literals made here from datetimes, never from a user's text."""
    if not runs:
        return "false"
    return (
        "("
        + " OR ".join(
            f"(event_time >= timestamptz '{lo.isoformat()}'"
            f" AND event_time < timestamptz '{hi.isoformat()}')"
            for lo, hi in runs
        )
        + ")"
    )


@dataclass(frozen=True, slots=True)
class HourlyOwnersSource:
    """Where the heat map reads its owners per hour from: `sql` is a parenthesised
    SELECT of `HOURLY_OWNERS_COLUMNS` (for `FROM ... AS h`) over `[$1, $2)`, taking the
    hours in `live_hours` (bind them as `$hours_parameter`) from the raw rows and every
    other hour from `<table>_hourly_owners`."""

    sql: str
    live_hours: list[datetime]


async def hourly_owners_source(
    conn: Connection, table: str, start: datetime, end: datetime, *, hours_parameter: int
) -> HourlyOwnersSource:
    """The owners-per-hour rollup for `start <= event_time < end` ($1 and $2 of the
    caller's statement, whole hours), exact at any moment on either layout: the hours
    still noted for a refresh from the raw rows (as `usage_rollup` reads `_hourly`),
    every other hour from the rollup's materialised rows."""
    noted = await _noted(conn, table, "hourly")
    live_hours = sorted(h for h in noted if start <= h < end)
    p = f"${hours_parameter}::timestamptz[]"
    columns = _HOURLY_OWNERS_COLUMNS
    live_where = f"{_RANGE} AND {_within(spans(live_hours, HOUR))}"
    materialised = await materialised_rows(conn, table, "hourly_owners")
    sql = _materialised_or_live(columns, materialised, p, hourly_owners_query(table, live_where))
    return HourlyOwnersSource(sql, live_hours)


def _sort_key(r: RollupRow) -> tuple[Any, ...]:
    """`_ORDER` in Python: NULLs first, then by code point (the "C" collation on UTF-8)."""
    return (
        r.bucket,
        *((v is not None, v or "") for v in (r.category, r.schema, r.model, r.firmware, r.region)),
    )


# The same order on both paths and for the direct query, whatever the column collation.
_ORDER = ", ".join(f'{c} COLLATE "C" NULLS FIRST' if c != "bucket" else c for c in GROUP)


def direct_rollup_query(table: str, granularity: Granularity) -> str:
    """The rollup computed straight from the raw rows, in `usage_rollup`'s order: what
    the rollups must equal. Takes $1 (start) and $2 (end); for tests and for checking a
    live system.
    """
    return f"SELECT * FROM ({aggregate_query(table, granularity)}) direct ORDER BY {_ORDER}"
