"""What the filters can be set to: the values the stored usage holds.

The web page offers these in its filter inputs, so a planner picks a model, category,
region or firmware version that has data instead of guessing how it is spelled. They
come from the device-daily rollup (`ingest.rollups.device_daily_source`: days still
awaiting a refresh, and days the range only partly covers, from the raw rows), for the
selected time range only; other filters do not narrow them, so a planner can always
switch to a value the current filters exclude.

Nothing here is about a person: the values are product models, categories, firmware
versions and ISO 3166-2 regions, with no counts beside them. `data_start` and
`data_end` bound the UTC days that hold any usage at all, so the page can say where
the data is when a range holds none.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
from pydantic import BaseModel, Field

from ingest.errors import StoreUnavailable
from ingest.migrations import Connection
from ingest.postgres import DB_ERRORS
from ingest.rollups import device_daily_source
from insights.filters import Filters

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FilterChoices(BaseModel):
    """The values each filter can take in a time range (`GET /api/filters`)."""

    start: str = Field(description="start of the range the values are from (UTC, ISO 8601)")
    end: str = Field(description="end of the range, excluded (UTC, ISO 8601)")
    model: list[str] = Field(description="product models with usage in the range")
    category: list[str] = Field(description="appliance categories with usage in the range")
    region: list[str] = Field(
        description="owners' regions (ISO 3166-2) with usage in the range; usage of owners "
        "without analytics consent has none and is not listed"
    )
    firmware: list[str] = Field(description="firmware versions with usage in the range")
    model_category: dict[str, str] = Field(description="each model's category")
    firmware_by_model: dict[str, list[str]] = Field(
        description="the firmware versions with usage in the range, per model"
    )
    data_start: str | None = Field(
        description="first UTC day (00:00) with any stored usage, in any range; null: none"
    )
    data_end: str | None = Field(
        description="the day after the last UTC day with any stored usage; null: none"
    )


async def filter_choices(conn: Connection, table: str, filters: Filters) -> FilterChoices:
    """The values each filter can take in `filters`' time range (its other filters
    are ignored), and the UTC days holding any usage. Runs read-only; raises
    `StoreUnavailable` when the database fails or lacks the tables."""
    try:
        async with conn.transaction(readonly=True):
            daily = await device_daily_source(
                conn, table, filters.start, filters.end, days_parameter=3
            )
            rows = await conn.fetch(
                f"SELECT DISTINCT category, model, firmware, region FROM {daily.sql} d",
                filters.start,
                filters.end,
                daily.live_days,
            )
            first, last = await _extent(conn, table)
    except asyncpg.UndefinedTableError as exc:
        raise StoreUnavailable(f"{exc}: run `usagepipe db migrate` first") from exc
    except DB_ERRORS as exc:
        raise StoreUnavailable(f"filter values failed: {exc!r}") from exc
    model_category: dict[str, str] = {}
    firmware_by_model: dict[str, set[str]] = {}
    for r in rows:
        if r["model"] is not None:
            model_category[r["model"]] = r["category"]
            if r["firmware"] is not None:
                firmware_by_model.setdefault(r["model"], set()).add(r["firmware"])

    def distinct(column: str) -> list[str]:
        return sorted({r[column] for r in rows if r[column] is not None})

    described = filters.describe()
    return FilterChoices(
        start=described["start"],
        end=described["end"],
        model=distinct("model"),
        category=distinct("category"),
        region=distinct("region"),
        firmware=distinct("firmware"),
        model_category=dict(sorted(model_category.items())),
        firmware_by_model={m: sorted(v) for m, v in sorted(firmware_by_model.items())},
        data_start=_iso(first),
        data_end=_iso(last),
    )


async def _extent(conn: Connection, table: str) -> tuple[datetime | None, datetime | None]:
    """First UTC day with usage, and the day after the last one: the device-daily
    rollup's bounds (its bucket index answers) widened by the days still awaiting a
    refresh, which only the raw rows hold yet (the plain layout's notes; TimescaleDB's
    real-time aggregate has none)."""
    bounds = await conn.fetchrow(f"SELECT min(bucket), max(bucket) FROM {table}_device_daily")
    assert bounds is not None  # an aggregate without GROUP BY answers one row
    lo, hi = bounds
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    pending = await device_daily_source(
        conn, table, _EPOCH, today + timedelta(days=2), days_parameter=3
    )
    days = [d for d in (lo, hi) if d is not None]
    if pending.live_days:
        raw = await conn.fetchrow(
            f"SELECT min(event_time), max(event_time) FROM {table}"
            " WHERE event_time >= $1 AND event_time < $2",
            min(pending.live_days),
            max(pending.live_days) + timedelta(days=1),
        )
        assert raw is not None
        days += [_day(t) for t in raw if t is not None]
    if not days:
        return None, None
    return min(days), max(days) + timedelta(days=1)


def _day(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
