"""`GET /api/filters`: the values the dashboard's filter inputs offer, equal to a direct
query of the raw rows, for whole and partial days, before and after a rollup refresh."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import httpx

from ingest.rollups import refresh_rollups
from ingest.settings import InsightsSettings
from insights.api import create_app
from insights.choices import filter_choices
from insights.filters import Filters
from tests import tokens
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START


async def direct(seeded: Seeded, start: datetime, end: datetime) -> dict[str, list[str]]:
    conn = await asyncpg.connect(seeded.settings.postgres.dsn.get_secret_value())
    try:
        out = {}
        for column in ("model", "category", "region", "firmware"):
            rows = await conn.fetch(
                f"SELECT DISTINCT {column} AS v FROM {seeded.settings.postgres.table}"
                f" WHERE event_time >= $1 AND event_time < $2 AND {column} IS NOT NULL",
                start,
                end,
            )
            out[column] = sorted(r["v"] for r in rows)
        return out
    finally:
        await conn.close()


async def test_the_values_offered_are_those_stored_in_the_range(seeded: Seeded) -> None:
    s = seeded.settings
    table = s.postgres.table
    ranges = [
        (START, END),
        (START + timedelta(days=3, hours=5), START + timedelta(days=4, hours=2)),  # partial days
        (START - timedelta(days=30), START - timedelta(days=2)),  # before any data
    ]
    conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
    try:
        for refreshed in (False, True):
            if refreshed:
                assert await refresh_rollups(conn, table, wait=True) is not None
            for start, end in ranges:
                got = await filter_choices(conn, table, Filters.parse(start=start, end=end))
                expected = await direct(seeded, start, end)
                assert {c: getattr(got, c) for c in expected} == expected, (refreshed, start)
                assert (got.data_start, got.data_end) == (
                    "2026-11-02T00:00:00Z",
                    "2026-11-23T00:00:00Z",
                )
            full = await filter_choices(conn, table, Filters.parse(start=START, end=END))
            assert full.model == ["DR-B", "RV-C", "WM-A", "WM-RARE"]
            assert full.region == ["KR-11", "KR-26", "KR-41"]
            assert full.model_category == {
                "DR-B": "dryer", "RV-C": "robot_vacuum", "WM-A": "washer", "WM-RARE": "washer",
            }  # fmt: skip
            assert full.firmware_by_model == {
                "DR-B": ["1.0"], "RV-C": ["1.0"], "WM-A": ["1.0", "2.1"], "WM-RARE": ["0.9"],
            }  # fmt: skip
    finally:
        await conn.close()


async def test_the_route_is_read_only_documented_and_refuses_a_bad_range(seeded: Seeded) -> None:
    s = seeded.settings
    app = create_app(
        s.postgres, InsightsSettings(), s.registry.db_schema, verifier=tokens.verifier()
    )
    planner = tokens.bearer("Pat Planner", tokens.PLANNER)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=planner
        ) as client:
            answer = await client.get("/api/filters", params={"start": "2026-11-02"})
            assert answer.status_code == 200
            body = answer.json()
            # Filter values and the range only: no counts, nothing about owners.
            assert set(body) == {
                "start", "end", "model", "category", "region", "firmware", "model_category",
                "firmware_by_model", "data_start", "data_end",
            }  # fmt: skip
            assert body["start"] == "2026-11-02T00:00:00Z"
            assert body["category"] == ["dryer", "robot_vacuum", "washer"]
            bad = await client.get(
                "/api/filters", params={"start": "2026-11-09", "end": "2026-11-02"}
            )
            assert bad.status_code == 422
            assert bad.json()["field"] == "start"
            openapi = (await client.get("/openapi.json")).json()
            operation = openapi["paths"]["/api/filters"]["get"]
            schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/FilterChoices"}
            documented = openapi["components"]["schemas"]["FilterChoices"]["properties"]
            assert set(documented) == set(body)
            assert {p["name"] for p in operation["parameters"]} == {"start", "end"}
            script = await client.get("/static/dashboard.js")
            assert script.status_code == 200
            assert script.headers["content-type"] == "text/javascript; charset=utf-8"
            assert (await client.get("/static/../api.py")).status_code == 404
            assert (await client.get("/static/nope.js")).status_code == 404
