"""Private releases at scale: what each report's differentially private release shows on
a month of 2,000 devices, against its exact bounded numbers, at each epsilon.

    python bench/dp_releases.py                      # epsilon 1 (the default) and 4
    python bench/dp_releases.py --epsilon 0.5 1 2 4 --devices 4000

Loads bench/refresh.py's fleet (the simulator's realistic usage) into a table of its own,
gives each device an owner as enrichment would (model from the device id, a key for
the 5 in 6 owners with analytics consent, one owner in 4 with a second appliance),
refreshes the rollups, then prints per report and epsilon: the threshold, the
segments with any owner and those shown, the owners behind the median shown segment,
and the median relative error of the first measure over the shown segments. The
product reports only (programs, cycles, errors): the marketing-usable ones need the
registry's owners, which this table has none of. Drops its tables.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
from datetime import UTC, datetime

import asyncpg
from refresh import DAY, drop, fleet_rows

from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from insights.dp import DP_REPORTS, Plan, bounded_segments, cell_key, noisy_rows
from insights.filters import Filters
from insights.privacy import Privacy
from insights.query import Query

COMMAND = "python bench/dp_releases.py " + " ".join(sys.argv[1:])
TABLE = "i20dp_usage_dp"
REPORTS = ("programs", "cycles", "errors")


def owned(rows: list, devices: list[str]) -> list:  # type: ignore[type-arg]
    """`rows` with an owner each, as enrichment stores them: model and category, and a
    key where the owner consents to analytics (5 in 6); every fourth owner has two."""
    owner = {d: i - (i % 4 == 1) for i, d in enumerate(devices)}
    out = []
    for r in rows:
        o = owner[r.device_id]
        consents = o % 6 != 5
        out.append(
            dataclasses.replace(
                r,
                model=r.device_id.rsplit("-", 1)[0],
                category=r.schema.split(".", 1)[0],
                firmware="1.0",
                owner_key=f"owner-{o}" if consents else None,
                analytics_consent=consents,
            )
        )
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    settings = Settings()
    base = settings.postgres
    dsn = base.dsn.get_secret_value()
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    raw = fleet_rows(args.devices, args.days, end)
    rows = owned(raw, sorted({r.device_id for r in raw}))
    pg = PostgresSettings(**{**base.model_dump(), "table": TABLE})
    await drop(dsn, TABLE)
    try:
        async with UsageStore(pg) as store:
            await store.migrate()
            for i in range(0, len(rows), 5000):
                await store.write(rows[i : i + 5000])
            await store.refresh_rollups(wait=True, settled_only=False, now=end)
        print(f"{len(rows):,} rows of {args.devices:,} devices over {args.days} days; "
              f"k = {args.k}, delta = {settings.insights.dp_delta:g}")  # fmt: skip
        f = Filters.parse(start=end - args.days * DAY, end=end, max_days=3660)
        privacy = Privacy(args.k, settings.registry.db_schema)
        conn = await asyncpg.connect(dsn)
        try:
            print(f"{'report':<10} {'epsilon':>7} {'threshold':>9} {'segments':>8} "
                  f"{'shown':>5} {'owners':>6}  median error of the first measure")  # fmt: skip
            for name in REPORTS:
                spec = DP_REPORTS[name]
                async with conn.transaction(readonly=True):
                    q = Query(conn, TABLE, f, privacy, {}, False)
                    exact = {
                        cell_key(s, spec.dimensions): s for s in await bounded_segments(q, spec)
                    }
                first = next(iter(spec.caps))
                for eps in args.epsilon:
                    plan = Plan.make(spec, eps, settings.insights.dp_delta, args.k)
                    shown = noisy_rows(spec, plan, list(exact.values()))
                    errors, owners = [], []
                    for row in shown:
                        s = exact[cell_key_of(row, spec.dimensions)]
                        owners.append(s.owners)
                        true = int(s.values[first] or 0)
                        errors.append(abs(int(row[first] or 0) - true) / max(true, 1))
                    median_owners = f"{statistics.median(owners):>6.0f}" if owners else "     -"
                    error = f"{statistics.median(errors):.1%}" if errors else "-"
                    print(f"{name:<10} {eps:>7g} {plan.threshold:>9} {len(exact):>8} "
                          f"{len(shown):>5} {median_owners}  {error} ({first})")  # fmt: skip
        finally:
            await conn.close()
    finally:
        await drop(dsn, TABLE)


def cell_key_of(row: dict, dimensions: tuple[str, ...]) -> str:  # type: ignore[type-arg]
    import json

    return json.dumps([row[d] for d in dimensions])


if __name__ == "__main__":
    asyncio.run(main())
