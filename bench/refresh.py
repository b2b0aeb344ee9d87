"""What a rollup refresh costs on each storage layout, on a month of a simulated fleet.

Plays `--days` days of `--devices` appliances' household usage (the fleet simulator's
usage model, as `usagepipe simulate` sends it), writes the rows through `UsageStore`
in event-time order into a fresh usage table per layout (plain PostgreSQL always;
TimescaleDB too where `CREATE EXTENSION timescaledb` succeeds on the server), then
times the refreshes the consumers run:

    history   the first refresh: every noted hour and day of the month
    tick      one hour of new rows that has ended, as a `rollup_refresh_s` tick finds it
    day       the day that just ended, with late events in each of the 3 days before
    idle      a tick with nothing noted

For each it prints the seconds, the hours and days recomputed and the raw rows in the
table. The run's "now" is the end of the played span, so every bucket but the last
hour has ended. Tables `usage_bench_refresh_<layout>`, dropped before and after. A
benchmark, not a test: it prints figures and asserts nothing.

    python bench/refresh.py [--devices 1000] [--days 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import platform
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from compression import probe

from ingest.rollups import RefreshReport, bucket_start
from ingest.rows import UsageRow
from ingest.settings import PostgresSettings, Settings
from ingest.sql import Kind
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables
from schemas.parse import parse_telemetry
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids

COMMAND = "python bench/refresh.py " + " ".join(sys.argv[1:])
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def fleet_rows(devices: int, days: int, end: datetime) -> list[UsageRow]:
    """The fleet's usage over `days` days up to `end`, as the consumer stores it."""
    plan = FleetPlan(
        devices=devices,
        messages_per_device=0,
        seed=3,
        window=days * DAY,
        sim_start=end - days * DAY,
        clock=end,
    )
    rows = []
    for device in device_ids(plan):
        for i, msg in enumerate(plan_device(plan, device)):
            env = parse_telemetry(msg.payload, now=end, max_future_skew=HOUR, max_bytes=65536)
            rows.append(UsageRow.from_envelope(env, hash(device) % 6, i))
    rows.sort(key=lambda r: r.event_time)
    return rows


async def drop(dsn: str, table: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await drop_usage_tables(conn, table)
    finally:
        await conn.close()


def shifted(rows: list[UsageRow], by: timedelta, boot: str) -> list[UsageRow]:
    """`rows` again, `by` later, under boots of their own (one for each boot of `rows`,
    so no two share a message id): new events, not duplicates."""
    return [
        dataclasses.replace(r, event_time=r.event_time + by, boot_id=f"{boot}-{r.boot_id}")
        for r in rows
    ]


async def timed(store: UsageStore, now: datetime) -> RefreshReport:
    """The consumers' periodic refresh at `now`, days included."""
    done = await store.refresh_rollups(wait=True, settled_only=True, now=now)
    assert done is not None  # wait=True
    return done


async def run(
    base: PostgresSettings,
    kind: Kind,
    rows: list[UsageRow],
    end: datetime,
    after_history: Callable[[UsageStore], Awaitable[None]] | None = None,
) -> dict[str, RefreshReport]:
    """The four refreshes on a fresh table of layout `kind`. `after_history` is called
    once the history's rows are in, before its refresh (`bench/layouts.py` runs the
    compression policy there)."""
    table = f"usage_bench_refresh_{kind}"
    dsn = base.dsn.get_secret_value()
    await drop(dsn, table)
    pg = PostgresSettings(
        **{**base.model_dump(), "table": table, "use_timescaledb": kind == "timescaledb"}
    )
    out: dict[str, RefreshReport] = {}
    try:
        async with UsageStore(pg) as store:
            await store.migrate()
            if store.layout.kind != kind:
                raise SystemExit(f"bench/refresh.py: {table} came out {store.layout.kind}")
            last_hour = bucket_start(end, HOUR) - HOUR
            history = [r for r in rows if r.event_time < last_hour]
            for i in range(0, len(history), 5000):
                await store.write(history[i : i + 5000])
            if after_history is not None:
                await after_history(store)
            out["history"] = await timed(store, last_hour)
            # Every tick after that finds one ended hour (the day's still open).
            await store.write([r for r in rows if r.event_time >= last_hour])
            out["tick"] = await timed(store, bucket_start(end, HOUR) + 5 * timedelta(minutes=1))
            # The day that just ended, plus late events in each of the three before it.
            day = bucket_start(end, DAY) - DAY
            late = [r for r in rows if day - 3 * DAY <= r.event_time < day][::20]
            await store.write(shifted(late, timedelta(minutes=1), "late"))
            out["day"] = await timed(store, bucket_start(end, DAY) + timedelta(minutes=5))
            out["idle"] = await timed(store, bucket_start(end, DAY) + timedelta(minutes=6))
    finally:
        await drop(dsn, table)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    base = Settings().postgres
    end = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    rows = fleet_rows(args.devices, args.days, end)
    version, timescale, _ = await probe(base.dsn.get_secret_value(), "USAGEPIPE_POSTGRES__DSN")
    layouts: list[Kind] = ["partitioned"]
    if timescale:
        layouts.append("timescaledb")
    print(
        f"{len(rows):,} rows from {args.devices:,} devices over {args.days} days;"
        f" PostgreSQL {version}, TimescaleDB {timescale or 'not available'},"
        f" Python {platform.python_version()}; best of {args.repeat}"
    )
    for kind in layouts:
        best: dict[str, RefreshReport] = {}
        for _ in range(args.repeat):
            for step, done in (await run(base, kind, rows, end)).items():
                if step not in best or done.seconds < best[step].seconds:
                    best[step] = done
        for step, done in best.items():
            print(
                f"{kind:<12} {step:<8} {done.seconds:8.3f} s  {done.hours:5} hours"
                f" {done.days:3} days recomputed"
            )


if __name__ == "__main__":
    asyncio.run(main())
