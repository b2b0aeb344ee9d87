"""A large simulated fleet from one process: provisioning, connecting, idling, publishing.

Uses the local Kafka and PostgreSQL with topics, table and registry schema of its own
(`--name`), and a Mosquitto of its own on a free port (`ulimit -n` raised first, which
it inherits): the fleet's accounts are registered in the registry against a collector
and written into that broker's dynamic-security file before it starts
(`simulators.provision.CollectedAccounts`), because the plugin's control topic slows
to about 20 accounts/s with thousands. A bridge and a consumer run as their own
processes, and the ledger is verified at the end. Prints figures; asserts nothing.

    python bench/fleet.py --devices 10000 --window 7d --duration 120s

Prints: provisioning time and rate (first run registers, later runs reissue secrets),
connect time, RSS and CPU while idle with every device connected, then messages per
second, CPU and RSS while the fleet plays its window in time-compressed mode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry

from ingest.kafka import ensure_topics
from ingest.metrics import SimulatorMetrics
from ingest.settings import Settings
from ingest.tables import drop_usage_tables
from simulators.cli import raise_fd_limit, span
from simulators.faults import parse_faults
from simulators.fleet import Fleet
from simulators.ledger import LedgerWriter
from simulators.plan import FleetPlan
from simulators.provision import (
    CollectedAccounts,
    open_registry,
    provision,
    write_broker_accounts,
)
from simulators.verify import verify
from usagepipe.services import MosquittoBroker, with_broker_logins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class FleetBench:
    """A provisioned fleet with a broker of its own, and the environment that points a
    `usagepipe bridge` or `consume` at it (topics, table, registry schema of `name`)."""

    settings: Settings
    env: dict[str, str]
    plan: FleetPlan
    credentials: dict[str, str]
    broker: MosquittoBroker
    usagepipe: str


@contextlib.asynccontextmanager
async def provisioned_fleet(
    name: str, plan: FleetPlan, extra_env: dict[str, str] | None = None
) -> AsyncIterator[FleetBench]:
    """Provision `plan`'s devices into a registry schema and a broker of `name`'s own,
    migrate its usage table; on the way out, stop the broker and drop what it made."""
    raise_fd_limit(plan.devices)
    base = with_broker_logins(Settings())
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    broker = MosquittoBroker(free_port(), run_dir)
    broker.start()  # first start: writes the plugin's file and the service logins
    broker.stop()
    logins = broker.logins()
    assert logins is not None
    settings = base.model_copy(
        update={
            "registry": base.registry.model_copy(
                update={"db_schema": f"reg_{name}", "events_topic": f"{name}.registry"}
            ),
            "mqtt": broker.mqtt_settings(base.mqtt),
            "kafka": base.kafka.model_copy(
                update={"raw_topic": f"{name}.raw", "dlq_topic": f"{name}.dlq"}
            ),
            "postgres": base.postgres.model_copy(update={"table": f"usage_{name}"}),
        }
    )
    env = {
        **os.environ,
        "USAGEPIPE_MQTT__PORT": str(broker.port),
        "USAGEPIPE_MQTT__USERNAME": logins.bridge_username,
        "USAGEPIPE_MQTT__PASSWORD": logins.bridge_password,
        "USAGEPIPE_MQTT__ADMIN_USERNAME": logins.admin_username,
        "USAGEPIPE_MQTT__ADMIN_PASSWORD": logins.admin_password,
        "USAGEPIPE_KAFKA__RAW_TOPIC": settings.kafka.raw_topic,
        "USAGEPIPE_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
        "USAGEPIPE_POSTGRES__TABLE": settings.postgres.table,
        "USAGEPIPE_REGISTRY__DB_SCHEMA": settings.registry.db_schema,
        "USAGEPIPE_REGISTRY__EVENTS_TOPIC": settings.registry.events_topic,
        "USAGEPIPE_BRIDGE__CLIENT_ID": f"{name}-bridge",
        "USAGEPIPE_CONSUMER__GROUP_ID": f"{name}-group",
        "USAGEPIPE_BRIDGE__METRICS_PORT": "0",
        "USAGEPIPE_CONSUMER__METRICS_PORT": "0",
        # A load test sends each device far above the per-device ceiling: off.
        "USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S": "0",
        **(extra_env or {}),
    }
    print(f"{os.cpu_count()} CPUs; {plan.devices:,} devices; fd limit "
          f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]:,}", flush=True)  # fmt: skip
    try:
        await ensure_topics(settings.kafka, settings.registry.events_topic)
        collected = CollectedAccounts()
        async with open_registry(settings, broker=collected) as registry:
            fleet = await provision(registry, plan)
        started = time.monotonic()
        write_broker_accounts(broker.dir, collected.secrets, settings.mqtt.topic_prefix)
        broker.start()
        accounts_s = time.monotonic() - started
        total_s = fleet.elapsed_s + accounts_s
        print(
            f"provisioned in {total_s:.1f}s = {plan.devices / total_s:,.0f} devices/s"
            f" (registry {fleet.elapsed_s:.1f}s, {fleet.registered:,} registered; broker"
            f" accounts written and broker started in {accounts_s:.1f}s)",
            flush=True,
        )
        usagepipe = str(Path(sys.executable).with_name("usagepipe"))
        migrate = await asyncio.create_subprocess_exec(
            usagepipe, "db", "migrate", env=env, stdout=subprocess.DEVNULL
        )
        if await migrate.wait() != 0:
            raise SystemExit(f"usagepipe db migrate failed for {settings.postgres.table}")
        yield FleetBench(settings, env, plan, fleet.credentials, broker, usagepipe)
    finally:
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        await drop(settings)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--window", type=span, default=timedelta(days=1))
    parser.add_argument("--duration", type=span, default=timedelta(seconds=120))
    parser.add_argument("--faults", default="dup=0.01,reorder=0.01")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to idle connected")
    parser.add_argument("--name", default="benchfleet", help="schema, topics, table prefix")
    parser.add_argument("--ledger", type=Path, default=Path("/tmp/usagepipe-bench-fleet.jsonl"))
    args = parser.parse_args()
    plan = FleetPlan(
        devices=args.devices,
        messages_per_device=0,
        seed=1,
        run_id=secrets.token_hex(4),
        fleet=args.name.replace("_", ""),
        window=args.window,
        speed=args.window / args.duration,
        faults=parse_faults(args.faults),
    )
    async with provisioned_fleet(args.name, plan) as bench:
        services = [
            await asyncio.create_subprocess_exec(
                bench.usagepipe,
                "--log-level",
                "WARNING",
                command,
                env=bench.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for command in ("bridge", "consume")
        ]
        try:
            await run(args, bench.settings, plan, bench.credentials)
        finally:
            for service in services:
                if service.returncode is None:
                    with contextlib.suppress(ProcessLookupError):  # it ended by itself
                        service.send_signal(signal.SIGTERM)
            for service in services:
                await service.wait()


async def run(
    args: argparse.Namespace, settings: Settings, plan: FleetPlan, credentials: dict[str, str]
) -> None:
    await asyncio.sleep(5)  # the consumer joins its group
    idle: dict[str, float] = {}

    async def hold() -> None:
        idle["rss_mb"] = rss_mb()
        before, started = cpu_s(), time.monotonic()
        await asyncio.sleep(args.idle)
        idle["cpu"] = (cpu_s() - before) / (time.monotonic() - started)

    with LedgerWriter(args.ledger) as ledger:
        devices = Fleet(
            settings.mqtt,
            plan,
            SimulatorMetrics(CollectorRegistry()),
            credentials=credentials,
            max_inflight=settings.simulator.max_inflight_per_client,
            ledger=ledger,
            on_connected=hold,
        )
        cpu_before = cpu_s()
        report = await devices.run()
        cpu_total = cpu_s() - cpu_before
        published = time.monotonic()
    publish_s = report.elapsed_s - report.connect_s - args.idle
    print(
        f"connected {report.connected:,} devices in {report.connect_s:.1f}s;"
        f" idle: RSS {idle['rss_mb']:.0f} MB, CPU {idle['cpu']:.1%} of a core",
        flush=True,
    )
    print(
        f"played {args.window} in {publish_s:.1f}s ({plan.speed:,.0f}x): {report.sent:,}"
        f" messages acknowledged = {report.sent / publish_s:,.0f} msg/s; worst lag behind"
        f" schedule {report.lag_s:.1f}s; CPU {cpu_total:.1f}s in all; peak RSS"
        f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB;"
        f" ledger {args.ledger} ({report.planned:,} lines)",
        flush=True,
    )
    if report.surprises:
        print(f"{len(report.surprises)} unexpected outcomes, first: {report.surprises[0]}")
    result = await verify(settings, args.ledger, timeout_s=600)
    caught_up = time.monotonic() - published
    print(
        f"pipeline caught up {caught_up:.1f}s after the last PUBACK; verify:"
        f" {'OK' if result.ok else f'{len(result.discrepancies)} discrepancies'};"
        f" expected vs found: "
        + ", ".join(f"{n} {e:,}/{f:,}" for n, e, f in result.table() if ":" not in n),
        flush=True,
    )
    for line in result.discrepancies[:10]:
        print(f"  {line}")


async def drop(settings: Settings) -> None:
    """Drop the bench's table, registry schema (its broker went with its run dir)."""
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        await drop_usage_tables(conn, settings.postgres.table)
        await conn.execute(f"DROP SCHEMA IF EXISTS {settings.registry.db_schema} CASCADE")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
