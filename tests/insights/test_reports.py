"""Every report against a direct SQL computation over the seeded raw rows, with and
without filters; k-anonymity (segments below k merged or suppressed, never shown as
they are: `test_generalise.py` checks the merged rows' numbers); the marketing
population; bad filters."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict

import asyncpg
import pytest

from ingest.rows import UsageRow
from ingest.settings import Settings
from insights.export import export
from insights.filters import FilterError, Filters
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.runner import run_report
from insights.specs import Report
from tests.conftest import require_timescaledb
from tests.ingest.test_store import materialised
from tests.insights.conftest import Seeded, seeded_store
from tests.insights.seed import END, START, Population

SMALL = "below k: merged or suppressed"
CYCLES = "('washer.cycle', 'dryer.cycle', 'robot_vacuum.clean_run')"
TRIGGERED = (
    "(schema LIKE '%.cycle' OR schema LIKE '%.clean_run' OR schema LIKE '%.mode_change'"
    " OR schema LIKE '%.setpoint_change')"
)

# The direct computations: plain SQL over the raw table `{t}`, rows chosen by `{w}`;
# written from the report definitions, not from insights/reports.py (other
# functions where there are two ways: date_trunc for weeks, ::date for days). The
# reports read the device-daily rollup; these read the raw rows only. For the
# marketing-usable reports `{w}` keeps the seed's own marketable rows, by the
# device-day rule the reports apply (`Population.marketable_day`).
DIRECT: dict[str, str] = {
    "programs": """
        SELECT model, firmware, schema, coalesce(body ->> 'program', body ->> 'mode') AS feature,
               count(*) AS events, count(DISTINCT device_id) AS devices,
               count(DISTINCT owner_key) AS owners
        FROM {t} WHERE {w}
          AND (schema LIKE '%.cycle' OR schema LIKE '%.clean_run' OR schema LIKE '%.mode_change')
        GROUP BY 1, 2, 3, 4""",
    "heatmap": """
        SELECT extract(isodow FROM event_time AT TIME ZONE 'Asia/Seoul')::int AS day_of_week,
               extract(hour FROM event_time AT TIME ZONE 'Asia/Seoul')::int AS hour,
               count(*) AS events, count(DISTINCT owner_key) AS owners
        FROM {t} WHERE {w} GROUP BY 1, 2""",
    "regions": f"""
        SELECT region, count(*) AS events,
               count(*) FILTER (WHERE schema IN {CYCLES}) AS cycles,
               count(DISTINCT device_id) AS devices,
               round(count(*)::numeric / count(DISTINCT device_id), 2) AS events_per_device,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}} GROUP BY 1""",
    "cycles": f"""
        WITH weeks AS (
            SELECT split_part(schema, '.', 1) AS category, device_id,
                   date_trunc('week', event_time AT TIME ZONE 'UTC') AS week,
                   count(*) FILTER (WHERE schema IN {CYCLES}) AS cycles
            FROM {{t}} WHERE {{w}}
              AND split_part(schema, '.', 1) IN ('washer', 'dryer', 'robot_vacuum')
            GROUP BY 1, 2, 3
        ), whole AS (
            SELECT * FROM weeks
            WHERE week >= $1 AT TIME ZONE 'UTC'
              AND week + interval '7 days' <= $2 AT TIME ZONE 'UTC'
        )
        SELECT w.category, w.cycles, count(DISTINCT w.device_id || w.week::text) AS device_weeks,
               count(DISTINCT u.owner_key) AS owners
        FROM whole w JOIN {{t}} u ON u.device_id = w.device_id
             AND date_trunc('week', u.event_time AT TIME ZONE 'UTC') = w.week
             AND split_part(u.schema, '.', 1) = w.category
        WHERE {{uw}}
        GROUP BY 1, 2""",
    "errors": """
        WITH dd AS (
            SELECT model, firmware,
                   count(DISTINCT (device_id, (event_time AT TIME ZONE 'UTC')::date)) AS days
            FROM {t} WHERE {w} GROUP BY 1, 2
        )
        SELECT e.model, e.firmware, e.body ->> 'code' AS code, count(*) AS errors,
               count(DISTINCT e.device_id) AS devices, max(dd.days) AS device_days,
               round(count(*) * 1000.0 / max(dd.days), 3) AS per_1000_device_days,
               count(DISTINCT e.owner_key) AS owners
        FROM {t} e JOIN dd ON dd.model = e.model AND dd.firmware IS NOT DISTINCT FROM e.firmware
        WHERE {ew} AND e.schema LIKE '%.error' AND e.body ->> 'state' = 'raised'
        GROUP BY 1, 2, 3""",
    "adoption": f"""
        SELECT date_trunc('week', event_time AT TIME ZONE 'UTC')::date AS week,
               count(DISTINCT device_id) AS active_devices,
               count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'app_remote')
                   AS remote_start_devices,
               count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'schedule')
                   AS schedule_devices,
               round(count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'app_remote')
                     ::numeric / count(DISTINCT device_id), 4) AS remote_start_share,
               round(count(DISTINCT device_id) FILTER (WHERE body ->> 'trigger' = 'schedule')
                     ::numeric / count(DISTINCT device_id), 4) AS schedule_share,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}} AND {TRIGGERED} GROUP BY 1""",
    "cohorts": f"""
        SELECT {{cohort}} AS cohort, split_part(schema, '.', 1) AS category,
               count(DISTINCT device_id) AS devices,
               count(DISTINCT device_id || (event_time AT TIME ZONE 'UTC')::date::text)
                   AS device_days,
               count(*) FILTER (WHERE schema IN {CYCLES}) AS cycles,
               round(7.0 * count(*) FILTER (WHERE schema IN {CYCLES})
                     / count(DISTINCT device_id || (event_time AT TIME ZONE 'UTC')::date::text),
                     3) AS cycles_per_device_week,
               round((count(*) FILTER (WHERE {TRIGGERED}
                                        AND body ->> 'trigger' IN ('app_remote', 'schedule')))
                     ::numeric / nullif(count(*) FILTER (WHERE {TRIGGERED}), 0), 4) AS app_share,
               count(DISTINCT owner_key) AS owners
        FROM {{t}} WHERE {{w}} GROUP BY 1, 2""",
    "completeness": """
        WITH s AS (
            SELECT device_id, model, owner_key, (event_time AT TIME ZONE 'UTC')::date AS day,
                   coalesce(seq - lag(seq) OVER (PARTITION BY device_id, boot_id ORDER BY seq)
                            - 1, 0) AS gap
            FROM {t} WHERE {w}
        ), dd AS (
            SELECT day, model, device_id, count(*) AS received, sum(gap) AS missing
            FROM s GROUP BY 1, 2, 3
        ), own AS (SELECT day, model, count(DISTINCT owner_key) AS owners FROM s GROUP BY 1, 2)
        SELECT dd.day, dd.model, count(*) AS device_days, sum(received) AS received,
               sum(missing) AS missing, count(*) FILTER (WHERE missing = 0) AS complete_device_days,
               round(sum(received) / (sum(received) + sum(missing)), 4) AS completeness,
               max(own.owners) AS owners
        FROM dd JOIN own USING (day, model) GROUP BY 1, 2""",
}


def where(f: Filters, alias: str = "", marketing: bool = False) -> str:
    """The filters as SQL over `alias`'s columns ($1 start, $2 end, $3 marketable keys)."""
    a = f"{alias}." if alias else ""
    parts = [f"{a}event_time >= $1", f"{a}event_time < $2"]
    for column, values in (("model", f.model), ("region", f.region), ("firmware", f.firmware)):
        if values:
            parts.append(f"{a}{column} IN ({', '.join(repr(v) for v in values)})")
    if f.category:
        parts.append(f"split_part({a}schema, '.', 1) IN ({', '.join(map(repr, f.category))})")
    if marketing:
        parts.append(f"({a}device_id || '/' || {a}boot_id || '/' || {a}seq) = ANY($3::text[])")
    return " AND ".join(parts)


def marketable_keys(pop: Population) -> list[str]:
    return [f"{r.device_id}/{r.boot_id}/{r.seq}" for r in pop.rows if pop.marketable_day(r)]


def plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, date | datetime):
        return value.isoformat()
    return value


async def direct(s: Seeded, name: str, f: Filters, k: int, by: str = "channel") -> dict[Any, Any]:
    spec = REPORTS[name]
    sql = DIRECT[name].format(
        t=s.settings.postgres.table,
        w=where(f, marketing=spec.marketing),
        uw=where(f, "u", spec.marketing),
        ew=where(f, "e", spec.marketing),
        cohort={"channel": "purchase_channel", "tier": "membership_tier"}[by],
    )
    args: list[Any] = [f.start, f.end]
    if spec.marketing:
        args.append(marketable_keys(s.population))
    conn = await asyncpg.connect(s.settings.postgres.dsn.get_secret_value())
    try:
        records = await conn.fetch(sql, *args)
    finally:
        await conn.close()
    out = {}
    for r in records:
        d = {k2: plain(v) for k2, v in r.items()}
        owners = d.pop("owners")
        key = tuple(d.pop(dim) for dim in spec.dimensions)
        out[key] = d if owners >= k else SMALL
    return out


def found(report: Report) -> dict[Any, Any]:
    """Each fine segment of the report: its values where it is shown as it is, `SMALL`
    where it is inside a merged row (generalised or suppressed) or suppressed alone."""
    out: dict[Any, Any] = {}
    for row in report.rows:
        if row.members:
            out.update((tuple(m.values()), SMALL) for m in row.members)
        else:
            out[tuple(row.segment.values())] = SMALL if row.suppressed else row.values
    return out


def fine_rows(report: Report) -> list[tuple[Any, ...]]:
    """The keys of the rows that are one fine segment each, in the report's order."""
    return [tuple(r.segment.values()) for r in report.rows if not r.members]


async def run(s: Seeded, name: str, f: Filters, k: int, **options: str) -> Report:
    conn = await asyncpg.connect(s.settings.postgres.dsn.get_secret_value())
    try:
        return await run_report(
            conn,
            name,
            f,
            table=s.settings.postgres.table,
            privacy=Privacy(k, s.settings.registry.db_schema),
            options=options,
        )
    finally:
        await conn.close()


class FilterSet(TypedDict, total=False):
    """`Filters.parse`'s keywords, as much of them as a filter set names."""

    start: str | datetime
    end: str | datetime
    model: list[str]
    category: list[str]
    region: list[str]
    firmware: list[str]


FILTERS: dict[str, FilterSet] = {
    "all": {},
    "model": {"model": ["WM-A", "WM-RARE"]},
    "category+region": {"category": ["washer", "dryer"], "region": ["KR-11"]},
    "firmware+time": {"firmware": ["2.1"], "start": "2026-11-09", "end": "2026-11-23"},
    # Starts and ends inside a UTC day: those two days are read from the raw rows.
    "hours": {"start": "2026-11-03T05:00:00+00:00", "end": "2026-11-19T17:00:00+00:00"},
}


def filters(name: str) -> Filters:
    """Filter set `name` over the seeded weeks, or over its own start and end."""
    given = FilterSet(start=START, end=END)
    given.update(FILTERS[name])
    return Filters.parse(**given)


@pytest.mark.parametrize("filter_set", list(FILTERS))
async def test_every_report_equals_a_direct_computation_over_the_raw_rows(
    seeded: Seeded, filter_set: str
) -> None:
    f = filters(filter_set)
    k = 3
    shown_total = 0
    for name in REPORTS:
        options_sets: list[dict[str, str]] = [{}]
        if name == "cohorts":
            options_sets = [{"by": "channel"}, {"by": "tier"}]
        for options in options_sets:
            report = await run(seeded, name, f, k, **options)
            expected = await direct(seeded, name, f, k, **options)
            assert found(report) == expected, (name, options)
            shown = [key for key, v in expected.items() if v != SMALL]
            order = sorted(shown, key=lambda key: tuple((v is not None, v) for v in key))
            assert [k for k in fine_rows(report) if k in shown] == order, (name, options)
            shown_total += sum(1 for r in report.rows if not r.suppressed)
    assert shown_total > 20  # the comparison is not between empty results


async def test_reports_are_the_same_before_and_after_the_rollups_are_refreshed(
    seeded_either: Seeded,
) -> None:
    """Before a refresh every day is read from the raw rows (noted), after it from the
    device-daily rollup, and after a late batch the days it touched are read live again
    beside materialised ones: the same reports each time (every row, merged ones too),
    equal to the direct SQL. On both layouts."""
    seeded = seeded_either
    filter_sets = [Filters.parse(start=START, end=END)] + [
        filters(n) for n in ("category+region", "hours")
    ]

    async def everything() -> dict[tuple[str, str, int], tuple[dict[Any, Any], bytes]]:
        """(fine segments, the whole report as JSON) per report, option and filters."""
        out = {}
        for i, f in enumerate(filter_sets):
            for name in REPORTS:
                for by in ("channel", "tier") if name == "cohorts" else ("",):
                    options = {"by": by} if by else {}
                    report = await run(seeded, name, f, 3, **options)
                    out[name, by, i] = (found(report), export(report, "json"))
        return out

    async def materialised_days() -> int:
        async with seeded.store.pool.acquire() as conn:
            return len(set(await materialised(conn, seeded.store, "device_daily")))

    assert await materialised_days() == 0
    before = await everything()
    refreshed = await seeded.store.refresh_rollups()
    assert refreshed is not None and refreshed.days == 21
    assert await materialised_days() == 21
    after = await everything()
    assert after == before
    for i, f in enumerate(filter_sets):
        for name in ("programs", "errors", "completeness", "regions"):
            assert after[name, "", i][0] == await direct(seeded, name, f, 3), (name, i)
    # A late batch in two settled days: they are noted, so read live, the rest not.
    pop = seeded.population
    wm = next(d for d in pop.devices if d.model == "WM-A" and d.firmware == "2.1")
    late = [
        _late_row(wm.device_id, START + timedelta(days=3, hours=2), seq) for seq in (900, 903)
    ] + [_late_row(wm.device_id, START + timedelta(days=15, hours=20), 950)]
    assert await seeded.store.write(late) == 3
    mixed = await everything()
    assert mixed != after  # the late rows count
    for i, f in enumerate(filter_sets):
        for name in REPORTS:
            if name != "cohorts":
                assert mixed[name, "", i][0] == await direct(seeded, name, f, 3), (name, i)
    assert await seeded.store.refresh_rollups() is not None
    assert await everything() == mixed


def _late_row(device: str, at: datetime, seq: int) -> UsageRow:
    """A washer error raised by an existing device, with a boot of its own."""
    body: dict[str, object] = {"code": "E01", "severity": "fault", "state": "raised"}
    return UsageRow(
        device, f"{device}-late", seq, at, "washer.error", 1, body, 0, seq,
        model="WM-A", firmware="2.1", region=None, category="washer",
        purchase_channel="gift", analytics_consent=False,
    )  # fmt: skip


async def test_the_seed_is_rich_enough_that_each_report_shows_and_suppresses(
    seeded: Seeded,
) -> None:
    """At k=3 each report has segments shown, the errors of unknown firmware too;
    WM-RARE (3 owners, one without consent, so 2 keys) is below k in each of its
    programs, and merging them (the same two owners) cannot reach 3, nor can any sibling
    join them (WM-A's programs all have 3 owners or more): its four programs are one
    suppressed row, which says so."""
    f = Filters.parse(start=START, end=END)
    for name in REPORTS:
        report = await run(seeded, name, f, 3)
        assert any(not r.suppressed for r in report.rows), name
    # The dryers of unknown firmware (NULL) show their errors at k = 3: the oracle's
    # NULL-safe join (`DIRECT["errors"]`) is exercised, not only its known versions.
    errors = await run(seeded, "errors", f, 3)
    unknown = [
        r.segment["code"]
        for r in errors.rows
        if r.segment["firmware"] is None and not r.members and not r.suppressed
    ]
    assert unknown == ["E01", "E07", "F12"]
    programs = await run(seeded, "programs", f, 3)
    rare = [r for r in programs.rows if r.segment["model"] == "WM-RARE"]
    assert [r.segment for r in rare] == [
        {
            "model": "WM-RARE",
            "firmware": "0.9",
            "schema": "washer.cycle",
            "feature": "other features",
        }
    ]
    assert rare[0].values == {} and rare[0].generalised is None
    assert [m["feature"] for m in rare[0].members] == ["cotton", "eco", "quick", "wool"]
    assert rare[0].suppressed == (
        "fewer than 3 distinct owners (k-anonymity), even the 4 small segments left merged together"
    )
    assert programs.rows[-1] is rare[0]  # the remainder comes last
    assert (programs.suppressed_segments, programs.generalised_segments) == (4, 0)


async def test_segments_below_the_default_k_of_10_are_generalised_or_suppressed_and_say_so(
    seeded: Seeded,
) -> None:
    f = Filters.parse(start=START, end=END)
    report = await run(seeded, "errors", f, seeded.settings.insights.k_anonymity)
    assert seeded.settings.insights.k_anonymity == 10
    expected = await direct(seeded, "errors", f, 10)
    assert found(report) == expected
    small = [key for key, v in expected.items() if v == SMALL]
    assert small and len(small) < len(expected)  # some of each
    # Every small error segment is in a generalised row here: none suppressed.
    assert report.suppressed_segments == 0
    assert report.generalised_segments == len(small) == 16
    records = {(r["model"], r["firmware"], r["code"]): r for r in report.records()}
    assert records["WM-A", "all versions", "E07"]["generalised"] == (
        "2 firmware versions merged (1.0, 2.1): each had fewer than 10 owners"
    )
    # The dryers' segments of unknown firmware (NULL) merge with their 1.0 siblings.
    assert records["DR-B", "all versions", "E01"]["generalised"] == (
        "2 firmware versions merged (unknown, 1.0): each had fewer than 10 owners"
    )
    other = records["other models", "other versions", "other codes"]
    assert other["generalised"] == (
        "8 segments merged (RV-C 1.0 E01, RV-C 1.0 E07, RV-C 1.0 F12, WM-A 1.0 E01 and 4 "
        "more): each had fewer than 10 owners"
    )
    assert records["WM-A", "2.1", "E01"]["generalised"] is None
    # cohorts by tier: 36 owners over 4 tiers and 3 categories are all below 10; the
    # washers' two marketable tiers reach 10 together, the rest stays suppressed.
    cohorts = await run(seeded, "cohorts", f, 10, by="tier")
    assert [(r.segment["cohort"], r.segment["category"], r.suppressed) for r in cohorts.rows] == [
        ("all cohorts", "washer", None),
        (
            "other cohorts",
            "other categories",
            "fewer than 10 distinct owners (k-anonymity), even the 4 small segments left "
            "merged together",
        ),
    ]
    assert cohorts.rows[0].generalised == (
        "2 cohorts merged (gold, standard): each had fewer than 10 owners"
    )
    for rec in cohorts.records():
        if rec["suppressed"]:
            assert rec["devices"] is None and rec["app_share"] is None


async def test_marketing_reports_count_only_active_owners_consenting_to_marketing(
    seeded: Seeded,
) -> None:
    pop = seeded.population
    f = Filters.parse(start=START, end=END)
    report = await run(seeded, "regions", f, 1)
    events = {r.segment["region"]: r.values["events"] for r in report.rows}
    expected: dict[str | None, int] = {}
    for r in pop.rows:
        if pop.marketable_day(r):
            expected[r.region] = expected.get(r.region, 0) + 1
    assert events == expected
    assert 0 < sum(expected.values()) < len(pop.rows)
    # Reports read device-days: a row counts only if every owner of its device that UTC
    # day is marketable, which on every day but a handover is the per-event rule.
    assert all(pop.marketable(r) for r in pop.rows if pop.marketable_day(r))
    # Owner 4 consents to both but is dormant: none of its devices' rows count.
    dormant = pop.owners[4]
    assert dormant.status == "dormant" and dormant.analytics and dormant.marketing
    theirs = [d for d in pop.devices if d.periods[-1].owner is dormant]
    assert theirs and not any(
        pop.marketable(r) for r in pop.rows if r.device_id == theirs[0].device_id
    )
    # The handed-on device counts for its first (marketing) owner only, up to the handover.
    first = pop.devices[0]
    handover = first.periods[0].valid_to
    assert handover is not None
    mine = [r for r in pop.rows if r.device_id == first.device_id]
    assert any(pop.marketable(r) for r in mine if r.event_time < handover)
    assert not any(pop.marketable(r) for r in mine if r.event_time >= handover)
    # ... and, in the reports, up to the UTC day of the handover, which counts for no one.
    midnight = handover.replace(hour=0)
    assert any(pop.marketable(r) for r in mine if midnight <= r.event_time < handover)
    assert [pop.marketable_day(r) for r in mine] == [r.event_time < midnight for r in mine]
    # Product reports read every row.
    heat = await run(seeded, "heatmap", f, 1)
    assert sum(int(r.values["events"] or 0) for r in heat.rows) == len(pop.rows)


async def test_marketing_reports_drop_owners_whose_marketing_consent_lapsed(
    seeded: Seeded,
) -> None:
    """A policy version re-asking marketing, in effect now, lapses every marketing grant
    the seed made (under `initial`): the marketing-usable reports count no one until
    owners grant again under it; the product reports are unchanged; an owner who
    grants again counts again."""
    f = Filters.parse(start=START, end=END)
    before = await run(seeded, "regions", f, 1)
    assert sum(int(r.values["events"] or 0) for r in before.rows) > 0
    heat_before = await run(seeded, "heatmap", f, 1)
    reg = seeded.settings.registry.db_schema
    conn = await asyncpg.connect(seeded.settings.postgres.dsn.get_secret_value())
    try:
        await conn.execute(
            f"INSERT INTO {reg}.policy_versions (version, effective_at, policy_text,"
            " published_at) VALUES ('2026-12', now(), 'Marketing with partners.', now())"
        )
        await conn.execute(f"INSERT INTO {reg}.policy_reasks VALUES ('2026-12', 'marketing')")
        lapsed = await run(seeded, "regions", f, 1)
        assert lapsed.rows == []
        heat = await run(seeded, "heatmap", f, 1)
        assert heat.rows == heat_before.rows
        # One marketable owner grants again under the new version: their days count.
        owner = await conn.fetchval(
            f"SELECT o.owner_id FROM {reg}.owners o WHERE o.status = 'active'"
            f" AND {reg}.consent_in_force(o.owner_id, 'analytics') AND o.marketing_consent"
            f" AND EXISTS (SELECT 1 FROM {reg}.ownership_periods p"
            "  WHERE p.owner_id = o.owner_id AND p.valid_to IS NULL)"
            " ORDER BY o.owner_id LIMIT 1"
        )
        await conn.execute(
            f"INSERT INTO {reg}.consent_events (owner_id, purpose, granted, changed_at, source,"
            " policy_version) VALUES ($1, 'marketing', true, now(), 'test', '2026-12')",
            owner,
        )
        again = await run(seeded, "regions", f, 1)
        assert (
            0
            < sum(int(r.values["events"] or 0) for r in again.rows)
            < sum(int(r.values["events"] or 0) for r in before.rows)
        )
    finally:
        await conn.close()


async def test_completeness_matches_the_gaps_the_seed_made(seeded: Seeded) -> None:
    pop = seeded.population
    f = Filters.parse(start=START, end=END)
    report = await run(seeded, "completeness", f, 1)
    missing = 0
    by_boot: dict[tuple[str, str], list[int]] = {}
    for r in pop.rows:
        by_boot.setdefault((r.device_id, r.boot_id), []).append(r.seq)
    for seqs in by_boot.values():
        seqs.sort()
        missing += sum(b - a - 1 for a, b in itertools.pairwise(seqs))
    assert missing > 0
    assert sum(int(r.values["missing"] or 0) for r in report.rows) == missing
    assert sum(int(r.values["received"] or 0) for r in report.rows) == len(pop.rows)


async def test_no_output_carries_a_device_id_an_owner_key_or_an_owner_id(seeded: Seeded) -> None:
    pop = seeded.population
    f = Filters.parse(start=START, end=END)
    secrets = {d.device_id for d in pop.devices} | {r.boot_id for r in pop.rows}
    secrets |= {o.key for o in pop.owners if o.key} | {str(o.owner_id) for o in pop.owners}
    for name, k in itertools.product(REPORTS, (1, 3, 10)):  # merged rows, members too
        report = await run(seeded, name, f, k)
        for fmt in ("json", "csv"):
            text = export(report, fmt).decode()
            assert not [s for s in secrets if s in text], (name, k, fmt)


def test_bad_filters_name_what_is_wrong() -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("start", {"start": "2026-13-01"}),
        ("end", {"end": "tomorrow"}),
        ("start", {"start": "2026-11-02", "end": "2026-11-01"}),
        ("category", {"category": ["toaster"]}),
        ("region", {"region": ["seoul"]}),
        ("model", {"model": ["WM A; DROP TABLE"]}),
        ("firmware", {"firmware": [""]}),
    ]
    for field, given in cases:
        with pytest.raises(FilterError) as caught:
            Filters.parse(**given)
        assert caught.value.field == field, given
    with pytest.raises(FilterError, match="whole UTC hour"):
        Filters.parse(start="2026-11-02T10:30:00+00:00", end="2026-11-03")
    with pytest.raises(FilterError, match="no time zone"):
        Filters.parse(start="2026-11-02T10:00:00", end="2026-11-03")
    with pytest.raises(FilterError, match="at most 400 days"):
        Filters.parse(start="2020-01-01", end="2026-01-01")
    f = Filters.parse(start="2026-11-02T09:00:00+09:00", end="2026-11-03")
    assert f.start == datetime(2026, 11, 2, tzinfo=UTC)
    default = Filters.parse(now=datetime(2026, 11, 26, 6, 30, tzinfo=UTC))
    assert default.end == datetime(2026, 11, 26, 7, tzinfo=UTC)
    assert default.end - default.start == timedelta(days=28)


async def test_bad_options_name_what_is_wrong(seeded: Seeded) -> None:
    f = Filters.parse(start=START, end=END)
    with pytest.raises(FilterError) as caught:
        await run(seeded, "cohorts", f, 3, by="age")
    assert (caught.value.field, caught.value.message) == ("by", "'age' is not one of channel, tier")
    with pytest.raises(FilterError, match="takes no option 'by'"):
        await run(seeded, "heatmap", f, 3, by="tier")
    with pytest.raises(FilterError, match="not an IANA time zone"):
        await run(seeded, "heatmap", f, 3, tz="Mars/Olympus")
    with pytest.raises(FilterError, match="whole number of hours"):
        await run(seeded, "heatmap", f, 3, tz="Asia/Kolkata")
    with pytest.raises(FilterError, match="unknown 'nope'"):
        await run(seeded, "nope", f, 3)


async def test_json_export_describes_filters_privacy_and_population(seeded: Seeded) -> None:
    f = Filters.parse(start=START, end=END, category=["washer"])
    report = await run(seeded, "adoption", f, 3)
    doc = json.loads(export(report, "json"))
    assert doc["filters"]["category"] == ["washer"]
    assert doc["k_anonymity"] == 3
    assert doc["marketing_usable"] is True
    assert doc["population"] == ("owners active now, with analytics and marketing consent in force")
    assert doc["purposes"] == ["analytics", "marketing"]
    assert [r["week"] for r in doc["rows"]] == ["2026-11-02", "2026-11-09", "2026-11-16"]


@pytest.mark.timescale
async def test_reports_are_the_same_on_timescaledb(
    settings: Settings, population: Population
) -> None:
    await require_timescaledb(settings)
    async with seeded_store(settings, population, timescaledb=True) as s:
        assert s.store.layout.kind == "timescaledb"
        f = Filters.parse(start=START, end=END)
        for name in REPORTS:
            assert found(await run(s, name, f, 3)) == await direct(s, name, f, 3), name
