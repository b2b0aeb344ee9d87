"""How long a bridge's dead letter lives only in Kafka: the window a Kafka loss can
take it in (`ingest.dead_letter_table`, README "Dead letters").

On the local servers, with names of its own (topics, table, group, prefix): a bridge
runs; `--cold` letters (a device naming another device in its payload:
`device_id_mismatch`) are published while no consumer runs, then a consumer starts and
the time until all of them are in the dead-letter table is printed (the consumer's
start, its group join, the read). Then, the consumer warm, `--warm` letters are
published one at a time, each timed from the broker's PUBACK to its row in the table.
Everything it made is dropped after. A benchmark: it prints figures, asserts nothing.

    python bench/bridge_letters.py [--cold 100] [--warm 20]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import secrets
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from devices.schema import migrate_registry_at
from ingest.bridge import Bridge
from ingest.consumer import Consumer
from ingest.metrics import BridgeMetrics, ConsumerMetrics
from ingest.mqtt import MqttClient
from ingest.settings import BridgeSettings, ConsumerSettings, KafkaSettings, Settings
from ingest.tables import drop_usage_tables
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from usagepipe import services

COMMAND = "python bench/bridge_letters.py " + " ".join(sys.argv[1:])


def own_names(base: Settings, name: str) -> Settings:
    return base.model_copy(
        update={
            "mqtt": base.mqtt.model_copy(update={"topic_prefix": f"{name}/"}),
            "kafka": KafkaSettings(
                **base.kafka.model_dump() | {"raw_topic": f"{name}.raw", "dlq_topic": f"{name}.dlq"}
            ),
            "enrich": base.enrich.model_copy(
                update={"owner_key_secret": SecretStr(secrets.token_hex(32))}
            ),
            "bridge": BridgeSettings(client_id=f"{name}-bridge", metrics_port=0),
            "consumer": ConsumerSettings(group_id=f"{name}-group", metrics_port=0),
            "postgres": base.postgres.model_copy(update={"table": f"usage_{name}"}),
            "registry": base.registry.model_copy(
                update={"db_schema": f"reg_{name}", "events_topic": f"{name}.registry"}
            ),
        }
    )


async def letters(conn: asyncpg.Connection, settings: Settings) -> int:
    table = f"{settings.postgres.table}_dead_letters"
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return 0
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


async def until(check: Callable[[], bool | Awaitable[bool]]) -> None:
    while True:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        await asyncio.sleep(0.005)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=100)
    parser.add_argument("--warm", type=int, default=20)
    args = parser.parse_args()
    print(f"$ {COMMAND}".rstrip())
    base = services.with_broker_logins(Settings())
    s = own_names(base, "bench" + secrets.token_hex(4))
    dsn = s.postgres.dsn.get_secret_value()
    await migrate_registry_at(dsn, s.registry.db_schema)
    plan = FleetPlan(devices=2, messages_per_device=args.cold + args.warm, seed=48)
    device, other = device_ids(plan)
    topic = plan_device(plan, device, s.mqtt.topic_prefix)[0].topic
    spoofs = [m.payload for m in plan_device(plan, other, s.mqtt.topic_prefix)]
    bridge = Bridge(s, BridgeMetrics(CollectorRegistry()))
    consumer = Consumer(s, ConsumerMetrics(CollectorRegistry()))
    conn = await asyncpg.connect(dsn)

    async def stored(n: int) -> bool:
        return await letters(conn, s) >= n

    try:
        async with asyncio.TaskGroup() as tasks, MqttClient(s.mqtt, client_id=device) as pub:
            tasks.create_task(bridge.run(), name="bench-bridge")
            await bridge.ready.wait()
            await asyncio.gather(*[await pub.publish(topic, p) for p in spoofs[: args.cold]])
            await until(lambda: bridge.report.acked >= args.cold)
            started = time.monotonic()
            tasks.create_task(consumer.run(), name="bench-consumer")
            await until(lambda: stored(args.cold))
            cold = time.monotonic() - started
            waits = []
            for n, payload in enumerate(spoofs[args.cold :], start=args.cold + 1):
                await (await pub.publish(topic, payload))
                acked = time.monotonic()
                await until(functools.partial(stored, n))
                waits.append(time.monotonic() - acked)
            bridge.stop("bench over")
            consumer.stop("bench over")
    finally:
        await drop_usage_tables(conn, s.postgres.table)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{s.registry.db_schema}" CASCADE')
        await conn.close()
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka.bootstrap_servers)
        await admin.start()
        try:
            made = [s.kafka.raw_topic, s.kafka.dlq_topic, s.registry.events_topic]
            await admin.delete_topics([t for t in made if t in await admin.list_topics()])
        finally:
            await admin.close()
    waits.sort()
    print(f"{args.cold} letters queued before the consumer started: all stored {cold:.2f} s later")
    median = waits[len(waits) // 2]
    print(
        f"{args.warm} letters one at a time, PUBACK -> table: median {median:.3f} s,"
        f" max {waits[-1]:.3f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
