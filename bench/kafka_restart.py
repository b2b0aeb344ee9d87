"""What a Kafka broker restart loses: the local broker (Tansu, memory storage) killed -9
mid-traffic and started again, the pipeline left running, every message's fate checked
against the fleet's ledger (`simulators.verify`, as `usagepipe verify` does).

A PRIVATE Tansu on --kafka-port (default 19392; never the shared 9092) carries the
run's topics; the shared Mosquitto and PostgreSQL carry its own topic prefix, bridge
session, registry schema and usage table (dropped after). The bridge and the consumer
run in this process. The fleet publishes at --rate for --seconds; --kill-at seconds in,
the broker is SIGKILLed, and --down seconds later started again, empty: the clients'
requests bring the topics back (Tansu auto-creates them, with 4 partitions), the
consumer finds each partition's log re-created and reads it from its start.

Prints, per run, the ledger's expected vs found fates and what the restart cost:
messages the broker had acknowledged (so the bridge PUBACKed them to their devices)
and lost before the consumer stored them, the topics' partitions after the restart,
the partitions found re-created, and the longest batch.

    .venv/bin/python bench/kafka_restart.py [--runs 3] [--rate 500] [--down 10]

It prints figures and asserts nothing (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

from devices.mosquitto import DynsecAccounts
from devices.schema import migrate_registry_at
from ingest.bridge import Bridge
from ingest.consumer import Consumer
from ingest.kafka import ensure_topics
from ingest.metrics import BridgeMetrics, ConsumerMetrics, SimulatorMetrics
from ingest.settings import Settings
from ingest.tables import drop_usage_tables
from simulators.fleet import Fleet
from simulators.ledger import LedgerWriter
from simulators.plan import FleetPlan
from simulators.provision import open_registry, provision
from simulators.verify import verify
from usagepipe import services
from usagepipe.services import TansuBroker


def run_settings(name: str, kafka_port: int) -> Settings:
    """The environment's settings with every name of the run's own, Kafka private."""
    env = {
        "USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "USAGEPIPE_KAFKA__RAW_TOPIC": f"{name}.raw",
        "USAGEPIPE_KAFKA__DLQ_TOPIC": f"{name}.dlq",
        "USAGEPIPE_KAFKA__PARTITIONS": "6",
        "USAGEPIPE_MQTT__TOPIC_PREFIX": f"{name}/",
        "USAGEPIPE_BRIDGE__CLIENT_ID": f"{name}-bridge",
        "USAGEPIPE_BRIDGE__METRICS_PORT": "0",
        "USAGEPIPE_POSTGRES__TABLE": f"usage_{name}",
        "USAGEPIPE_REGISTRY__DB_SCHEMA": f"reg_{name}",
        "USAGEPIPE_REGISTRY__EVENTS_TOPIC": f"{name}.registry",
        "USAGEPIPE_CONSUMER__GROUP_ID": f"{name}-group",
        "USAGEPIPE_CONSUMER__METRICS_PORT": "0",
        "USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S": "0",
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET": secrets.token_hex(32),
    }
    os.environ.update(env)
    return services.with_broker_logins(Settings())


async def partitions(settings: Settings, *topics: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(list(topics))}
    finally:
        await admin.close()


def value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


async def one_run(args: argparse.Namespace, run: int, work: Path) -> dict[str, object]:
    name = f"krestart{secrets.token_hex(3)}"
    broker = TansuBroker("127.0.0.1", args.kafka_port, work / f"tansu-{run}.log")
    broker.start()
    settings = run_settings(name, args.kafka_port)
    dsn = settings.postgres.dsn.get_secret_value()
    devices = 100
    plan = FleetPlan(
        devices=devices,
        messages_per_device=int(args.rate * args.seconds / devices),
        seed=run,
        run_id=name,
        fleet=name,
        rate=args.rate,
        start=datetime.now(UTC) - timedelta(hours=2),
    )
    ledger = work / f"ledger-{name}.jsonl"
    bridge_metrics, consumer_metrics = CollectorRegistry(), CollectorRegistry()
    bridge = Bridge(settings, BridgeMetrics(bridge_metrics))
    consumer = Consumer(settings, ConsumerMetrics(consumer_metrics))
    figures: dict[str, object] = {"run": run}
    try:
        await migrate_registry_at(dsn, settings.registry.db_schema)
        await ensure_topics(settings.kafka, settings.registry.events_topic)
        async with open_registry(settings) as registry:
            credentials = (await provision(registry, plan)).credentials
        longest = 0.0
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(bridge.run(), name="bridge")
            tasks.create_task(consumer.run(), name="consumer")
            await asyncio.wait_for(bridge.ready.wait(), 60)
            writer = LedgerWriter(ledger)
            with writer:
                fleet = Fleet(
                    settings.mqtt,
                    plan,
                    SimulatorMetrics(CollectorRegistry()),
                    credentials=credentials,
                    ledger=writer,
                )
                publishing = tasks.create_task(fleet.run(), name="fleet")
                await asyncio.sleep(args.kill_at)
                stored_at_kill = consumer.report.stored
                acked_at_kill = bridge.report.acked
                broker.kill()
                await asyncio.sleep(args.down)
                broker.start()
                restarted = time.monotonic()
                last, last_at = consumer.report.stored, time.monotonic()
                while not publishing.done() or time.monotonic() - last_at < 15:
                    await asyncio.sleep(0.5)
                    if consumer.report.stored != last:
                        now = time.monotonic()
                        longest = max(longest, now - last_at) if last_at > restarted else longest
                        last, last_at = consumer.report.stored, now
                sent = publishing.result()
            figures["partitions"] = await partitions(
                settings, settings.kafka.raw_topic, settings.kafka.dlq_topic
            )
            bridge.stop("bench over")
            consumer.stop("bench over")
        result = await verify(settings, ledger, timeout_s=5)
        conn = await asyncpg.connect(dsn)
        try:
            figures["rows_in_table"] = await conn.fetchval(
                f"SELECT count(*) FROM {settings.postgres.table}"
            )
        finally:
            await conn.close()
        figures["first_discrepancies"] = result.discrepancies[:2]
        table = {n: (e, f) for n, e, f in result.table()}
        expected_stored, found_stored = table.get("stored", (0, 0))
        figures.update(
            sent=sent.sent,
            acked_before_kill=acked_at_kill,
            stored_before_kill=stored_at_kill,
            fates=table,
            lost=expected_stored - found_stored,
            discrepancies=len(result.discrepancies),
            recreated=sum(
                value(
                    consumer_metrics,
                    "usagepipe_consumer_recreated_partitions_total",
                    {"found": how},
                )
                for how in ("assigned", "running")
            ),
            gap=value(consumer_metrics, "usagepipe_consumer_recreated_gap_offsets_total"),
            repairs={
                a: value(consumer_metrics, "usagepipe_consumer_topic_repairs_total", {"action": a})
                + value(bridge_metrics, "usagepipe_bridge_topic_repairs_total", {"action": a})
                for a in ("created", "grown", "short")
            },
            commit_errors=value(
                consumer_metrics, "usagepipe_consumer_errors_total", {"kind": "kafka_commit"}
            ),
            longest_stall_after_restart_s=round(longest, 1),
        )
        return figures
    finally:
        broker.stop()
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(dsn)
            try:
                schema = settings.registry.db_schema
                ids: list[str] = [
                    r[0] for r in await conn.fetch(f"SELECT device_id FROM {schema}.devices")
                ]
                async with DynsecAccounts(settings.mqtt) as accounts:
                    await accounts.revoke_devices(ids)
                await drop_usage_tables(conn, settings.postgres.table)
                await conn.execute(f"DROP SCHEMA IF EXISTS {settings.registry.db_schema} CASCADE")
            finally:
                await conn.close()
        ledger.unlink(missing_ok=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its outage noise
    logging.getLogger("simulators").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="fleet messages a second")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the fleet sends")
    parser.add_argument("--kill-at", type=float, default=15.0, help="seconds into the traffic")
    parser.add_argument("--down", type=float, default=10.0, help="seconds the broker is away")
    parser.add_argument("--kafka-port", type=int, default=19392)
    args = parser.parse_args()
    print(f"$ {' '.join(['python', *sys.argv])}")
    with tempfile.TemporaryDirectory(prefix="kafka-restart-") as tmp:
        for run in range(1, args.runs + 1):
            figures = asyncio.run(one_run(args, run, Path(tmp)))
            print(" ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
