"""`usagepipe report`: every format and both chart types, and exit 2 on a bad filter."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from insights.filters import Filters
from insights.reports import REPORTS
from tests.insights.conftest import Seeded
from tests.insights.seed import END, START
from tests.insights.test_reports import run
from usagepipe.cli import main

RANGE = ["--start", "2026-11-02", "--end", "2026-11-23"]


@pytest.fixture
def environment(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> Seeded:
    """The CLI reads its settings from the environment: point it at the seeded data."""
    s = seeded.settings
    monkeypatch.setenv("USAGEPIPE_POSTGRES__DSN", s.postgres.dsn.get_secret_value())
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", s.postgres.table)
    monkeypatch.setenv("USAGEPIPE_REGISTRY__DB_SCHEMA", s.registry.db_schema)
    monkeypatch.setenv("USAGEPIPE_INSIGHTS__K_ANONYMITY", "3")
    return seeded


async def cli(*argv: str) -> int:
    """`usagepipe ARGV` in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, ["--log-level", "WARNING", *argv])


async def test_report_exports_and_charts(
    environment: Seeded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = await run(environment, "programs", Filters.parse(start=START, end=END), 3)
    records = report.records()

    assert await cli("report", "programs", *RANGE, "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{k: "" if v is None else str(v) for k, v in r.items()} for r in records]

    out = tmp_path / "programs.parquet"
    png, svg = tmp_path / "programs.png", tmp_path / "programs.svg"
    args = ("report", "programs", *RANGE, "--format", "parquet", "--out", str(out))
    assert await cli(*args, "--chart", str(png)) == 0
    assert pq.read_table(out).to_pylist() == records
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = sum(1 for r in records if not r["suppressed"])
    assert f"chart: {png} ({shown} segments)" in capsys.readouterr().err

    assert await cli("report", "programs", *RANGE, "--format", "json", "--chart", str(svg)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] == report.describe()["rows"] and doc["k_anonymity"] == 3
    assert [{k: v for k, v in r.items() if k != "members"} for r in doc["rows"]] == records
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    assert "Programs and modes by model and firmware" in text
    assert "k = 3: 4 segment(s) with fewer than 3 owners suppressed" in text

    assert await cli("report", "programs", *RANGE) == 0
    table = capsys.readouterr().out
    assert "Programs and modes by model and firmware" in table
    assert "│ WM-RARE │ 0.9      │ washer.cycle           │ other features │ suppressed │" in table
    assert (
        "[1] fewer than 3 distinct owners (k-anonymity), even the 4 small segments left "
        "merged together\nk = 3; no segment generalised; 4 segments suppressed\n"
    ) in table


async def test_generalised_rows_in_every_format(
    environment: Seeded,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At k = 10 the cycles per device-week mostly have fewer owners: merged into
    ranges, the table marks them and says what each merged; the cycles column holds
    labels, so Parquet makes it a string column."""
    monkeypatch.setenv("USAGEPIPE_INSIGHTS__K_ANONYMITY", "10")
    report = await run(environment, "cycles", Filters.parse(start=START, end=END), 10)
    assert await cli("report", "cycles", *RANGE) == 0
    table = capsys.readouterr().out
    assert "│ washer       │ 6-8, 10-13   │           13 │ [3]  │" in table
    assert "│ washer       │ 15           │           16 │      │" in table
    assert "│ robot_vacuum │ other counts │   suppressed │ [5]  │" in table
    assert "[3] 7 cycle counts merged (6-8, 10-13): each had fewer than 10 owners" in table
    assert table.endswith(
        "k = 10; 29 segments with fewer than 10 owners generalised into 4 rows; "
        "12 segments suppressed\n"
    )

    assert await cli("report", "cycles", *RANGE, "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [
        {k: "" if v is None else str(v) for k, v in r.items()} for r in report.records()
    ]
    assert (
        rows[2]["generalised"]
        == "7 cycle counts merged (6-8, 10-13): each had fewer than 10 owners"
    )

    out = tmp_path / "cycles.parquet"
    assert await cli("report", "cycles", *RANGE, "--format", "parquet", "--out", str(out)) == 0
    parquet = pq.read_table(out)
    assert str(parquet.schema.field("cycles").type) == "string"
    assert str(parquet.schema.field("device_weeks").type) == "int64"
    assert parquet.column("cycles").to_pylist() == [str(r.segment["cycles"]) for r in report.rows]
    assert parquet.column("generalised").to_pylist() == [r.generalised for r in report.rows]

    assert await cli("report", "cycles", *RANGE, "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["generalised_segments"], doc["suppressed_segments"]) == (29, 12)
    assert doc["rows"][2]["members"] == [
        {"category": "washer", "cycles": n} for n in (6, 7, 8, 10, 11, 12, 13)
    ]
    assert doc["rows"][4]["members"] is None  # washer 15: a fine segment


@pytest.mark.parametrize("name", ["heatmap", "cycles", "adoption", "completeness", "cohorts"])
async def test_every_chart_kind_draws(environment: Seeded, tmp_path: Path, name: str) -> None:
    png = tmp_path / f"{name}.png"
    out = tmp_path / f"{name}.json"
    assert await cli("report", name, *RANGE, "--out", str(out), "--chart", str(png)) == 0
    assert png.stat().st_size > 10_000
    assert REPORTS[name].title in out.read_text()  # --format table (the default) to a file


async def test_bad_filters_exit_2_naming_the_field(
    environment: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("report", "heatmap", "--start", "2026-11-02T10:30:00Z") == 2
    assert "usagepipe report heatmap: start: must be a whole UTC hour" in capsys.readouterr().err
    assert await cli("report", "cohorts", *RANGE, "--by", "age") == 2
    assert "by: 'age' is not one of channel, tier" in capsys.readouterr().err
    assert await cli("report", "errors", *RANGE, "--category", "toaster") == 2
    assert "category: unknown 'toaster'" in capsys.readouterr().err
    assert await cli("report", "errors", *RANGE, "--format", "parquet") == 2
    assert "--format parquet needs --out FILE" in capsys.readouterr().err
    assert await cli("report", "errors", *RANGE, "--chart", "x.gif") == 2
    assert "must end in .png or .svg" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        await cli("report", "toasters", *RANGE)
    assert exited.value.code == 2  # argparse: invalid choice


@pytest.mark.parametrize("k", ["1", "2"])
async def test_a_k_below_the_minimum_is_one_line_naming_the_setting(
    environment: Seeded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, k: str
) -> None:
    monkeypatch.setenv("USAGEPIPE_INSIGHTS__K_ANONYMITY", k)
    for argv in (("report", "programs", *RANGE), ("insights", "serve", "--port", "0")):
        assert await cli(*argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            f"usagepipe: USAGEPIPE_INSIGHTS__K_ANONYMITY={k!r} is not allowed: use a whole "
            "number from 3 to 1000\n"
        )
