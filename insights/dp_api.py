"""The private releases over HTTP: `GET /api/dp/reports/{name}` and `GET /api/dp/budget`.

    GET /api/dp/reports/{name}     a report's differentially private release
                                   (`insights.dp`, `insights.dp_ledger`): the same
                                   filters as `/api/reports/{name}` (`end` by default
                                   today's 00:00 UTC, and never after the current
                                   hour), `format=json|csv`; charged to the caller's
                                   budget when new, replayed free when made before
    GET /api/dp/budget             the caller's privacy budget: total, spent, left

The planner charged is the token's subject. A report without a private release is 404
`unknown_report`; a new release beyond the caller's budget 403
`privacy_budget_exceeded`, its detail naming what is left; a range not yet over 422
`invalid_request` (field `end`).

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import csv
import io
import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.responses import Response
from pydantic import BaseModel

from ingest import auth, httpapi
from ingest.errors import StoreUnavailable
from ingest.postgres import DB_ERRORS
from ingest.settings import InsightsSettings, PostgresSettings
from insights.api import (
    _AUTH_ERRORS,
    Categories,
    End,
    FiltersOut,
    Firmwares,
    InsightsProblem,
    Models,
    Regions,
    Start,
    _State,
)
from insights.dp import DP_REPORTS
from insights.dp_ledger import (
    BudgetExceeded,
    Release,
    budget_of,
    default_end,
    epsilons,
    private_report,
)
from insights.filters import Filters
from insights.privacy import Privacy

log = logging.getLogger(__name__)

BUDGET_EXCEEDED = "privacy_budget_exceeded"

Scalar = str | int | float | bool | None
PrivateName = Annotated[str, Path(json_schema_extra={"enum": list(DP_REPORTS)})]


class BudgetOut(BaseModel):
    """A planner's privacy budget (epsilon): the total, spent on releases, left."""

    planner: str
    total: float
    spent: float
    left: float


class PrivacyOut(BaseModel):
    """How a release was made private: epsilon and delta stated, the unit (owner), the
    bound on each owner, the noisy owner count a segment needs to be shown (never below
    k), each noise's scale, the mechanism, and the composed loss OpenDP's privacy maps
    give (at most the stated epsilon and delta)."""

    epsilon: float
    delta: float
    unit: str
    cells_per_owner: int
    caps: dict[str, int]
    threshold: int
    k_anonymity: int
    noise_scale: dict[str, float]
    mechanism: str
    bound: str
    loss: list[float]


class PrivateReportOut(BaseModel):
    """A private release: noisy numbers only, for the segments whose noisy owner count
    reached the threshold. `replayed`: made before and returned as stored (charged 0);
    `charged_epsilon` and `budget` are this request's."""

    report: str
    title: str
    private: bool
    marketing_usable: bool
    population: str
    filters: FiltersOut
    options: dict[str, str]
    privacy: PrivacyOut
    release_key: str
    released_at: str
    dimensions: list[str]
    measures: list[str]
    rows: list[dict[str, Scalar]]
    replayed: bool
    charged_epsilon: float
    budget: BudgetOut


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PrivateReportOut,
        "description": "The private release as JSON, or its rows as CSV (`format`).",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    },
    **_AUTH_ERRORS,
    **httpapi.documented(InsightsProblem, 404, 422, 503),
}
_ANSWERS[403] = {
    "model": InsightsProblem,
    "description": "The token lacks the planner scope (`insufficient_scope`), or this new "
    f"release would cost more epsilon than the caller has left (`{BUDGET_EXCEEDED}`, the "
    "detail naming what is left).",
}


def private_router(
    postgres: PostgresSettings, insights: InsightsSettings, privacy: Privacy, state: _State
) -> APIRouter:
    """The private releases' routes over `postgres.table`, for planners."""
    router = APIRouter()
    chosen = epsilons(insights.dp_epsilon)  # refuses a setting naming no private report

    @router.get(
        "/api/dp/reports/{name}",
        summary="A report's differentially private release",
        response_model=None,
        responses=_ANSWERS,
    )
    async def private(
        name: PrivateName,
        who: auth.Planner,
        *,
        start: Start = None,
        end: End = None,
        model: Models = [],  # noqa: B006 - FastAPI copies defaults per request
        category: Categories = [],  # noqa: B006
        region: Regions = [],  # noqa: B006
        firmware: Firmwares = [],  # noqa: B006
        format: Literal["json", "csv"] = "json",
    ) -> Response:
        if name not in DP_REPORTS:
            return httpapi.problem(
                404,
                "unknown_report",
                f"no private release of {name[:40]!r}; one of {', '.join(DP_REPORTS)}",
                field="name",
            )
        filters = Filters.parse(
            start=start,
            end=default_end() if end is None else end,
            model=model,
            category=category,
            region=region,
            firmware=firmware,
            max_days=insights.max_range_days,
        )
        try:
            async with state["pool"].acquire() as conn:
                release = await private_report(
                    conn,
                    name,
                    filters,
                    table=postgres.table,
                    privacy=privacy,
                    planner=who.subject,
                    budget=insights.dp_budget,
                    epsilon=chosen[name],
                    delta=insights.dp_delta,
                )
        except BudgetExceeded as exc:
            return httpapi.problem(403, BUDGET_EXCEEDED, str(exc))
        except (*DB_ERRORS, StoreUnavailable) as exc:
            log.warning("private release %s failed: %s", name, exc)
            return httpapi.unavailable(str(exc))
        if format == "csv":
            return Response(
                release_csv(release),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{name}-dp.csv"'},
            )
        return Response(json.dumps(release.describe()), media_type="application/json")

    @router.get(
        "/api/dp/budget",
        summary="The caller's privacy budget",
        response_model=BudgetOut,
        responses={**_AUTH_ERRORS, **httpapi.documented(InsightsProblem, 503)},
    )
    async def budget(who: auth.Planner) -> Response:
        try:
            async with state["pool"].acquire() as conn:
                found = await budget_of(conn, postgres.table, who.subject, insights.dp_budget)
        except (*DB_ERRORS, StoreUnavailable) as exc:
            return httpapi.unavailable(str(exc))
        return Response(json.dumps(found.describe()), media_type="application/json")

    return router


def release_csv(release: Release) -> bytes:
    """A release's rows as RFC 4180 CSV (dimensions, then the noisy measures)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=release.columns, lineterminator="\r\n")
    writer.writeheader()
    for row in release.body["rows"]:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in release.columns})
    return out.getvalue().encode()
