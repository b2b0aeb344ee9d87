"""What every report's SQL runs through: `Query`, one run's connection, table,
filters, privacy rules and options.

`Query.segments` puts the filtered rows before a report's SQL, as the CTE `days` (the
device-daily rollup, read through `ingest.rollups.device_daily_source`) or `base` (the
raw usage rows), runs it, and splits each record into a `Segment`
(`insights.generalise`): its key, its values, its distinct owners, and the hidden
`_...` columns a merge needs. Database values come back as JSON- and CSV-friendly
scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from ingest.migrations import Connection
from ingest.rollups import device_daily_source, hourly_owners_source
from insights.filters import Filters
from insights.generalise import Scalar, Segment
from insights.privacy import Privacy


@dataclass(frozen=True, slots=True)
class Query:
    """What a report's `compute` gets: the connection, the usage table, the filters,
    the privacy rules and the report's options (validated, defaults filled in)."""

    conn: Connection
    table: str
    filters: Filters
    privacy: Privacy
    options: Mapping[str, str]
    marketing: bool

    def base(self) -> str:
        """The `base AS (...)` CTE: the filtered usage rows ($1..$6, `Filters.parameters`).

        Only for product reports: the marketing population is defined on device-days
        (`days`, `Privacy.marketing_day_clause`), so a marketing-usable report reading
        raw rows is refused rather than given rows of every owner."""
        if self.marketing:
            raise ValueError(f"{self.table}: a marketing-usable report must read device-days")
        return f"""base AS (
            SELECT u.device_id, u.boot_id, u.seq, u.event_time, u.schema, u.body, u.model,
                   u.firmware, u.region, u.purchase_channel, u.membership_tier, u.owner_key,
                   split_part(u.schema, '.', 1) AS category
            FROM {self.table} u
            WHERE u.event_time >= $1 AND u.event_time < $2
              AND ($3::text[] IS NULL OR u.model = ANY($3::text[]))
              AND ($4::text[] IS NULL OR split_part(u.schema, '.', 1) = ANY($4::text[]))
              AND ($5::text[] IS NULL OR u.region = ANY($5::text[]))
              AND ($6::text[] IS NULL OR u.firmware = ANY($6::text[]))
        )"""

    def days(self, source: str) -> str:
        """The `days AS (...)` CTE: the device-daily rollup rows of the filters ($1..$6,
        the time range inside `source`), the marketing population's only where the
        report is marketing-usable (`Privacy.marketing_day_clause`)."""
        population = f"AND {self.privacy.marketing_day_clause('d')}" if self.marketing else ""
        return f"""days AS (
            SELECT d.* FROM {source} d
            WHERE ($3::text[] IS NULL OR d.model = ANY($3::text[]))
              AND ($4::text[] IS NULL OR d.category = ANY($4::text[]))
              AND ($5::text[] IS NULL OR d.region = ANY($5::text[]))
              AND ($6::text[] IS NULL OR d.firmware = ANY($6::text[]))
              {population}
        )"""

    def hours(self, source: str) -> str:
        """The `hours AS (...)` CTE: the owners-per-hour rollup rows of the filters
        ($1..$6, the time range inside `source`). Product reports only, as `base`."""
        if self.marketing:
            raise ValueError(f"{self.table}: a marketing-usable report must read device-days")
        return f"""hours AS (
            SELECT h.* FROM {source} h
            WHERE ($3::text[] IS NULL OR h.model = ANY($3::text[]))
              AND ($4::text[] IS NULL OR h.category = ANY($4::text[]))
              AND ($5::text[] IS NULL OR h.region = ANY($5::text[]))
              AND ($6::text[] IS NULL OR h.firmware = ANY($6::text[]))
        )"""

    async def segments(
        self,
        sql: str,
        dimensions: tuple[str, ...],
        *extra: Any,
        source: Literal["days", "hours", "raw"] = "days",
    ) -> list[Segment]:
        """Run `sql` after `WITH days` ($7 k, $8 the days read live, `extra` from $9),
        for `source="hours"` after `WITH hours` (the owners-per-hour rollup: $7 k, $8
        the hours read live, `extra` from $9) or, for `source="raw"`, after `WITH base`
        ($7 k, `extra` from $8), and split each record into segment key, values, the
        `owners` column and the hidden columns (`_...`: `Segment.parts`, what merging a
        segment below k needs)."""
        k = self.privacy.k
        f = self.filters
        if source == "raw":
            cte, parameters = self.base(), [*f.parameters(), k, *extra]
        elif source == "hours":
            hourly = await hourly_owners_source(
                self.conn, self.table, f.start, f.end, hours_parameter=8
            )
            cte = self.hours(hourly.sql)
            parameters = [*f.parameters(), k, hourly.live_hours, *extra]
        else:
            daily = await device_daily_source(
                self.conn, self.table, f.start, f.end, days_parameter=8
            )
            cte = self.days(daily.sql)
            parameters = [*f.parameters(), k, daily.live_days, *extra]
        records = await self.conn.fetch(f"WITH {cte}, {sql}", *parameters)
        out = []
        for r in records:
            parts = {
                c: v if isinstance(v, list) else _plain(v) for c, v in r.items() if c[0] == "_"
            }
            row = {c: _plain(v) for c, v in r.items() if c[0] != "_"}
            owners = int(row.pop("owners") or 0)
            key = {d: row.pop(d) for d in dimensions}
            out.append(Segment(key, row, owners, parts))
        return out


def _plain(value: Any) -> Scalar:
    """A database value as a JSON/CSV-friendly scalar."""
    if isinstance(value, Decimal):
        # sum() of counts comes back as numeric with no decimals: an integer.
        return int(value) if value.as_tuple().exponent == 0 else float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)
