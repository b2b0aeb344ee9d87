"""Planners' reports at scale: a month of 2,000 devices (or `--shape year`, 10,000 devices
over 365 days, scaled with `--devices`/`--days` where disk or time demands; the output
says so, with the scale factor) loaded straight into a usage table of its own, the
rollups refreshed, then every report timed over the HTTP API and the CLI, without and
with a filter: p50, p95, max, beside the target (HTTP p95 <= 200 ms on the month,
<= 1 s on the year), with the rows each report's queries read and the buffers they
touched (EXPLAIN (ANALYZE, BUFFERS)), and the database's size.

    nice -n 10 .venv/bin/python bench/report_scale.py                 # month, 2,000 devices
    nice -n 10 .venv/bin/python bench/report_scale.py --shape year --devices 2000

What it does, in order:

1. registers the fleet's devices in a registry schema of its own through the
   simulator's provisioning (`simulators.provision`: owners with their consents,
   regions, tiers, purchase channels, handovers), so owner-based reports (k-anonymity,
   the marketing population) and the heat map's owners per local hour have data;
2. plays the fleet's realistic usage over the span (`simulators.plan`, the usage model
   as `usagepipe simulate` sends it), enriches each row through the consumer's own
   `ingest.enrich.Enricher` against that registry, and writes it through `UsageStore`
   (the consumer's COPY), `--group` devices at a time in event-time order (a year of
   10,000 devices does not fit in memory at once);
3. refreshes every rollup (`refresh_rollups`, every note) and ANALYZEs the tables, as
   autovacuum would in time;
4. for each report and filter: one in-process run with every query recorded, each
   then run under EXPLAIN (ANALYZE, BUFFERS): rows read (the scan nodes' rows returned
   and removed by filter, times their loops), shared buffers hit + read, and the
   server's execution time summed; then `--requests` requests to `usagepipe insights
   serve` (a subprocess on `--port`, a planner's token from the dev signer) and
   `--cli-requests` runs of `usagepipe report NAME --format json` (a new process each
   time, as a planner runs it: start-up included).

The range is the default one, the days up to the current hour, so the first and last
days are partial and read live, as a planner's default view is. Table, registry schema
and events topic are named after `--name` and dropped after (`--keep` keeps the table
and registry). Prints `uptime` before
and after: on a shared machine the timings move with the load, the rows and buffers do
not. A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
from e2e_procs import say
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from ingest.enrich import Enricher
from ingest.kafka import admin_client, ensure_topics
from ingest.metrics import ConsumerMetrics
from ingest.migrations import Connection
from ingest.rows import UsageRow
from ingest.settings import Settings
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables
from insights.filters import Filters
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.runner import run_report
from schemas.parse import parse_telemetry
from simulators.plan import FleetPlan, plan_device
from simulators.provision import CollectedAccounts, open_registry, provision
from simulators.units import device_ids

COMMAND = "nice -n 10 .venv/bin/python bench/report_scale.py " + " ".join(sys.argv[1:])
SHAPES = {"month": (2000, 28, 0.2), "year": (10000, 365, 1.0)}
"""devices, days, HTTP p95 target in seconds (issue 19)."""
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
BATCH = 5000
SCANS = ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "CTE Scan")
"""Plan nodes that read a relation's rows (a CTE Scan re-reads rows a CTE made)."""


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


async def run(argv: list[str], env: dict[str, str]) -> bytes:
    """`argv`'s standard output; exits naming the command if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[1:4])} exited {proc.returncode}: {err.decode()[-500:]}")
    return out


def group_rows(plan: FleetPlan, devices: list[str], end: datetime) -> Iterator[UsageRow]:
    """The usage of `devices` in event-time order, as the consumer stores it."""

    def one(i: int, device: str) -> Iterator[UsageRow]:
        for n, msg in enumerate(plan_device(plan, device)):
            env = parse_telemetry(msg.payload, now=end, max_future_skew=HOUR, max_bytes=65536)
            yield UsageRow.from_envelope(env, i % 6, n)

    lists = [sorted(one(i, d), key=lambda r: r.event_time) for i, d in enumerate(devices)]
    yield from heapq.merge(*lists, key=lambda r: r.event_time)


@dataclass
class Recorder:
    """A connection that records every statement a report runs (for EXPLAIN)."""

    conn: asyncpg.Connection
    queries: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.queries.append((sql, args))
        return await self.conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.queries.append((sql, args))
        return await self.conn.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        self.queries.append((sql, args))
        return await self.conn.fetchrow(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.conn.execute(sql, *args)

    def transaction(self, **kwargs: Any) -> Any:
        return self.conn.transaction(**kwargs)


def rows_read(node: dict[str, Any]) -> int:
    """Rows the scan nodes under `node` read: returned plus removed by filter, per loop."""
    n = 0
    if node["Node Type"] in SCANS:
        loops = node.get("Actual Loops", 1)
        n += int((node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops)
    for child in node.get("Plans", []):
        n += rows_read(child)
    return n


@dataclass
class Explained:
    statements: int = 0
    rows: int = 0
    buffers: int = 0
    server_ms: float = 0.0
    worst: str = ""


async def explain(
    conn: asyncpg.Connection, queries: list[tuple[str, tuple[Any, ...]]], work_mem_mb: int
) -> Explained:
    out = Explained()
    worst = 0
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{work_mem_mb}MB'; SET LOCAL jit = off")
        for sql, args in queries:
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
            top = (json.loads(plan) if isinstance(plan, str) else plan)[0]
            node = top["Plan"]
            read = rows_read(node)
            out.statements += 1
            out.rows += read
            out.buffers += node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
            out.server_ms += top.get("Execution Time", 0.0)
            if read > worst:
                worst, out.worst = read, " ".join(sql.split())[:60]
    return out


async def load(args: argparse.Namespace, settings: Settings, plan: FleetPlan, end: datetime) -> int:
    """Enrich and store the fleet's usage, `args.group` devices at a time."""
    devices = device_ids(plan)
    metrics = ConsumerMetrics(CollectorRegistry())
    enricher = Enricher(
        settings.enrich,
        registry_schema=settings.registry.db_schema,
        dsn=settings.postgres.dsn.get_secret_value(),
        metrics=metrics,
    )
    written = unknown = 0
    started = time.perf_counter()
    async with enricher, UsageStore(settings.postgres) as store:
        await store.migrate()
        for g in range(0, len(devices), args.group):
            batch: list[UsageRow] = []
            for r in group_rows(plan, devices[g : g + args.group], end):
                batch.append(r)
                if len(batch) == BATCH:
                    enriched = await enricher.enrich(batch)
                    unknown += len(enriched.unregistered)
                    written += await store.write(enriched.rows)
                    batch = []
            if batch:
                enriched = await enricher.enrich(batch)
                unknown += len(enriched.unregistered)
                written += await store.write(enriched.rows)
            done = min(g + args.group, len(devices))
            say(f"loaded {done:,}/{len(devices):,} devices: {written:,} rows"
                f" ({written / (time.perf_counter() - started):,.0f} rows/s)")  # fmt: skip
        if unknown:
            raise SystemExit(f"bench/report_scale.py: {unknown:,} rows of unregistered devices")
        say("refreshing the rollups (every note) ...")
        t0 = time.perf_counter()
        done_ = await store.refresh_rollups(wait=True, settled_only=False, now=end)
        assert done_ is not None
        say(f"rollups refreshed in {time.perf_counter() - t0:.1f} s: {done_.hours:,} hours,"
            f" {done_.days:,} days")  # fmt: skip
    return written


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="month")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--days", type=int)
    parser.add_argument("--requests", type=int, default=10, help="HTTP requests a report")
    parser.add_argument("--cli-requests", type=int, default=3, help="CLI runs a report")
    parser.add_argument("--group", type=int, default=100, help="devices generated at once")
    parser.add_argument("--port", type=int, default=19700, help="the API's private port")
    parser.add_argument("--name", default=f"rscale{secrets.token_hex(3)}")
    parser.add_argument("--keep", action="store_true", help="keep the table and registry")
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip(), flush=True)
    print(f"load before: {uptime()}")
    full_devices, full_days, target_s = SHAPES[args.shape]
    devices, days = args.devices or full_devices, args.days or full_days
    factor = devices * days / (full_devices * full_days)
    disk = shutil.disk_usage("/")
    print(f"disk: {disk.free / 1e9:.0f} GB free of {disk.total / 1e9:.0f} GB")
    if factor != 1:
        print(f"SCALED DOWN: {devices:,} devices x {days} days = {factor:.3f} of the"
              f" {args.shape} shape ({full_devices:,} x {full_days})")  # fmt: skip
    base = Settings()
    n = args.name
    settings = base.model_copy(
        update={
            "postgres": base.postgres.model_copy(update={"table": f"usage_{n}"}),
            "registry": base.registry.model_copy(
                update={"db_schema": f"reg_{n}", "events_topic": f"{n}.registry"}
            ),
            "enrich": base.enrich.model_copy(
                update={"owner_key_secret": SecretStr(secrets.token_hex(32))}
            ),
        }
    )
    table, schema = settings.postgres.table, settings.registry.db_schema
    dsn = settings.postgres.dsn.get_secret_value()
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    plan = FleetPlan(
        devices=devices,
        messages_per_device=0,
        seed=3,
        fleet="rscale",
        window=days * DAY,
        sim_start=end - days * DAY,
        clock=end,
    )
    env = {
        **os.environ,
        "USAGEPIPE_POSTGRES__TABLE": table,
        "USAGEPIPE_REGISTRY__DB_SCHEMA": schema,
        "USAGEPIPE_INSIGHTS__MAX_RANGE_DAYS": str(max(400, days + 2)),
    }
    usagepipe = str(Path(sys.executable).with_name("usagepipe"))
    server: asyncio.subprocess.Process | None = None
    try:
        await ensure_topics(settings.kafka, settings.registry.events_topic)
        t0 = time.perf_counter()
        async with open_registry(settings, broker=CollectedAccounts()) as registry:
            fleet = await provision(registry, plan)
        say(f"registered {fleet.registered:,} devices ({fleet.transferred:,} handed over)"
            f" in {time.perf_counter() - t0:.1f} s, registry schema {schema}")  # fmt: skip
        t0 = time.perf_counter()
        written = await load(args, settings, plan, end)
        say(f"{written:,} rows stored and rolled up in {time.perf_counter() - t0:.1f} s")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"ANALYZE {table}")
            for suffix in ("device_daily", "hourly", "daily", "hourly_owners"):
                if await conn.fetchval("SELECT to_regclass($1)", f"{table}_{suffix}"):
                    await conn.execute(f"ANALYZE {table}_{suffix}")
            size = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " WHERE c.relname LIKE $1 AND c.relkind IN ('r', 'm')",
                f"{table}%",
            )
            sizes = await conn.fetch(
                "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes,"
                " c.reltuples::bigint AS rows FROM pg_class c"
                " WHERE c.relname = ANY($1::text[]) ORDER BY 1",
                [f"{table}_{s}" for s in ("device_daily", "hourly", "daily", "hourly_owners")],
            )
            print(f"{table}*: {written:,} rows, {int(size) / 1e6:,.0f} MB on disk (usage"
                  " table with its partitions and ids, rollups)")  # fmt: skip
            for r in sizes:
                print(f"  {r['relname'][len(table) + 1 :]:<14} {r['rows']:>11,} rows"
                      f" {r['bytes'] / 1e6:>8,.1f} MB")  # fmt: skip
            since = f"{end - days * DAY:%Y-%m-%dT%H:%M}Z"
            until = f"{end:%Y-%m-%dT%H:%M}Z"
            cases = {"none": {}, "category=washer": {"category": ["washer"]}}
            tz = settings.insights.timezone
            privacy = Privacy(settings.insights.k_anonymity, schema)
            server = await asyncio.create_subprocess_exec(
                usagepipe, "--log-level", "WARNING", "insights", "serve",
                "--host", "127.0.0.1", "--port", str(args.port), env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            token = (
                (await run([usagepipe, "auth", "token", "--subject", "bench", "--scope",
                            "planner"], env))
                .decode().strip().splitlines()[-1]
            )  # fmt: skip
            url = f"http://127.0.0.1:{args.port}"
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
            ) as http:
                for _ in range(100):
                    try:
                        if (await http.get("/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)
                print(f"range {since} to {until}; HTTP target p95 <= {target_s * 1000:.0f} ms;"
                      f" {args.requests} HTTP requests, {args.cli_requests} CLI runs each;"
                      f" k = {privacy.k}")  # fmt: skip
                print(f"{'report':<13} {'filter':<16} {'HTTP p50':>8} {'p95':>6} {'max':>6}"
                      f"  {'CLI p50':>7} {'p95':>6} {'max':>6}  {'stmts':>5} {'rows read':>10}"
                      f" {'buffers':>8} {'server':>7}  target")  # fmt: skip
                for name in REPORTS:
                    for label, extra in cases.items():
                        filters = Filters.parse(
                            start=since,
                            end=until,
                            category=extra.get("category", ()),
                            max_days=3660,
                        )
                        recorder = Recorder(conn)
                        await run_report(
                            cast(Connection, recorder), name, filters, table=table,
                            privacy=privacy, options={}, timezone=tz,
                            work_mem_mb=settings.insights.report_work_mem_mb,
                        )  # fmt: skip
                        plan_ = await explain(
                            conn, recorder.queries, settings.insights.report_work_mem_mb
                        )
                        params: dict[str, Any] = {"start": since, "end": until, **extra}
                        web = []
                        for _ in range(args.requests):
                            t0 = time.perf_counter()
                            answer = await http.get(f"/api/reports/{name}", params=params)
                            web.append(time.perf_counter() - t0)
                            if answer.status_code != 200:
                                raise SystemExit(f"{name}: HTTP {answer.status_code} {answer.text}")
                        cli = []
                        argv = [usagepipe, "report", name, "--start", since, "--end", until,
                                "--format", "json"]  # fmt: skip
                        for c in extra.get("category", []):
                            argv += ["--category", c]
                        for _ in range(args.cli_requests):
                            t0 = time.perf_counter()
                            await run(argv, env)
                            cli.append(time.perf_counter() - t0)
                        p95 = pct(web, 0.95)
                        mark = "ok" if p95 <= target_s else "MISS"
                        print(f"{name:<13} {label:<16} {statistics.median(web) * 1e3:>8.0f}"
                              f" {p95 * 1e3:>6.0f} {max(web) * 1e3:>6.0f}"
                              f"  {statistics.median(cli) * 1e3:>7.0f} {pct(cli, 0.95) * 1e3:>6.0f}"
                              f" {max(cli) * 1e3:>6.0f}  {plan_.statements:>5}"
                              f" {plan_.rows:>10,} {plan_.buffers:>8,}"
                              f" {plan_.server_ms:>5.0f}ms  {mark}", flush=True)  # fmt: skip
        finally:
            await conn.close()
    finally:
        if server is not None:
            server.terminate()
            await server.wait()
        if not args.keep:
            conn = await asyncpg.connect(dsn)
            try:
                await drop_usage_tables(conn, table)
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()
            async with admin_client(settings.kafka) as admin:
                await admin.delete_topics([settings.registry.events_topic])
        print(f"load after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
