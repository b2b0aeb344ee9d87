"""The planners' dashboard in Debian's Chromium, driven by Playwright.

Playwright's Python package drives the system browser (`/usr/bin/chromium`, which
deploy/local/env.sh installs) through `executable_path`; it never downloads a browser
of its own. The page is served by the real app on a real port over data the simulator
sent through the whole pipeline (a provisioned fleet playing four weeks of household
usage over MQTT, through the bridge, Kafka and the consumer's validate, enrich and
store), or over `tests.insights.seed`'s small population. The test checks what the
browser drew against what the API answers for the same filters: every chart drew
exactly the report's unsuppressed rows (one element of class "point" each), for the
range the API answered, the table holds every row, the downloads carry the filters;
and after a filter is changed in the form, the charts redraw for the new range. A
screenshot of each state is kept in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from ingest.settings import InsightsSettings, Settings
from insights.api import create_app
from insights.reports import REPORTS
from simulators.plan import FleetPlan
from simulators.traffic import device_traffic
from simulators.units import fleet_units
from tests import tokens
from tests.http_contract import served
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START
from tests.pipeline import pipeline, publish, stored_keys

ARTIFACTS = Path(
    os.environ.get("USAGEPIPE_TEST_ARTIFACTS", Path(__file__).parents[1] / "artifacts")
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
K = 3
PLANNER = tokens.bearer("Pat Planner", tokens.PLANNER)
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


def dashboard(s: Settings, k: int = K) -> AbstractAsyncContextManager[str]:
    """The insights app over the test's usage table and registry, on a free port."""
    app = create_app(
        s.postgres,
        InsightsSettings(k_anonymity=k),
        s.registry.db_schema,
        verifier=tokens.verifier(),
    )
    return served(app)


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


async def answers(
    api: str, params: dict[str, Any], names: Iterable[str] = REPORTS
) -> dict[str, dict[str, Any]]:
    """The reports `names` as the API answers them for `params`."""
    async with httpx.AsyncClient(base_url=api, timeout=30, headers=PLANNER) as client:
        out = {}
        for name in names:
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


def signed_in(address: str, token: str | None = None) -> str:
    """`address` with a planner's token in its fragment, as `usagepipe insights serve`
    prints it."""
    return f"{address}#token={token or tokens.token('Pat Planner', tokens.PLANNER)}"


async def test_every_chart_draws_its_unsuppressed_rows_and_redraws_for_new_filters(
    seeded: Seeded, browser: Browser
) -> None:
    first = {"start": iso_date(START), "end": iso_date(END)}
    async with dashboard(seeded.settings) as api:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(signed_in(f"{api}/?{urlencode(first)}"))
        await ready(page, urlencode(first))
        assert page.url == f"{api}/?{urlencode(first)}"  # the token left the address bar
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

        # A report's own option: cohorts by membership tier instead of purchase channel.
        await page.select_option("#cohorts select[name=by]", "tier")
        await ready(page, urlencode(first))
        assert await page.get_attribute("#cohorts", "data-options") == "by=tier"
        assert page.url == f"{api}/?{urlencode({**first, 'by': 'tier'})}"
        cohorts = (await answers(api, {**first, "by": "tier"}, ["cohorts"]))["cohorts"]
        fine = {r["cohort"] for r in cohorts["rows"] if not r.get("generalised")}
        assert fine <= {"standard", "silver", "gold", "platinum"}
        assert check_drawn({"cohorts": (await drawn(page))["cohorts"]}, {"cohorts": cohorts}) == 1
        await page.go_back()  # the browser's history holds each view
        await ready(page, urlencode(first))
        assert await page.get_attribute("#cohorts", "data-options") == "by=channel"

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


async def test_the_page_needs_a_planners_token_and_says_so(
    seeded: Seeded, browser: Browser
) -> None:
    """Without a token, with a refused one or with an owner's, the page says what is
    wrong and what to do instead of showing empty charts; with a planner's it draws,
    keeps the token out of the address, requests and the Referer, and downloads with it."""
    async with dashboard(seeded.settings) as api:
        expired = tokens.token(
            "Pat Planner", tokens.PLANNER, now=datetime.now(UTC) - timedelta(hours=13)
        )
        cases = [
            (f"{api}/", "unauthenticated", "Sign in to see the usage data.", "signin_none"),
            (signed_in(f"{api}/", expired), "unauthenticated", "the token has expired", "expired"),
            (
                signed_in(f"{api}/", tokens.token("Ada Owner")),
                "insufficient_scope",
                "You are signed in, but not as a planner.",
                "owner",
            ),
        ]
        for address, reason, says, shot in cases:
            page = await browser.new_page(viewport={"width": 1280, "height": 700})
            await page.goto(address)
            await page.wait_for_function("document.body.dataset.state === 'error'", timeout=30_000)
            assert await page.get_attribute("body", "data-auth") == reason, shot
            message = page.locator("#signin")
            assert await message.is_visible(), shot
            assert says in await message.inner_text(), shot
            assert not await page.locator("#filters").is_visible(), shot
            assert page.url == f"{api}/", shot
            await screenshot(page, f"dashboard_{shot}.png")
            await page.close()

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        sent: list[tuple[str, str | None, str | None]] = []
        page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"),
                                                  r.headers.get("referer"))))  # fmt: skip
        first = {"start": iso_date(START), "end": iso_date(END)}
        token = tokens.token("Pat Planner", tokens.PLANNER)
        await page.goto(signed_in(f"{api}/?{urlencode(first)}", token))
        await ready(page, urlencode(first))
        await page.reload()  # the tab keeps the token; the address no longer has it
        await ready(page, urlencode(first))
        assert page.url == f"{api}/?{urlencode(first)}"
        async with page.expect_download() as saving:
            await page.click("#cohorts .downloads a.csv")
        saved = await saving.value
        assert saved.suggested_filename == "cohorts.csv"
        path = await saved.path()
        async with httpx.AsyncClient(base_url=api, headers=PLANNER) as client:
            direct = await client.get("/api/reports/cohorts", params={**first, "format": "csv"})
        assert await asyncio.to_thread(Path(path).read_bytes) == direct.content
        api_calls = [(url, auth) for url, auth, _ in sent if "/api/" in url]
        assert api_calls and all(auth == f"Bearer {token}" for _, auth in api_calls)
        assert all(token not in url for url, _, _ in sent)
        assert [(u, r) for u, _, r in sent if r] == []  # <meta name="referrer">: none, or empty


SIM_DAYS = 28
SIM_DEVICES = 240
"""40 appliances of each of the six categories over four weeks: about 28,500 messages,
enough that every report has segments of k = 3 owners (errors are rare: 10 raised)."""


@pytest.fixture
async def simulated(settings: Settings) -> Settings:
    """The test's table and registry filled by the simulator through the real path:
    the fleet provisioned in the registry (households that bought their units before
    the window), four weeks of its usage published over MQTT, carried by the bridge
    and Kafka, validated, enriched and stored by the consumer."""
    plan = FleetPlan(
        devices=SIM_DEVICES,
        messages_per_device=0,
        window=timedelta(days=SIM_DAYS),
        fleet="dash",
        mix="usage",
    )
    expected = sum(
        1 for u in fleet_units(plan) for _ in device_traffic(plan, u.device_id, u.category)
    )
    async with pipeline(settings):
        report = await publish(settings, plan)
        assert report.sent == expected and not report.surprises
        stored = await stored_keys(settings)
        async with asyncio.timeout(90):
            while len(stored) < expected:
                await asyncio.sleep(0.2)
                stored = await stored_keys(settings)
        assert len(set(stored)) == len(stored) == expected
    return settings


async def test_the_simulated_fleet_draws_every_chart_and_the_form_redraws_it(
    simulated: Settings, browser: Browser
) -> None:
    async with dashboard(simulated) as api:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # A new user opens the page as it is: the default range, the last 28 days.
        await page.goto(signed_in(f"{api}/"))
        await ready(page, "")
        default = await page.locator("#scope b.range").get_attribute("data-start")
        assert default is not None
        shown = await drawn(page)
        await screenshot(page, "dashboard_simulated_default.png")
        assert check_drawn(shown, await answers(api, {})) == len(REPORTS), {
            n: (v["state"], v["rows"], v["notes"]) for n, v in shown.items()
        }

        # The last whole Monday-to-Sunday week (the cycles report counts whole weeks),
        # washers only, set in the form.
        shown_end = datetime.fromisoformat(
            await page.locator("#scope b.range").get_attribute("data-end") or ""
        )
        end = shown_end.replace(hour=0) - timedelta(days=shown_end.weekday())
        week = {
            "start": iso_date(end - timedelta(days=7)),
            "end": iso_date(end),
            "category": "washer",
        }
        await page.fill("input[name=from]", week["start"])
        await page.fill("input[name=through]", iso_date(end - timedelta(days=1)))
        await page.click("details[data-name=category] summary")
        await page.check("details[data-name=category] input[value=washer]")
        await page.click("button.apply")
        await ready(page, urlencode(week))
        shown = await drawn(page)
        expected = await answers(api, week)
        assert check_drawn(shown, expected) >= 5
        for name in REPORTS:
            assert shown[name]["start"] == f"{week['start']}T00:00:00Z", name
            assert shown[name]["end"] == f"{week['end']}T00:00:00Z", name
        assert {r["category"] for r in expected["cycles"]["rows"]} == {"washer"}
        await screenshot(page, "dashboard_simulated_washers_week.png")
        assert errors == []


async def screenshot(page: Page, name: str) -> None:
    shot = ARTIFACTS / name
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
