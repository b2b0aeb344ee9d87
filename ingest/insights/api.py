"""The planners' HTTP API: read-only, with the OpenAPI document at `/openapi.json`.

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

A bad filter or option answers 422 `{"field": ..., "detail": ...}`; an unknown report
404; a database that does not answer 503. Suppressed segments are in the rows, marked
`suppressed` with the reason. There is no authentication here: the API is meant to sit
behind the company's single sign-on proxy, like the registry's.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ingest.errors import StoreUnavailable
from ingest.insights.choices import FilterChoices, filter_choices
from ingest.insights.export import MEDIA_TYPES, export
from ingest.insights.filters import FilterError, Filters
from ingest.insights.privacy import Privacy
from ingest.insights.reports import REPORTS, run_report
from ingest.settings import InsightsSettings, PostgresSettings

log = logging.getLogger(__name__)

Values = Annotated[list[str], Query()]


def create_app(
    postgres: PostgresSettings, insights: InsightsSettings, registry_schema: str
) -> FastAPI:
    """The API over `postgres.table`; marketing-usable reports read owners from the
    registry in `registry_schema` (same database)."""
    state: dict[str, asyncpg.Pool] = {}
    privacy = Privacy(insights.k_anonymity, registry_schema)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            state["pool"] = await asyncpg.create_pool(
                postgres.dsn.get_secret_value(), min_size=1, max_size=postgres.pool_size
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        try:
            yield
        finally:
            await state.pop("pool").close()

    app = FastAPI(
        title="usagepipe insights",
        version="1",
        description="Read-only usage reports for product planners; segments with fewer "
        f"than k={insights.k_anonymity} distinct owners are suppressed.",
        lifespan=lifespan,
    )

    @app.exception_handler(FilterError)
    async def bad_filter(request: Request, exc: FilterError) -> JSONResponse:
        return JSONResponse({"field": exc.field, "detail": exc.message}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = files("ingest.insights").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.get("/api/reports", summary="Every report and what it takes")
    async def catalogue() -> list[dict[str, Any]]:
        return [spec.describe() for spec in REPORTS.values()]

    @app.get("/api/reports/{name}", summary="One report, filtered", response_model=None)
    async def report(
        name: str,
        *,
        start: str | None = None,
        end: str | None = None,
        model: Values = [],  # noqa: B006 - FastAPI copies defaults per request
        category: Values = [],  # noqa: B006
        region: Values = [],  # noqa: B006
        firmware: Values = [],  # noqa: B006
        by: str | None = None,
        tz: str | None = None,
        format: Literal["json", "csv", "parquet"] = "json",
    ) -> Response:
        if name not in REPORTS:
            return JSONResponse(
                {"detail": f"no report {name!r}; one of {', '.join(REPORTS)}"}, status_code=404
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
                )
        except (OSError, asyncpg.PostgresError, StoreUnavailable) as exc:
            log.warning("report %s failed: %s", name, exc)
            return JSONResponse({"detail": str(exc)}, status_code=503)
        body = export(result, format)
        headers = {}
        if format != "json":
            headers["Content-Disposition"] = f'attachment; filename="{name}.{format}"'
        return Response(body, media_type=MEDIA_TYPES[format], headers=headers)

    # -- the dashboard's own routes: its assets, and the values its filters offer --------

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            return JSONResponse({"detail": f"no file {name!r}"}, status_code=404)
        text = files("ingest.insights").joinpath(f"static/{name}").read_text("utf-8")
        return Response(text, media_type=media_type)

    @app.get(
        "/api/filters",
        summary="The values each filter can take in a time range",
        response_model=FilterChoices,
        description="Distinct models, categories, regions (ISO 3166-2) and firmware "
        "versions with usage in `[start, end)` (the same range rules and defaults as the "
        "reports), read from the device-daily rollup; no counts and nothing about owners. "
        "Also the UTC days holding any usage at all (`data_start`, `data_end`).",
    )
    async def choices(start: str | None = None, end: str | None = None) -> Response:
        filters = Filters.parse(start=start, end=end, max_days=insights.max_range_days)
        try:
            async with state["pool"].acquire() as conn:
                found = await filter_choices(conn, postgres.table, filters)
        except (OSError, asyncpg.PostgresError, StoreUnavailable) as exc:
            log.warning("filter values failed: %s", exc)
            return JSONResponse({"detail": str(exc)}, status_code=503)
        return Response(found.model_dump_json(), media_type="application/json")

    return app


ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The page's files in `static/`, served by `GET /static/{name}` (no CDN, no build)."""
