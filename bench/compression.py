"""How much TimescaleDB's compression saves on realistic traffic, and how it batches it.

Builds the demo's traffic (`simulators.cli.demo_plan`: 1,200 appliances, four weeks of
household usage ending now, 2 % of messages sent twice), each message parsed as the
consumer parses it and enriched as the consumer enriches it from the registry the demo
provisions: model, category, the firmware at event time (from the device's own
installation events), and from the ownership period covering the event (the unit's
history, `simulators.history`: registration, a handover for 3 % of units) the purchase
channel, the consent and, with it, region, membership tier and owner key. Resolved by
`ingest.registry_lookup.DeviceFacts`, as `ingest.enrich` does.

The rows go through `UsageStore.write`, in the consumer's batch size and in arrival
order (every device sending at once), into a fresh TimescaleDB usage table
(`usage_bench_compression`, dropped before and after); then the table's compression
policy runs (`CALL run_job`: every chunk older than allowed lateness plus one chunk)
and the script prints what it compressed: rows, chunks, batches (TimescaleDB's
compressed rows, up to 1,000 rows each) and rows per batch, rows per segment (per
segmentby value and chunk), the bytes before and after, and the ratio. Then two
statements on the compressed chunks: 1,000 of their rows re-sent (the store's slow
path; how many were stored and how many rows that decompressed) and erasure's UPDATE
for the owner with most rows (rolled back; the batches and rows TimescaleDB
decompressed for it, from EXPLAIN ANALYZE), each timed.

`--segmentby`/`--orderby` set other compression settings after migrating, to compare
(the settings before migration 006: `--segmentby device_id --orderby 'event_time DESC,
boot_id, seq'`); `--chunk-interval` the table's chunk interval (`postgres.
partition_interval_s`); `--devices`, `--window`, `--seed` the fleet. It prints figures
and asserts nothing. Needs TimescaleDB (the server of
USAGEPIPE_POSTGRES__DSN); without it, it says so and exits 1.

    USAGEPIPE_POSTGRES__DSN=postgresql://postgres@127.0.0.1:5442/test \
        python bench/compression.py [--devices 1200] [--window 28d] [--chunk-interval 1d]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import NAMESPACE_URL, UUID, uuid5

import asyncpg

from ingest.enrich import with_facts
from ingest.migrations import Connection
from ingest.owner_keys import owner_key
from ingest.registry_lookup import DeviceFacts, Install, Period
from ingest.rows import UsageRow
from ingest.settings import ConsumerSettings, PostgresSettings, Settings
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables, timescaledb_choice
from schemas.errors import InvalidTelemetry
from schemas.parse import parse_telemetry
from simulators.cli import demo_plan, span
from simulators.history import UnitHistory, unit_history
from simulators.plan import FleetPlan, plan_device
from simulators.units import fleet_units

COMMAND = "python bench/compression.py " + " ".join(sys.argv[1:])
TABLE = "usage_bench_compression"
SECRET = b"bench-compression-owner-key-secret"
PARTITIONS = 6


def facts(plan: FleetPlan, i: int, history: UnitHistory, installs: list[Install]) -> DeviceFacts:
    """What the registry would tell the consumer about unit `i` once provisioned."""
    periods = []
    owners = [(history.owner, history.purchase, history.registered_at)]
    if history.handover is not None and history.buyer and history.handover_purchase:
        owners.append((history.buyer, history.handover_purchase, history.handover.at))
    for n, (owner, purchase, since) in enumerate(owners):
        until = owners[n + 1][2] if n + 1 < len(owners) else None
        owner_id = uuid5(NAMESPACE_URL, owner.email)  # the registry's is random
        linked = owner.analytics_consent
        periods.append(
            Period(
                since,
                until,
                purchase.channel.value,
                linked,
                owner.region if linked else None,
                owner.membership_tier.value if linked else None,
                owner_key(SECRET, owner_id) if linked else None,
            )
        )
    return DeviceFacts(
        i,
        history.unit.model.model_number,
        history.unit.category,
        None,
        tuple(periods),
        frozenset[UUID](),
        tuple(sorted(installs)),
    )


def device_rows(plan: FleetPlan, i: int, history: UnitHistory) -> list[UsageRow]:
    """Unit `i`'s messages that the consumer stores (duplicates included), enriched."""
    partition = zlib.crc32(history.unit.device_id.encode()) % PARTITIONS
    parsed = []
    for msg in plan_device(plan, history.unit.device_id):
        try:
            env = parse_telemetry(
                msg.payload,
                now=datetime.now(UTC),
                max_future_skew=timedelta(seconds=plan.max_future_skew_s),
                max_bytes=plan.max_payload_bytes,
            )
        except InvalidTelemetry:
            continue  # a dead letter
        parsed.append(UsageRow.from_envelope(env, partition, 0))
    installs = [
        (r.event_time, r.body["from_version"], r.body["to_version"])
        for r in parsed
        if r.schema.endswith(".firmware") and r.body.get("outcome") == "installed"
    ]
    f = facts(plan, i, history, installs)
    return [with_facts(r, f) for r in parsed]


def arrival_order(per_device: list[list[UsageRow]]) -> Iterator[UsageRow]:
    """Every device sending at once, as fast as it can: one message of each in turn (a
    message sent twice, twice in a row, as a device resends one whose PUBACK it
    missed), each with the next offset of its Kafka partition."""
    sends: list[list[list[UsageRow]]] = []
    for rows in per_device:
        device: list[list[UsageRow]] = []
        for r in rows:
            if device and device[-1][0].key == r.key:
                device[-1].append(r)
            else:
                device.append([r])
        sends.append(device)
    offsets = [0] * PARTITIONS
    for n in range(max((len(d) for d in sends), default=0)):
        for device in sends:
            for r in device[n] if n < len(device) else ():
                yield dataclasses.replace(r, kafka_offset=offsets[r.kafka_partition])
                offsets[r.kafka_partition] += 1


def demo_rows(devices: int, window: timedelta, seed: int) -> list[UsageRow]:
    """The demo's traffic for `devices` over `window` up to now, enriched, in arrival
    order (duplicates included)."""
    plan = demo_plan(devices=devices, window=window, seed=seed, run_id="bench")
    units = enumerate(fleet_units(plan))
    per_device = [device_rows(plan, i, unit_history(plan, i, u)) for i, u in units]
    return list(arrival_order(per_device))


def days_text(interval: timedelta) -> str:
    days = interval / timedelta(days=1)
    return f"{days:g} day" if days == 1 else f"{days:g} days"


async def probe(dsn: str, where: str) -> tuple[str, str | None, str]:
    """The server's PostgreSQL version, its TimescaleDB version if a hypertable can be
    made there (None if not), and why not, as the store decides (`ingest.tables`);
    SystemExit naming `where` the DSN came from if the server cannot be reached."""
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SystemExit(f"{sys.argv[0]}: cannot connect to {where}: {exc}") from None
    try:
        version: str = await conn.fetchval("SHOW server_version")
        available = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        kind, why = timescaledb_choice(available, preload)
        if kind == "partitioned":  # asked first: CREATE EXTENSION would fail FATAL
            return version, None, why
        try:
            async with conn.transaction():
                await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            return version, None, f"CREATE EXTENSION timescaledb failed: {exc}"
        timescale: str = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
        return version, timescale, why
    finally:
        await conn.close()


async def timescaledb_version(dsn: str) -> str:
    """TimescaleDB's version on the server; SystemExit with the server's answer if the
    server cannot be reached or cannot have a hypertable."""
    _, version, why = await probe(dsn, "PostgreSQL (USAGEPIPE_POSTGRES__DSN)")
    if version is None:
        raise SystemExit(
            f"bench/compression.py measures TimescaleDB's compression, and this server has"
            f" none ({why}); point USAGEPIPE_POSTGRES__DSN at one that has"
        )
    return version


async def policy_job(conn: Connection, table: str) -> int:
    """The compression policy's job of `table`, unscheduled: only the benchmark runs it
    (`run_policy`), once every row is in. SystemExit if the table has none."""
    job: int | None = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs"
        " WHERE hypertable_name = $1 AND proc_name = 'policy_compression'",
        table,
    )
    if job is None:
        raise SystemExit(f"{table} has no compression policy after migrating")
    await conn.execute("SELECT alter_job($1, scheduled => false)", job)
    return job


async def run_policy(conn: Connection, job: int) -> float:
    """Run the compression policy's job now, in this session (`CALL run_job`), at a
    moment the benchmark chose; returns its seconds."""
    started = time.perf_counter()
    await conn.execute(f"CALL run_job({job})")
    return time.perf_counter() - started


async def figures(conn: Connection, table: str) -> dict[str, int]:
    """The compressed chunks' rows, batches and segments, and their bytes."""
    stats = await conn.fetchrow(  # an aggregate: always a row
        "SELECT count(*) AS chunks, coalesce(sum(before_compression_total_bytes), 0) AS before,"
        " coalesce(sum(after_compression_total_bytes), 0) AS after"
        " FROM chunk_compression_stats($1::regclass) WHERE compression_status = 'Compressed'",
        table,
    )
    assert stats is not None
    segmentby = await conn.fetchval(
        "SELECT segmentby FROM timescaledb_information.hypertable_compression_settings"
        " WHERE hypertable = $1::regclass",
        table,
    )
    compressed = await conn.fetch(
        "SELECT c.chunk::text AS chunk FROM timescaledb_information.chunk_compression_settings c"
        " WHERE c.hypertable = $1::regclass",
        table,
    )
    rows = batches = segments = 0
    for c in compressed:
        relation = await conn.fetchval(
            "SELECT format('%I.%I', k.schema_name, k.table_name)"
            " FROM _timescaledb_catalog.chunk u JOIN _timescaledb_catalog.chunk k"
            " ON k.id = u.compressed_chunk_id"
            " WHERE format('%I.%I', u.schema_name, u.table_name)::regclass = $1::regclass",
            c["chunk"],
        )
        by = f"GROUP BY {segmentby}" if segmentby else ""
        counts = await conn.fetch(
            f"SELECT sum(_ts_meta_count) AS n, count(*) AS b FROM {relation} {by}"
        )
        rows += sum(int(r["n"]) for r in counts)
        batches += sum(int(r["b"]) for r in counts)
        segments += len(counts)
    return {
        "chunks": stats["chunks"], "before": stats["before"], "after": stats["after"],
        "rows": rows, "batches": batches, "segments": segments,
    }  # fmt: skip


async def rowstore_rows(conn: asyncpg.Connection, table: str) -> int:
    """Rows of compressed chunks held uncompressed (decompressed by DML, or new)."""
    chunks = await conn.fetch(
        "SELECT chunk::text AS chunk FROM timescaledb_information.chunk_compression_settings"
        " WHERE hypertable = $1::regclass",
        table,
    )
    return sum([await conn.fetchval(f"SELECT count(*) FROM ONLY {c['chunk']}") for c in chunks])


async def redelivery(store: UsageStore, conn: asyncpg.Connection, rows: list[UsageRow]) -> str:
    """Re-send the first 1,000 rows of compressed chunks, as a replay would: the store's
    slow path (`INSERT ... ON CONFLICT DO NOTHING`) against compressed batches."""
    oldest = await conn.fetchval(
        "SELECT min(range_end) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = $1 AND NOT is_compressed",
        TABLE,
    )
    again = [r for r in rows if oldest is None or r.event_time < oldest][:1000]
    decompressed = await rowstore_rows(conn, TABLE)
    started = time.perf_counter()
    new = await store.write(again)
    took = time.perf_counter() - started
    decompressed = await rowstore_rows(conn, TABLE) - decompressed
    return (
        f"{len(again):,} rows of compressed chunks re-sent: {new} stored,"
        f" {decompressed} rows decompressed, in {took:.3f}s"
    )


async def erasure(store: UsageStore) -> str:
    """Erasure's statement (`ingest.erasure`) for the owner with most compressed rows,
    on one of the store's connections (its settings) in a transaction rolled back:
    what TimescaleDB decompresses for it, and how long."""
    async with store.pool.acquire() as conn:
        return await _erasure(conn)


async def _erasure(conn: Connection) -> str:
    found = await conn.fetchrow(
        f"SELECT owner_key, count(*) AS n FROM {TABLE} WHERE owner_key IS NOT NULL"
        " GROUP BY 1 ORDER BY 2 DESC LIMIT 1"
    )
    if found is None:
        return "erasure: no owner key in the table"
    rolled_back = conn.transaction()
    await rolled_back.start()
    try:
        started = time.perf_counter()
        plan = await conn.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)"
            f" UPDATE {TABLE} SET owner_key = NULL, membership_tier = NULL WHERE owner_key = $1",
            found["owner_key"],
        )
        took = time.perf_counter() - started
        left = await conn.fetchval(
            f"SELECT count(*) FROM {TABLE} WHERE owner_key = $1", found["owner_key"]
        )
    finally:
        await rolled_back.rollback()
    counters = dict.fromkeys(("Batches decompressed", "Tuples decompressed"), 0)
    for line in (r[0].strip() for r in plan):
        name, _, value = line.partition(": ")
        if name in counters:
            counters[name] += int(value)
    return (
        f"erasure of the owner with most rows ({found['n']:,}): {left} left,"
        f" {counters['Batches decompressed']:,} batches"
        f" ({counters['Tuples decompressed']:,} rows) decompressed, in {took:.3f}s"
    )


async def run(args: argparse.Namespace, base: PostgresSettings) -> None:
    dsn = base.dsn.get_secret_value()
    version = await timescaledb_version(dsn)
    started = time.perf_counter()
    rows = demo_rows(args.devices, args.window, args.seed)
    built_s = time.perf_counter() - started
    unique = len({r.key for r in rows})
    days = args.window / timedelta(days=1)
    print(
        f"{len(rows):,} messages ({unique:,} unique) from {args.devices:,} devices over"
        f" {days_text(args.window)} = {unique / args.devices / days:.1f} rows per device per day"
        f" (built in {built_s:.1f}s); TimescaleDB {version}"
    )
    settings = PostgresSettings(
        **{**base.model_dump(), "table": TABLE, "use_timescaledb": True,
           "partition_interval_s": int(args.chunk_interval.total_seconds())}
    )  # fmt: skip
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET timescaledb.enable_compression_ratio_warnings = off")
        await drop_usage_tables(conn, TABLE)
        async with UsageStore(settings) as store:
            await store.migrate()
            job = await policy_job(conn, TABLE)
            if args.segmentby is not None or args.orderby is not None:
                options = []
                if args.segmentby is not None:
                    options.append(f"timescaledb.compress_segmentby = '{args.segmentby}'")
                if args.orderby is not None:
                    options.append(f"timescaledb.compress_orderby = '{args.orderby}'")
                await conn.execute(f"ALTER TABLE {TABLE} SET ({', '.join(options)})")
            started = time.perf_counter()
            stored = 0
            batch = ConsumerSettings().batch_max
            for i in range(0, len(rows), batch):
                stored += await store.write(rows[i : i + batch])
            write_s = time.perf_counter() - started
            await conn.execute(f"ANALYZE {TABLE}")
            total = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
            chunks = await conn.fetchval(f"SELECT count(*) FROM show_chunks('{TABLE}')")
            size = f"SELECT total_bytes FROM hypertable_detailed_size('{TABLE}')"
            before = await conn.fetchval(size)
            compress_s = await run_policy(conn, job)
            after = await conn.fetchval(size)
            f = await figures(conn, TABLE)
            segmentby, orderby = await conn.fetchrow(
                "SELECT segmentby, orderby"
                " FROM timescaledb_information.hypertable_compression_settings"
                " WHERE hypertable = $1::regclass",
                TABLE,
            ) or ("?", "?")
            compress_after = await conn.fetchval(
                "SELECT config ->> 'compress_after' FROM timescaledb_information.jobs"
                " WHERE job_id = $1",
                job,
            )
            checks = [await redelivery(store, conn, rows), await erasure(store)]
        batches, segments = max(f["batches"], 1), max(f["segments"], 1)
        for line in (
            f"stored {stored:,} rows in {write_s:.1f}s ({total:,} in the table,"
            f" {chunks} chunks of {days_text(args.chunk_interval)})",
            f"compression: segmentby {segmentby or '(none)'!r}, orderby {orderby!r};"
            f" the policy (job {job}, compress_after {compress_after}) ran in {compress_s:.2f}s",
            f"compressed {f['chunks']} of {chunks} chunks: {f['rows']:,} rows in"
            f" {f['batches']:,} batches = {f['rows'] / batches:,.1f} rows per batch;"
            f" {f['segments']:,} segments = {f['rows'] / segments:,.1f} rows per segment",
            f"compressed chunks: {f['before']:,} bytes before, {f['after']:,} after"
            f" = ratio {f['before'] / max(f['after'], 1):.2f}",
            f"whole table (uncompressed chunks included): {before:,} bytes before,"
            f" {after:,} after = ratio {before / max(after, 1):.2f}",
            *checks,
        ):
            print(line)
    finally:
        if not args.keep:
            await drop_usage_tables(conn, TABLE)
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1200)
    parser.add_argument("--window", type=span, default=timedelta(days=28), help="28d")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chunk-interval", type=span, default=timedelta(days=1), help="1d")
    parser.add_argument("--segmentby", help="to compare (default: the migrations' settings)")
    parser.add_argument("--orderby")
    parser.add_argument("--keep", action="store_true", help=f"leave {TABLE} for a look")
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    asyncio.run(run(args, Settings().postgres))


if __name__ == "__main__":
    main()
