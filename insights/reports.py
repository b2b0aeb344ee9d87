"""The planners' reports, `REPORTS`: one `ReportSpec` each (`insights.specs`) and its SQL.

Every report reads what its `Filters` select (time range, models, categories,
regions, firmware) and finds *segments*, each with the distinct owners behind it
counted; segments below k owners also return, in hidden `_...` columns, the sets a
merge needs, and `insights.generalise` merges them along the report's hierarchy
(`insights.hierarchies`) before any is suppressed. Where each number comes from:

| report | segments | source |
|---|---|---|
| programs | model, firmware, schema, program/mode | device-daily rollup (`detail`) |
| heatmap | local day of week x hour | owners-per-hour rollup (events and owners) |
| regions | region | device-daily rollup |
| cycles | category, cycles in a week | device-daily rollup: one count per device and week |
| errors | model, firmware, error code | device-daily rollup (`detail`: codes raised) |
| adoption | week | device-daily rollup (`trigger`) |
| cohorts | purchase channel or membership tier, category | device-daily rollup |
| completeness | day, model | device-daily rollup: `min_seq`/`max_seq` per boot and day |

The device-daily rollup (`ingest.rollups`, `<table>_device_daily`: the `days` rows
here) keeps the device and the owner key per UTC day and group, so distinct owners,
devices, device-days and device-weeks over any range are exact; it is read through
`device_daily_source`, which takes the days still awaiting a refresh, and a day the
range only partly covers, from the raw rows: the same numbers before and after a
refresh, and as the raw rows would give. The heat map's owners per local hour cannot
come from it (a local hour is not within one UTC day's row): it reads the owners-per-hour
rollup (`<table>_hourly_owners`, through `hourly_owners_source`: events and owner keys
per UTC hour and group, the hours still noted from the raw rows), each UTC hour mapped
once to its local day and hour. Completeness
counts a boot's gap on the day of the message after it, found from each boot-day's
lowest and highest sequence number: exact where a boot's sequence numbers rise with
its event time, as a device sends them. Every query is plain PostgreSQL (`date_bin`
from fixed origins, UTC), the same on both storage layouts.

Weeks start on Monday 00:00 UTC; days are UTC days; the heat map is in local time
(`insights.timezone`, or the `tz` option).
"""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingest.owner_keys import OWNERS_AT_LEAST_SQL
from insights.filters import FilterError
from insights.generalise import Segment
from insights.query import Query
from insights.specs import Chart, Option, ReportSpec
from schemas.catalog import models

_MONDAY = "timestamptz '1970-01-05 00:00:00+00'"  # weeks start on Monday, UTC
_SCHEMAS = sorted({name for name, _v, _m in models()})
CYCLE_SCHEMAS = [s for s in _SCHEMAS if s.endswith((".cycle", ".clean_run"))]
"""Events that are one use of the appliance: a wash, a drying, a cleaning run."""
FEATURE_SCHEMAS = [s for s in _SCHEMAS if s.endswith((".cycle", ".clean_run", ".mode_change"))]
"""Events naming the program or mode a user chose."""
TRIGGERED_SCHEMAS = sorted(
    name
    for name, _v, body in models()
    if "trigger" in body.model_fields and not name.endswith(".firmware")
)
"""Uses started by someone (panel, app, voice, schedule); firmware updates are not."""
ERROR_SCHEMAS = [s for s in _SCHEMAS if s.endswith(".error")]
CYCLE_CATEGORIES = sorted({s.split(".", 1)[0] for s in CYCLE_SCHEMAS})
APP_TRIGGERS = ["app_remote", "schedule"]


# -- the reports -------------------------------------------------------------------------


_KEYS = "array_agg(DISTINCT owner_key) FILTER (WHERE owner_key IS NOT NULL) AS keys"
"""A segment's distinct owner keys: counted (`_OWNERS`), and returned where below k."""
_OWNERS = f"{OWNERS_AT_LEAST_SQL.format(keys='keys')} AS owners"
"""A segment's owners for k-anonymity: at least as many as the most keys of one version
(`ingest.owner_keys.owners_at_least`), so a range across a rotation never counts an
owner twice."""


def _small(expression: str, name: str) -> str:
    """Hidden column `name`: `expression` for a segment below k ($7) owners, else NULL:
    the sets merging needs, returned only where a merge may need them."""
    return f"CASE WHEN owners < $7 THEN {expression} END AS {name}"


async def _programs(q: Query) -> list[Segment]:
    return await q.segments(
        f"""used AS (
            -- detail: coalesce(program, mode) on these schemas (ingest.rollups.DETAIL)
            SELECT model, firmware, schema, detail AS feature, events, device_id, owner_key
            FROM days WHERE schema = ANY($9::text[]) AND detail IS NOT NULL
        ),
        found AS (
            SELECT model, firmware, schema, feature, sum(events) AS events,
                   array_agg(DISTINCT device_id) AS device_ids, {_KEYS}
            FROM used GROUP BY 1, 2, 3, 4
        ),
        counted AS (SELECT *, cardinality(device_ids) AS devices, {_OWNERS} FROM found)
        SELECT model, firmware, schema, feature, events, devices, owners,
               {_small("keys", "_owners")}, {_small("device_ids", "_devices")}
        FROM counted""",
        ("model", "firmware", "schema", "feature"),
        FEATURE_SCHEMAS,
    )


def _zone(q: Query) -> str:
    name = q.options["tz"]
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long
        raise FilterError("tz", f"{name!r} is not an IANA time zone (Asia/Seoul)") from None
    return name


async def _heatmap(q: Query) -> list[Segment]:
    tz = _zone(q)
    f = q.filters
    found = await q.segments(
        f"""local AS MATERIALIZED (
            -- Each UTC hour of the range once: its local day of week and hour (one
            -- time zone conversion an hour, not one a row). A UTC hour lies in one
            -- local hour: the zone is whole hours from UTC (checked below).
            SELECT h AS bucket, extract(isodow FROM h AT TIME ZONE $9)::int AS day_of_week,
                   extract(hour FROM h AT TIME ZONE $9)::int AS hour
            FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 hour',
                                 interval '1 hour') AS h
        ),
        cell_owners AS (
            -- Each owner once a cell (hashed): the cell's keys below are then distinct.
            SELECT l.day_of_week, l.hour, o.owner_key, sum(o.events) AS events
            FROM hours o JOIN local l USING (bucket) GROUP BY 1, 2, 3
        ),
        found AS (
            SELECT day_of_week, hour, sum(events) AS events,
                   array_agg(owner_key) FILTER (WHERE owner_key IS NOT NULL) AS keys
            FROM cell_owners GROUP BY 1, 2
        ),
        counted AS (SELECT *, {_OWNERS} FROM found)
        SELECT day_of_week, hour, events, owners, {_small("keys", "_owners")} FROM counted""",
        ("day_of_week", "hour"),
        tz,
        source="hours",
    )
    if found and await q.conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM generate_series($1::timestamptz,"
        " $2::timestamptz - interval '1 hour', interval '1 hour') AS h"
        " WHERE to_char(h AT TIME ZONE $3, 'MI:SS') <> '00:00')",
        f.start,
        f.end,
        tz,
    ):
        raise FilterError("tz", f"{tz!r} is not a whole number of hours from UTC")
    return found


async def _regions(q: Query) -> list[Segment]:
    return await q.segments(
        f"""found AS (
            SELECT region, sum(events) AS events,
                   coalesce(sum(events) FILTER (WHERE schema = ANY($9::text[])), 0) AS cycles,
                   array_agg(DISTINCT device_id) AS device_ids, {_KEYS}
            FROM days GROUP BY 1
        ),
        counted AS (SELECT *, cardinality(device_ids) AS devices, {_OWNERS} FROM found)
        SELECT region, events, cycles, devices,
               round(events::numeric / devices, 2) AS events_per_device, owners,
               {_small("keys", "_owners")}, {_small("device_ids", "_devices")}
        FROM counted""",
        ("region",),
        CYCLE_SCHEMAS,
    )


async def _cycles(q: Query) -> list[Segment]:
    return await q.segments(
        f"""device_weeks AS (
            SELECT category, device_id, date_bin('7 days', bucket, {_MONDAY}) AS week,
                   coalesce(sum(events) FILTER (WHERE schema = ANY($9::text[])), 0)::bigint
                       AS cycles,
                   array_agg(DISTINCT owner_key) FILTER (WHERE owner_key IS NOT NULL) AS keys
            FROM days WHERE category = ANY($10::text[])
            GROUP BY 1, 2, 3
        ),
        whole AS (
            -- Only weeks wholly inside the range: a cut week would count too few cycles.
            SELECT * FROM device_weeks WHERE week >= $1 AND week + interval '7 days' <= $2
        ),
        counted AS (SELECT category, cycles, count(*) AS device_weeks FROM whole GROUP BY 1, 2),
        keyed AS (
            SELECT category, cycles, array_agg(DISTINCT k) AS keys
            FROM whole, unnest(keys) AS k GROUP BY 1, 2
        ),
        joined AS (
            SELECT c.category, c.cycles, c.device_weeks, k.keys, {_OWNERS}
            FROM counted c LEFT JOIN keyed k USING (category, cycles)
        )
        SELECT category, cycles, device_weeks, owners, {_small("keys", "_owners")}
        FROM joined""",
        ("category", "cycles"),
        CYCLE_SCHEMAS,
        CYCLE_CATEGORIES,
    )


async def _errors(q: Query) -> list[Segment]:
    return await q.segments(
        f"""pair_days AS (SELECT DISTINCT model, firmware, device_id, bucket FROM days),
        exposure AS (
            -- Device-days per model and firmware, and (for merging) how many of them
            -- are in this pair alone: a device that changed firmware that day is in two.
            SELECT model, firmware, count(*) AS device_days,
                   count(*) FILTER (WHERE pairs = 1) AS only_days,
                   array_agg(device_id || ' ' || bucket) FILTER (WHERE pairs > 1)
                       AS shared_days
            FROM (
                SELECT *, count(*) OVER (PARTITION BY device_id, bucket) AS pairs
                FROM pair_days
            ) p
            GROUP BY 1, 2
        ),
        found AS (
            -- detail: the code of an error raised, NULL for one cleared (ingest.rollups)
            SELECT model, firmware, detail AS code, min(category) AS category,
                   sum(events) AS errors, array_agg(DISTINCT device_id) AS device_ids, {_KEYS}
            FROM days WHERE schema = ANY($9::text[]) AND detail IS NOT NULL
            GROUP BY 1, 2, 3
        ),
        counted AS (SELECT *, cardinality(device_ids) AS devices, {_OWNERS} FROM found)
        SELECT e.model, e.firmware, e.code, e.errors, e.devices, d.device_days,
               round(1000.0 * e.errors / d.device_days, 3) AS per_1000_device_days, e.owners,
               e.category AS _category, {_small("e.keys", "_owners")},
               {_small("e.device_ids", "_devices")}, {_small("d.only_days", "_only_days")},
               {_small("d.shared_days", "_shared_days")}
        FROM counted e JOIN exposure d
          ON d.model IS NOT DISTINCT FROM e.model AND d.firmware IS NOT DISTINCT FROM e.firmware""",
        ("model", "firmware", "code"),
        ERROR_SCHEMAS,
    )


async def _adoption(q: Query) -> list[Segment]:
    return await q.segments(
        f"""found AS (
            SELECT (date_bin('7 days', bucket, {_MONDAY}) AT TIME ZONE 'UTC')::date AS week,
                   array_agg(DISTINCT device_id) AS active,
                   array_agg(DISTINCT device_id) FILTER (WHERE trigger = 'app_remote')
                       AS remote,
                   array_agg(DISTINCT device_id) FILTER (WHERE trigger = 'schedule')
                       AS scheduled,
                   {_KEYS}
            FROM days WHERE schema = ANY($9::text[])
            GROUP BY 1
        ),
        counted AS (
            SELECT *, cardinality(active) AS active_devices,
                   coalesce(cardinality(remote), 0) AS remote_start_devices,
                   coalesce(cardinality(scheduled), 0) AS schedule_devices, {_OWNERS}
            FROM found
        )
        SELECT week, active_devices, remote_start_devices, schedule_devices,
               round(remote_start_devices::numeric / active_devices, 4) AS remote_start_share,
               round(schedule_devices::numeric / active_devices, 4) AS schedule_share, owners,
               {_small("keys", "_owners")}, {_small("active", "_devices")},
               {_small("remote", "_remote")}, {_small("scheduled", "_schedule")}
        FROM counted""",
        ("week",),
        TRIGGERED_SCHEMAS,
    )


async def _cohorts(q: Query) -> list[Segment]:
    column = {"channel": "purchase_channel", "tier": "membership_tier"}[q.options["by"]]
    return await q.segments(
        f"""found AS (
            SELECT {column} AS cohort, category, array_agg(DISTINCT device_id) AS device_ids,
                   array_agg(DISTINCT device_id || ' ' || bucket) AS device_day_ids,
                   coalesce(sum(events) FILTER (WHERE schema = ANY($9::text[])), 0) AS cycles,
                   coalesce(sum(events) FILTER (WHERE schema = ANY($10::text[])), 0) AS uses,
                   coalesce(sum(events) FILTER (WHERE schema = ANY($10::text[])
                                                AND trigger = ANY($11::text[])), 0) AS app_uses,
                   {_KEYS}
            FROM days GROUP BY 1, 2
        ),
        counted AS (
            SELECT *, cardinality(device_ids) AS devices,
                   cardinality(device_day_ids) AS device_days, {_OWNERS}
            FROM found
        )
        SELECT cohort, category, devices, device_days, cycles,
               round(7.0 * cycles / device_days, 3) AS cycles_per_device_week,
               round(app_uses::numeric / nullif(uses, 0), 4) AS app_share, owners,
               {_small("keys", "_owners")}, {_small("device_ids", "_devices")},
               {_small("device_day_ids", "_device_days")}, {_small("uses", "_uses")},
               {_small("app_uses", "_app_uses")}
        FROM counted""",
        ("cohort", "category"),
        CYCLE_SCHEMAS,
        TRIGGERED_SCHEMAS,
        APP_TRIGGERS,
    )


async def _completeness(q: Query) -> list[Segment]:
    return await q.segments(
        f"""boot_days AS (
            SELECT bucket, model, device_id, boot_id, sum(events) AS received,
                   min(min_seq) AS lo, max(max_seq) AS hi
            FROM days GROUP BY 1, 2, 3, 4
        ),
        sequenced AS (
            -- Missing on a boot-day: its span of sequence numbers, from just after the
            -- boot's highest on its previous day in the range (or from its lowest: the
            -- boot's first message in the range opens no gap), less those received.
            SELECT (bucket AT TIME ZONE 'UTC')::date AS day, model, device_id, received,
                   greatest(hi - coalesce(lag(hi) OVER (PARTITION BY device_id, boot_id
                                                        ORDER BY bucket, model), lo - 1)
                            - received, 0) AS missing
            FROM boot_days
        ),
        device_days AS (
            SELECT day, model, device_id, sum(received) AS received, sum(missing) AS missing
            FROM sequenced GROUP BY 1, 2, 3
        ),
        counted AS (
            SELECT day, model, count(*) AS device_days, sum(received) AS received,
                   sum(missing) AS missing,
                   count(*) FILTER (WHERE missing = 0) AS complete_device_days
            FROM device_days GROUP BY 1, 2
        ),
        found AS (
            SELECT (bucket AT TIME ZONE 'UTC')::date AS day, model,
                   min(category) AS category, {_KEYS}
            FROM days GROUP BY 1, 2
        ),
        keyed AS (SELECT *, {_OWNERS} FROM found)
        SELECT c.day, c.model, c.device_days, c.received, c.missing, c.complete_device_days,
               round(c.received / (c.received + c.missing), 4) AS completeness,
               coalesce(k.owners, 0) AS owners, k.category AS _category,
               CASE WHEN coalesce(k.owners, 0) < $7 THEN k.keys END AS _owners
        FROM counted c LEFT JOIN keyed k
          ON k.day = c.day AND k.model IS NOT DISTINCT FROM c.model""",
        ("day", "model"),
    )


REPORTS: dict[str, ReportSpec] = {
    spec.name: spec
    for spec in (
        ReportSpec(
            "programs",
            "Programs and modes by model and firmware",
            "How often each program (washer, dryer) or mode (robot vacuum, air conditioner, "
            "purifier, refrigerator) is chosen, per model and firmware.",
            ("model", "firmware", "schema", "feature"),
            {"events": "int", "devices": "int"},
            "device-daily rollup",
            False,
            Chart("bar", "events", label=("feature", "firmware"), series="model"),
            _programs,
        ),
        ReportSpec(
            "heatmap",
            "Usage by hour of day and day of week",
            "Events per local hour of the week (1 = Monday), summed over the range.",
            ("day_of_week", "hour"),
            {"events": "int"},
            "owners-per-hour rollup (events; owners, for suppression)",
            False,
            Chart("heatmap", "events", x="hour", y="day_of_week"),
            _heatmap,
            {"tz": Option("IANA time zone of the hours (insights.timezone)")},
        ),
        ReportSpec(
            "regions",
            "Regional hot spots",
            "Events, cycles and devices per owner region; events per device shows where "
            "appliances work hardest.",
            ("region",),
            {"events": "int", "cycles": "int", "devices": "int", "events_per_device": "float"},
            "device-daily rollup",
            True,
            Chart("bar", "events_per_device", label=("region",)),
            _regions,
        ),
        ReportSpec(
            "cycles",
            "Cycles per device per week",
            "The distribution of cycles (washes, dryings, cleaning runs) per device in each "
            "whole Monday-to-Sunday UTC week of the range, for devices that sent anything "
            "that week.",
            ("category", "cycles"),
            {"device_weeks": "int"},
            "device-daily rollup",
            False,
            Chart("bar", "device_weeks", label=("cycles",), series="category"),
            _cycles,
        ),
        ReportSpec(
            "errors",
            "Error rates per 1,000 device-days",
            "Errors raised per code, per 1,000 device-days (a device sending anything on a "
            "UTC day) of the same model and firmware.",
            ("model", "firmware", "code"),
            {
                "errors": "int",
                "devices": "int",
                "device_days": "int",
                "per_1000_device_days": "float",
            },
            "device-daily rollup",
            False,
            Chart("bar", "per_1000_device_days", label=("model", "firmware", "code")),
            _errors,
        ),
        ReportSpec(
            "adoption",
            "App feature adoption",
            "Per week, of the devices used at all, the share started from the app "
            "(remote start) and by a schedule at least once.",
            ("week",),
            {
                "active_devices": "int",
                "remote_start_devices": "int",
                "schedule_devices": "int",
                "remote_start_share": "float",
                "schedule_share": "float",
            },
            "device-daily rollup",
            True,
            Chart("line", "remote_start_share", x="week"),
            _adoption,
        ),
        ReportSpec(
            "cohorts",
            "Cohorts by purchase channel or membership tier",
            "Per cohort and category: devices, device-days, cycles per device-week and the "
            "share of uses started from the app or a schedule.",
            ("cohort", "category"),
            {
                "devices": "int",
                "device_days": "int",
                "cycles": "int",
                "cycles_per_device_week": "float",
                "app_share": "float",
            },
            "device-daily rollup",
            True,
            Chart("bar", "app_share", label=("cohort",), series="category"),
            _cohorts,
            {"by": Option("channel or tier", ("channel", "tier"), "channel")},
        ),
        ReportSpec(
            "completeness",
            "Data completeness per device-day",
            "From gaps in each boot's sequence numbers: messages received, missing, and the "
            "received share, per UTC day and model (a gap counts on the day of the message "
            "after it; a boot's first message in the range opens no gap).",
            ("day", "model"),
            {
                "device_days": "int",
                "received": "int",
                "missing": "int",
                "complete_device_days": "int",
                "completeness": "float",
            },
            "device-daily rollup",
            False,
            Chart("line", "completeness", x="day", series="model"),
            _completeness,
        ),
    )
}
