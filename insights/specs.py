"""What a report is, and what it answers with.

`ReportSpec`: a report's name, title, dimensions, measures, source, whether it is
marketing-usable, how it is drawn (`Chart`), its own options (`Option`) and the
`compute` that reads its segments through a `Query`. `Report`: one run's answer, the
spec, the filters and options in effect, k, and the rows after generalisation,
flattened by `records()` for every export and by `describe()` for JSON. Nothing here
touches the database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from insights.filters import Filters
from insights.generalise import Generalisation, Row, Scalar, Segment
from insights.hierarchies import HIERARCHIES
from insights.query import Query


@dataclass(frozen=True, slots=True)
class Chart:
    """How a report is drawn, by the CLI (matplotlib) and the web page alike.

    bar: one bar per row, labelled by `label` dimensions, height `value`, grouped by
    `series` when set; line: `value` over the `x` dimension, a line per `series`;
    heatmap: `value` on a grid of `y` (rows) by `x` (columns).
    """

    kind: Literal["bar", "line", "heatmap"]
    value: str
    label: tuple[str, ...] = ()
    x: str | None = None
    y: str | None = None
    series: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "label": list(self.label),
            "x": self.x,
            "y": self.y,
            "series": self.series,
        }


@dataclass(frozen=True, slots=True)
class Option:
    """A report-specific option (`by`, `tz`): its allowed values, or any when empty."""

    help: str
    choices: tuple[str, ...] = ()
    default: str | None = None


Compute = Callable[[Query], Awaitable[list[Segment]]]


@dataclass(frozen=True, slots=True)
class ReportSpec:
    name: str
    title: str
    description: str
    dimensions: tuple[str, ...]
    measures: dict[str, Literal["int", "float"]]
    source: str
    marketing: bool
    chart: Chart
    compute: Compute
    options: dict[str, Option] = field(default_factory=dict)

    @property
    def purposes(self) -> tuple[str, ...]:
        """The registry purposes (devices/sql/008) whose consent the report relies on:
        every report counts owners by the key enrichment gave only under product-planning
        consent in force (`analytics`); a marketing-usable one also needs `marketing`
        consent in force now, for every owner it counts."""
        return ("analytics", "marketing") if self.marketing else ("analytics",)

    @property
    def generalisation(self) -> Generalisation:
        """How its small segments roll up (`insights.hierarchies`)."""
        return HIERARCHIES[self.name]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "dimensions": list(self.dimensions),
            "measures": dict(self.measures),
            "source": self.source,
            "marketing_usable": self.marketing,
            "purposes": list(self.purposes),
            "chart": self.chart.describe(),
            "options": {
                k: {"help": o.help, "choices": list(o.choices), "default": o.default}
                for k, o in self.options.items()
            },
        }


@dataclass(frozen=True, slots=True)
class Report:
    spec: ReportSpec
    filters: Filters
    options: dict[str, str]
    k: int
    rows: list[Row]

    @property
    def columns(self) -> list[str]:
        return [
            *self.spec.dimensions,
            *self.spec.measures,
            "suppressed",
            "suppressed_reason",
            "generalised",
        ]

    @property
    def generalised_segments(self) -> int:
        """Fine segments shown inside generalised rows."""
        return sum(len(r.members) for r in self.rows if r.generalised)

    @property
    def generalised_rows(self) -> int:
        return sum(1 for r in self.rows if r.generalised)

    @property
    def suppressed_segments(self) -> int:
        """Fine segments withheld: alone, or in the merged remainder."""
        return sum(len(r.members) or 1 for r in self.rows if r.suppressed)

    def records(self) -> list[dict[str, Scalar]]:
        """Flat rows (dimensions, measures, `suppressed`, `suppressed_reason`,
        `generalised`), the measures None where suppressed: what every export writes. A
        generalised row's merged dimensions hold labels ("all versions")."""
        out: list[dict[str, Scalar]] = []
        for row in self.rows:
            flat: dict[str, Scalar] = dict(row.segment)
            for m in self.spec.measures:
                flat[m] = row.values.get(m)
            flat["suppressed"] = row.suppressed is not None
            flat["suppressed_reason"] = row.suppressed
            flat["generalised"] = row.generalised
            out.append(flat)
        return out

    def describe(self) -> dict[str, Any]:
        """The report as JSON: what it is, the filters, the privacy rule and the rows."""
        return {
            "report": self.spec.name,
            "title": self.spec.title,
            "source": self.spec.source,
            "marketing_usable": self.spec.marketing,
            "purposes": list(self.spec.purposes),
            "population": (
                "owners active now, with analytics and marketing consent in force"
                if self.spec.marketing
                else "every stored usage row"
            ),
            "filters": self.filters.describe(),
            "options": self.options,
            "k_anonymity": self.k,
            "suppressed_segments": self.suppressed_segments,
            "generalised_segments": self.generalised_segments,
            "dimensions": list(self.spec.dimensions),
            "measures": list(self.spec.measures),
            "chart": self.spec.chart.describe(),
            "rows": [
                {**record, "members": [dict(m) for m in row.members] if row.members else None}
                for row, record in zip(self.rows, self.records(), strict=True)
            ],
        }
