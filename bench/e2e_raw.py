"""The e2e benchmark's raw limits: each stage without usagepipe's code, same payloads.

- MQTT relay: plain paho publishers (`e2e_load.relay_publisher`, several processes,
  each a bounded window on paho's own loop) -> Mosquitto -> one plain paho subscriber,
  QoS 1 both ways; timed from the first publish to the last message received.
- Kafka produce: aiokafka, acks=all, pipelined sends.
- PostgreSQL COPY: asyncpg `copy_records_to_table` into a table created exactly as the
  usage table (`UsageStore.migrate`), in batches of 5,000, no staging, no rollups.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from e2e_load import SPAWN, RelayJob, relay_publisher, relay_subscriber

from ingest.kafka import ensure_topics, make_producer
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids

if TYPE_CHECKING:
    from e2e import Bench


async def raw_relay(bench: Bench) -> dict[str, Any]:
    count = bench.sizes.relay
    topic = f"{bench.settings.mqtt.topic_prefix}devices/relay/telemetry"
    ready, go, subq, pubq = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue(), SPAWN.Queue()
    sub = SPAWN.Process(target=relay_subscriber,
                        args=(bench.settings.mqtt, topic, count, ready, subq))  # fmt: skip
    sub.start()
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, ready.wait, 30):
        raise SystemExit("the relay subscriber did not subscribe")
    publishers = bench.args.publishers
    pubs = []
    for i in range(publishers):
        share = count // publishers + (i < count % publishers)
        job = RelayJob(bench.settings.mqtt, topic, bench.payloads, share, window=1000)
        proc = SPAWN.Process(target=relay_publisher, args=(job, go, pubq))
        proc.start()
        pubs.append(proc)
    await asyncio.sleep(1.0)
    go.set()
    outs = [await loop.run_in_executor(None, pubq.get, True, 600) for _ in pubs]
    got, _, last = await loop.run_in_executor(None, subq.get, True, 600)
    for proc in [*pubs, sub]:
        await loop.run_in_executor(None, proc.join)
    started = min(o[0] for o in outs)
    published = max(o[1] for o in outs)
    return {
        "msg_s": got / (last - started),
        "received": got,
        "of": count,
        "publishers": publishers,
        "publish_msg_s": count / (published - started),
        "publisher_cpu_share": [round(o[2] / (o[1] - o[0]), 2) for o in outs],
    }


async def raw_produce(bench: Bench) -> dict[str, Any]:
    topic = f"{bench.name}.rawproduce"
    bench.topics.append(topic)
    await ensure_topics(bench.settings.kafka, topic)
    producer = make_producer(bench.settings.kafka, client_id="bench-raw")
    await producer.start()
    try:
        count, payloads = bench.sizes.produce, bench.payloads
        started = time.perf_counter()
        pending = [
            await producer.send(topic, payloads[i % len(payloads)], key=b"dev-%d" % (i % 1000))
            for i in range(count)
        ]
        await asyncio.gather(*pending)
        return {"msg_s": count / (time.perf_counter() - started), "records": count}
    finally:
        await producer.stop()


async def raw_copy(bench: Bench) -> dict[str, Any]:
    from ingest.rows import COLUMNS, UsageRow
    from ingest.store import UsageStore
    from schemas.parse import parse_telemetry

    pg = bench.settings.postgres.model_copy(
        update={"table": f"{bench.settings.postgres.table}_copy", "pool_size": 1}
    )
    plan = FleetPlan(devices=200, messages_per_device=bench.sizes.copy // 200, seed=2,
                     fleet="e2ecopy", start=datetime.now(UTC) - timedelta(hours=3),
                     mix=bench.args.mix)  # fmt: skip
    now = datetime.now(UTC)
    rows = []
    for device in device_ids(plan):
        for i, msg in enumerate(plan_device(plan, device)):
            env = parse_telemetry(msg.payload, now=now, max_future_skew=timedelta(minutes=5),
                                  max_bytes=65536)  # fmt: skip
            rows.append(UsageRow.from_envelope(env, 0, i))
    rows.sort(key=lambda r: r.event_time)
    batches = [rows[i : i + 5000] for i in range(0, len(rows), 5000)]
    async with UsageStore(pg) as store:
        await store.migrate()
        if store.layout.kind == "partitioned":  # a hypertable makes its chunks itself
            await store.ensure_partitions(r.event_time for r in rows)
        async with store.pool.acquire() as conn:
            started = time.perf_counter()
            for batch in batches:
                await conn.copy_records_to_table(
                    pg.table, records=[r.record() for r in batch], columns=COLUMNS
                )
            elapsed = time.perf_counter() - started
        layout = store.layout.kind
    return {"msg_s": len(rows) / elapsed, "rows": len(rows), "batch": 5000, "layout": layout}
