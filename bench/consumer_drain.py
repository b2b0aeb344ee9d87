"""The consumer's backlog drain: records queued in Kafka first, then one consumer timed.

    nice -n 10 .venv/bin/python bench/consumer_drain.py [--records 1000000]
        [--devices 1000] [--kafka-port 0] [--metrics-port 0] [--name cdrain<hex>]
        [--profile drain.txt]

Starts a private Tansu (memory storage, a free port unless `--kafka-port`) and uses the
local PostgreSQL with a usage table, registry schema and consumer group of its own
(dropped after). It registers `--devices` devices of the simulated fleet (their owners
and ownership periods, so enrichment finds each one), then produces the backlog:
`--records` messages of the simulator (`simulators.plan`, plain mode, the schemas in the
shares the usage model gives a year of real use, every device model), each device's in
order, the devices interleaved as live traffic arrives, keyed by device.

Then, in one run:

    raw consume  plain aiokafka reading the whole backlog back (no group, no decoding),
                 this process's CPU
    start-up     one `usagepipe consume` started on an empty topic of its own and left
                 until it has joined its group and gone idle: its CPU then is the
                 start-up cost, subtracted from the drain's
    drain        one `usagepipe consume` (a real subprocess, the CLI's defaults) started
                 on the backlog, timed from its start, and from its first stored batch,
                 to the last row stored: the stored offsets of every partition (written
                 in the rows' transaction) reach the end of what was produced (counted
                 from the producer's answers: Tansu's end offsets are reported too low).
                 Validation, enrichment, COPY, offsets and rollup notes are all inside.
                 CPU from /proc/<pid>/stat (utime + stime, all threads), net of start-up;
                 peak RSS (VmHWM); the consumer's own stage timings from its metrics
    raw COPY     the rows the consumer stored, read back and written with asyncpg
                 `copy_records_to_table` into a table made exactly as the usage table,
                 without its ids trigger (no ids, no rollups), in batches of the
                 consumer's `batch_max`; only the COPYs are timed

and checks that the usage table holds every record once: rows == records, 0 lost, 0
duplicated, no dead letters. Prints the figures and the command; exits 1 unless the
check holds. The machine's other load shows in the figures: CPU per 1,000 messages is
the one to compare across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from e2e import STAGES
from e2e_procs import Service, db_migrate, ensure_py_spy, free_port, say, wait_idle

from ingest.kafka import ensure_topics, make_producer
from ingest.migrations import Connection
from ingest.rows import COLUMNS
from ingest.settings import Settings
from ingest.store import UsageStore
from ingest.tables import drop_usage_tables
from simulators.plan import FleetPlan, plan_device
from simulators.provision import CollectedAccounts, open_registry, provision
from simulators.units import device_ids
from usagepipe.faults.processes import scrape
from usagepipe.services import TansuBroker

COMMAND = "nice -n 10 .venv/bin/python bench/consumer_drain.py " + " ".join(sys.argv[1:])
SEND_WINDOW = 20_000
"""Sends awaiting Kafka's answer while the backlog is produced."""


class Drain:
    """One run: its names, settings, the consumer's environment and the backlog's ends."""

    def __init__(self, args: argparse.Namespace, kafka: str, run_dir: Path) -> None:
        self.args = args
        self.dir = run_dir
        n = args.name
        base = Settings()
        self.settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(
                    update={
                        "bootstrap_servers": kafka,
                        "raw_topic": f"{n}.raw",
                        "dlq_topic": f"{n}.dlq",
                    }
                ),
                "postgres": base.postgres.model_copy(update={"table": f"usage_{n}"}),
                "registry": base.registry.model_copy(
                    update={"db_schema": f"reg_{n}", "events_topic": f"{n}.registry"}
                ),
            }
        )
        s = self.settings
        self.group = f"{n}-group"
        self.metrics_port = args.metrics_port or free_port()
        self.env = {
            **os.environ,
            "USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS": kafka,
            "USAGEPIPE_KAFKA__RAW_TOPIC": s.kafka.raw_topic,
            "USAGEPIPE_KAFKA__DLQ_TOPIC": s.kafka.dlq_topic,
            "USAGEPIPE_POSTGRES__TABLE": s.postgres.table,
            "USAGEPIPE_REGISTRY__DB_SCHEMA": s.registry.db_schema,
            "USAGEPIPE_REGISTRY__EVENTS_TOPIC": s.registry.events_topic,
            "USAGEPIPE_CONSUMER__GROUP_ID": self.group,
            "USAGEPIPE_CONSUMER__METRICS_PORT": str(self.metrics_port),
            # A backlog sends each device far above the per-device ceiling: off.
            "USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S": "0",
        }
        self.usagepipe = str(Path(sys.executable).with_name("usagepipe"))
        self.ends: dict[int, int] = {}
        """Per partition, the offset after the last record produced."""
        self.produced = 0

    @property
    def dsn(self) -> str:
        return self.settings.postgres.dsn.get_secret_value()

    # -- set-up -----------------------------------------------------------------------

    async def provision(self) -> FleetPlan:
        s = self.settings
        await ensure_topics(s.kafka, s.kafka.raw_topic, s.kafka.dlq_topic, s.registry.events_topic)
        per_device = -(-self.args.records // self.args.devices)
        plan = FleetPlan(
            devices=self.args.devices,
            messages_per_device=per_device,
            seed=1,
            fleet="cdrain",
            mix="usage",
            start=datetime.now(UTC) - timedelta(seconds=per_device * 10 + 600),
        )
        started = time.monotonic()
        async with open_registry(s, broker=CollectedAccounts()) as registry:
            fleet = await provision(registry, plan)
        say(
            f"registered {fleet.registered:,} devices (registry schema {s.registry.db_schema})"
            f" in {time.monotonic() - started:.1f}s"
        )
        await db_migrate(self.usagepipe, self.env)
        return plan

    async def produce(self, plan: FleetPlan) -> float:
        """The backlog into the raw topic; returns its mean message size in bytes."""
        lists = [plan_device(plan, d) for d in device_ids(plan)]
        order = [m for round_ in zip(*lists, strict=True) for m in round_][: self.args.records]
        del lists
        size = sum(len(m.payload) for m in order) / len(order)
        producer = make_producer(self.settings.kafka, client_id="bench-backlog")
        await producer.start()
        try:
            started = time.perf_counter()
            for i in range(0, len(order), SEND_WINDOW):
                sent = [
                    await producer.send(
                        self.settings.kafka.raw_topic, m.payload, key=m.key[0].encode()
                    )
                    for m in order[i : i + SEND_WINDOW]
                ]
                for meta in await asyncio.gather(*sent):
                    self.ends[meta.partition] = max(
                        self.ends.get(meta.partition, 0), meta.offset + 1
                    )
                    self.produced += 1
            elapsed = time.perf_counter() - started
        finally:
            await producer.stop()
        say(
            f"backlog: {self.produced:,} records from {plan.devices:,} devices"
            f" ({size:.0f} bytes mean) produced in {elapsed:.1f}s"
            f" ({self.produced / elapsed:,.0f} msg/s) over {len(self.ends)} partitions"
        )
        return size

    # -- raw limits -------------------------------------------------------------------

    async def raw_consume(self) -> tuple[float, float]:
        """msg/s and CPU-ms per 1,000 of plain aiokafka reading the backlog."""
        topic = self.settings.kafka.raw_topic
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(self.ends)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            got = 0
            cpu, started = time.process_time(), time.perf_counter()
            while got < self.produced:
                batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
                got += sum(len(records) for records in batch.values())
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
        finally:
            await consumer.stop()
        return got / elapsed, cpu / got * 1e6

    async def raw_copy(self) -> float:
        """Rows/s of asyncpg COPY of the stored rows into a table made as the usage table."""
        pg = self.settings.postgres
        copy = pg.model_copy(update={"table": f"{pg.table}_copy", "pool_size": 2})
        batch = self.settings.consumer.batch_max
        cols = ", ".join(COLUMNS)
        elapsed = 0.0
        copied = 0
        async with UsageStore(copy) as store:
            await store.migrate()
            async with store.pool.acquire() as reader, store.pool.acquire() as writer:
                # Without the trigger that writes the ids (plain PostgreSQL's migration
                # 010), as bench/store.py's raw COPY: raw is the rows alone.
                await writer.execute(
                    f"DROP TRIGGER IF EXISTS {copy.table}_write_ids ON {copy.table}"
                )
                times = await reader.fetch(
                    f"SELECT DISTINCT date_trunc('hour', event_time) AS t FROM {pg.table}"
                )
                await store.ensure_partitions(r["t"] for r in times)
                async with reader.transaction():
                    cursor = reader.cursor(f"SELECT {cols} FROM {pg.table}", prefetch=batch)
                    records: list[tuple[object, ...]] = []
                    async for row in cursor:
                        records.append(tuple(row))
                        if len(records) == batch:
                            elapsed += await self._copy(writer, copy.table, records)
                            copied += len(records)
                            records = []
                    if records:
                        elapsed += await self._copy(writer, copy.table, records)
                        copied += len(records)
        return copied / elapsed

    @staticmethod
    async def _copy(conn: Connection, table: str, records: list[tuple[object, ...]]) -> float:
        started = time.perf_counter()
        await conn.copy_records_to_table(table, records=records, columns=COLUMNS)
        return time.perf_counter() - started

    # -- the consumer -----------------------------------------------------------------

    def consumer(self, label: str, env: dict[str, str]) -> Service:
        argv = [self.usagepipe, "--log-level", "WARNING", "consume"]
        return Service(label, argv, env, self.dir / f"{label}.log")

    async def start_up(self) -> tuple[float, float]:
        """CPU seconds and wall seconds a consumer needs to start: on an empty topic of
        its own, until it has joined its group and gone idle."""
        topic = f"{self.args.name}.empty"
        await ensure_topics(self.settings.kafka, topic)
        env = {
            **self.env,
            "USAGEPIPE_KAFKA__RAW_TOPIC": topic,
            "USAGEPIPE_CONSUMER__GROUP_ID": f"{self.group}-startup",
            "USAGEPIPE_CONSUMER__METRICS_PORT": "0",
        }
        probe = self.consumer("startup", env)
        try:
            await asyncio.sleep(2.0)  # at least past the imports, before it can look idle
            await wait_idle(probe, quiet_s=1.5, timeout_s=60)
            return probe.cpu_s(), time.time() - probe.started
        finally:
            probe.stop()

    def profile(self, service: Service) -> subprocess.Popen[bytes]:
        """py-spy sampling `service` until it exits, into `--profile` (collapsed stacks,
        busy samples only); the venv's py-spy if installed, else the bench tools' own."""
        py_spy = Path(sys.executable).with_name("py-spy")
        if not py_spy.exists():
            py_spy = ensure_py_spy()
        return subprocess.Popen(
            [str(py_spy), "record", "-p", str(service.pid), "-r", "100", "-f", "raw",
             "-o", str(self.args.profile), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def stored_offsets(self, conn: asyncpg.Connection) -> dict[int, int]:
        rows = await conn.fetch(
            f"SELECT partition, next_offset FROM {self.settings.postgres.table}_offsets"
            " WHERE group_id = $1 AND topic = $2",
            self.group,
            self.settings.kafka.raw_topic,
        )
        return {r["partition"]: r["next_offset"] for r in rows}

    async def drain(self) -> dict[str, float]:
        """Start one consumer on the backlog; time it to the last row stored."""
        conn = await asyncpg.connect(self.dsn)
        try:
            service = self.consumer("drain", self.env)
            profiler = self.profile(service) if self.args.profile else None
            first = 0.0
            timeout = time.monotonic() + max(600.0, self.produced / 1000)
            while True:
                await asyncio.sleep(0.05)
                stored = await self.stored_offsets(conn)
                now = time.time()
                if stored and not first:
                    first = now
                if all(stored.get(p, 0) >= end for p, end in self.ends.items()):
                    cpu, rss = service.cpu_s(), service.peak_rss_mb()
                    break
                if not service.alive() or time.monotonic() > timeout:
                    service.stop()
                    raise SystemExit(
                        f"the consumer stopped or timed out; stored {stored} of {self.ends};"
                        f" its log: {service.log}"
                    )
            names = tuple(f'usagepipe_consumer_stage_seconds_sum{{stage="{s}"}}' for s in STAGES)
            names += ("usagepipe_consumer_batch_records_count",)
            stages = await asyncio.get_running_loop().run_in_executor(
                None, scrape, self.metrics_port, names
            )
            code = service.stop()
            if code != 0:
                say(f"the consumer exited {code}; its log: {service.log}")
            if profiler is not None:
                profiler.wait(60)  # it writes when the consumer has exited
                say(f"profile (py-spy, collapsed stacks, busy samples): {self.args.profile}")
        finally:
            await conn.close()
        out = {
            "from_start_s": now - service.started,
            "first_to_last_s": now - first,
            "cpu_s": cpu,
            "rss_mb": rss,
            "batches": stages["usagepipe_consumer_batch_records_count"],
        }
        for stage, name in zip(STAGES, names, strict=False):
            out[stage] = stages[name]
        return out

    async def check(self) -> tuple[int, int, int]:
        """Rows, distinct message ids and dead letters in the usage tables."""
        t = self.settings.postgres.table
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetchval(f"SELECT count(*) FROM {t}")
            ids = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT DISTINCT device_id, boot_id, seq FROM {t}) d"
            )
            letters = await conn.fetchval(f"SELECT count(*) FROM {t}_dead_letters")
        finally:
            await conn.close()
        return int(rows), int(ids), int(letters)

    async def cleanup(self) -> None:
        s = self.settings
        conn = await asyncpg.connect(self.dsn)
        try:
            for table in (s.postgres.table, f"{s.postgres.table}_copy"):
                await drop_usage_tables(conn, table)
            await conn.execute(f"DROP SCHEMA IF EXISTS {s.registry.db_schema} CASCADE")
        finally:
            await conn.close()


async def main(args: argparse.Namespace) -> int:
    print(f"$ {COMMAND}".rstrip(), flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix="usagepipe-consumer-drain-"))
    tansu = TansuBroker("127.0.0.1", args.kafka_port or free_port(), run_dir / "tansu.log")
    tansu.start()
    bench = Drain(args, tansu.address, run_dir)
    try:
        plan = await bench.provision()
        size = await bench.produce(plan)
        n = bench.produced
        consume_rate, consume_cpu = await bench.raw_consume()
        say(f"raw consume: {consume_rate:,.0f} msg/s, {consume_cpu:.1f} CPU-ms per 1,000")
        startup_cpu, startup_s = await bench.start_up()
        say(f"consumer start-up: {startup_cpu:.2f} s of CPU, idle after {startup_s:.1f} s")
        d = await bench.drain()
        net = d["cpu_s"] - startup_cpu
        rows, ids, letters = await bench.check()
        copy_rate = await bench.raw_copy()
        batches = max(d["batches"], 1)
        stage_ms = ", ".join(
            f"{stage} {d[stage] * 1e3 / batches:.1f}" for stage in STAGES if d[stage]
        )
        print(
            f"\n{n:,} records ({size:.0f} bytes mean) from {args.devices:,} registered"
            f" devices, the usage mix, over {len(bench.ends)} partitions; one consumer,"
            " the CLI's defaults; a shared 2-core machine"
        )
        print(
            f"consumer drain, from process start:     {n / d['from_start_s']:>10,.0f} msg/s"
            f" ({d['from_start_s']:.2f} s)"
        )
        if d["first_to_last_s"] > 0:
            print(
                f"consumer drain, first to last batch:    {n / d['first_to_last_s']:>10,.0f}"
                f" msg/s ({d['first_to_last_s']:.2f} s)"
            )
        else:  # the whole backlog stored in the first batch the poller saw: no interval
            print("consumer drain, first to last batch:    one batch (no interval to time)")
        print(
            f"consumer CPU: {d['cpu_s']:.2f} s, start-up {startup_cpu:.2f} s, net"
            f" {net / n * 1e6:.1f} CPU-ms per 1,000 messages; peak RSS {d['rss_mb']:.0f} MB"
        )
        print(f"consumer batches: {d['batches']:,.0f}, mean ms each: {stage_ms}")
        print(
            f"raw aiokafka consume:                   {consume_rate:>10,.0f} msg/s"
            f" ({consume_cpu:.1f} CPU-ms per 1,000)"
        )
        print(f"raw asyncpg COPY of the same rows:      {copy_rate:>10,.0f} rows/s")
        duplicated = rows - ids
        lost = n - ids
        print(
            f"check: {rows:,} rows for {n:,} records; lost {lost:,}, duplicated"
            f" {duplicated:,}, dead letters {letters:,}"
        )
        return 0 if lost == 0 and duplicated == 0 and letters == 0 else 1
    finally:
        tansu.stop()
        await bench.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1000, help="registered, in the backlog")
    parser.add_argument("--kafka-port", type=int, default=0, help="the private Tansu's port")
    parser.add_argument("--metrics-port", type=int, default=0, help="the consumer's metrics")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the drain into this file (collapsed stacks)")  # fmt: skip
    parser.add_argument("--name", default=f"cdrain{secrets.token_hex(3)}",
                        help="topics, table, registry schema, group")  # fmt: skip
    sys.exit(asyncio.run(main(parser.parse_args())))
