"""Differentially private releases of the planners' reports: what each releases, each
owner's bounded contribution, and the noise (OpenDP).

A release is for numbers that leave the analytics team. k-anonymity alone leaks
through differencing (two reports whose ranges differ by a day single out whoever
used an appliance that day); a release here is instead epsilon-differentially private
with respect to one owner: adding or removing every row of any one owner changes the
chance of any output by at most a factor e^epsilon (plus delta, for which segments are
shown at all). Two releases about the same owners compose: their epsilons add, which
is what the planner's budget is charged (`insights.dp_ledger`).

**The unit is the owner** (the pseudonymous owner key). Only rows that carry a key
count: owners who withheld analytics consent, or were erased, have none and are in no
release; a device-day whose owner changed counts for each owner's own part.

**Each owner's contribution is bounded** (`DpSpec`): in SQL, per owner, a cell (a
segment: a region, a model and firmware and code, ...) gets at most `caps[m]` of each
measure `m` (larger values are clamped), and an owner counts in at most
`cells_per_owner` cells (their largest by the first measure, ties by the cell: a choice
made from that owner's own rows, so the bound holds whatever the others did).

**Noise, OpenDP 0.16** (`Plan`): half of epsilon selects the segments. The segments'
owner counts (each owner in at most C cells, once in each: L0 = C, L1 = C, Linf = 1)
go through `make_laplace_threshold`: Laplace noise of scale C / (epsilon / 2), and a
segment is shown only if its noisy owner count reaches the threshold, chosen (by
OpenDP's privacy map) so that the chance a segment of one owner passes is at most
`delta`, and never below k. The other half is split evenly among the measures; each
measure's sums over the shown segments get discrete Laplace noise (`make_laplace` on
integers) of scale C * cap / its share. The release's privacy loss is the sum of the
privacy maps' epsilons (basic composition) and the threshold's delta: `Plan.loss()`,
never more than the stated epsilon. Ratios (events per device, shares) are computed
from the noisy numbers, and negative noisy counts are shown as 0: post-processing,
which costs nothing. Noisy owner counts are not shown, as in the other reports.

Which reports have a private release, and their bounds, is `DP_REPORTS`; the heat
map (raw rows per local hour), cohorts (two groupings) and completeness (gaps per
device) have none yet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import opendp.prelude as dp

from insights.generalise import Scalar, Segment
from insights.query import Query
from insights.reports import (
    CYCLE_CATEGORIES,
    CYCLE_SCHEMAS,
    ERROR_SCHEMAS,
    FEATURE_SCHEMAS,
    TRIGGERED_SCHEMAS,
)

dp.enable_features("contrib")  # OpenDP's measurements are behind this flag

_MONDAY = "timestamptz '1970-01-05 00:00:00+00'"  # weeks start on Monday, as the reports'
OPENDP = "OpenDP 0.16"
DEFAULT_EPSILON = 1.0
"""A report's epsilon unless `insights.dp_epsilon` names another."""
_BISECT_UPPER = 1e9
"""Largest noise scale or threshold searched for (far above any used)."""


@dataclass(frozen=True, slots=True)
class DpSpec:
    """One report's private release: its cells, the bound on each owner, the SQL.

    `sql` defines the CTE `contrib` from `days` (the filtered device-days,
    `Query.days`): one row per owner key and cell, the dimensions and each measure of
    `caps`; `extra` are its parameters from $9. `derived` computes the ratios from the
    noisy numbers of one row."""

    name: str
    dimensions: tuple[str, ...]
    caps: dict[str, int]
    cells_per_owner: int
    sql: str
    extra: tuple[Any, ...] = ()
    derived: dict[str, Callable[[Mapping[str, int]], float | None]] | None = None
    epsilon: float = DEFAULT_EPSILON

    @property
    def measures(self) -> list[str]:
        return [*self.caps, *(self.derived or {})]

    def bound(self) -> str:
        """The bound in words: what one owner can add to a release at most."""
        caps = ", ".join(f"{cap} {_noun(m, cap)}" for m, cap in self.caps.items())
        cells = "1 segment" if self.cells_per_owner == 1 else f"{self.cells_per_owner} segments"
        return f"each owner counts in at most {cells}, with at most {caps} in each"

    def bounded_sql(self) -> str:
        """`sql`, then each owner's cells kept to `cells_per_owner` and each measure
        clamped to its cap, summed per cell with the cell's owners (one each)."""
        dims = ", ".join(self.dimensions)
        first = next(iter(self.caps))
        sums = ", ".join(f"sum(least({m}, {cap}))::bigint AS {m}" for m, cap in self.caps.items())
        return f"""{self.sql},
        ranked AS (
            SELECT *, row_number() OVER (PARTITION BY owner_key ORDER BY {first} DESC, {dims})
                AS nth
            FROM contrib
        )
        -- $7 (k) is applied after the noise, as the threshold's floor; it is named
        -- here only because every parameter of a statement must have a type.
        SELECT {dims}, count(*) AS owners, {sums}, $7::int AS _k
        FROM ranked WHERE nth <= {self.cells_per_owner} GROUP BY {dims}"""


def _noun(measure: str, count: int) -> str:
    """A measure's name as a noun for `count` of it: "1 device", "2 device weeks"."""
    words = measure.replace("_", " ")
    return words.removesuffix("s") if count == 1 else words


def _ratio(
    top: str, bottom: str, digits: int, share: bool = False
) -> Callable[[Mapping[str, int]], float | None]:
    """`top / bottom` of the noisy numbers (None where `bottom` is 0); a `share` is at
    most 1 (the noise can make a part larger than its whole)."""

    def ratio(row: Mapping[str, int]) -> float | None:
        if row[bottom] <= 0:
            return None
        value = row[top] / row[bottom]
        return round(min(value, 1.0) if share else value, digits)

    return ratio


DP_REPORTS: dict[str, DpSpec] = {
    spec.name: spec
    for spec in (
        DpSpec(
            "programs",
            ("model", "firmware", "schema", "feature"),
            {"events": 8, "devices": 1},
            4,
            """contrib AS (
                SELECT owner_key, model, firmware, schema, detail AS feature,
                       sum(events) AS events, count(DISTINCT device_id) AS devices
                FROM days
                WHERE owner_key IS NOT NULL AND schema = ANY($9::text[]) AND detail IS NOT NULL
                GROUP BY 1, 2, 3, 4, 5
            )""",
            (FEATURE_SCHEMAS,),
        ),
        DpSpec(
            "regions",
            ("region",),
            {"events": 200, "cycles": 60, "devices": 3},
            1,
            """contrib AS (
                SELECT owner_key, region, sum(events) AS events,
                       coalesce(sum(events) FILTER (WHERE schema = ANY($9::text[])), 0)
                           AS cycles,
                       count(DISTINCT device_id) AS devices
                FROM days WHERE owner_key IS NOT NULL GROUP BY 1, 2
            )""",
            (CYCLE_SCHEMAS,),
            {"events_per_device": _ratio("events", "devices", 2)},
        ),
        DpSpec(
            "cycles",
            ("category", "cycles"),
            {"device_weeks": 2},
            4,
            f"""device_weeks AS (
                SELECT owner_key, category, device_id,
                       date_bin('7 days', bucket, {_MONDAY}) AS week,
                       coalesce(sum(events) FILTER (WHERE schema = ANY($9::text[])), 0)::bigint
                           AS cycles
                FROM days WHERE owner_key IS NOT NULL AND category = ANY($10::text[])
                GROUP BY 1, 2, 3, 4
            ),
            contrib AS (
                -- Only weeks wholly inside the range, as in the exact report.
                SELECT owner_key, category, cycles, count(*) AS device_weeks
                FROM device_weeks WHERE week >= $1 AND week + interval '7 days' <= $2
                GROUP BY 1, 2, 3
            )""",
            (CYCLE_SCHEMAS, CYCLE_CATEGORIES),
        ),
        DpSpec(
            "errors",
            ("model", "firmware", "code"),
            {"errors": 5, "devices": 1},
            2,
            """contrib AS (
                SELECT owner_key, model, firmware, detail AS code, sum(events) AS errors,
                       count(DISTINCT device_id) AS devices
                FROM days
                WHERE owner_key IS NOT NULL AND schema = ANY($9::text[]) AND detail IS NOT NULL
                GROUP BY 1, 2, 3, 4
            )""",
            (ERROR_SCHEMAS,),
        ),
        DpSpec(
            "adoption",
            ("week",),
            {"active_devices": 2, "remote_start_devices": 2, "schedule_devices": 2},
            5,
            f"""contrib AS (
                SELECT owner_key,
                       (date_bin('7 days', bucket, {_MONDAY}) AT TIME ZONE 'UTC')::date AS week,
                       count(DISTINCT device_id) AS active_devices,
                       count(DISTINCT device_id) FILTER (WHERE trigger = 'app_remote')
                           AS remote_start_devices,
                       count(DISTINCT device_id) FILTER (WHERE trigger = 'schedule')
                           AS schedule_devices
                FROM days WHERE owner_key IS NOT NULL AND schema = ANY($9::text[])
                GROUP BY 1, 2
            )""",
            (TRIGGERED_SCHEMAS,),
            {
                "remote_start_share": _ratio("remote_start_devices", "active_devices", 4, True),
                "schedule_share": _ratio("schedule_devices", "active_devices", 4, True),
            },
        ),
    )
}


# -- the noise -----------------------------------------------------------------------------

_CELLS = (
    dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T=int)),
    dp.l01inf_distance(dp.absolute_distance(T=int)),
)
"""A segment's owner count by segment key; an owner changes at most L0 keys by at most
Linf each (L1 in all)."""
_SUMS = (dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int))
"""One measure's sums over the shown segments, in key order."""


def privacy_map(measurement: dp.Measurement, d_in: Any) -> Any:
    """OpenDP's privacy map of `measurement` at `d_in`: epsilon, or (epsilon, delta)."""
    return measurement.map(d_in)  # type: ignore[no-untyped-call]  # OpenDP has no hints


def _selection(scale: float, threshold: int) -> dp.Measurement:
    return dp.m.make_laplace_threshold(*_CELLS, scale=scale, threshold=threshold)


def _sums(scale: float) -> dp.Measurement:
    return dp.m.make_laplace(*_SUMS, scale=scale)


@dataclass(frozen=True, slots=True)
class Plan:
    """A release's privacy parameters: epsilon and delta stated, the bounds, and the
    noise scales and threshold that meet them (found with OpenDP's privacy maps)."""

    report: str
    epsilon: float
    delta: float
    k: int
    cells_per_owner: int
    caps: dict[str, int]
    selection_scale: float
    threshold: int
    scales: dict[str, float]

    @classmethod
    def make(cls, spec: DpSpec, epsilon: float, delta: float, k: int) -> Plan:
        """The smallest noise that keeps `spec`'s release within (`epsilon`, `delta`):
        half of epsilon for the segments shown, half split among the measures."""
        c = spec.cells_per_owner
        selecting = epsilon / 2
        each = (epsilon - selecting) / len(spec.caps)
        big = int(_BISECT_UPPER)

        def selects(scale: float) -> bool:
            eps, _delta = privacy_map(_selection(scale, big), (c, c, 1))
            return bool(eps <= selecting)

        def thresholds(scale: float) -> Callable[[float], bool]:
            # OpenDP searches integers here (T=int) but types the predicate for floats.
            return lambda t: bool(privacy_map(_selection(scale, int(t)), (c, c, 1))[1] <= delta)

        def noises(d_in: int) -> Callable[[float], bool]:
            return lambda s: bool(privacy_map(_sums(s), d_in) <= each)

        scale = float(dp.binary_search(selects, bounds=(1e-9, _BISECT_UPPER)))
        found = int(dp.binary_search(thresholds(scale), bounds=(1, big), T=int))
        scales = {
            m: float(dp.binary_search(noises(c * cap), bounds=(1e-9, 1e12)))
            for m, cap in spec.caps.items()
        }
        return cls(spec.name, epsilon, delta, k, c, dict(spec.caps), scale, max(found, k), scales)

    def selection(self) -> dp.Measurement:
        """OpenDP's measurement choosing the segments shown (noisy owners >= threshold)."""
        return _selection(self.selection_scale, self.threshold)

    def sums(self, measure: str) -> dp.Measurement:
        """OpenDP's measurement noising `measure`'s sums over the shown segments."""
        return _sums(self.scales[measure])

    def loss(self) -> tuple[float, float]:
        """The release's (epsilon, delta) from OpenDP's privacy maps at this plan's
        bounds, composed (epsilons and deltas added): at most the stated ones."""
        c = self.cells_per_owner
        eps, delta = privacy_map(self.selection(), (c, c, 1))
        for m, cap in self.caps.items():
            eps += privacy_map(self.sums(m), c * cap)
        return float(eps), float(delta)

    def describe(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "unit": "owner",
            "cells_per_owner": self.cells_per_owner,
            "caps": dict(self.caps),
            "threshold": self.threshold,
            "k_anonymity": self.k,
            "noise_scale": {"owners": self.selection_scale, **self.scales},
            "mechanism": f"{OPENDP}: make_laplace_threshold (segments shown), make_laplace "
            "on integers (discrete Laplace, each measure)",
        }


def cell_key(segment: Segment, dimensions: tuple[str, ...]) -> str:
    """A segment's key as one string (OpenDP's map keys): its dimensions as JSON."""
    return json.dumps([segment.key[d] for d in dimensions])


def noisy_rows(spec: DpSpec, plan: Plan, segments: list[Segment]) -> list[dict[str, Scalar]]:
    """The release's rows from the bounded exact segments: the segments whose noisy
    owner count reaches the threshold, in key order, each with its noisy measures (at
    least 0) and the ratios computed from them."""
    by_key = {cell_key(s, spec.dimensions): s for s in segments}
    shown = sorted(plan.selection()({k: s.owners for k, s in by_key.items()}))
    noisy: dict[str, list[int]] = {}
    for m in spec.caps:
        exact = [int(by_key[k].values[m] or 0) for k in shown]
        noisy[m] = [max(0, v) for v in plan.sums(m)(exact)] if shown else []
    rows: list[dict[str, Scalar]] = []
    for i, key in enumerate(shown):
        values = {m: noisy[m][i] for m in spec.caps}
        row: dict[str, Scalar] = dict(zip(spec.dimensions, json.loads(key), strict=True))
        row.update(values)
        for name, compute in (spec.derived or {}).items():
            row[name] = compute(values)
        rows.append(row)
    return rows


async def bounded_segments(q: Query, spec: DpSpec) -> list[Segment]:
    """The exact per-segment sums after each owner's contribution is bounded
    (`DpSpec.bounded_sql`): what the noise is added to; never shown as they are."""
    return await q.segments(spec.bounded_sql(), spec.dimensions, *spec.extra)


def within(loss: tuple[float, float], epsilon: float, delta: float) -> bool:
    """Whether a composed loss is within (epsilon, delta), allowing the last bit of
    floating-point rounding in adding the parts (each part is within its own share)."""
    return loss[0] <= epsilon * (1 + 1e-12) and loss[1] <= delta and not math.isnan(loss[0])
