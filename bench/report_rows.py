"""What each report shows over the configured usage table: rows shown, generalised and
suppressed at each k, and how long each report takes (best of `--repeat`).

Reads the table and registry schema the settings name (`USAGEPIPE_POSTGRES__TABLE`,
`USAGEPIPE_REGISTRY__DB_SCHEMA`), so point it at a simulated fleet's data first, e.g.
a `usagepipe simulate --devices 1000 --window 28d` run through a bridge and a consumer.
Read-only. Prints figures; asserts nothing.

    python bench/report_rows.py --start 2026-11-03 --end 2026-12-02 --k 3 10 20

Columns: fine (segments the SQL found), >=k (of them, with k owners or more), shown
(rows with numbers: fine segments of k owners and generalised rows), gen rows / gen
segs (generalised rows and the small segments inside them), supp rows / supp segs
(suppressed rows and the segments they hold), ms.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg

from ingest.settings import Settings
from insights.filters import Filters
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.runner import run_report
from insights.specs import Report

COMMAND = "python bench/report_rows.py " + " ".join(sys.argv[1:])
HEADER = ("report", "k", "fine", ">=k", "shown", "gen rows", "gen segs", "supp rows",
          "supp segs", "ms")  # fmt: skip


def figures(report: Report) -> tuple[int, ...]:
    fine = sum(len(r.members) or 1 for r in report.rows)
    big = sum(1 for r in report.rows if not r.members and not r.suppressed)
    shown = sum(1 for r in report.rows if not r.suppressed)
    suppressed = sum(1 for r in report.rows if r.suppressed)
    return (fine, big, shown, report.generalised_rows, report.generalised_segments,
            suppressed, report.suppressed_segments)  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start")
    parser.add_argument("--end")
    parser.add_argument("--k", type=int, nargs="+", default=[10])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    settings = Settings()
    f = Filters.parse(start=args.start, end=args.end, max_days=3660)
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetchval(f"SELECT count(*) FROM {settings.postgres.table}")
        print(f"{settings.postgres.table}: {rows:,} rows; {f.start:%Y-%m-%d %H:%M} to "
              f"{f.end:%Y-%m-%d %H:%M} UTC")  # fmt: skip
        print(("{:<20}" + " {:>9}" * (len(HEADER) - 1)).format(*HEADER))
        for k in args.k:
            privacy = Privacy(k, settings.registry.db_schema)
            for name in REPORTS:
                for by in ("channel", "tier") if name == "cohorts" else (None,):
                    best = float("inf")
                    for _ in range(args.repeat):
                        started = time.perf_counter()
                        report = await run_report(
                            conn, name, f, table=settings.postgres.table, privacy=privacy,
                            options={"by": by}, timezone=settings.insights.timezone,
                        )  # fmt: skip
                        best = min(best, time.perf_counter() - started)
                    label = f"{name} by {by}" if by else name
                    cells = (*figures(report), round(best * 1000))
                    print(("{:<20}" + " {:>9}" * (len(HEADER) - 1)).format(label, k, *cells))
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
