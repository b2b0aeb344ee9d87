"""The planners' dashboard in Debian's Chromium, driven by Playwright.

Playwright's Python package drives the system browser (`/usr/bin/chromium`, which
deploy/local/env.sh installs) through `executable_path`; it never downloads a browser
of its own. The page is served by the real app on a real port over a seeded table;
the test checks what the browser drew against what the API answers for the same
filters: every chart drew exactly the report's unsuppressed rows (one element of class
"point" each), the range shown is the range answered, the table holds every row, and
after a filter is changed in the form the charts redraw for the new range. A
screenshot of each state is kept in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright

from ingest.insights.api import create_app
from ingest.insights.reports import REPORTS
from ingest.settings import InsightsSettings
from tests.conftest import free_port
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START

ARTIFACTS = Path(
    os.environ.get("USAGEPIPE_TEST_ARTIFACTS", Path(__file__).parents[1] / "artifacts")
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
K = 3
# A sandbox-less, offline, reproducible browser (root in CI, no GPU, no network).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # CI must have it: deploy/local/env.sh
    reason="chromium is not installed (deploy/local/env.sh installs it)",
)


@contextlib.asynccontextmanager
async def served(seeded: Seeded, k: int = K) -> AsyncIterator[str]:
    """The insights app over the seeded table, on a free loopback port."""
    s = seeded.settings
    app = create_app(s.postgres, InsightsSettings(k_anonymity=k), s.registry.db_schema)
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


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def ready(page: Page, query: str) -> None:
    """Wait until the page has drawn every report for `query` (its filters)."""
    await page.wait_for_function(
        "q => document.body.dataset.state === 'ready' && document.body.dataset.query === q",
        arg=query,
        timeout=30_000,
    )


async def drawn(page: Page) -> dict[str, dict[str, Any]]:
    """What the page shows per report: its section's data attributes, the chart's
    points, the table's rows and the download links."""
    found: dict[str, dict[str, Any]] = await page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('section.card')].map(s => [
            s.dataset.report, {
                ...s.dataset,
                points: s.querySelectorAll('.plot svg .point').length,
                table_rows: s.querySelectorAll('.table-wrap tbody tr').length,
                suppressed_rows: s.querySelectorAll('.table-wrap tbody tr.suppressed').length,
                notes: s.querySelector('.notes').innerText,
                csv: s.querySelector('.downloads a.csv').href,
                parquet: s.querySelector('.downloads a.parquet').href,
            }]))"""
    )
    return found


async def answers(api: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every report as the API answers it for `params`."""
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        out = {}
        for name in REPORTS:
            response = await client.get(f"/api/reports/{name}", params=params)
            assert response.status_code == 200, response.text
            out[name] = response.json()
        return out


def check_drawn(shown: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> int:
    """Each chart drew exactly its report's unsuppressed rows, for the range the API
    answered; the table lists every row. Returns how many charts drew anything."""
    assert set(shown) == set(expected)
    with_points = 0
    for name, report in expected.items():
        page = shown[name]
        rows = report["rows"]
        unsuppressed = sum(1 for r in rows if not r["suppressed"])
        assert "error" not in page, (name, page.get("error"))
        assert int(page["rendered"]) == page["points"] == unsuppressed, name
        assert (page["start"], page["end"]) == (
            report["filters"]["start"],
            report["filters"]["end"],
        ), name
        assert page["table_rows"] == len(rows), name
        assert page["suppressed_rows"] == int(page["suppressed"]) == len(rows) - unsuppressed
        state = "drawn" if unsuppressed else "suppressed" if rows else "empty"
        assert page["state"] == state, name
        if state != "drawn":
            assert page["notes"], f"{name}: a view with nothing drawn says why"
        with_points += unsuppressed > 0
    return with_points


def iso_date(t: datetime) -> str:
    return t.date().isoformat()


async def test_every_chart_draws_its_unsuppressed_rows_and_redraws_for_new_filters(
    seeded: Seeded, browser: Browser
) -> None:
    first = {"start": iso_date(START), "end": iso_date(END)}
    async with served(seeded) as api:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{api}/?{urlencode(first)}")
        await ready(page, urlencode(first))
        shown = await drawn(page)
        assert check_drawn(shown, await answers(api, first)) == len(REPORTS)
        scope = page.locator("#scope b.range")
        assert await scope.get_attribute("data-start") == "2026-11-02T00:00:00Z"
        assert await scope.get_attribute("data-end") == "2026-11-23T00:00:00Z"
        assert await scope.inner_text() == "2026-11-02 to 2026-11-22"
        for name in REPORTS:  # the downloads carry the filters in effect
            for fmt in ("csv", "parquet"):
                assert (
                    shown[name][fmt] == f"{api}/api/reports/{name}?{urlencode(first)}&format={fmt}"
                )
        await screenshot(page, "dashboard_full_range.png")

        # Planners narrow the view in the form: the second week only, washers only.
        second = {
            "start": iso_date(START + timedelta(days=7)),
            "end": iso_date(START + timedelta(days=14)),
            "category": "washer",
        }
        await page.fill("input[name=from]", second["start"])
        await page.fill("input[name=through]", iso_date(START + timedelta(days=13)))
        await page.click("details[data-name=category] summary")
        await page.check("details[data-name=category] input[value=washer]")
        await page.click("button.apply")
        await ready(page, urlencode(second))
        assert page.url == f"{api}/?{urlencode(second)}"
        shown = await drawn(page)
        expected = await answers(api, second)
        assert check_drawn(shown, expected) >= 4
        assert await scope.get_attribute("data-start") == "2026-11-09T00:00:00Z"
        assert await scope.get_attribute("data-end") == "2026-11-16T00:00:00Z"
        assert "category: washer" in await page.locator("#scope").inner_text()
        # Washers only: no dryer or vacuum left in any chart's rows.
        assert {r["model"] for r in expected["programs"]["rows"]} == {"WM-A", "WM-RARE"}
        await screenshot(page, "dashboard_washers_second_week.png")
        assert errors == []


async def screenshot(page: Page, name: str) -> None:
    shot = ARTIFACTS / name
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
