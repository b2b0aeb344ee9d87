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
TimescaleDB: the same boundaries).

- TimescaleDB: `<table>_hourly` and `<table>_daily` are continuous aggregates (see
  ingest/sql/timescaledb), with real-time aggregation on.
- Plain PostgreSQL: they are tables the store updates in the write transaction. The
  store knows which rows the transaction actually inserted (all of them after a clean
  COPY, else the INSERT's RETURNING), so a duplicate never counts twice. `Contribution`
  sums those rows per group in Python; `rollup_statement()` adds the sums. Distinct
  devices are exact: `<table>_hourly_devices` / `_daily_devices` hold which devices a
  rollup row has counted, and a device adds 1 only when its membership row is new.
  `KnownMembers` spares the database the memberships this process knows exist.

`usage_rollup()` reads either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from schemas.catalog import models

Granularity = Literal["hourly", "daily"]

GROUP = ("bucket", "category", "schema", "model", "firmware", "region")
SUMMED = ("energy_wh", "duration_s")
"""The body fields summed per bucket, where an event has them."""

_ORIGIN = "timestamptz '1970-01-01 00:00:00+00'"
_STEP: dict[Granularity, str] = {"hourly": "1 hour", "daily": "1 day"}
_SECONDS: dict[Granularity, int] = {"hourly": 3600, "daily": 86400}

# (bucket as epoch seconds, schema, model, firmware, region)
_Group = tuple[int, str, str | None, str | None, str | None]


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


Member = tuple[int, str, str | None, str | None, str | None, str]
"""(hour as epoch seconds, schema, model, firmware, region, device_id)"""


class Contribution:
    """What newly inserted rows add to the rollups, summed per group in one pass.

    `members` are the (hour, group, device) memberships the rows imply; the statement
    inserts them and counts a device only where its membership is new.
    """

    def __init__(self, rows: Iterable[Any]) -> None:
        hourly: dict[_Group, list[Any]] = {}
        members: set[Member] = set()
        summed = _SCHEMAS_WITH_SUMS
        for r in rows:
            epoch = int(r.event_time.timestamp())
            key = (epoch - epoch % 3600, r.schema, r.model, r.firmware, r.region)
            members.add((*key, r.device_id))
            sums = hourly.get(key)
            if sums is None:
                sums = hourly[key] = [0, None, None]
            sums[0] += 1
            if r.schema in summed or r.schema not in _KNOWN:
                _add_sums(sums, r.body_json)
        daily: dict[_Group, list[Any]] = {}
        for (hour, schema, model, firmware, region), sums in hourly.items():
            day_key = (hour - hour % 86400, schema, model, firmware, region)
            total = daily.get(day_key)
            if total is None:
                daily[day_key] = list(sums)
            else:
                total[0] += sums[0]
                total[1] = _plus(total[1], sums[1])
                total[2] = _plus(total[2], sums[2])
        self.members = members
        self._groups = {"hourly": hourly, "daily": daily}

    def parameters(self, members: Iterable[Member]) -> list[list[Any]]:
        """The arrays `rollup_statement` takes, in its order, for `members` (those of
        `self.members` the store does not already know to exist)."""
        out: list[list[Any]] = [list(c) for c in zip(*members, strict=True)] or [
            [] for _ in range(6)
        ]
        for granularity in ("hourly", "daily"):
            # Sorted, so concurrent writers lock hot rollup rows in the same order.
            items = sorted(self._groups[granularity].items(), key=lambda kv: _sort_key(kv[0]))
            out.extend(
                [list(c) for c in zip(*(k for k, _ in items), strict=True)]
                or [[] for _ in range(5)]
            )
            for i in range(3):
                out.append([sums[i] for _, sums in items])
        return out


def _plus(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    return b if a is None else a if b is None else a + b


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((v is not None, v) for v in key)


def _add_sums(sums: list[Any], body_json: str) -> None:
    """Add the body's summed fields, exactly as PostgreSQL reads them from the jsonb.

    Bodies are written by orjson, whose floats are the shortest text that reads back
    as the same double; Python's repr() of that double is the same text.
    """
    body = orjson.loads(body_json)
    if not isinstance(body, dict):
        return
    for i, name in enumerate(SUMMED, start=1):
        value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
        sums[i] = number if sums[i] is None else sums[i] + number


def _schemas_with(fields: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(schemas whose body has any of `fields` in some version, every known schema)."""
    known = set()
    having = set()
    for name, _version, body_model in models():
        known.add(name)
        if any(f in body_model.model_fields for f in fields):
            having.add(name)
    return frozenset(having), frozenset(known)


_SCHEMAS_WITH_SUMS, _KNOWN = _schemas_with(SUMMED)


class KnownMembers:
    """Memberships this process has seen committed, for the recent hours.

    Only a positive cache: a membership row, once committed, stays (retention prunes
    only hours long past), so a cached one need not be inserted again; anything not
    cached is checked by the database. Kafka partitions are keyed by device, so a
    consumer meets the same devices batch after batch and most lookups hit.
    """

    def __init__(self, hours: int = 3) -> None:
        self._hours = hours
        self._by_hour: dict[int, set[Member]] = {}

    def unknown(self, members: set[Member]) -> list[Member]:
        out = []
        for m in members:
            seen = self._by_hour.get(m[0])
            if seen is None or m not in seen:
                out.append(m)
        return out

    def remember(self, members: Iterable[Member]) -> None:
        for m in members:
            seen = self._by_hour.get(m[0])
            if seen is None:
                seen = self._by_hour[m[0]] = set()
            seen.add(m)
        if len(self._by_hour) > self._hours:
            for hour in sorted(self._by_hour)[: -self._hours]:
                del self._by_hour[hour]


def rollup_statement(table: str, first: int) -> str:
    """CTEs adding a `Contribution` to both rollups; its parameters start at `$first`.

    The result is a list of `name AS (...)` items to put after `WITH`.
    """
    member = "schema, model, firmware, region"
    p = [f"${i}" for i in range(first, first + 22)]
    return f"""hourly_members AS (
            INSERT INTO {table}_hourly_devices (bucket, {member}, device_id)
            SELECT to_timestamp(b), s, m, f, r, d
            FROM unnest({p[0]}::bigint[], {p[1]}::text[], {p[2]}::text[], {p[3]}::text[],
                        {p[4]}::text[], {p[5]}::text[]) AS u (b, s, m, f, r, d)
            ON CONFLICT DO NOTHING
            RETURNING bucket, {member}, device_id
        ),
        daily_members AS (
            -- A device new to a day's group is new to that hour's group as well, so
            -- only the new hourly members need checking against the daily ones.
            INSERT INTO {table}_daily_devices (bucket, {member}, device_id)
            SELECT DISTINCT date_bin('1 day', bucket, {_ORIGIN}), {member}, device_id
            FROM hourly_members
            ON CONFLICT DO NOTHING
            RETURNING bucket, {member}
        ),
        {_add_to(table, "hourly", "hourly_members", p[6:14])},
        {_add_to(table, "daily", "daily_members", p[14:22])}"""


def _add_to(table: str, granularity: str, members: str, p: list[str]) -> str:
    r = f"{table}_{granularity}"
    return f"""{granularity}_added AS (
            INSERT INTO {r} AS r ({", ".join(GROUP)}, events, devices, energy_wh, duration_s)
            SELECT to_timestamp(f.b), split_part(f.s, '.', 1), f.s, f.m, f.f, f.r,
                   f.events, coalesce(fresh.devices, 0), f.energy_wh, f.duration_s
            FROM unnest({p[0]}::bigint[], {p[1]}::text[], {p[2]}::text[], {p[3]}::text[],
                        {p[4]}::text[], {p[5]}::bigint[], {p[6]}::numeric[], {p[7]}::numeric[])
                 WITH ORDINALITY AS f (b, s, m, f, r, events, energy_wh, duration_s, n)
            LEFT JOIN (
                SELECT bucket, schema, model, firmware, region, count(*) AS devices
                FROM {members} GROUP BY 1, 2, 3, 4, 5
            ) fresh ON fresh.bucket = to_timestamp(f.b) AND fresh.schema = f.s
               AND fresh.model IS NOT DISTINCT FROM f.m AND fresh.firmware IS NOT DISTINCT FROM f.f
               AND fresh.region IS NOT DISTINCT FROM f.r
            ORDER BY f.n
            ON CONFLICT ON CONSTRAINT {r}_key DO UPDATE SET
                events = r.events + excluded.events,
                devices = r.devices + excluded.devices,
                energy_wh = {_add_nullable("r.energy_wh", "excluded.energy_wh")},
                duration_s = {_add_nullable("r.duration_s", "excluded.duration_s")}
        )"""


def _add_nullable(a: str, b: str) -> str:
    """a + b where NULL means "no such values yet", as sum() treats them."""
    return f"CASE WHEN {a} IS NULL THEN {b} WHEN {b} IS NULL THEN {a} ELSE {a} + {b} END"


async def usage_rollup(
    conn: asyncpg.Connection | PoolConnectionProxy,
    table: str,
    granularity: Granularity,
    start: datetime,
    end: datetime,
    *,
    category: str | None = None,
    schema: str | None = None,
) -> list[RollupRow]:
    """Rollup rows with `start <= bucket < end`, optionally for one category or schema.

    Ordered by bucket and group. The same answer on TimescaleDB and plain PostgreSQL.
    """
    if granularity not in _STEP:
        raise ValueError(f"granularity must be 'hourly' or 'daily', not {granularity!r}")
    rows = await conn.fetch(
        f"""
        SELECT {", ".join(GROUP)}, events, devices, energy_wh, duration_s
        FROM {table}_{granularity}
        WHERE bucket >= $1 AND bucket < $2
          AND ($3::text IS NULL OR category = $3) AND ($4::text IS NULL OR schema = $4)
        ORDER BY {_ORDER}
        """,
        start,
        end,
        category,
        schema,
    )
    return [RollupRow(**dict(row)) for row in rows]


# The same order on both paths and for the direct query, whatever the column collation.
_ORDER = ", ".join(f'{c} COLLATE "C" NULLS FIRST' if c != "bucket" else c for c in GROUP)


def direct_rollup_query(table: str, granularity: Granularity) -> str:
    """The rollup computed straight from the raw rows: what the rollups must equal.

    Takes $1 (start) and $2 (end); for tests and for checking a live system.
    """
    step = _STEP[granularity]
    return f"""
        SELECT * FROM (
            SELECT date_bin('{step}', event_time, {_ORIGIN}) AS bucket,
                   split_part(schema, '.', 1) AS category, schema, model, firmware, region,
                   count(*) AS events, count(DISTINCT device_id) AS devices,
                   sum((body ->> 'energy_wh')::numeric) AS energy_wh,
                   sum((body ->> 'duration_s')::numeric) AS duration_s
            FROM {table}
            WHERE event_time >= $1 AND event_time < $2
            GROUP BY 1, 2, 3, 4, 5, 6
        ) direct
        ORDER BY {_ORDER}
    """
