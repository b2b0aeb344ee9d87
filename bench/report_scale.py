"""Planners' reports at scale: a month of 2,000 devices (or `--shape year`, 10,000 devices
over 365 days, scaled with `--devices`/`--days` where disk or time demands; the output says
so) loaded straight into a table of its own, rollups refreshed, then every report timed
`--requests` times without and with a filter: p50, p95, max, beside the target (p95 <=
200 ms on the month, <= 1 s on the year). Prints the table's size on disk. Drops its tables.

    python bench/report_scale.py                  # month, 2,000 devices
    python bench/report_scale.py --shape year --devices 1000 --days 90

Reuses bench/refresh.py's fleet (the simulator's realistic usage, as the consumer stores
it). First step of issue 19 item 3: timings are in-process (`insights.runner.run_report`,
the code the HTTP API and the CLI call); HTTP, CLI, registered owners and EXPLAIN rows
are not measured yet.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime

import asyncpg
from refresh import DAY, drop, fleet_rows

from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from insights.filters import Filters
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.runner import run_report

COMMAND = "python bench/report_scale.py " + " ".join(sys.argv[1:])
TABLE = "i19r_usage_scale"
SHAPES = {"month": (2000, 28, 0.2), "year": (10000, 365, 1.0)}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="month")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--days", type=int)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    full_devices, full_days, target_s = SHAPES[args.shape]
    devices, days = args.devices or full_devices, args.days or full_days
    if (devices, days) != (full_devices, full_days):
        print(f"SCALED DOWN: {devices:,} devices x {days} days "
              f"(the {args.shape} shape is {full_devices:,} x {full_days})")  # fmt: skip
    settings = Settings()
    base = settings.postgres
    dsn = base.dsn.get_secret_value()
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    started = time.perf_counter()
    rows = fleet_rows(devices, days, end)
    print(f"generated {len(rows):,} rows in {time.perf_counter() - started:.1f} s")
    pg = PostgresSettings(**{**base.model_dump(), "table": TABLE})
    await drop(dsn, TABLE)
    try:
        async with UsageStore(pg) as store:
            await store.migrate()
            started = time.perf_counter()
            for i in range(0, len(rows), 5000):
                await store.write(rows[i : i + 5000])
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            await store.refresh_rollups(wait=True, settled_only=False, now=end)
            print(f"loaded in {loaded:.1f} s, rollups refreshed in "
                  f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        conn = await asyncpg.connect(dsn)
        try:
            size = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " WHERE c.relname LIKE $1 AND c.relkind IN ('r', 'p', 'm')",
                f"{TABLE}%",
            )
            print(f"{TABLE}*: {len(rows):,} rows, {int(size) / 1e6:.0f} MB on disk "
                  "(usage table, partitions, rollups)")  # fmt: skip
            since = f"{end - days * DAY:%Y-%m-%dT%H:%M}Z"
            until = f"{end:%Y-%m-%dT%H:%M}Z"
            plain = Filters.parse(start=since, end=until, max_days=3660)
            filtered = Filters.parse(start=since, end=until, category=["washer"], max_days=3660)
            tz = settings.insights.timezone
            privacy = Privacy(args.k, settings.registry.db_schema)
            print(f"target p95 <= {target_s * 1000:.0f} ms; {args.requests} requests each; "
                  "shared 2-core machine")  # fmt: skip
            print(f"{'report':<20} {'filter':<16} {'p50':>7} {'p95':>7} {'max':>7}  target")
            for name in REPORTS:
                for label, f in (("none", plain), ("category=washer", filtered)):
                    times = []
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        await run_report(
                            conn, name, f, table=TABLE, privacy=privacy, options={}, timezone=tz
                        )
                        times.append(time.perf_counter() - t0)
                    p95 = pct(times, 0.95)
                    mark = "ok" if p95 <= target_s else "MISS"
                    print(f"{name:<20} {label:<16} {statistics.median(times) * 1000:>7.0f} "
                          f"{p95 * 1000:>7.0f} {max(times) * 1000:>7.0f}  {mark}")  # fmt: skip
        finally:
            await conn.close()
    finally:
        await drop(dsn, TABLE)


if __name__ == "__main__":
    asyncio.run(main())
