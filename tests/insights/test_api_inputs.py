"""Parameters UTF-8 or the filters cannot carry, against the planners' API on a real
uvicorn server: each is a 4xx `InsightsProblem` naming the parameter, never a 500, and
the keep-alive connection serves the next request. Every case is refused before the
database is read, so no table is seeded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ingest.settings import InsightsSettings, Settings
from insights.api import InsightsProblem, create_app
from tests import tokens
from tests.http_contract import OneConnection, served

RANGE = "start=2026-11-02&end=2026-11-23"
VALUES = ["%00", "a%00", "WM-100%00", "%ED%A0%80", "a%ED%A0%80", "%FF", "%0A"]
# Each parameter on a report that takes it; `start`/`end` alone (the other one defaults).
PARAMETERS = {
    "model": "programs",
    "region": "regions",
    "firmware": "programs",
    "category": "errors",
    "start": "programs",
    "end": "programs",
    "tz": "heatmap",
    "by": "cohorts",
    "format": "programs",
}


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[OneConnection]:
    s = settings
    app = create_app(
        s.postgres, InsightsSettings(), s.registry.db_schema, verifier=tokens.verifier()
    )
    planner = tokens.bearer("Pat Planner", tokens.PLANNER)
    async with served(app) as url, OneConnection(url, headers=planner) as client:
        yield client


async def _answered(client: OneConnection, path: str) -> tuple[int, str, str | None]:
    answer = await client.request("GET", path)
    problem = InsightsProblem.model_validate(answer.json())
    assert "\x00" not in answer.text and "\n" not in problem.detail  # never echoed raw
    # The same connection serves the next request.
    assert (await client.request("GET", "/api/reports")).status_code == 200
    assert client.connects == 1
    return answer.status_code, problem.reason, problem.field


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("parameter", list(PARAMETERS))
async def test_a_parameter_utf8_or_its_rule_cannot_carry(
    api: OneConnection, parameter: str, value: str
) -> None:
    report = PARAMETERS[parameter]
    query = (
        f"{parameter}={value}" if parameter in ("start", "end") else f"{RANGE}&{parameter}={value}"
    )
    answer = await _answered(api, f"/api/reports/{report}?{query}")
    assert answer == (422, "invalid_request", parameter)
    if parameter in ("start", "end"):
        answer = await _answered(api, f"/api/filters?{parameter}={value}")
        assert answer == (422, "invalid_request", parameter)


@pytest.mark.parametrize("value", VALUES)
async def test_a_path_utf8_or_a_report_cannot_carry(api: OneConnection, value: str) -> None:
    """An unknown report is 404 `unknown_report`, whatever bytes name it."""
    assert await _answered(api, f"/api/reports/{value}") == (404, "unknown_report", "name")
    assert await _answered(api, f"/static/{value}") == (404, "not_found", "name")
    assert await _answered(api, f"/api/{value}") == (404, "not_found", None)
