"""`usagepipe report NAME ...` and `usagepipe insights serve`.

    usagepipe report heatmap --start 2026-11-01 --end 2026-11-29 --category washer \
        --format csv --out heatmap.csv --chart heatmap.svg

A bad filter or option prints what is wrong, naming it, and exits 2; a database that
does not answer exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ingest.ports import port_number
from ingest.postgres import DB_ERRORS
from ingest.settings import Settings
from insights.filters import CATEGORIES, FilterError, Filters
from insights.reports import REPORTS
from insights.specs import Report

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], int]
OUTPUT_FORMATS = ("table", "csv", "parquet", "json")


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `report` and `insights`; each sets `handler(args, settings) -> int`."""
    names = ", ".join(REPORTS)
    report = subparsers.add_parser(
        "report",
        help="a planners' report over the usage data (table, CSV, Parquet, JSON, chart)",
        description=f"Reports: {names}. Segments with fewer than insights.k_anonymity "
        "distinct owners are merged with their siblings (other firmware, hours of the "
        "same part of the day, ...) until a group reaches k, or else suppressed.",
    )
    report.set_defaults(handler=_report)
    report.add_argument("name", choices=list(REPORTS), metavar="NAME", help=names)
    report.add_argument("--start", help="ISO date or time with zone, whole UTC hour (end - 28d)")
    report.add_argument("--end", help="ISO date or time with zone, excluded (the next hour)")
    for name, extra in (
        ("model", ""),
        ("category", f" ({', '.join(CATEGORIES)})"),
        ("region", " (ISO 3166-2, KR-11)"),
        ("firmware", ""),
    ):
        report.add_argument(
            f"--{name}", action="append", default=[], help=f"only this {name}{extra}; repeatable"
        )
    report.add_argument("--by", help="cohorts: channel (default) or tier")
    report.add_argument("--tz", help="heatmap: IANA time zone (insights.timezone)")
    report.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    report.add_argument("--out", type=Path, help="write the export here (required for parquet)")
    report.add_argument("--chart", type=Path, help="also draw the report into F.png or F.svg")
    report.add_argument(
        "--dp",
        action="store_true",
        help="the differentially private release (programs, regions, cycles, errors, "
        "adoption), charged to --planner's privacy budget; table, csv or json",
    )
    report.add_argument("--planner", help="with --dp: who is charged (default cli:<your user>)")

    insights = subparsers.add_parser("insights", help="the planners' HTTP API and web page")
    actions = insights.add_subparsers(dest="insights_command", required=True, metavar="COMMAND")
    serve = actions.add_parser("serve", help="serve the read-only API and the web page")
    serve.set_defaults(handler=_serve)
    serve.add_argument("--host", help="listen address (insights.http_host)")
    serve.add_argument("--port", type=port_number, help="port (insights.http_port)")
    budget = actions.add_parser(
        "budget", help="every planner's privacy budget: private releases made, epsilon spent"
    )
    budget.set_defaults(handler=_budget)
    budget.add_argument("--planner", help="only this planner (a token subject, cli:<user>)")


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.errors import StoreUnavailable

    prog = f"usagepipe report {args.name}"
    if args.dp:
        from insights.dp_cli import private

        return private(args, settings)
    if args.planner is not None:
        print(f"{prog}: --planner goes with --dp", file=sys.stderr)
        return 2
    if args.format == "parquet" and args.out is None:
        print(f"{prog}: --format parquet needs --out FILE", file=sys.stderr)
        return 2
    if args.chart is not None and args.chart.suffix.lower() not in (".png", ".svg"):
        print(f"{prog}: --chart {args.chart} must end in .png or .svg", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run(args, settings))
    except FilterError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (*DB_ERRORS, StoreUnavailable) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return _write(report, args, prog)


async def _run(args: argparse.Namespace, settings: Settings) -> Report:
    """The report `args` ask for, over its own connection for this one run."""
    import asyncpg

    from insights.privacy import Privacy
    from insights.runner import run_report

    filters = Filters.parse(
        start=args.start,
        end=args.end,
        model=args.model,
        category=args.category,
        region=args.region,
        firmware=args.firmware,
        max_days=settings.insights.max_range_days,
    )
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        return await run_report(
            conn,
            args.name,
            filters,
            table=settings.postgres.table,
            privacy=Privacy(settings.insights.k_anonymity, settings.registry.db_schema),
            options={"by": args.by, "tz": args.tz},
            timezone=settings.insights.timezone,
            work_mem_mb=settings.insights.report_work_mem_mb,
        )
    finally:
        await conn.close()


def _write(report: Report, args: argparse.Namespace, prog: str) -> int:
    """Print or save `report` in `--format`, and draw `--chart`; the exit status."""
    from insights.charts import ChartError, write_chart
    from insights.export import export

    if args.format == "table":
        text = _table(report)
        if args.out is None:
            print(text, end="")
        else:
            args.out.write_text(text)
    else:
        data = export(report, args.format)
        if args.out is None:
            sys.stdout.write(data.decode())
        else:
            args.out.write_bytes(data)
    if args.chart is not None:
        try:
            shown = write_chart(report, args.chart)
        except ChartError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
        print(f"chart: {args.chart} ({shown} segments)", file=sys.stderr)
    return 0


def _table(report: Report) -> str:
    """The report as a plain-text table. A generalised row is marked [1], [2], ... in a
    last column, the sentence saying what it merged printed under the table; a
    suppressed row says so in its first measure. The last line counts the segments
    generalised and suppressed."""
    from rich.console import Console
    from rich.table import Table

    f = report.filters
    table = Table()
    for column in (*report.spec.dimensions, *report.spec.measures):
        table.add_column(column, justify="right" if column in report.spec.measures else "left")
    marked = any(r.generalised or r.members for r in report.rows)
    if marked:
        table.add_column("note")
    notes: list[str] = []
    for row in report.rows:
        cells = [("" if v is None else str(v)) for v in row.segment.values()]
        if row.suppressed:
            cells += ["suppressed"] + [""] * (len(report.spec.measures) - 1)
        else:
            cells += [_cell(row.values.get(m)) for m in report.spec.measures]
        if marked:
            if row.generalised or row.members:
                notes.append(row.generalised or f"{row.suppressed}")
                cells.append(f"[{len(notes)}]")
            else:
                cells.append("")
        table.add_row(*cells)
    out = io.StringIO()
    console = Console(file=out, width=160, markup=False, highlight=False)
    console.print(report.spec.title)
    console.print(f"{f.start:%Y-%m-%d %H:%M} to {f.end:%Y-%m-%d %H:%M} UTC")
    console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"[{i}] {note}")
    console.print(footnote(report))
    return out.getvalue()


def footnote(report: Report) -> str:
    """One line: k, the segments generalised into how many rows, those suppressed."""
    generalised, rows = report.generalised_segments, report.generalised_rows
    suppressed = report.suppressed_segments
    population = "; marketing population" if report.spec.marketing else ""
    merged = (
        f"{_n(generalised, 'segment')} with fewer than {report.k} owners generalised into "
        f"{_n(rows, 'row')}"
        if generalised
        else "no segment generalised"
    )
    return f"k = {report.k}; {merged}; {_n(suppressed, 'segment')} suppressed{population}"


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _cell(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _budget(args: argparse.Namespace, settings: Settings) -> int:
    from insights.dp_cli import budgets

    return budgets(args, settings)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg
    import uvicorn
    from prometheus_client import CollectorRegistry

    from ingest.auth import build_verifier
    from ingest.errors import StoreUnavailable
    from ingest.ports import listen
    from ingest.setting_errors import variable
    from insights.api import create_app

    host = args.host or settings.insights.http_host
    port = args.port if args.port is not None else settings.insights.http_port
    # Bound before uvicorn starts, so a port in use is one line naming what moves it
    # (`PortUnavailable`, reported by the main CLI), not uvicorn's log and exit.
    sock = listen(
        host,
        port,
        "--port" if args.port is not None else variable(["insights", "http_port"]),
        "--host" if args.host else variable(["insights", "http_host"]),
    )
    verifier, signer = build_verifier(settings.auth, settings.services.run_dir)
    config = uvicorn.Config(
        create_app(
            settings.postgres,
            settings.insights,
            settings.registry.db_schema,
            verifier=verifier,
            docs=settings.auth.docs_enabled,
            metrics_registry=CollectorRegistry(),
        ),
        host=host,
        port=port,
        log_config=None,
    )

    async def run() -> None:
        # A database that does not answer is one line here, not the traceback uvicorn
        # logs when the app's startup (its connection pool) fails.
        try:
            conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        except DB_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        await conn.close()
        url = f"http://{host}:{sock.getsockname()[1]}/"
        log.info("insights on %s", url)
        if signer is None:
            print(
                f"open {url} through the sign-in: the page needs a token from"
                f" {settings.auth.issuer} with scope {settings.auth.planner_scope}, in its"
                " address as #token=...",
                flush=True,
            )
        else:
            token = signer.token(
                "planner",
                audience=settings.auth.audience,
                scopes=[settings.auth.planner_scope],
                scope_claim=settings.auth.scope_claim,
            )
            print(
                f"open the dashboard, signed in as a planner for 12 h (dev signer):\n"
                f"  {url}#token={token}\n"
                "another: usagepipe auth token --dashboard [--subject NAME] [--ttl 1h]",
                flush=True,
            )
        await uvicorn.Server(config).serve(sockets=[sock])

    with sock:
        asyncio.run(run())
    return 0
