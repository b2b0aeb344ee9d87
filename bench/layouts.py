"""Both storage layouts side by side: the store stage, the bytes stored, the refresh cost.

One command for each layout a server offers: plain PostgreSQL (native partitions) on
the settings' server (USAGEPIPE_POSTGRES__DSN), and TimescaleDB (a hypertable) on
`--timescaledb-dsn`, or on the same server where TimescaleDB is preloaded there. Both
get the same rows: the demo's traffic (`bench/compression.py`'s: `--devices`
appliances over `--window` ending now, enriched as the consumer enriches them), each
message once, in event-time order. For each layout, the same phases:

    store     the store stage against raw COPY into the same shape, best of
              `--repeat` (`bench/store.py`'s runs, on `--store-rows` of the newest
              rows in batches of `--batch`): UsageStore.write (rows, ids, rollup
              notes, offsets, one transaction a batch) against asyncpg COPY into the
              partitioned table keyed by (device_id, boot_id, seq, event_time), or
              into the hypertable as migrated (which has that key itself)
    bytes     every row but the last hour's written through the store into a fresh
              table (`bench/refresh.py`'s run); then, on TimescaleDB, the table's
              compression policy runs (`CALL run_job`: chunks older than allowed
              lateness plus one chunk) and the ratio is printed, of the compressed
              chunks and of the whole table; on plain PostgreSQL the table's bytes
    refresh   on that table, the policy having run, the refreshes the consumers
              make (`bench/refresh.py`): the first (the whole history), a tick that
              finds one ended hour, the day that just ended with late events in the
              three before it, and an idle tick; best of `--repeat`

The refresh cost per minute of traffic is what the consumers' refreshes take for each
minute of rows at the rate played: each hour one tick finds an ended hour and the
others (every `rollup_refresh_s`, 60 s by default) find nothing, so (tick + 59 idle)
/ 60 seconds of PostgreSQL a minute; plus the day refresh, day / 1440 where it runs
once a day, or day / 30 where late rows note ended days all the time and it runs every
`rollup_day_refresh_s` (1,800 s by default): both are printed.

Tables `usage_bench_store`, `usage_bench_raw`, `usage_bench_refresh_<layout>` on each
server, dropped before and after. A benchmark, not a test: it prints figures
and asserts nothing; it exits 1 only if `--timescaledb-dsn` names a server that cannot
have TimescaleDB.

    python bench/layouts.py [--timescaledb-dsn DSN] [--devices 1200] [--window 28d]
        [--store-rows 100000] [--batch 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

from compression import days_text, demo_rows, figures, policy_job, probe, run_policy
from refresh import run as run_refreshes
from store import run_raw, run_store

from ingest.rollups import RefreshReport
from ingest.rows import UsageRow
from ingest.settings import PostgresSettings, Settings
from ingest.sql import Kind
from ingest.store import UsageStore
from simulators.cli import span

COMMAND = "python bench/layouts.py " + " ".join(sys.argv[1:])


@dataclass
class Layout:
    """One layout's server and what was measured on it."""

    kind: Kind
    settings: PostgresSettings
    version: str
    store_s: float = float("inf")
    raw_s: float = float("inf")
    sizes: list[str] = field(default_factory=list)
    refreshes: dict[str, RefreshReport] = field(default_factory=dict)


def on(base: PostgresSettings, dsn: str) -> PostgresSettings:
    return PostgresSettings(**{**base.model_dump(), "dsn": dsn})


async def layouts(base: PostgresSettings, timescaledb_dsn: str | None) -> list[Layout]:
    """Plain PostgreSQL on the settings' server, and TimescaleDB where there is one."""
    dsn = base.dsn.get_secret_value()
    where = "the settings' server (USAGEPIPE_POSTGRES__DSN)"
    version, timescale, why = await probe(dsn, where)
    found = [Layout("partitioned", base, f"PostgreSQL {version}")]
    if timescaledb_dsn is not None:
        where = "--timescaledb-dsn"
        version, timescale, why = await probe(timescaledb_dsn, where)
        if timescale is None:
            raise SystemExit(f"bench/layouts.py: no TimescaleDB on {where}: {why}")
        dsn = timescaledb_dsn
    if timescale is None:
        print(f"TimescaleDB: not measured ({why}); give --timescaledb-dsn to measure it")
    else:
        found.append(
            Layout(
                "timescaledb",
                on(base, dsn),
                f"PostgreSQL {version}, TimescaleDB {timescale} ({where})",
            )
        )
    return found


def mb(n: int) -> str:
    return f"{int(n) / 1e6:,.1f} MB"


async def measure_bytes(layout: Layout, store: UsageStore) -> None:
    """After the history is in: on TimescaleDB, run the compression policy and note
    the ratio; on plain PostgreSQL, note the table's bytes. Once a layout."""
    async with store.pool.acquire() as conn:
        t = store.table
        if layout.kind == "partitioned":
            size = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)"
                " FROM pg_inherits WHERE inhparent = $1::regclass",
                t,
            )
            if not layout.sizes:
                layout.sizes.append(f"{mb(size)} (partitions and their indexes; no compression)")
            return
        await conn.execute("SET timescaledb.enable_compression_ratio_warnings = off")
        job = await policy_job(conn, t)
        whole = f"SELECT total_bytes FROM hypertable_detailed_size('{t}')"
        before = await conn.fetchval(whole)
        took = await run_policy(conn, job)
        after = await conn.fetchval(whole)
        f = await figures(conn, t)
        chunks = await conn.fetchval(f"SELECT count(*) FROM show_chunks('{t}')")
        if not layout.sizes:
            layout.sizes += [
                f"the policy compressed {f['chunks']} of {chunks} chunks in {took:.2f}s:"
                f" {mb(f['before'])} -> {mb(f['after'])} = ratio"
                f" {f['before'] / max(f['after'], 1):.2f}"
                f" ({f['rows'] / max(f['batches'], 1):,.0f} rows a batch)",
                f"whole table (newest chunks uncompressed): {mb(before)} -> {mb(after)}"
                f" = ratio {before / max(after, 1):.2f}",
            ]


async def run(args: argparse.Namespace) -> None:
    base = Settings().postgres
    measured = await layouts(base, args.timescaledb_dsn)
    started = time.perf_counter()
    rows: list[UsageRow] = []
    seen = set()
    for row in demo_rows(args.devices, args.window, args.seed):
        if row.key not in seen:  # once: raw COPY into a keyed table refuses a repeat
            seen.add(row.key)
            rows.append(row)
    rows.sort(key=lambda r: r.event_time)
    built_s = time.perf_counter() - started
    minutes = args.window / timedelta(minutes=1)
    newest = rows[-args.store_rows :]
    batches = [newest[i : i + args.batch] for i in range(0, len(newest), args.batch)]
    print(
        f"{len(rows):,} rows from {args.devices:,} devices over {days_text(args.window)} ="
        f" {len(rows) / minutes:,.1f} rows a minute (built in {built_s:.1f}s);"
        f" store stage on the newest {len(newest):,} in batches of {args.batch:,};"
        f" best of {args.repeat}; Python {platform.python_version()}"
    )
    end = rows[-1].event_time
    for _ in range(args.repeat):  # alternate, so drift hits all alike
        for layout in measured:
            s, k = layout.settings, layout.kind
            layout.raw_s = min(layout.raw_s, await run_raw(s, batches, keyed=True, kind=k))
            layout.store_s = min(layout.store_s, await run_store(s, batches, kind=k))

            async def after_history(store: UsageStore, layout: Layout = layout) -> None:
                await measure_bytes(layout, store)

            for step, done in (await run_refreshes(s, k, rows, end, after_history)).items():
                best = layout.refreshes.get(step)
                if best is None or done.seconds < best.seconds:
                    layout.refreshes[step] = done
    for layout in measured:
        print(f"\n{layout.kind}: {layout.version}")
        store_rate, raw_rate = len(newest) / layout.store_s, len(newest) / layout.raw_s
        shape = "hypertable" if layout.kind == "timescaledb" else "partitioned table"
        for label, rate in (
            ("store stage (UsageStore.write)", store_rate),
            (f"raw COPY ({shape}, keyed)", raw_rate),
        ):
            print(f"  {label + ':':<40}{rate:>10,.0f} rows/s")
        print(f"  ratio store / raw COPY: {store_rate / raw_rate:.2f}")
        for line in layout.sizes:
            print(f"  bytes: {line}")
        done_by = layout.refreshes
        for step, done in done_by.items():
            print(
                f"  refresh {step:<8} {done.seconds:8.3f} s  {done.hours:5} hours"
                f" {done.days:3} days recomputed"
            )
        tick, idle, day = (done_by[s].seconds for s in ("tick", "idle", "day"))
        pg = layout.settings
        ticks = 3600 / pg.rollup_refresh_s  # an hour's ticks, one of them finding the hour
        hourly = (tick + (ticks - 1) * idle) / 60
        late = 60 / pg.rollup_day_refresh_s  # day refreshes a minute, late rows always
        print(
            f"  refresh cost per minute of traffic ({len(rows) / minutes:,.1f} rows a minute):"
            f" {(hourly + day / 1440) * 1000:.2f} ms of PostgreSQL with one day refresh a day,"
            f" {(hourly + day * late) * 1000:.2f} ms if late rows note ended days before every"
            f" rollup_day_refresh_s ({pg.rollup_day_refresh_s:g} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timescaledb-dsn", help="a server with TimescaleDB (default: the settings' one, if)"
    )
    parser.add_argument("--devices", type=int, default=1200)
    parser.add_argument("--window", type=span, default=timedelta(days=28), help="28d")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--store-rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
