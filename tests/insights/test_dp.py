"""Differentially private releases (`insights.dp`, `insights.dp_ledger`,
`insights.dp_api`, `usagepipe report --dp`) over the seeded data, on a real uvicorn
server and PostgreSQL: each owner's contribution bounded, a release replayed
unchanged and free, the budget charged and refused, small groups thresholded, and a
differencing attack between two overlapping releases held to their epsilons."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import opendp.prelude as dp
import pytest

from ingest.settings import InsightsSettings
from insights.api import create_app
from insights.dp import DP_REPORTS, Plan, bounded_segments, cell_key, privacy_map
from insights.dp_api import PrivateReportOut
from insights.filters import Filters
from insights.privacy import Privacy
from insights.query import Query
from tests import tokens
from tests.http_contract import served
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START
from usagepipe.cli import main

K = 3
EPSILON = 20.0
"""Large, so that the seed's few owners per segment pass the noisy threshold (at k = 3
and epsilon 20 the threshold is k); the default is 1.0."""
BUDGET = 50.0
DELTA = 1e-6
RANGE = {"start": "2026-11-02", "end": "2026-11-23"}
PAT = tokens.bearer("pat", tokens.PLANNER)
SAM = tokens.bearer("sam", tokens.PLANNER)
SETTINGS = InsightsSettings(
    k_anonymity=K,
    dp_budget=BUDGET,
    dp_delta=DELTA,
    dp_epsilon={"regions": EPSILON, "errors": EPSILON, "programs": EPSILON},
)


@pytest.fixture
async def api(seeded: Seeded) -> AsyncIterator[str]:
    s = seeded.settings
    app = create_app(s.postgres, SETTINGS, s.registry.db_schema, verifier=tokens.verifier())
    async with served(app) as url:
        yield url


async def ledger(s: Seeded) -> list[dict[str, Any]]:
    """The spend ledger's rows, oldest first."""
    conn = await asyncpg.connect(s.settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            f"SELECT planner, release_key, epsilon, delta FROM {s.settings.postgres.table}_dp_spend"
            " ORDER BY spent_at, release_key"
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def exact(s: Seeded, name: str, f: Filters) -> dict[str, Any]:
    """The bounded exact sums the noise was added to, by segment key (never shown)."""
    conn = await asyncpg.connect(s.settings.postgres.dsn.get_secret_value())
    spec = DP_REPORTS[name]
    try:
        async with conn.transaction(readonly=True):
            q = Query(
                conn, s.settings.postgres.table, f, Privacy(K, s.settings.registry.db_schema), {},
                name in ("regions", "adoption"),
            )  # fmt: skip
            found = await bounded_segments(q, spec)
    finally:
        await conn.close()
    return {cell_key(seg, spec.dimensions): seg for seg in found}


def filters(span: dict[str, str]) -> Filters:
    return Filters.parse(start=span["start"], end=span["end"])


def key_of(row: dict[str, Any], name: str) -> str:
    return json.dumps([row[d] for d in DP_REPORTS[name].dimensions])


async def test_a_release_is_replayed_unchanged_and_charged_once(seeded: Seeded, api: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers=PAT) as client:
        first = await client.get("/api/dp/reports/regions", params=RANGE)
        assert first.status_code == 200, first.text
        doc = PrivateReportOut.model_validate(first.json())
        assert doc.replayed is False and doc.charged_epsilon == EPSILON
        assert doc.budget.model_dump() == {
            "planner": "pat", "total": BUDGET, "spent": EPSILON, "left": BUDGET - EPSILON,
        }  # fmt: skip
        assert doc.privacy.epsilon == EPSILON and doc.privacy.delta == DELTA
        assert doc.privacy.loss[0] <= EPSILON * (1 + 1e-12) and doc.privacy.loss[1] <= DELTA
        assert doc.privacy.cells_per_owner == 1
        assert doc.privacy.caps == {"events": 200, "cycles": 60, "devices": 3}
        assert doc.privacy.threshold == K  # epsilon 20: the noise needs no more than k
        assert doc.measures == ["events", "cycles", "devices", "events_per_device"]
        assert [r["region"] for r in doc.rows] == ["KR-11", "KR-26", "KR-41"]

        # Asked again, by the same planner or another: the same numbers, for nothing.
        again = (await client.get("/api/dp/reports/regions", params=RANGE)).json()
        other = (await client.get("/api/dp/reports/regions", params=RANGE, headers=SAM)).json()
        for repeat, planner, spent in ((again, "pat", EPSILON), (other, "sam", 0.0)):
            assert repeat["rows"] == first.json()["rows"]
            assert repeat["release_key"] == doc.release_key
            assert repeat["replayed"] is True and repeat["charged_epsilon"] == 0
            assert repeat["budget"]["planner"] == planner and repeat["budget"]["spent"] == spent
        as_csv = await client.get("/api/dp/reports/regions", params={**RANGE, "format": "csv"})
        assert as_csv.headers["content-disposition"] == 'attachment; filename="regions-dp.csv"'
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert rows == [
            {k: "" if v is None else str(v) for k, v in r.items()} for r in first.json()["rows"]
        ]
        budget = (await client.get("/api/dp/budget")).json()
        assert budget == {
            "planner": "pat", "total": BUDGET, "spent": EPSILON, "left": BUDGET - EPSILON
        }  # fmt: skip

    assert await ledger(seeded) == [
        {"planner": "pat", "release_key": doc.release_key, "epsilon": EPSILON, "delta": DELTA}
    ]


async def test_every_private_release_has_its_documented_shape(seeded: Seeded, api: str) -> None:
    async with httpx.AsyncClient(base_url=api) as client:
        for name, spec in DP_REPORTS.items():
            who = tokens.bearer(f"planner-{name}", tokens.PLANNER)
            got = await client.get(f"/api/dp/reports/{name}", params=RANGE, headers=who)
            assert got.status_code == 200, got.text
            doc = PrivateReportOut.model_validate(got.json())
            assert doc.measures == spec.measures and doc.dimensions == list(spec.dimensions)
            assert doc.charged_epsilon == SETTINGS.dp_epsilon.get(name, 1.0)
            assert doc.privacy.loss[0] <= doc.privacy.epsilon * (1 + 1e-12)
            assert doc.privacy.threshold >= K
            for row in doc.rows:
                assert set(row) == {*spec.dimensions, *spec.measures}
                numbers = [row[m] for m in spec.measures if row[m] is not None]
                assert all(isinstance(v, int | float) and v >= 0 for v in numbers)
        openapi = (await client.get("/openapi.json")).json()
    operation = openapi["paths"]["/api/dp/reports/{name}"]["get"]
    assert set(operation["responses"]) == {"200", "401", "403", "404", "422", "503"}
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["name"]["schema"]["enum"] == list(DP_REPORTS)
    assert {"start", "end", "model", "category", "region", "firmware", "format"} <= set(params)


async def test_two_requests_at_once_make_one_release_and_one_charge(
    seeded: Seeded, api: str
) -> None:
    async with httpx.AsyncClient(base_url=api, headers=PAT) as client:
        answers = await asyncio.gather(
            *(client.get("/api/dp/reports/programs", params=RANGE) for _ in range(4))
        )
    docs = [a.json() for a in answers]
    assert [a.status_code for a in answers] == [200] * 4
    assert all(d["rows"] == docs[0]["rows"] for d in docs)
    assert sorted(d["charged_epsilon"] for d in docs) == [0, 0, 0, EPSILON]
    assert [(r["planner"], r["epsilon"]) for r in await ledger(seeded)] == [("pat", EPSILON)]


async def test_each_owner_is_bounded_before_the_noise(seeded: Seeded) -> None:
    """The SQL keeps each owner to `cells_per_owner` cells (their largest by the first
    measure) and clamps each measure to its cap: computed here from the seed's rows."""
    spec = dataclasses.replace(
        DP_REPORTS["errors"], caps={"errors": 1, "devices": 1}, cells_per_owner=2
    )
    f = Filters.parse(start=START, end=END)
    conn = await asyncpg.connect(seeded.settings.postgres.dsn.get_secret_value())
    try:
        async with conn.transaction(readonly=True):
            privacy = Privacy(K, seeded.settings.registry.db_schema)
            q = Query(conn, seeded.settings.postgres.table, f, privacy, {}, False)
            found = await bounded_segments(q, spec)
    finally:
        await conn.close()
    cells: dict[str, dict[tuple[Any, ...], int]] = defaultdict(lambda: defaultdict(int))
    for r in seeded.population.rows:
        if r.owner_key and r.schema.endswith(".error") and r.body.get("state") == "raised":
            cells[r.owner_key][(r.model, r.firmware, r.body["code"])] += 1
    kept = {o: sorted(c.values(), reverse=True)[:2] for o, c in cells.items()}
    assert sum(s.owners for s in found) == sum(len(v) for v in kept.values())
    assert sum(int(s.values["errors"] or 0) for s in found) == sum(
        min(v, 1) for values in kept.values() for v in values
    )
    assert max(s.owners for s in found) <= len(cells)
    # Without the bound an owner's errors in a cell reach more than 1: the clamp bites.
    assert max(v for c in cells.values() for v in c.values()) > 1


async def test_differencing_two_overlapping_releases_learns_nothing_beyond_epsilon(
    seeded: Seeded, api: str
) -> None:
    """Two ranges a day apart: exact reports would differ by exactly that day's usage.
    The two private releases are two draws of independent noise, each charged; their
    composition is what the budget shows, and the numbers do not move on asking again."""
    shorter = {"start": "2026-11-02", "end": "2026-11-22"}
    longer = {"start": "2026-11-02", "end": "2026-11-23"}
    async with httpx.AsyncClient(base_url=api, headers=PAT) as client:
        a = (await client.get("/api/dp/reports/regions", params=shorter)).json()
        b = (await client.get("/api/dp/reports/regions", params=longer)).json()
        again = [
            (await client.get("/api/dp/reports/regions", params=p)).json()
            for p in (shorter, longer)
        ]
        errors = (await client.get("/api/dp/reports/errors", params=longer, headers=SAM)).json()
    assert [x["rows"] for x in again] == [a["rows"], b["rows"]]
    assert [x["charged_epsilon"] for x in (a, b, *again)] == [EPSILON, EPSILON, 0, 0]
    assert again[1]["budget"]["spent"] == 2 * EPSILON
    spent = (await ledger(seeded))[:2]
    assert [(r["planner"], r["epsilon"]) for r in spent] == [("pat", EPSILON)] * 2
    assert {r["release_key"] for r in spent} == {a["release_key"], b["release_key"]}

    # Composition, by OpenDP: the pair's loss is the sum of each release's privacy map
    # at its bound, and that is what the ledger charged.
    plan = Plan.make(DP_REPORTS["regions"], EPSILON, DELTA, K)
    c = plan.cells_per_owner
    pair = dp.c.make_composition([plan.selection(), plan.selection()])
    eps_selecting, delta_pair = privacy_map(pair, (c, c, 1))
    eps_pair = eps_selecting + sum(
        privacy_map(dp.c.make_composition([plan.sums(m), plan.sums(m)]), c * cap)
        for m, cap in plan.caps.items()
    )
    assert eps_pair <= sum(r["epsilon"] for r in spent) * (1 + 1e-12)
    assert delta_pair <= 2 * DELTA
    assert a["privacy"]["loss"][0] <= EPSILON * (1 + 1e-12)

    # What the attacker wants, the last day's usage per region, is the difference of
    # the exact sums. Each measure's noise has the scale its owner bound needs at its
    # share of epsilon (any less and OpenDP's map exceeds the share), and each release
    # draws its own (noisy minus exact), so the difference of the two releases carries
    # two draws of noise of that scale, not none.
    exact_a = await exact(seeded, "regions", filters(shorter))
    exact_b = await exact(seeded, "regions", filters(longer))
    share = EPSILON / 2 / len(plan.caps)
    for m, cap in plan.caps.items():
        laplace = plan.sums(m)
        assert privacy_map(laplace, c * cap) <= share
        less = dp.m.make_laplace(*laplace.input_space, scale=plan.scales[m] * 0.99)
        assert privacy_map(less, c * cap) > share
    assert plan.scales["events"] == pytest.approx(200 / share)
    assert [r["region"] for r in a["rows"]] == [r["region"] for r in b["rows"]] == [
        "KR-11", "KR-26", "KR-41"
    ]  # fmt: skip
    day = {k: exact_b[k].values["events"] - exact_a[k].values["events"] for k in exact_b}
    assert all(v > 0 for v in day.values())  # the day an exact difference would reveal
    noise = [
        (
            one["events"] - exact_a[key_of(one, "regions")].values["events"],
            two["events"] - exact_b[key_of(two, "regions")].values["events"],
        )
        for one, two in zip(a["rows"], b["rows"], strict=True)
    ]
    assert any(x != y for x, y in noise)  # independent draws, not one noise replayed
    released = [
        two["events"] - one["events"] for one, two in zip(a["rows"], b["rows"], strict=True)
    ]
    assert released != list(day.values())

    # Small groups stay thresholded after the noise: the threshold is what the owners'
    # noise needs for delta (never below k), and no segment of one owner gets past it
    # (each with a chance below delta). A segment of two or more may, now and then:
    # which one does tells no more about any one of them than epsilon allows.
    exact_errors = await exact(seeded, "errors", filters(longer))
    threshold = errors["privacy"]["threshold"]
    assert threshold >= K
    # At the default epsilon the noise is wider, and so the threshold: far above k.
    assert Plan.make(DP_REPORTS["errors"], 1.0, DELTA, K).threshold == 56
    assert sum(1 for s in exact_errors.values() if s.owners < threshold) >= 5
    shown = [key_of(r, "errors") for r in errors["rows"]]
    assert shown and all(exact_errors[k].owners > 1 for k in shown)


async def test_a_release_beyond_the_budget_is_refused_naming_what_is_left(
    seeded: Seeded,
) -> None:
    s = seeded.settings
    tight = InsightsSettings(
        k_anonymity=K, dp_budget=2.5, dp_epsilon={}
    )  # 1.0 a release: two fit, a third does not
    app = create_app(s.postgres, tight, s.registry.db_schema, verifier=tokens.verifier())
    async with served(app) as url, httpx.AsyncClient(base_url=url, headers=PAT) as client:
        for end in ("2026-11-21", "2026-11-22"):
            got = await client.get("/api/dp/reports/cycles", params={**RANGE, "end": end})
            assert got.status_code == 200 and got.json()["charged_epsilon"] == 1.0
        refused = await client.get("/api/dp/reports/cycles", params=RANGE)
        assert refused.status_code == 403
        assert refused.json() == {
            "reason": "privacy_budget_exceeded",
            "detail": "this release costs epsilon 1; planner 'pat' has epsilon 0.5 left of a "
            "budget of 2.5 (a release already made is replayed at no cost)",
            "field": None,
        }
        replay = await client.get("/api/dp/reports/cycles", params={**RANGE, "end": "2026-11-21"})
        assert replay.status_code == 200 and replay.json()["replayed"] is True
        # Sam's budget is Sam's own.
        sam = await client.get("/api/dp/reports/cycles", params=RANGE, headers=SAM)
        assert sam.status_code == 200 and sam.json()["budget"]["left"] == 1.5

        future = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
        late = await client.get("/api/dp/reports/cycles", params={**RANGE, "end": future})
        assert late.status_code == 422 and late.json()["field"] == "end"
        assert "a private release covers only time that is over" in late.json()["detail"]
        none = await client.get("/api/dp/reports/heatmap", params=RANGE)
        assert none.status_code == 404 and none.json()["reason"] == "unknown_report"
        assert "one of programs, regions, cycles, errors, adoption" in none.json()["detail"]
        anonymous = await client.get("/api/dp/budget", headers={"Authorization": ""})
        assert anonymous.status_code == 401
    assert [r["planner"] for r in await ledger(seeded)] == ["pat", "pat", "sam"]


async def test_cli_release_is_the_same_release(
    seeded: Seeded, api: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    s = seeded.settings
    monkeypatch.setenv("USAGEPIPE_POSTGRES__DSN", s.postgres.dsn.get_secret_value())
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", s.postgres.table)
    monkeypatch.setenv("USAGEPIPE_REGISTRY__DB_SCHEMA", s.registry.db_schema)
    monkeypatch.setenv("USAGEPIPE_INSIGHTS__K_ANONYMITY", str(K))
    monkeypatch.setenv("USAGEPIPE_INSIGHTS__DP_BUDGET", str(BUDGET))
    monkeypatch.setenv("USAGEPIPE_INSIGHTS__DP_EPSILON", json.dumps({"errors": EPSILON}))
    argv = ["--log-level", "WARNING", "report", "errors", "--dp", "--start", RANGE["start"],
            "--end", RANGE["end"]]  # fmt: skip
    assert await asyncio.to_thread(main, [*argv, "--planner", "cli:kim", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["charged_epsilon"] == EPSILON and doc["budget"]["planner"] == "cli:kim"
    async with httpx.AsyncClient(base_url=api, headers=PAT) as client:
        over_http = (await client.get("/api/dp/reports/errors", params=RANGE)).json()
    assert over_http["rows"] == doc["rows"] and over_http["charged_epsilon"] == 0

    assert await asyncio.to_thread(main, [*argv, "--planner", "cli:kim"]) == 0
    text = capsys.readouterr().out
    assert "Error rates per 1,000 device-days (differentially private)" in text
    assert "replayed: charged nothing; cli:kim has epsilon 30 left of 50" in text
    assert (
        await asyncio.to_thread(main, [*argv, "--format", "parquet", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--format parquet not with --dp" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*argv[:3], "heatmap", "--dp"]) == 2
    assert "'heatmap' has no private release" in capsys.readouterr().err

    assert await asyncio.to_thread(main, ["--log-level", "WARNING", "insights", "budget"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "planner                          releases    spent     left  (budget: epsilon 50)",
        "cli:kim                                 1       20       30",
    ]
    argv = ["--log-level", "WARNING", "insights", "budget", "--planner", "pat"]
    assert await asyncio.to_thread(main, argv) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["pat", "0", "0", "50"]
