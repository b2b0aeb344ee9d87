"""The planners' HTTP API on a real uvicorn server (the web page in a browser:
tests/insights/test_browser.py)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator

import httpx
import pyarrow.parquet as pq
import pytest
import uvicorn

from ingest.insights.api import create_app
from ingest.insights.filters import Filters
from ingest.settings import InsightsSettings
from tests.conftest import free_port
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START
from tests.insights.test_reports import direct, run

RANGE = {"start": "2026-11-02", "end": "2026-11-23"}
K = 3


@pytest.fixture
async def api(seeded: Seeded) -> AsyncIterator[str]:
    """The API over the seeded table, served by uvicorn on a free loopback port."""
    s = seeded.settings
    app = create_app(s.postgres, InsightsSettings(k_anonymity=K), s.registry.db_schema)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve(), name="insights-api")
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_reports_over_http_equal_the_direct_computation(seeded: Seeded, api: str) -> None:
    f = Filters.parse(start=START, end=END, category=["washer"])
    async with httpx.AsyncClient(base_url=api) as client:
        doc = (
            await client.get("/api/reports/errors", params={**RANGE, "category": "washer"})
        ).json()
        expected = await direct(seeded, "errors", f, K)
        got = {
            (r["model"], r["firmware"], r["code"]): (
                "suppressed" if r["suppressed"] else {m: r[m] for m in doc["measures"]}
            )
            for r in doc["rows"]
        }
        assert got == expected
        assert doc["k_anonymity"] == K and doc["source"] == "device-daily rollup"

        catalogue = (await client.get("/api/reports")).json()
        assert [c["name"] for c in catalogue] == [
            "programs", "heatmap", "regions", "cycles", "errors", "adoption", "cohorts",
            "completeness",
        ]  # fmt: skip
        openapi = (await client.get("/openapi.json")).json()
        assert "/api/reports/{name}" in openapi["paths"]
        params = {p["name"] for p in openapi["paths"]["/api/reports/{name}"]["get"]["parameters"]}
        assert {"start", "end", "model", "category", "region", "firmware", "format"} <= params
        # Read-only: nothing but GET.
        for path, item in openapi["paths"].items():
            assert set(item) == {"get"}, path


async def test_exports_over_http_carry_the_same_numbers(seeded: Seeded, api: str) -> None:
    report = await run(seeded, "cohorts", Filters.parse(start=START, end=END), K, by="tier")
    async with httpx.AsyncClient(base_url=api) as client:
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
    async with httpx.AsyncClient(base_url=api) as client:
        bad = await client.get("/api/reports/heatmap", params={"region": "Seoul"})
        assert bad.status_code == 422
        assert bad.json() == {
            "field": "region",
            "detail": "'Seoul' is not an ISO 3166-2 code like KR-11",
        }
        bad = await client.get("/api/reports/cohorts", params={**RANGE, "by": "age"})
        assert (bad.status_code, bad.json()["field"]) == (422, "by")
        bad = await client.get("/api/reports/heatmap", params={**RANGE, "format": "xlsx"})
        assert bad.status_code == 422  # FastAPI's own validation names the parameter
        assert bad.json()["detail"][0]["loc"] == ["query", "format"]
        missing = await client.get("/api/reports/nope")
        assert missing.status_code == 404
        assert "one of programs, heatmap" in missing.json()["detail"]


async def test_a_missing_table_or_registry_answers_503_saying_what_to_do(
    seeded: Seeded,
) -> None:
    s = seeded.settings
    no_table = s.postgres.model_copy(update={"table": s.postgres.table + "_none"})
    cases = [
        (create_app(no_table, InsightsSettings(), s.registry.db_schema), "heatmap"),
        (create_app(s.postgres, InsightsSettings(), s.registry.db_schema + "_none"), "regions"),
    ]
    for app, name in cases:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.get(f"/api/reports/{name}", params=RANGE)
        assert answer.status_code == 503
        assert "does not exist: run `usagepipe db migrate`" in answer.json()["detail"]
