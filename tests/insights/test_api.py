"""The planners' HTTP API on a real uvicorn server (the web page in a browser:
tests/insights/test_browser.py)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.auth import AUTH_REASONS
from ingest.httpapi import GENERIC_REASONS
from ingest.settings import InsightsSettings
from insights.api import InsightsProblem, ReportInfo, ReportOut, create_app
from insights.filters import CATEGORIES, Filters
from insights.reports import REPORTS
from tests import tokens
from tests.http_contract import schemathesis_run, served
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START
from tests.insights.test_reports import SMALL, direct, run

RANGE = {"start": "2026-11-02", "end": "2026-11-23"}
K = 3
VERIFIER = tokens.verifier()
PLANNER = tokens.bearer("Pat Planner", tokens.PLANNER)
"""A planner's sign-in: every `/api/...` route needs the planner scope."""


@pytest.fixture
async def api(seeded: Seeded) -> AsyncIterator[str]:
    """The API over the seeded table, served by uvicorn on a free loopback port."""
    s = seeded.settings
    app = create_app(
        s.postgres,
        InsightsSettings(k_anonymity=K),
        s.registry.db_schema,
        verifier=tokens.verifier(),
    )
    async with served(app) as url:
        yield url


async def test_reports_over_http_equal_the_direct_computation(seeded: Seeded, api: str) -> None:
    f = Filters.parse(start=START, end=END, category=["washer"])
    async with httpx.AsyncClient(base_url=api, headers=PLANNER) as client:
        doc = (
            await client.get("/api/reports/errors", params={**RANGE, "category": "washer"})
        ).json()
        expected = await direct(seeded, "errors", f, K)
        got = {}
        for r in doc["rows"]:  # merged rows: their members are below k (test_generalise.py)
            for m in r["members"] or [r]:
                key = (m["model"], m["firmware"], m["code"])
                shown = not r["suppressed"] and not r["members"]
                got[key] = {m: r[m] for m in doc["measures"]} if shown else SMALL
        assert got == expected
        assert doc["k_anonymity"] == K and doc["source"] == "device-daily rollup"

        catalogue = (await client.get("/api/reports")).json()
        assert [c["name"] for c in catalogue] == [
            "programs", "heatmap", "regions", "cycles", "errors", "adoption", "cohorts",
            "completeness",
        ]  # fmt: skip
        # The 200s have the documented shapes (extra keys would be allowed).
        for info in catalogue:
            ReportInfo.model_validate(info)
        for name in REPORTS:
            answer = await client.get(f"/api/reports/{name}", params=RANGE)
            assert answer.status_code == 200, answer.text
            ReportOut.model_validate(answer.json())

        openapi = (await client.get("/openapi.json")).json()
        assert {"/api/reports", "/api/reports/{name}", "/health", "/ready", "/metrics"} <= set(
            openapi["paths"]
        )
        operation = openapi["paths"]["/api/reports/{name}"]["get"]
        params = {p["name"]: p for p in operation["parameters"]}
        assert {"start", "end", "model", "category", "region", "firmware", "format"} <= set(params)
        assert params["name"]["schema"]["enum"] == list(REPORTS)
        assert params["category"]["schema"]["items"]["enum"] == list(CATEGORIES)
        answers = operation["responses"]
        assert set(answers) == {"200", "401", "403", "404", "422", "503"}
        assert set(answers["200"]["content"]) == {
            "application/json",
            "text/csv",
            "application/vnd.apache.parquet",
        }
        assert answers["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ReportOut"
        }
        problem = {"$ref": "#/components/schemas/InsightsProblem"}
        for code in ("401", "403", "404", "422", "503"):
            assert answers[code]["content"]["application/json"]["schema"] == problem, code
        schemas = openapi["components"]["schemas"]
        assert "HTTPValidationError" not in schemas
        reasons = schemas["InsightsProblem"]["properties"]["reason"]["enum"]
        assert set(reasons) == {
            "unknown_report", "privacy_budget_exceeded", *GENERIC_REASONS, *AUTH_REASONS
        }  # fmt: skip
        # Read-only: nothing but GET.
        for path, item in openapi["paths"].items():
            assert set(item) == {"get"}, path


async def test_exports_over_http_carry_the_same_numbers(seeded: Seeded, api: str) -> None:
    report = await run(seeded, "cohorts", Filters.parse(start=START, end=END), K, by="tier")
    async with httpx.AsyncClient(base_url=api, headers=PLANNER) as client:
        params = {**RANGE, "by": "tier"}
        as_csv = await client.get("/api/reports/cohorts", params={**params, "format": "csv"})
        as_parquet = await client.get(
            "/api/reports/cohorts", params={**params, "format": "parquet"}
        )
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert as_csv.headers["content-disposition"] == 'attachment; filename="cohorts.csv"'
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    records = report.records()
    assert len(rows) == len(records) > 0
    for got, want in zip(rows, records, strict=True):
        assert got == {k: "" if v is None else str(v) for k, v in want.items()}
    table = pq.read_table(io.BytesIO(as_parquet.content))
    assert table.to_pylist() == records
    assert str(table.schema.field("devices").type) == "int64"
    assert table.schema.metadata[b"usagepipe.k_anonymity"] == b"3"


async def test_bad_requests_say_what_is_wrong(api: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers=PLANNER) as client:
        bad = await client.get("/api/reports/heatmap", params={"region": "Seoul"})
        assert bad.status_code == 422
        assert bad.json() == {
            "reason": "invalid_request",
            "detail": "'Seoul' is not an ISO 3166-2 code like KR-11",
            "field": "region",
        }
        bad = await client.get("/api/reports/programs", params={"end": "0001-01-01"})
        assert bad.status_code == 422  # was a 500 (OverflowError)
        assert bad.json() == {
            "reason": "invalid_request",
            "detail": "0001-01-01T00:00:00Z leaves no room for the default 28 days before it; "
            "give start",
            "field": "end",
        }
        missing = await client.get("/api/reports/nope")
        assert missing.status_code == 404
        assert missing.json()["reason"] == "unknown_report"
        assert "one of programs, heatmap" in missing.json()["detail"]
        # Every kind of bad input is a 4xx InsightsProblem naming the parameter, never a 500.
        cases: list[tuple[str, dict[str, str] | str, int, str]] = [
            ("programs", {"end": "0001-01-01T00:00:00+14:00"}, 422, "end"),
            ("programs", {"start": "9999-12-31T23:00:00-14:00"}, 422, "start"),
            ("programs", {"start": "2026-11-01\x00"}, 422, "start"),
            ("programs", {"start": "2026-11-01\n"}, 422, "start"),
            ("programs", "start=%ED%A0%80", 422, "start"),  # a lone surrogate, as UTF-8 bytes
            ("programs", "start=%FF", 422, "start"),  # not UTF-8
            ("programs", {"start": "9" * 5000}, 422, "start"),
            ("programs", {"start": "2026-11-01T09:00"}, 422, "start"),
            ("programs", {"model": "WM\x00"}, 422, "model"),
            ("programs", {"model": "WM-100\n"}, 422, "model"),
            ("programs", {"firmware": "é"}, 422, "firmware"),
            ("programs", {"region": "KR-11\n"}, 422, "region"),
            ("programs", {"category": "toaster"}, 422, "category"),
            ("heatmap", {**RANGE, "tz": "\x00"}, 422, "tz"),
            ("heatmap", {**RANGE, "tz": "a" * 300}, 422, "tz"),  # was a 503 (OSError)
            ("heatmap", {**RANGE, "tz": "Mars/Olympus"}, 422, "tz"),
            ("cohorts", {**RANGE, "by": "age"}, 422, "by"),
            ("programs", {**RANGE, "by": "tier"}, 422, "by"),
            ("heatmap", {**RANGE, "format": "xlsx"}, 422, "format"),  # FastAPI's own check
            ("x" * 20000, {}, 404, "name"),
        ]
        for name, params, code, field in cases:
            if isinstance(params, str):  # a raw query string: bytes httpx would not send
                bad = await client.get(f"/api/reports/{name}?{params}")
            else:
                bad = await client.get(f"/api/reports/{name}", params=params)
            assert bad.status_code == code, (name, params, bad.text)
            problem = InsightsProblem.model_validate(bad.json())
            assert problem.field == field, (name, params, bad.text)
            assert len(problem.detail) < 400
        wrong = await client.post("/api/reports/programs")
        assert (wrong.status_code, wrong.json()["reason"]) == (405, "method_not_allowed")
        assert wrong.headers["allow"] == "GET"
        nowhere = await client.get("/api/nowhere")
        assert (nowhere.status_code, nowhere.json()["reason"]) == (404, "not_found")


async def test_health_and_metrics(seeded: Seeded, api: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers=PLANNER) as client:
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "alive"})
        ready = await client.get("/ready")
        assert (ready.status_code, ready.json()) == (
            200,
            {
                "status": "ready",
                "not_ready": [],
                "checks": {"postgresql": "ok", "usage_table": "ok"},
            },
        )
        await client.get("/api/reports/errors", params=RANGE)
        await client.get("/api/reports/errors", params={"region": "Seoul"})
        await client.get("/api/reports/cohorts", params={**RANGE, "format": "csv"})
        await client.get("/api/reports/nope")
        metrics = await client.get("/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    counts = {
        (s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics.text)
        if family.name == "usagepipe_http_requests"
        for s in family.samples
        if s.name == "usagepipe_http_requests_total" and s.labels["api"] == "insights"
    }
    assert counts == {
        ("/health", "200"): 1,
        ("/ready", "200"): 1,
        ("/api/reports/{name}", "200"): 2,
        ("/api/reports/{name}", "422"): 1,
        ("/api/reports/{name}", "404"): 1,
    }
    assert "/api/reports/errors" not in metrics.text  # route templates, never raw paths

    s = seeded.settings
    no_table = s.postgres.model_copy(update={"table": s.postgres.table + "_none"})
    app = create_app(no_table, InsightsSettings(), s.registry.db_schema, verifier=VERIFIER)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=PLANNER
        ) as client:
            ready = await client.get("/ready")
    assert (ready.status_code, ready.headers["retry-after"]) == (503, "5")
    assert ready.json() == {
        "status": "not_ready",
        "not_ready": ["usage_table"],
        "checks": {
            "postgresql": "ok",
            "usage_table": f"the usage table {no_table.table} does not exist: run "
            "`usagepipe db migrate`",
        },
    }


async def test_schemathesis_finds_nothing(api: str) -> None:
    status, generated, output = await schemathesis_run(
        api, "--header", f"Authorization: {PLANNER['Authorization']}"
    )
    assert status == 0, output[-6000:]
    assert generated > 500, output[-2000:]
    print(f"schemathesis: {generated} cases, no failure")


async def test_a_missing_table_or_registry_answers_503_saying_what_to_do(
    seeded: Seeded,
) -> None:
    s = seeded.settings
    no_table = s.postgres.model_copy(update={"table": s.postgres.table + "_none"})
    cases = [
        (
            create_app(no_table, InsightsSettings(), s.registry.db_schema, verifier=VERIFIER),
            "heatmap",
        ),
        (
            create_app(
                s.postgres, InsightsSettings(), s.registry.db_schema + "_none", verifier=VERIFIER
            ),
            "regions",
        ),
    ]
    for app, name in cases:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", headers=PLANNER
            ) as client:
                answer = await client.get(f"/api/reports/{name}", params=RANGE)
        assert (answer.status_code, answer.headers["retry-after"]) == (503, "5")
        assert answer.json()["reason"] == "unavailable"
        assert "does not exist: run `usagepipe db migrate`" in answer.json()["detail"]


async def test_the_api_needs_a_planners_token(seeded: Seeded, api: str) -> None:
    """Every `/api/...` route: 401 without a token or with a refused one, 403 with a valid
    token lacking the planner scope (an owner's, an operator's); the page, its assets,
    `/health`, `/metrics` and `/openapi.json` hold no usage data and stay open."""
    data_routes = ["/api/reports", "/api/reports/programs", "/api/filters"]
    expired = tokens.bearer(
        "Pat Planner", tokens.PLANNER, now=datetime.now(UTC) - timedelta(hours=13)
    )
    refusals = [
        ({}, 401, "unauthenticated", "sign in: send Authorization: Bearer <token>"),
        ({"Authorization": "Bearer not-a-jwt"}, 401, "unauthenticated", None),
        (expired, 401, "unauthenticated", "the token has expired; sign in again"),
        (tokens.bearer("Ada Owner"), 403, "insufficient_scope", None),
        (tokens.bearer("Sam Support", tokens.OPERATOR), 403, "insufficient_scope", None),
    ]
    async with httpx.AsyncClient(base_url=api) as client:
        for route in data_routes:
            for headers, status, reason, detail in refusals:
                answer = await client.get(route, params=RANGE, headers=headers)
                assert (answer.status_code, answer.json()["reason"]) == (status, reason), route
                if detail is not None:
                    assert answer.json()["detail"] == detail
                challenge = answer.headers["www-authenticate"]
                assert challenge.startswith('Bearer realm="usagepipe"'), route
                if status == 403:
                    assert answer.json()["detail"] == "this needs the scope 'usagepipe:planner'"
                    assert 'scope="usagepipe:planner"' in challenge
            answer = await client.get(route, params=RANGE, headers=PLANNER)
            assert answer.status_code == 200, route
        for route in [
            "/",
            "/static/dashboard.js",
            "/health",
            "/ready",
            "/metrics",
            "/openapi.json",
        ]:
            assert (await client.get(route)).status_code == 200, route
        assert (await client.get("/docs")).status_code == 404  # off unless auth.docs
        openapi = (await client.get("/openapi.json")).json()
        assert openapi["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path, item in openapi["paths"].items():
            secured = item["get"].get("security") == [{"bearer": []}]
            assert secured == path.startswith("/api/"), path

    s = seeded.settings
    app = create_app(
        s.postgres, InsightsSettings(), s.registry.db_schema, verifier=VERIFIER, docs=True
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/docs")).status_code == 200
            assert (await client.get("/redoc")).status_code == 200
