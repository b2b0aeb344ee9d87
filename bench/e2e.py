"""End to end, side by side: the pipeline, each stage's raw limit and a Rust-core peer.

    .venv/bin/python bench/e2e.py [--quick] [--publishers 3] [--bridges 2] [--consumers 2]
                                  [--profile] [--skip-peer] [--mix usage|uniform]

`--quick` takes about 3 minutes, the full run about 5 (on 2 cores).

One run, on this machine, against the local servers (`usagepipe services up`), with
topics, table, registry schema, MQTT topic prefix and sessions of its own (dropped
after). Every figure below comes from the same run and the same message size (the
simulator's fleet payloads, about 250 bytes, their schemas in the shares the usage
model gives a year of real use; `--mix uniform` draws every schema alike, so that a
sixth of the messages are firmware installations, a stress on the registry):

raw limits, without usagepipe's code
  mqtt relay    plain paho publishers (each a bounded window on paho's own loop, QoS 1)
                -> Mosquitto -> one plain paho subscriber (QoS 1)
  kafka produce aiokafka, acks=all, pipelined sends
  pg COPY       asyncpg COPY into a table created exactly as the usage table

the pipeline (`usagepipe bridge` and `usagepipe consume` as their own processes; two
bridges in one MQTT v5 shared subscription and two consumers in one group by default,
which went fastest on 2 cores), loaded by
the simulated fleet (its devices registered, each its own MQTT login and connection,
spread over --publishers processes; 1 % of messages sent twice):
  sustained     every publisher as fast as the broker takes it; msg/s that became
                rows (first publish -> last row queryable), and the 20-80 % slope; the
                ledger then proves 0 lost and 0 duplicated (`simulators.verify`)
  latency       paced at 50 % and 90 % of that; publish -> row queryable, p50/p99
  CPU, memory   bridge and consumer processes: CPU s per 1,000 messages, peak RSS

bridges alone (no consumer), ours and PyPI's mq-bridge (its own venv), in turn:
  live          the fleet publishing as fast as it can into a running bridge
  drain         the bridge away while the fleet queues a backlog in its persistent
                session (both bridges' sessions get the same messages), then started
                and timed from its first record in Kafka to its last (records'
                CreateTime), all of them checked against the ledger's digests

Prints one table and writes it as JSON to bench/results/<UTC time>.json. A figure
that the load, not the system under test, limited is marked so.

The usage table and the registry live on the settings' PostgreSQL; pointed at a server
with TimescaleDB preloaded (USAGEPIPE_POSTGRES__DSN=...), every phase runs on a
hypertable instead of native partitions (the raw COPY line names the layout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from e2e_bridges import bridges_alone
from e2e_load import SPAWN, LoadJob, LoadResult, run_load
from e2e_procs import (
    RowPoller,
    Service,
    count_rows,
    db_migrate,
    ensure_mq_bridge,
    ensure_py_spy,
    free_port,
    mq_bridge_route,
    per_second,
    percentile,
    read_topic,
    say,
    servers_cpu_s,
)
from e2e_raw import raw_copy, raw_produce, raw_relay

from ingest.kafka import ensure_topics
from ingest.mqtt import MqttClient
from ingest.settings import Settings
from simulators.plan import FleetPlan, plan_device
from simulators.provision import open_registry, provision
from simulators.units import device_ids
from simulators.verify import verify
from usagepipe.faults.processes import scrape
from usagepipe.services import with_broker_logins

RESULTS = Path(__file__).with_name("results")


STAGES = ("validate", "firmware", "enrich", "dead_letter", "store", "kafka_commit")
"""The consumer's stages (`usagepipe_consumer_stage_seconds`), in batch order."""


@dataclass(frozen=True)
class Sizes:
    relay: int
    produce: int
    copy: int
    per_device: int
    """Messages per device in the sustained phase (devices: --devices per publisher)."""
    latency_s: float
    live: int
    drain: int


QUICK = Sizes(relay=30_000, produce=30_000, copy=30_000, per_device=600, latency_s=10,
              live=30_000, drain=30_000)  # fmt: skip
FULL = Sizes(relay=100_000, produce=100_000, copy=100_000, per_device=2500, latency_s=30,
             live=100_000, drain=100_000)  # fmt: skip


class Bench:
    """One run: its names, settings, services, ledgers and figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.name = f"e2e{secrets.token_hex(3)}"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.dir = RESULTS / f"{stamp}-{self.name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.json_path = RESULTS / f"{stamp}.json"
        base = with_broker_logins(Settings())
        n = self.name
        self.settings = base.model_copy(
            update={
                "mqtt": base.mqtt.model_copy(update={"topic_prefix": f"{n}/"}),
                "kafka": base.kafka.model_copy(
                    update={"raw_topic": f"{n}.raw", "dlq_topic": f"{n}.dlq"}
                ),
                "postgres": base.postgres.model_copy(update={"table": f"usage_{n}"}),
                "registry": base.registry.model_copy(
                    update={"db_schema": f"reg_{n}", "events_topic": f"{n}.registry"}
                ),
            }
        )
        s = self.settings
        assert s.mqtt.username and s.mqtt.password
        assert s.mqtt.admin_username and s.mqtt.admin_password
        self.env = {
            **os.environ,
            "USAGEPIPE_MQTT__TOPIC_PREFIX": s.mqtt.topic_prefix,
            "USAGEPIPE_MQTT__USERNAME": s.mqtt.username,
            "USAGEPIPE_MQTT__PASSWORD": s.mqtt.password.get_secret_value(),
            "USAGEPIPE_MQTT__ADMIN_USERNAME": s.mqtt.admin_username,
            "USAGEPIPE_MQTT__ADMIN_PASSWORD": s.mqtt.admin_password.get_secret_value(),
            "USAGEPIPE_KAFKA__RAW_TOPIC": s.kafka.raw_topic,
            "USAGEPIPE_KAFKA__DLQ_TOPIC": s.kafka.dlq_topic,
            "USAGEPIPE_POSTGRES__TABLE": s.postgres.table,
            "USAGEPIPE_REGISTRY__DB_SCHEMA": s.registry.db_schema,
            "USAGEPIPE_REGISTRY__EVENTS_TOPIC": s.registry.events_topic,
            "USAGEPIPE_CONSUMER__GROUP_ID": f"{n}-group",
            "USAGEPIPE_BRIDGE__METRICS_PORT": "0",
            "USAGEPIPE_CONSUMER__METRICS_PORT": "0",
            # A load test sends each device far above the per-device ceiling: off.
            "USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S": "0",
        }
        self.usagepipe = str(Path(sys.executable).with_name("usagepipe"))
        self.credentials: dict[int, dict[str, str]] = {}
        self.ledgers: list[Path] = []
        self.topics: list[str] = [s.kafka.raw_topic, s.kafka.dlq_topic, s.registry.events_topic]
        self.results: dict[str, Any] = {}
        self.payloads: list[bytes] = []
        self._runs = 0
        self.peer_python: Path | None = None
        self.consumer_ports: list[int] = []
        self.sessions: list[str] = []
        """MQTT client ids whose persistent sessions the run opened (ended at clean-up)."""
        self.loadavg_at_start = os.getloadavg()

    # -- set-up ---------------------------------------------------------------------

    def fleet(self, publisher: int) -> str:
        return f"{self.name}p{publisher}"

    async def provision(self) -> None:
        s = self.settings
        await ensure_topics(s.kafka, s.registry.events_topic)
        started = time.monotonic()
        async with open_registry(s) as registry:
            for p in range(self.args.publishers):
                plan = FleetPlan(devices=self.args.devices, messages_per_device=0, seed=1,
                                 fleet=self.fleet(p))  # fmt: skip
                fleet = await provision(registry, plan)
                self.credentials[p] = fleet.credentials
        say(
            f"provisioned {self.args.publishers} x {self.args.devices} devices (registry"
            f" schema {s.registry.db_schema}, each its broker login) in"
            f" {time.monotonic() - started:.1f}s"
        )
        await db_migrate(self.usagepipe, self.env)
        plan = FleetPlan(devices=6, messages_per_device=50, seed=1, fleet="e2esize",
                         mix=self.args.mix)  # fmt: skip
        self.payloads = [m.payload for d in device_ids(plan) for m in plan_device(plan, d)]

    async def cleanup(self) -> None:
        from devices.mosquitto import DynsecAccounts

        s = self.settings
        for client_id in self.sessions:  # end the bridges' persistent sessions
            with contextlib.suppress(Exception):
                async with MqttClient(s.mqtt, client_id=client_id):
                    pass
        with contextlib.suppress(Exception):
            async with DynsecAccounts(s.mqtt) as accounts:
                for creds in self.credentials.values():
                    await accounts.revoke_devices(list(creds))
        conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
        try:
            for t in (s.postgres.table, f"{s.postgres.table}_copy"):
                names = await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE tablename = $1 OR tablename LIKE $2",
                    t, f"{t}\\_%",
                )  # fmt: skip
                if names:
                    await conn.execute(
                        "DROP TABLE IF EXISTS " + ", ".join(r[0] for r in names) + " CASCADE"
                    )
                await conn.execute("DELETE FROM schema_migrations WHERE component LIKE $1", f"%{t}")
            await conn.execute(f"DROP SCHEMA IF EXISTS {s.registry.db_schema} CASCADE")
        finally:
            await conn.close()
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka.bootstrap_servers)
        with contextlib.suppress(Exception):
            await admin.start()
            existing = set(await admin.list_topics())
            await admin.delete_topics([t for t in self.topics if t in existing])
        with contextlib.suppress(Exception):
            await admin.close()

    # -- the fleet as load ---------------------------------------------------------

    async def load(
        self,
        label: str,
        *,
        per_device: int,
        rate: float = 0.0,
        duration_s: float | None = None,
        duplicates: float = 0.01,
        samples: Any = None,
        sample_every: int = 0,
        on_go: Any = None,
    ) -> dict[str, Any]:
        """Run the fleet's publisher processes once; returns what they did."""
        self._runs += 1
        run_id = f"{label}{self._runs}"
        ready, go, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
        start = datetime.now(UTC) - timedelta(seconds=per_device * 10 + 600)
        procs = []
        for p in range(self.args.publishers):
            ledger = self.dir / f"ledger-{run_id}-{p}.jsonl"
            self.ledgers.append(ledger)
            job = LoadJob(
                index=p, mqtt=self.settings.mqtt, fleet=self.fleet(p), seed=1, run_id=run_id,
                devices=self.args.devices, credentials=self.credentials[p],
                messages_per_device=per_device, mix=self.args.mix, start=start,
                ledger=str(ledger),
                duplicate_rate=duplicates, rate=rate / self.args.publishers,
                duration_s=duration_s, sample_every=sample_every,
            )  # fmt: skip
            proc = SPAWN.Process(target=run_load, args=(job, ready, go, samples, results))
            proc.start()
            procs.append(proc)
        loop = asyncio.get_running_loop()
        for _ in procs:
            await loop.run_in_executor(None, ready.get, True, 120)
        go.set()
        go_at = time.time()
        if on_go is not None:
            on_go()
        outs: list[LoadResult] = []
        for _ in procs:
            outs.append(await loop.run_in_executor(None, results.get, True, 1800))
        for proc in procs:
            await loop.run_in_executor(None, proc.join)
        errors = [e for o in outs for e in o.errors]
        if errors:
            raise SystemExit(f"publishers failed: {errors[:3]}")
        first = min(o.first_publish for o in outs)
        last = max(o.last_puback for o in outs)
        sent = sum(o.sent for o in outs)
        return {
            "go_at": go_at,
            "first_publish": first,
            "last_puback": last,
            "sent": sent,
            "acked": sum(o.acked for o in outs),
            "failed": sum(o.failed for o in outs),
            "stored_expected": sum(o.stored_expected for o in outs),
            "publish_rate": sent / max(last - first, 1e-9),
            "publisher_cpu_s": [round(o.cpu_s, 2) for o in outs],
            "publisher_cpu_share": [round(o.cpu_s / max(last - first, 1e-9), 2) for o in outs],
        }

    # -- the pipeline --------------------------------------------------------------------

    def start_pipeline(self) -> tuple[list[Service], list[Service]]:
        bridges, consumers = [], []
        for i in range(self.args.bridges):
            self.sessions.append(f"{self.name}-bridge-{i}")
            env = {**self.env, "USAGEPIPE_BRIDGE__CLIENT_ID": self.sessions[-1]}
            if self.args.bridges > 1:
                env["USAGEPIPE_BRIDGE__SHARED_GROUP"] = self.name
            bridges.append(Service(f"bridge-{i}", [self.usagepipe, "--log-level", "INFO",
                                   "bridge"], env, self.dir / f"bridge-{i}.log"))  # fmt: skip
        self.consumer_ports = []
        for i in range(self.args.consumers):
            argv = [self.usagepipe, "--log-level", "WARNING", "consume"]
            port = free_port()
            self.consumer_ports.append(port)
            env = {**self.env, "USAGEPIPE_CONSUMER__METRICS_PORT": str(port)}
            consumers.append(Service(f"consumer-{i}", argv, env, self.dir / f"c-{i}.log"))
        return bridges, consumers

    async def wait_log(self, service: Service, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in service.log.read_text(errors="replace"):
                return
            if not service.alive():
                raise SystemExit(f"{service.name} exited; see {service.log}")
            await asyncio.sleep(0.1)
        raise SystemExit(f"{service.name}: no {text!r} in {timeout_s:.0f}s; see {service.log}")

    async def rows_until(self, expected: int, timeout_s: float = 600) -> list[tuple[float, int]]:
        """Poll the row count until `expected`; returns (time, count) readings."""
        dsn, table = self.settings.postgres.dsn.get_secret_value(), self.settings.postgres.table
        readings: list[tuple[float, int]] = []
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                asked = time.time()
                n = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
                readings.append((asked, n))
                if n >= expected:
                    return readings
                # count(*) is a scan: 4 a second keeps its cost (a few % of a core on
                # 300k rows) out of the figures, at 0.25 s resolution.
                await asyncio.sleep(0.25)
        finally:
            await conn.close()
        raise SystemExit(f"rows stuck at {readings[-1][1]:,} of {expected:,}")

    async def pipeline(self) -> None:
        bridges, consumers = self.start_pipeline()
        services = [*bridges, *consumers]
        profiles: list[subprocess.Popen[bytes]] = []
        try:
            for bridge in bridges:
                await self.wait_log(bridge, "bridge subscribed")
            stored = 0
            warm = await self.load("warm", per_device=2, duplicates=0.0)
            stored += warm["stored_expected"]
            await self.rows_until(stored, timeout_s=120)
            say("pipeline up: bridges subscribed, consumers joined and storing")

            # Sustained: every publisher as fast as the broker takes it.
            cpu0 = {s.name: s.cpu_s() for s in services}
            servers0 = servers_cpu_s(self.settings.services.run_dir)

            def start_profiles() -> None:
                if self.args.profile:
                    profiles.extend(self.profile(s) for s in services)

            base = await count_rows(self.settings.postgres.dsn.get_secret_value(),
                                    self.settings.postgres.table)  # fmt: skip
            batches0 = await self.batches()
            unique = self.args.publishers * self.args.devices * self.sizes.per_device
            # The row count is read while the fleet publishes, for the 20-80 % slope.
            counting = asyncio.create_task(self.rows_until(stored + unique))
            run = await self.load("max", per_device=self.sizes.per_device, on_go=start_profiles)
            stored += run["stored_expected"]
            assert run["stored_expected"] == unique
            readings = await counting
            cpu1 = {s.name: s.cpu_s() for s in services}
            servers1 = servers_cpu_s(self.settings.services.run_dir)
            for prof in profiles:
                prof.wait()
            done_at = readings[-1][0]
            elapsed = done_at - run["first_publish"]
            lag = done_at - run["last_puback"]
            steady = slope(readings, base, unique)
            sustained = unique / elapsed
            load_limited = lag <= max(1.0, 0.05 * elapsed)
            self.results["pipeline"] = {
                "bridges": self.args.bridges,
                "consumers": self.args.consumers,
                "publishers": self.args.publishers,
                "devices": self.args.publishers * self.args.devices,
                "messages": run["sent"],
                "unique": unique,
                "sustained_msg_s": sustained,
                "steady_20_80_msg_s": steady,
                "publish_msg_s": run["publish_rate"],
                "publisher_cpu_share": run["publisher_cpu_share"],
                "rows_done_after_last_puback_s": lag,
                "servers_cpu_share": {
                    k: round((servers1[k] - servers0.get(k, 0.0)) / elapsed, 2) for k in servers1
                },
                "limited_by": "load (the pipeline kept up with the publishers)"
                if load_limited
                else "pipeline (a backlog built up behind the publishers)",
                **self.usage(bridges, consumers, cpu0, cpu1, run["sent"]),
                **self.batch_figures(batches0, await self.batches()),
            }
            say(
                f"sustained: {unique:,} unique messages -> rows in {elapsed:.1f}s ="
                f" {sustained:,.0f} msg/s (20-80 %: {steady:,.0f}); published at"
                f" {run['publish_rate']:,.0f} msg/s; rows done {lag:.1f}s after the last PUBACK"
            )

            # Latency at 50 % and 90 % of the sustained rate.
            rate_base = sustained
            for share in (0.5, 0.9):
                rate = share * rate_base
                samples = SPAWN.Queue()
                poller = RowPoller(self.settings.postgres.dsn.get_secret_value(),
                                   self.settings.postgres.table, samples)  # fmt: skip
                publishing_done = asyncio.Event()
                per_publisher_s = rate / self.args.publishers * self.sizes.latency_s
                per_device = math.ceil(per_publisher_s / self.args.devices * 1.2) + 2
                polling = asyncio.create_task(poller.run(publishing_done, 60))
                batches0 = await self.batches()
                try:
                    run = await self.load(
                        f"lat{int(share * 100)}", per_device=per_device, rate=rate,
                        duration_s=self.sizes.latency_s, samples=samples,
                        sample_every=max(1, round(rate / 150)),
                    )  # fmt: skip
                finally:
                    publishing_done.set()
                    await polling
                stored += run["stored_expected"]
                await self.rows_until(stored)
                lat = poller.latencies
                to_kafka = await self.kafka_latencies(poller.published, run["go_at"])
                key = f"latency_{int(share * 100)}"
                self.results[key] = {
                    "target_msg_s": rate,
                    "achieved_msg_s": run["publish_rate"],
                    "samples": len(lat),
                    "unmatched_samples": len(poller.pending),
                    "p50_s": percentile(lat, 0.50),
                    "p99_s": percentile(lat, 0.99),
                    "max_s": max(lat, default=float("nan")),
                    "to_kafka_p50_s": percentile(to_kafka, 0.50),
                    "to_kafka_p99_s": percentile(to_kafka, 0.99),
                    **self.batch_figures(batches0, await self.batches()),
                    "poll_interval_s": poller.interval_s,
                    "per_second_p50_max_s": per_second(poller.timeline),
                }
                say(
                    f"latency at {share:.0%} ({rate:,.0f} msg/s asked, {run['publish_rate']:,.0f}"
                    f" sent): p50 {percentile(lat, 0.5) * 1000:.0f} ms, p99"
                    f" {percentile(lat, 0.99) * 1000:.0f} ms over {len(lat)} samples"
                )
        finally:
            for service in services:
                service.stop()
        # The ledger: every message of every phase, 0 lost and 0 duplicated.
        ledger = self.dir / "ledger-pipeline.jsonl"
        with ledger.open("wb") as out:
            for part in self.ledgers:
                out.write(part.read_bytes())
        result = await verify(self.settings, ledger, timeout_s=120)
        table = {n: {"expected": e, "found": f} for n, e, f in result.table() if e or f}
        self.results["verify"] = {
            "ok": result.ok,
            "ledger": str(ledger),
            "table": table,
            "discrepancies": len(result.discrepancies),
            "first_discrepancies": result.discrepancies[:5],
        }
        say(f"verify: {'OK' if result.ok else 'FAILED'} {table}")

    async def batches(self) -> dict[str, float]:
        """The consumers' batch counters so far (their Prometheus histograms' sums)."""
        names = tuple(f"usagepipe_consumer_batch_{m}_{k}" for m in ("records", "seconds")
                      for k in ("sum", "count"))  # fmt: skip
        names += tuple(f'usagepipe_consumer_stage_seconds_sum{{stage="{stage}"}}'
                       for stage in STAGES)  # fmt: skip
        names += tuple(f'usagepipe_consumer_registry_lookups_total{{result="{r}"}}'
                       for r in ("hit", "miss"))  # fmt: skip
        names += tuple(f"usagepipe_consumer_rollup_refresh_seconds_{k}" for k in ("sum", "count"))
        names += tuple(f'usagepipe_consumer_offset_holes_total{{outcome="{o}"}}'
                       for o in ("read_again", "read_past"))  # fmt: skip
        loop = asyncio.get_running_loop()
        total = dict.fromkeys(names, 0.0)
        for port in self.consumer_ports:
            got = await loop.run_in_executor(None, scrape, port, names)
            for k in names:
                total[k] += got[k]
        return total

    @staticmethod
    def batch_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
        def d(name: str) -> float:
            return after[name] - before[name]

        n = d("usagepipe_consumer_batch_seconds_count")
        return {
            "consumer_batches": n,
            "consumer_mean_batch_records": d("usagepipe_consumer_batch_records_sum") / n
            if n
            else 0,
            "consumer_mean_batch_s": d("usagepipe_consumer_batch_seconds_sum") / n if n else 0,
            "consumer_registry_lookups": {
                r: d(f'usagepipe_consumer_registry_lookups_total{{result="{r}"}}')
                for r in ("hit", "miss")
            },
            "consumer_mean_stage_s": {
                stage: d(f'usagepipe_consumer_stage_seconds_sum{{stage="{stage}"}}') / n if n else 0
                for stage in STAGES
            },
            # The periodic rollup refreshes (PostgreSQL work beside the batches) that ran.
            "rollup_refreshes": d("usagepipe_consumer_rollup_refresh_seconds_count"),
            "rollup_refresh_s": d("usagepipe_consumer_rollup_refresh_seconds_sum"),
            # Fetches cut at a hole in a partition's offsets (see ingest.consumer).
            "consumer_offset_holes": {
                o: d(f'usagepipe_consumer_offset_holes_total{{outcome="{o}"}}')
                for o in ("read_again", "read_past")
            },
        }

    async def kafka_latencies(
        self, published: dict[tuple[str, str, int], float], since: float
    ) -> list[float]:
        """Publish -> the bridge's Kafka record (its CreateTime) of the sampled messages:
        the bridge's share of the latency; the rest is the consumer's."""
        out = []
        for record in await read_topic(self.settings, self.settings.kafka.raw_topic):
            if record.timestamp_ms < since * 1000:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                doc = orjson.loads(record.value)
                t = published.get((doc["device_id"], doc["boot_id"], doc["seq"]))
                if t is not None:
                    out.append(record.timestamp_ms / 1000 - t)
        return out

    def usage(
        self,
        bridges: list[Service],
        consumers: list[Service],
        cpu0: dict[str, float],
        cpu1: dict[str, float],
        messages: int,
    ) -> dict[str, Any]:
        def side(services: list[Service]) -> dict[str, Any]:
            cpu = sum(cpu1[s.name] - cpu0[s.name] for s in services)
            return {
                "cpu_s": cpu,
                "cpu_s_per_1000": cpu / messages * 1000,
                "peak_rss_mb": max(s.peak_rss_mb() for s in services),
            }

        return {"bridge": side(bridges), "consumer": side(consumers)}

    def profile(self, service: Service) -> subprocess.Popen[bytes]:
        out = self.dir / f"profile-{service.name}.txt"
        py_spy = ensure_py_spy()
        return subprocess.Popen(
            [str(py_spy), "record", "-p", str(service.pid), "-d", str(self.args.profile_s),
             "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking", "--idle"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    # -- the whole run ----------------------------------------------------------------------

    async def run(self) -> int:
        peer_note = "skipped (--skip-peer)"
        if not self.args.skip_peer:
            self.peer_python, peer_note = ensure_mq_bridge()
        self.results["peer"] = {
            "status": peer_note,
            "available": self.peer_python is not None,
            "route": {
                k: v
                for k, v in mq_bridge_route(
                    self.settings,
                    client_id="-",
                    topic="-",
                    max_inflight=self.settings.bridge.max_inflight,
                ).items()
                if k != "input"
            }
            | {
                "mqtt": "our Mosquitto, bridge login, QoS 1, v5, persistent session,"
                f" max_inflight = queue_capacity = {self.settings.bridge.max_inflight}"
            },
        }
        say(f"peer: {peer_note}")
        if self.args.profile:
            say(f"profiler: {ensure_py_spy()}")
        try:
            await self.provision()
            self.results["message_bytes_mean"] = sum(map(len, self.payloads)) / len(self.payloads)
            self.results["raw_mqtt_relay"] = await raw_relay(self)
            say(f"raw mqtt relay: {self.results['raw_mqtt_relay']['msg_s']:,.0f} msg/s")
            self.results["raw_kafka_produce"] = await raw_produce(self)
            say(f"raw kafka produce: {self.results['raw_kafka_produce']['msg_s']:,.0f} msg/s")
            self.results["raw_pg_copy"] = await raw_copy(self)
            copied = self.results["raw_pg_copy"]
            say(f"raw pg COPY ({copied['layout']}): {copied['msg_s']:,.0f} rows/s")
            await self.pipeline()
            await bridges_alone(self)
        finally:
            await self.cleanup()
        self.report()
        ok = self.results.get("verify", {}).get("ok", False)
        ok = ok and all(
            self.results.get(k, {}).get("missing", 0) == 0
            for k in ("live_usagepipe", "drain_usagepipe")
        )
        return 0 if ok else 1

    def report(self) -> None:
        from e2e_report import render

        doc = {
            "command": " ".join([".venv/bin/python", "bench/e2e.py", *sys.argv[1:]]),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_at_end": os.getloadavg(),
                "loadavg_at_start": self.loadavg_at_start,
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "run": self.name,
            "sizes": asdict(self.sizes),
            "mix": self.args.mix,
            "settings_from_environment": {
                k: v
                for k, v in os.environ.items()
                if k.startswith("USAGEPIPE_") and "PASSWORD" not in k and "SECRET" not in k
            },
            **self.results,
        }
        doc["ratios"] = ratios(doc)
        RESULTS.mkdir(exist_ok=True)
        self.json_path.write_text(json.dumps(doc, indent=2, default=str))
        print(render(doc))
        print(f"JSON: {self.json_path}  (logs and ledgers: {self.dir})")
        if not self.args.keep:
            for ledger in self.dir.glob("ledger-*.jsonl"):
                ledger.unlink()


def slope(readings: list[tuple[float, int]], base: int, total: int) -> float:
    """Rows/s between the readings where 20 % and 80 % of `total` new rows were in."""
    lo = next((r for r in readings if r[1] - base >= 0.2 * total), None)
    hi = next((r for r in readings if r[1] - base >= 0.8 * total), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return 0.0
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def ratios(doc: dict[str, Any]) -> dict[str, Any]:
    raw = {k: doc[k]["msg_s"] for k in ("raw_mqtt_relay", "raw_kafka_produce", "raw_pg_copy")
           if k in doc}  # fmt: skip
    out: dict[str, Any] = {}
    if raw and "pipeline" in doc:
        slowest = min(raw, key=lambda k: raw[k])
        out["slowest_raw_stage"] = slowest
        out["pipeline_vs_slowest_raw"] = doc["pipeline"]["sustained_msg_s"] / raw[slowest]
    for phase in ("drain", "live"):
        ours, peer = doc.get(f"{phase}_usagepipe"), doc.get(f"{phase}_mq-bridge")
        if ours and peer:
            out[f"{phase}_rate_ours_vs_mq_bridge"] = ours["msg_s"] / peer["msg_s"]
            out[f"{phase}_cpu_per_msg_ours_vs_mq_bridge"] = (
                ours["cpu_s_per_1000"] / peer["cpu_s_per_1000"]
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller phases: a few minutes")
    parser.add_argument("--publishers", type=int, default=3, help="publisher processes (3)")
    parser.add_argument("--devices", type=int, default=40, help="devices per publisher (40)")
    parser.add_argument("--bridges", type=int, default=2, help="bridge processes (2)")
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes (2)")
    parser.add_argument("--skip-peer", action="store_true", help="no mq-bridge phases")
    parser.add_argument(
        "--mix",
        choices=("usage", "uniform"),
        default="usage",
        help="schema shares: the usage model's (usage), or every schema"
        " alike, a sixth of messages firmware installations (uniform)",
    )
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the bridge and consumer in the sustained phase")  # fmt: skip
    parser.add_argument("--profile-s", type=int, default=20, help="profile seconds (20)")
    parser.add_argument("--keep", action="store_true", help="keep the ledgers")
    args = parser.parse_args()
    print("$ .venv/bin/python bench/e2e.py " + " ".join(sys.argv[1:]), flush=True)
    return asyncio.run(Bench(args).run())


if __name__ == "__main__":
    sys.exit(main())
