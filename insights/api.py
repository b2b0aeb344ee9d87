"""The planners' HTTP API: read-only but for the private releases' ledger
(`insights.dp_ledger`), with the OpenAPI document at `/openapi.json`.

    GET /                          the web page (static/index.html): the main views drawn
                                   in the browser from the JSON below; no CDN, no build
    GET /api/filters               the values each filter can take in a time range
                                   (`start`, `end`): models, categories, regions,
                                   firmware, and the days holding any usage
    GET /static/{name}             the page's script and style sheet
    GET /api/reports               every report: dimensions, measures, source, options
    GET /api/reports/{name}        one report; filters `start`, `end` (ISO date or time
                                   with zone, whole UTC hours), `model`, `category`,
                                   `region`, `firmware` (repeat a parameter for several
                                   values); options `by` (cohorts), `tz` (heatmap);
                                   `format=json|csv|parquet`

    GET /api/dp/reports/{name}     a report's differentially private release, and
    GET /api/dp/budget             the caller's privacy budget (`insights.dp_api`)

    GET /health                    200 while the process serves (liveness)
    GET /ready                     200 while PostgreSQL answers and the usage table exists
    GET /metrics                   Prometheus text: requests and latency by route

Every error is the `Problem` document of `ingest.httpapi`,
`{"reason": ..., "detail": ..., "field": ...}`: a bad filter or option 422
`invalid_request` naming the `field`; an unknown report 404 `unknown_report`; a
database that does not answer, or lacks a table, 503 `unavailable` (with `Retry-After`).
Suppressed segments are in the rows, marked `suppressed` with the reason.

Every `/api/...` route needs `Authorization: Bearer <token>` (`ingest.auth`) with the
scope `auth.planner_scope`: no or an invalid token is 401 `unauthenticated`, one
without the scope 403 `insufficient_scope`. `/health`, `/ready`, `/metrics`,
`/openapi.json`, the page and its assets stay open (they hold no usage data); the page
takes its token from its URL's fragment (`#token=...`, which `usagepipe insights serve`
prints with the dev signer). `/docs` and `/redoc` are served only where `auth.docs` turns them on.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from ingest import auth, httpapi
from ingest.errors import StoreUnavailable
from ingest.metrics import HttpMetrics
from ingest.postgres import DB_ERRORS
from ingest.settings import InsightsSettings, PostgresSettings
from insights.choices import FilterChoices, filter_choices
from insights.export import MEDIA_TYPES, export
from insights.filters import (
    CATEGORIES,
    INSTANT_PATTERN,
    REGION_PATTERN,
    TEXT_PATTERN,
    FilterError,
    Filters,
)
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.runner import run_report
from insights.specs import Report

log = logging.getLogger(__name__)


class InsightsProblem(httpapi.Problem):
    """A refused or failed request: the reason code, a human-readable detail, and the
    parameter at fault."""

    reason: Annotated[
        str,
        Field(
            json_schema_extra=httpapi.reason_enum(
                ["unknown_report", "privacy_budget_exceeded", *auth.AUTH_REASONS]
            )
        ),
    ]


Scalar = str | int | float | bool | None


class FiltersOut(BaseModel):
    """The filters in effect, defaults filled in (UTC, whole hours, `end` excluded)."""

    start: str
    end: str
    model: list[str]
    category: list[str]
    region: list[str]
    firmware: list[str]


class ChartOut(BaseModel):
    """How the report is drawn: `kind` (bar, line, heatmap, ...), the measure `value`,
    and which dimensions make the labels, the axes and the series."""

    kind: str
    value: str
    label: list[str]
    x: str | None
    y: str | None
    series: str | None


class OptionOut(BaseModel):
    help: str
    choices: list[str]
    default: str | None


class ReportInfo(BaseModel):
    """What a report is and what it takes (`measures`: name -> int or float)."""

    name: str
    title: str
    description: str
    dimensions: list[str]
    measures: dict[str, str]
    source: str
    marketing_usable: bool
    purposes: list[str]
    """The owners' purposes it relies on (the registry's catalogue, `GET /purposes`)."""
    chart: ChartOut
    options: dict[str, OptionOut]


Members = list[dict[str, Scalar]]
"""A merged row's fine segments, each a dict of its dimensions."""


class ReportOut(BaseModel):
    """A report's answer: its filters and privacy rule, and one flat row per segment or
    merged group of small segments (dimensions, measures, `suppressed`,
    `suppressed_reason`, `generalised`, and `members`: null for a fine segment, the fine
    segments merged otherwise; measures null where suppressed)."""

    report: str
    title: str
    source: str
    marketing_usable: bool
    purposes: list[str]
    population: str
    filters: FiltersOut
    options: dict[str, str]
    k_anonymity: int
    suppressed_segments: int
    generalised_segments: int
    dimensions: list[str]
    measures: list[str]
    chart: ChartOut
    rows: list[dict[str, Scalar | Members]]


def _values(pattern: str | None = None, enum: tuple[str, ...] = (), what: str = "") -> Any:
    """A repeatable filter parameter, documented with the rule `Filters.parse` applies."""
    item: dict[str, Any] = {"type": "string"}
    if pattern:
        item["pattern"] = pattern
    if enum:
        item["enum"] = list(enum)
    return Query(
        description=f"only these {what}; repeat for several (none: all)",
        json_schema_extra={"items": item},
    )


def _instant(which: str) -> Any:
    return Query(
        description=f"{which}: an ISO date (00:00 UTC) or a time with zone, a whole UTC hour",
        json_schema_extra={"pattern": INSTANT_PATTERN, "examples": ["2026-11-01"]},
    )


_AUTH_ERRORS = auth.documented(InsightsProblem, scoped=True)
_REPORT_ERRORS = {**_AUTH_ERRORS, **httpapi.documented(InsightsProblem, 404, 422, 503)}
_BY = tuple(
    dict.fromkeys(
        choice
        for spec in REPORTS.values()
        if "by" in spec.options
        for choice in spec.options["by"].choices
    )
)
_TZ_PATTERN = r"^[A-Za-z0-9_+/-]{1,64}$"
"""What IANA time zone names are made of (`Asia/Seoul`, `Etc/GMT-9`)."""
ReportName = Annotated[str, Path(json_schema_extra={"enum": list(REPORTS)})]
Start = Annotated[str | None, _instant("start (default: end - 28 days)")]
End = Annotated[str | None, _instant("end, excluded (default: the next hour)")]
Models = Annotated[list[str], _values(TEXT_PATTERN, what="model numbers")]
Categories = Annotated[list[str], _values(enum=CATEGORIES, what="categories")]
Regions = Annotated[list[str], _values(REGION_PATTERN, what="regions (ISO 3166-2)")]
Firmwares = Annotated[list[str], _values(TEXT_PATTERN, what="firmware versions")]
By = Annotated[
    str | None,
    Query(description="cohorts: group by", max_length=64, json_schema_extra={"enum": list(_BY)}),
]
Tz = Annotated[
    str | None,
    Query(
        description="heatmap: IANA time zone of the hours (default: insights.timezone)",
        max_length=64,
        json_schema_extra={"pattern": _TZ_PATTERN},
    ),
]
_EXPORTS = {
    "text/csv": {"schema": {"type": "string"}},
    "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
}
_REPORT_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ReportOut,
        "description": "The report as JSON, or as a CSV or Parquet download "
        "(`format`), each with the same flat rows.",
        "content": _EXPORTS,
    },
    **_REPORT_ERRORS,
}
ExportFormat = Literal["json", "csv", "parquet"]
"""`format`: the order is the OpenAPI enum's, JSON first as the default."""
_State = dict[str, asyncpg.Pool]
"""The app's PostgreSQL pool under `"pool"`, there while the app runs (its lifespan)."""


def create_app(
    postgres: PostgresSettings,
    insights: InsightsSettings,
    registry_schema: str,
    *,
    verifier: auth.Verifier,
    docs: bool = False,
    metrics_registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The API over `postgres.table`, for planners whose tokens `verifier` accepts
    (`/docs` too where `docs`); marketing-usable reports read owners from the registry
    in `registry_schema` (same database). Request metrics go to `metrics_registry` (a
    fresh one when not given)."""
    state: _State = {}
    privacy = Privacy(insights.k_anonymity, registry_schema)
    app = FastAPI(
        title="usagepipe insights",
        version="1",
        description="Read-only usage reports for product planners; segments with fewer "
        f"than k={insights.k_anonymity} distinct owners are merged along their report's "
        "hierarchy until a group reaches k, else suppressed: no row shows fewer.",
        lifespan=_lifespan(postgres, state),
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    metrics = metrics_registry if metrics_registry is not None else CollectorRegistry()
    httpapi.install(
        app,
        metrics=HttpMetrics(metrics, "insights"),
        registry=metrics,
        model=InsightsProblem,
        ready=_ready_checks(postgres, state),
        ready_doc="200 while PostgreSQL answers within 2 s and the usage table exists; 503 "
        "naming `postgresql` or `usage_table` otherwise (the registry schema, read by "
        "marketing-usable reports only, is not checked).",
    )

    auth.install(app, verifier)

    @app.exception_handler(FilterError)
    async def bad_filter(request: Request, exc: FilterError) -> JSONResponse:
        return httpapi.problem(422, "invalid_request", exc.message, field=exc.field)

    app.include_router(_catalogue())
    app.include_router(_report(postgres, insights, privacy, state))
    app.include_router(_dashboard(postgres, insights, state))
    # Imported here: the private releases' routes take this module's parameter types.
    from insights.dp_api import private_router

    app.include_router(private_router(postgres, insights, privacy, state))
    return app


def _lifespan(
    postgres: PostgresSettings, state: _State
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Open the pool in `state` for the app's lifetime; a database that does not answer
    stops the start with `StoreUnavailable`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            state["pool"] = await asyncpg.create_pool(
                postgres.dsn.get_secret_value(), min_size=1, max_size=postgres.pool_size
            )
        except DB_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        try:
            yield
        finally:
            await state.pop("pool").close()

    return lifespan


def _ready_checks(postgres: PostgresSettings, state: _State) -> dict[str, httpapi.ReadyCheck]:
    """`GET /ready`'s checks: PostgreSQL answers, and the usage table exists."""

    async def postgresql() -> None:
        async with state["pool"].acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def usage_table() -> None:
        async with state["pool"].acquire() as conn:
            found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", postgres.table)
        if not found:
            raise StoreUnavailable(
                f"the usage table {postgres.table} does not exist: run `usagepipe db migrate`"
            )

    return {"postgresql": postgresql, "usage_table": usage_table}


def _catalogue() -> APIRouter:
    """`GET /api/reports`: every report and what it takes."""
    router = APIRouter(dependencies=[Depends(auth.planner)])

    @router.get(
        "/api/reports",
        summary="Every report and what it takes",
        response_model=None,
        responses={200: {"model": list[ReportInfo]}, **_AUTH_ERRORS},
    )
    async def catalogue() -> list[dict[str, Any]]:
        return [spec.describe() for spec in REPORTS.values()]

    return router


def _report(
    postgres: PostgresSettings, insights: InsightsSettings, privacy: Privacy, state: _State
) -> APIRouter:
    """`GET /api/reports/{name}`: one report, filtered, as JSON, CSV or Parquet."""
    router = APIRouter(dependencies=[Depends(auth.planner)])

    @router.get(
        "/api/reports/{name}",
        summary="One report, filtered",
        response_model=None,
        responses=_REPORT_ANSWERS,
    )
    async def report(
        name: ReportName,
        *,
        start: Start = None,
        end: End = None,
        model: Models = [],  # noqa: B006 - FastAPI copies defaults per request
        category: Categories = [],  # noqa: B006
        region: Regions = [],  # noqa: B006
        firmware: Firmwares = [],  # noqa: B006
        by: By = None,
        tz: Tz = None,
        format: ExportFormat = "json",
    ) -> Response:
        if name not in REPORTS:
            return httpapi.problem(
                404,
                "unknown_report",
                f"no report {name[:40]!r}; one of {', '.join(REPORTS)}",
                field="name",
            )
        filters = Filters.parse(
            start=start,
            end=end,
            model=model,
            category=category,
            region=region,
            firmware=firmware,
            max_days=insights.max_range_days,
        )
        try:
            async with state["pool"].acquire() as conn:
                result = await run_report(
                    conn,
                    name,
                    filters,
                    table=postgres.table,
                    privacy=privacy,
                    options={"by": by, "tz": tz},
                    timezone=insights.timezone,
                    work_mem_mb=insights.report_work_mem_mb,
                )
        except (*DB_ERRORS, StoreUnavailable) as exc:
            log.warning("report %s failed: %s", name, exc)
            return httpapi.unavailable(str(exc))
        return _answer(result, name, format)

    return router


def _answer(result: Report, name: str, format: ExportFormat) -> Response:
    """`result` as JSON, or as a CSV or Parquet download named after report `name`."""
    headers = {}
    if format != "json":
        headers["Content-Disposition"] = f'attachment; filename="{name}.{format}"'
    return Response(export(result, format), media_type=MEDIA_TYPES[format], headers=headers)


def _dashboard(postgres: PostgresSettings, insights: InsightsSettings, state: _State) -> APIRouter:
    """The dashboard's own routes, none in the OpenAPI document but `/api/filters`: the
    page, its assets, and the values its filters offer."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = files("insights").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @router.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            return httpapi.problem(404, "not_found", f"no file {name[:40]!r}", field="name")
        text = files("insights").joinpath(f"static/{name}").read_text("utf-8")
        return Response(text, media_type=media_type)

    @router.get(
        "/api/filters",
        summary="The values each filter can take in a time range",
        response_model=FilterChoices,
        responses={**_AUTH_ERRORS, **httpapi.documented(InsightsProblem, 422, 503)},
        dependencies=[Depends(auth.planner)],
        description="Distinct models, categories, regions (ISO 3166-2) and firmware "
        "versions with usage in `[start, end)` (the same range rules and defaults as the "
        "reports), read from the device-daily rollup; no counts and nothing about owners. "
        "Also the UTC days holding any usage at all (`data_start`, `data_end`).",
    )
    async def choices(start: Start = None, end: End = None) -> Response:
        filters = Filters.parse(start=start, end=end, max_days=insights.max_range_days)
        try:
            async with state["pool"].acquire() as conn:
                found = await filter_choices(conn, postgres.table, filters)
        except (*DB_ERRORS, StoreUnavailable) as exc:
            log.warning("filter values failed: %s", exc)
            return httpapi.unavailable(str(exc))
        return Response(found.model_dump_json(), media_type="application/json")

    return router


ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The page's files in `static/`, served by `GET /static/{name}` (no CDN, no build)."""
