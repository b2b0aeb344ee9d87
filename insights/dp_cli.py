"""`usagepipe report NAME --dp [--planner WHO]`: a report's private release; and
`usagepipe insights budget [--planner WHO]`: what each planner has spent.

    usagepipe report regions --dp --start 2026-11-01 --end 2026-11-29 --format csv

The release is made once and replayed after (`insights.dp_ledger`); a new one is
charged to `--planner` (default `cli:<the OS user>`). A report without a private
release, a range not yet over, a bad filter or a release beyond the budget prints what
is wrong and exits 2; a database that does not answer exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import io
import json
import sys
from datetime import datetime

from ingest.postgres import DB_ERRORS
from ingest.settings import Settings
from insights.dp import DEFAULT_EPSILON
from insights.dp_ledger import BudgetExceeded, Release, default_end, epsilons, private_report
from insights.filters import FilterError, Filters


def private(args: argparse.Namespace, settings: Settings) -> int:
    """Print or save the private release `args` ask for; the exit status."""
    from ingest.errors import ConfigurationError, StoreUnavailable

    prog = f"usagepipe report {args.name} --dp"
    refused = [
        flag
        for flag, given in (
            ("--chart", args.chart is not None),
            ("--by", args.by is not None),
            ("--tz", args.tz is not None),
            ("--format parquet", args.format == "parquet"),
        )
        if given
    ]
    if refused:
        print(f"{prog}: {', '.join(refused)} not with --dp (table, csv or json)", file=sys.stderr)
        return 2
    try:
        release = asyncio.run(_run(args, settings))
    except (FilterError, BudgetExceeded, ConfigurationError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (*DB_ERRORS, StoreUnavailable) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        text = json.dumps(release.describe(), ensure_ascii=False, indent=1) + "\n"
    elif args.format == "csv":
        from insights.dp_api import release_csv

        text = release_csv(release).decode()
    else:
        text = table(release)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> Release:
    import asyncpg

    from insights.privacy import Privacy

    s = settings.insights
    chosen = epsilons(s.dp_epsilon)
    filters = Filters.parse(
        start=args.start,
        end=default_end() if args.end is None else args.end,
        model=args.model,
        category=args.category,
        region=args.region,
        firmware=args.firmware,
        max_days=s.max_range_days,
    )
    planner = args.planner or f"cli:{getpass.getuser()}"
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        return await private_report(
            conn,
            args.name,
            filters,
            table=settings.postgres.table,
            privacy=Privacy(s.k_anonymity, settings.registry.db_schema),
            planner=planner,
            budget=s.dp_budget,
            epsilon=chosen.get(args.name, DEFAULT_EPSILON),
            delta=s.dp_delta,
        )
    finally:
        await conn.close()


def budgets(args: argparse.Namespace, settings: Settings) -> int:
    """`usagepipe insights budget [--planner P]`: per planner, the private releases
    charged to them, the epsilon spent and left of `insights.dp_budget`."""
    from ingest.errors import StoreUnavailable

    try:
        rows = asyncio.run(_spend(settings, args.planner))
    except (*DB_ERRORS, StoreUnavailable) as exc:
        print(f"usagepipe insights budget: {exc}", file=sys.stderr)
        return 1
    total = settings.insights.dp_budget
    if args.planner is not None and not rows:
        rows = [(args.planner, 0, 0.0)]
    if not rows:
        print(f"no private release made yet; each planner has a budget of epsilon {total:g}")
        return 0
    print(f"{'planner':<32} {'releases':>8} {'spent':>8} {'left':>8}  (budget: epsilon {total:g})")
    for planner, releases, spent in rows:
        print(f"{planner:<32} {releases:>8} {spent:>8g} {max(total - spent, 0):>8g}")
    return 0


async def _spend(settings: Settings, planner: str | None) -> list[tuple[str, int, float]]:
    import asyncpg

    from ingest.errors import StoreUnavailable

    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        found = await conn.fetch(
            f"SELECT planner, count(*) AS releases, sum(epsilon) AS spent"
            f" FROM {settings.postgres.table}_dp_spend"
            " WHERE $1::text IS NULL OR planner = $1 GROUP BY 1 ORDER BY 1",
            planner,
        )
    except asyncpg.UndefinedTableError as exc:
        raise StoreUnavailable(f"{exc}: run `usagepipe db migrate` first") from exc
    finally:
        await conn.close()
    return [(r["planner"], int(r["releases"]), float(r["spent"])) for r in found]


def table(release: Release) -> str:
    """The release as a plain-text table, with a footnote saying how it was made
    private and what this request cost."""
    from rich.console import Console
    from rich.table import Table

    body = release.body
    p = body["privacy"]
    out = Table()
    for column in release.columns:
        out.add_column(column, justify="right" if column in body["measures"] else "left")
    for row in body["rows"]:
        out.add_row(*(_cell(row.get(c)) for c in release.columns))
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, markup=False, highlight=False)
    f = body["filters"]
    console.print(f"{body['title']} (differentially private)")
    span = (datetime.fromisoformat(f[end]) for end in ("start", "end"))
    console.print("{:%Y-%m-%d %H:%M} to {:%Y-%m-%d %H:%M} UTC".format(*span))
    console.print(out)
    b = release.budget
    cost = "replayed: charged nothing" if release.replayed else f"charged {release.charged:g}"
    console.print(
        f"epsilon = {p['epsilon']:g}, delta = {p['delta']:g}; {p['bound']}; a segment is "
        f"shown only if its noisy owner count reaches {p['threshold']}; noise scale: "
        + ", ".join(f"{m.replace('_', ' ')} {s:.3g}" for m, s in p["noise_scale"].items())
    )
    console.print(
        f"{cost}; {b.planner} has epsilon {b.left:g} left of {b.total:g}; released "
        f"{body['released_at'][:19]} UTC"
    )
    return buffer.getvalue()


def _cell(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)
