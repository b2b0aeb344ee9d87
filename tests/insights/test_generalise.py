"""Generalisation: small segments merged along each report's hierarchy, checked against
direct SQL over the raw rows.

For every report, several k and filter sets: (a) no shown row has fewer than k distinct
owners, counted by direct SQL over exactly that row's member set; (b) every shown row's
numbers equal a direct SQL computation of its group; (c) every fine segment is in
exactly one row (shown alone, inside one generalised row, or in the suppressed
remainder), and a suppressed group has fewer than k owners. The direct SQL is written
from the report definitions, not from ingest/insights (as in test_reports.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from ingest.settings import K_ANONYMITY_MIN, InsightsSettings, Settings
from insights.filters import Filters
from insights.generalise import (
    Generalisation,
    Label,
    Level,
    Segment,
    generalise,
    listing,
    ratio,
    total,
    union,
)
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.specs import Report
from tests.insights.conftest import Seeded, seeded_store
from tests.insights.seed import END, START, Population
from tests.insights.test_reports import (
    CYCLES,
    DIRECT,
    TRIGGERED,
    filters,
    marketable_keys,
    plain,
    run,
    where,
)

FEATURE = "coalesce(body ->> 'program', body ->> 'mode')"
LOCAL = "event_time AT TIME ZONE 'Asia/Seoul'"
DAY = "(event_time AT TIME ZONE 'UTC')::date"

# One group's numbers over the raw rows `{w}` whose segment key (a JSON array of the
# dimensions, `{key}` in report order) is among the members `{m}` (a jsonb[]).
GROUP: dict[str, str] = {
    "programs": f"""
        SELECT count(*) AS events, count(DISTINCT device_id) AS devices,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}}
          AND (schema LIKE '%.cycle' OR schema LIKE '%.clean_run' OR schema LIKE '%.mode_change')
          AND jsonb_build_array(model, firmware, schema, {FEATURE}) = ANY({{m}})""",
    "heatmap": f"""
        SELECT count(*) AS events, count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}}
          AND jsonb_build_array(extract(isodow FROM {LOCAL})::int,
                                extract(hour FROM {LOCAL})::int) = ANY({{m}})""",
    "regions": f"""
        SELECT count(*) AS events, count(*) FILTER (WHERE schema IN {CYCLES}) AS cycles,
               count(DISTINCT device_id) AS devices,
               round(count(*)::numeric / count(DISTINCT device_id), 2) AS events_per_device,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}} AND jsonb_build_array(region) = ANY({{m}})""",
    "cycles": f"""
        WITH weeks AS (
            SELECT split_part(schema, '.', 1) AS category, device_id,
                   date_trunc('week', event_time AT TIME ZONE 'UTC') AS week,
                   count(*) FILTER (WHERE schema IN {CYCLES}) AS cycles
            FROM {{t}} WHERE {{w}}
              AND split_part(schema, '.', 1) IN ('washer', 'dryer', 'robot_vacuum')
            GROUP BY 1, 2, 3
        ), chosen AS (
            SELECT * FROM weeks
            WHERE week >= $1 AT TIME ZONE 'UTC'
              AND week + interval '7 days' <= $2 AT TIME ZONE 'UTC'
              AND jsonb_build_array(category, cycles) = ANY({{m}})
        )
        SELECT (SELECT count(*) FROM chosen) AS device_weeks,
               count(DISTINCT u.owner_key) AS owners
        FROM chosen w JOIN {{t}} u ON u.device_id = w.device_id
             AND date_trunc('week', u.event_time AT TIME ZONE 'UTC') = w.week
             AND split_part(u.schema, '.', 1) = w.category
        WHERE {{uw}}""",
    "errors": """
        WITH exposure AS (
            SELECT count(DISTINCT (device_id, (event_time AT TIME ZONE 'UTC')::date)) AS days
            FROM {t} WHERE {w} AND jsonb_build_array(model, firmware)
                IN (SELECT jsonb_build_array(m -> 0, m -> 1) FROM unnest({m}) AS m)
        )
        SELECT count(*) AS errors, count(DISTINCT e.device_id) AS devices,
               max(x.days) AS device_days,
               round(count(*) * 1000.0 / max(x.days), 3) AS per_1000_device_days,
               count(DISTINCT e.owner_key) AS owners
        FROM {t} e, exposure x
        WHERE {ew} AND e.schema LIKE '%.error' AND e.body ->> 'state' = 'raised'
          AND jsonb_build_array(e.model, e.firmware, e.body ->> 'code') = ANY({m})""",
    "adoption": f"""
        SELECT count(DISTINCT device_id) AS active_devices,
               count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'app_remote')
                   AS remote_start_devices,
               count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'schedule')
                   AS schedule_devices,
               round(count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'app_remote')
                     ::numeric / count(DISTINCT device_id), 4) AS remote_start_share,
               round(count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'schedule')
                     ::numeric / count(DISTINCT device_id), 4) AS schedule_share,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}} AND {TRIGGERED}
          AND jsonb_build_array(date_trunc('week', event_time AT TIME ZONE 'UTC')::date)
              = ANY({{m}})""",
    "cohorts": f"""
        SELECT count(DISTINCT device_id) AS devices,
               count(DISTINCT device_id || {DAY}::text) AS device_days,
               count(*) FILTER (WHERE schema IN {CYCLES}) AS cycles,
               round(7.0 * count(*) FILTER (WHERE schema IN {CYCLES})
                     / count(DISTINCT device_id || {DAY}::text), 3) AS cycles_per_device_week,
               round((count(*) FILTER (WHERE {TRIGGERED}
                                        AND body ->> 'trigger' IN ('app_remote', 'schedule')))
                     ::numeric / nullif(count(*) FILTER (WHERE {TRIGGERED}), 0), 4) AS app_share,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}}
          AND jsonb_build_array({{cohort}}, split_part(schema, '.', 1)) = ANY({{m}})""",
    "completeness": """
        WITH s AS (
            SELECT device_id, model, owner_key, (event_time AT TIME ZONE 'UTC')::date AS day,
                   coalesce(seq - lag(seq) OVER (PARTITION BY device_id, boot_id ORDER BY seq)
                            - 1, 0) AS gap
            FROM {t} WHERE {w}
        ), chosen AS (SELECT * FROM s WHERE jsonb_build_array(day, model) = ANY({m})),
        dd AS (
            SELECT day, model, device_id, count(*) AS received, sum(gap) AS missing
            FROM chosen GROUP BY 1, 2, 3
        )
        SELECT count(*) AS device_days, sum(received) AS received, sum(missing) AS missing,
               count(*) FILTER (WHERE missing = 0) AS complete_device_days,
               round(sum(received) / (sum(received) + sum(missing)), 4) AS completeness,
               (SELECT count(DISTINCT owner_key) FROM chosen) AS owners
        FROM dd""",
}

VARIANTS: list[tuple[str, dict[str, str]]] = [
    (name, {}) for name in REPORTS if name != "cohorts"
] + [
    ("cohorts", {"by": "channel"}),
    ("cohorts", {"by": "tier"}),
]


class Direct:
    """Direct SQL over the seeded raw rows, on one connection."""

    def __init__(self, s: Seeded, conn: asyncpg.Connection, f: Filters) -> None:
        self.s, self.conn, self.f = s, conn, f

    def _sql(self, template: str, name: str, by: str, members: str) -> tuple[str, list[Any]]:
        spec = REPORTS[name]
        args: list[Any] = [self.f.start, self.f.end]
        if spec.marketing:
            args.append(marketable_keys(self.s.population))
        sql = template.format(
            t=self.s.settings.postgres.table,
            w=where(self.f, marketing=spec.marketing),
            uw=where(self.f, "u", spec.marketing),
            ew=where(self.f, "e", spec.marketing),
            cohort={"channel": "purchase_channel", "tier": "membership_tier"}[by],
            m=members.format(n=len(args) + 1),
        )
        return sql, args

    async def fine(self, name: str, by: str) -> dict[tuple[Any, ...], int]:
        """Every fine segment of the report, with its distinct owners."""
        sql, args = self._sql(DIRECT[name], name, by, "")
        return {
            tuple(plain(r[d]) for d in REPORTS[name].dimensions): int(r["owners"])
            for r in await self.conn.fetch(sql, *args)
        }

    async def group(
        self, name: str, by: str, members: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], int]:
        """The numbers and distinct owners of the group of fine segments `members`."""
        sql, args = self._sql(GROUP[name], name, by, "${n}::jsonb[]")
        keys = [json.dumps([m[d] for d in REPORTS[name].dimensions]) for m in members]
        record = await self.conn.fetchrow(sql, *args, keys)
        assert record is not None
        values = {k: plain(v) for k, v in record.items()}
        owners = int(values.pop("owners"))
        return values, owners


def members_of(report: Report, index: int) -> list[dict[str, Any]]:
    row = report.rows[index]
    return [dict(m) for m in row.members] or [dict(row.segment)]


UPGRADED = START + timedelta(days=8, hours=12)
"""When two WM-A devices on 1.0 get 1.1 in `patchy` (mid-day: that device-day is in both)."""


def patchy(pop: Population) -> Population:
    """The seed with each device silent one week in three (which week depends on the
    device): weeks, days and hours with different owners, so that every report has
    small segments whose owners together reach k. Two WM-A devices move from firmware
    1.0 to 1.1 at noon one day, so a merged error row counts that device-day once."""
    index = {d.device_id: i for i, d in enumerate(pop.devices)}
    upgraded = [d.device_id for d in pop.devices if (d.model, d.firmware) == ("WM-A", "1.0")][:2]
    rows = []
    for r in pop.rows:
        if (index[r.device_id] + (r.event_time - START).days // 7) % 3 == 0:
            continue
        upgrade = r.device_id in upgraded and r.event_time >= UPGRADED
        rows.append(replace(r, firmware="1.1") if upgrade else r)
    return Population(pop.owners, pop.devices, rows)


@pytest.fixture(params=["seed", "patchy"])
async def dataset(
    request: pytest.FixtureRequest, settings: Settings, population: Population
) -> AsyncIterator[tuple[str, Seeded]]:
    pop = population if request.param == "seed" else patchy(population)
    async with seeded_store(settings, pop) as s:
        yield request.param, s


@pytest.mark.parametrize("filter_set", ["all", "category+region", "hours"])
async def test_generalised_rows_equal_direct_sql_and_never_show_a_group_below_k(
    dataset: tuple[str, Seeded], filter_set: str
) -> None:
    data, seeded = dataset
    f = filters(filter_set)
    conn = await asyncpg.connect(seeded.settings.postgres.dsn.get_secret_value())
    direct = Direct(seeded, conn, f)
    generalised: Counter[str] = Counter()
    try:
        for (name, options), k in [(v, k) for v in VARIANTS for k in (3, 5, 10, 15, 20)]:
            by = options.get("by", "channel")
            report = await run(seeded, name, f, k, **options)
            fine = await direct.fine(name, by)
            # (c) every fine segment in exactly one row
            placed = Counter(
                tuple(m.values()) for r in report.rows for m in (r.members or (r.segment,))
            )
            assert placed == Counter(fine.keys()), (name, options, k)
            for i, row in enumerate(report.rows):
                members = members_of(report, i)
                if row.suppressed:
                    assert row.values == {} and row.generalised is None
                    if row.members:  # the merged remainder: below k even together
                        _, owners = await direct.group(name, by, members)
                        assert owners < k, (name, options, k, row)
                    else:
                        assert fine[tuple(row.segment.values())] < k
                    continue
                if not row.members:
                    # a fine segment shown as it is (its numbers: test_reports.py)
                    assert row.generalised is None and fine[tuple(row.segment.values())] >= k
                    continue
                values, owners = await direct.group(name, by, members)
                assert owners >= k, (name, options, k, row)  # (a)
                assert row.values == values, (name, options, k, row)  # (b)
                assert len(row.members) >= 2 and all(
                    fine[tuple(m.values())] < k for m in row.members
                )
                assert row.generalised and row.generalised.endswith(f"fewer than {k} owners")
                generalised[name] += 1
                pairs = {(m.get("model"), m.get("firmware")) for m in row.members}
                if name == "errors" and {("WM-A", "1.0"), ("WM-A", "1.1")} <= pairs:
                    generalised["errors across the upgrade"] += 1
            assert report.describe()["generalised_segments"] == sum(
                len(r.members) for r in report.rows if r.generalised
            )
    finally:
        await conn.close()
    print(data, filter_set, dict(generalised))
    if (data, filter_set) == ("patchy", "all"):  # every report's generalisation exercised
        assert set(generalised) == {*REPORTS, "errors across the upgrade"}, generalised


async def test_the_seed_generalises_along_every_level_of_programs_and_errors(
    seeded: Seeded,
) -> None:
    """The labels and sentences a planner reads on the seed: errors and regions at
    k = 10, the heat map at k = 15 (where it merges hours within a day and across days)."""
    f = Filters.parse(start=START, end=END)
    errors = await run(seeded, "errors", f, 10)
    labelled = [(tuple(r.segment.values()), r.generalised) for r in errors.rows if r.members]
    # The dryers of unknown firmware (NULL, labelled "unknown") merge with those on 1.0.
    dryers = "2 firmware versions merged (unknown, 1.0): each had fewer than 10 owners"
    assert labelled == [
        (("DR-B", "all versions", "E01"), dryers),
        (("DR-B", "all versions", "E07"), dryers),
        (("DR-B", "all versions", "F12"), dryers),
        (("WM-A", "all versions", "E07"), "2 firmware versions merged (1.0, 2.1): each had "
         "fewer than 10 owners"),
        (("other models", "other versions", "other codes"), "8 segments merged (RV-C 1.0 E01, "
         "RV-C 1.0 E07, RV-C 1.0 F12, WM-A 1.0 E01 and 4 more): each had fewer than 10 owners"),
    ]  # fmt: skip
    # One firmware: the dryers' codes merge instead.
    errors = await run(seeded, "errors", Filters.parse(start=START, end=END, firmware=["1.0"]), 10)
    labelled = [(tuple(r.segment.values()), r.generalised) for r in errors.rows if r.members]
    assert labelled == [
        (("DR-B", "1.0", "all dryer codes"), "3 error codes merged (E01, E07, F12): each had "
         "fewer than 10 owners"),
        (("other models", "1.0", "other codes"), "6 segments merged (RV-C E01, RV-C E07, "
         "RV-C F12, WM-A E01 and 2 more): each had fewer than 10 owners"),
    ]  # fmt: skip
    heat = await run(seeded, "heatmap", f, 15)
    hours = {r.generalised: r.segment for r in heat.rows if r.generalised}
    assert hours["2 hours merged (6-7): each had fewer than 15 owners"] == {
        "day_of_week": 2,
        "hour": "6-7 (morning)",
    }
    assert hours[
        "3 hours of the week merged (Mon 0, Wed 5, Thu 5): each had fewer than 15 owners"
    ] == {
        "day_of_week": "Mon, Wed-Thu (weekdays)",
        "hour": "0, 5 (night)",
    }
    regions = await run(seeded, "regions", f, 10)
    assert [r.segment for r in regions.rows] == [{"region": "all regions"}]
    assert regions.rows[0].generalised == (
        "3 regions merged (KR-11, KR-26, KR-41): each had fewer than 10 owners"
    )


async def test_ratios_round_as_postgresql_rounds_numeric(settings: Any) -> None:
    """`ratio` against PostgreSQL's round(numeric, n), halves included."""
    cases = [(n, d, p, s) for n in range(0, 60) for d in (1, 2, 3, 7, 8, 16, 40, 400, 6000)
             for p, s in ((2, 1), (3, 1000), (3, 7), (4, 1))]  # fmt: skip
    cases += [(1, 8, 2, 1), (5, 1000, 2, 1), (12345, 2000, 3, 1), (1, 2, 0, 1), (-1, 8, 2, 1)]
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        got = await conn.fetch(
            "SELECT round(s * n::numeric / d, p) AS r FROM unnest($1::int[], $2::int[],"
            " $3::int[], $4::int[]) AS c(n, d, p, s)",
            *zip(*cases, strict=True),
        )
    finally:
        await conn.close()
    assert [ratio(n, d, p, s) for n, d, p, s in cases] == [float(r["r"]) for r in got]
    assert ratio(1, 0, 4) is None


def _seg(model: str, firmware: str, owners: set[str], events: int) -> Segment:
    parts = {"_owners": sorted(owners)} if len(owners) < 3 else {}
    return Segment({"model": model, "firmware": firmware}, {"events": events}, len(owners), parts)


TOY = Generalisation(
    (
        Level(
            "firmware versions", lambda s: ((s.key["model"],), {"firmware": Label("all versions")})
        ),
    ),
    lambda members: {"events": total(members, "events")},
    {"model": "models", "firmware": "versions"},
)


def _rows(found: list[Segment], k: int = 3) -> list[tuple[dict[str, Any], Any, Any, int]]:
    rows = generalise(found, TOY, k, Privacy(k, "x").reason, Privacy(k, "x").remainder_reason)
    return [(r.segment, r.values, r.suppressed or r.generalised, len(r.members)) for r in rows]


def test_only_small_siblings_merge_and_labels_say_what() -> None:
    """A: 1.0 shown, 1.1 + 1.2 merged (not all versions: 1.0 is shown beside them). B:
    every version small, so "all versions". C alone cannot reach k: the remainder."""
    found = [
        _seg("A", "1.0", {"a", "b", "c"}, 10),
        _seg("A", "1.1", {"a", "d"}, 1),
        _seg("A", "1.2", {"e"}, 2),
        _seg("B", "2.0", {"f", "g"}, 3),
        _seg("B", "2.1", {"f", "h"}, 4),
        _seg("C", "3.0", {"i"}, 5),
    ]
    assert _rows(found) == [
        ({"model": "A", "firmware": "1.0"}, {"events": 10}, None, 0),
        ({"model": "A", "firmware": "1.1, 1.2"}, {"events": 3},
         "2 firmware versions merged (1.1, 1.2): each had fewer than 3 owners", 2),
        ({"model": "B", "firmware": "all versions"}, {"events": 7},
         "2 firmware versions merged (2.0, 2.1): each had fewer than 3 owners", 2),
        ({"model": "C", "firmware": "3.0"}, {}, "fewer than 3 distinct owners (k-anonymity)", 0),
    ]  # fmt: skip
    # Owners are counted once however many members share them: B's two have f and g
    # only, so B goes on; with C and D it makes the "other" row.
    found[4] = _seg("B", "2.1", {"f", "g"}, 4)
    found.append(_seg("D", "4.0", {"j"}, 6))
    assert _rows(found)[2:] == [
        ({"model": "other models", "firmware": "other versions"}, {"events": 18},
         "4 segments merged (B 2.0, B 2.1, C 3.0, D 4.0): each had fewer than 3 owners", 4),
    ]  # fmt: skip
    # Too few even all together: one suppressed row, its members listed.
    found = [_seg("A", "1.0", {"a", "b", "c"}, 10), _seg("B", "2.0", {"f"}, 3)]
    found.append(_seg("C", "3.0", {"f"}, 5))
    assert _rows(found) == [
        ({"model": "A", "firmware": "1.0"}, {"events": 10}, None, 0),
        ({"model": "other models", "firmware": "other versions"}, {},
         "fewer than 3 distinct owners (k-anonymity), even the 2 small segments left merged"
         " together", 2),
    ]  # fmt: skip
    # Nothing shown at all: the one row is "all".
    assert _rows([_seg("A", "1", {"a"}, 1), _seg("B", "2", {"b", "c"}, 2)])[0][0] == {
        "model": "all models",
        "firmware": "all versions",
    }


def test_labels_list_few_values_in_ranges_and_count_many() -> None:
    assert listing(["1.1", "1.0"], "versions") == "1.0, 1.1"
    assert listing([0, 1, 2, 4, 5], "hours") == "0-2, 4-5"
    assert listing([1, 3, 5, 7], "hours") == "4 hours"
    assert listing([None, "KR-11"], "regions") == "unknown, KR-11"
    assert union([_seg("A", "1", {"a"}, 1), _seg("A", "2", {"a", "b"}, 1)], "_owners") == {"a", "b"}


def test_k_anonymity_has_a_documented_minimum() -> None:
    assert K_ANONYMITY_MIN == 3
    assert InsightsSettings(k_anonymity=3).k_anonymity == 3
    for bad in (2, 1, 0, -5):
        with pytest.raises(ValidationError, match="greater than or equal to 3"):
            InsightsSettings(k_anonymity=bad)
