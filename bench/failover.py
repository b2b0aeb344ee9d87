"""How long a killed consumer's partitions wait before another consumer of the group
stores them: two `usagepipe consume` processes in one group, a steady stream of records,
one SIGKILLed, and per partition the time from the kill to the next stored row.

Uses the local Kafka and PostgreSQL with topics, table, registry schema and group of its
own (dropped after). For each `--session-ms` (the group's `session.timeout.ms`; the
heartbeat a tenth of it) it prints the partitions that stalled and the longest stall:
the failover time. Prints figures; asserts nothing.

    python bench/failover.py --session-ms 10000 6000

On the local Tansu broker a group join takes about half of session.timeout.ms on top of
the coordinator noticing the dead member after session.timeout.ms; on Apache Kafka the
join is quick, so the figure there is about the session timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from ingest.kafka import ensure_topics, make_producer
from ingest.settings import Settings
from ingest.tables import drop_usage_tables
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids


async def measure(session_ms: int, partitions: int, rate: float) -> None:
    name = f"failover{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "USAGEPIPE_KAFKA__RAW_TOPIC": f"{name}.raw",
        "USAGEPIPE_KAFKA__DLQ_TOPIC": f"{name}.dlq",
        "USAGEPIPE_KAFKA__PARTITIONS": str(partitions),
        "USAGEPIPE_KAFKA__SESSION_TIMEOUT_MS": str(session_ms),
        "USAGEPIPE_KAFKA__HEARTBEAT_INTERVAL_MS": str(max(100, session_ms // 10)),
        "USAGEPIPE_POSTGRES__TABLE": f"usage_{name}",
        "USAGEPIPE_REGISTRY__DB_SCHEMA": f"reg_{name}",
        "USAGEPIPE_REGISTRY__EVENTS_TOPIC": f"{name}.registry",
        "USAGEPIPE_CONSUMER__GROUP_ID": f"{name}-group",
        "USAGEPIPE_CONSUMER__METRICS_PORT": "0",
        "USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S": "0",
        "USAGEPIPE_ENRICH__UNREGISTERED": "store",  # hand-made device ids
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET": secrets.token_hex(32),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("USAGEPIPE_")})
    settings = Settings()
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    usagepipe = str(Path(sys.executable).with_name("usagepipe"))
    consumers = await asyncio.to_thread(spawn, usagepipe, env, name)
    plan = FleetPlan(devices=60, messages_per_device=2000, seed=71)
    queues = [plan_device(plan, d) for d in device_ids(plan)]
    producer = make_producer(settings.kafka, client_id=f"{name}-produce")
    await producer.start()
    stop = asyncio.Event()

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            for device, messages in zip(device_ids(plan), queues, strict=True):
                if i < len(messages):
                    await producer.send(
                        settings.kafka.raw_topic, messages[i].payload, key=device.encode()
                    )
            i += 1
            await asyncio.sleep(len(queues) / rate)

    pg = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    advanced: dict[int, list[float]] = {}
    last: dict[int, int] = {}

    async def poll() -> None:
        table = settings.postgres.table
        while not stop.is_set():
            with contextlib.suppress(asyncpg.UndefinedTableError):
                rows = await pg.fetch(
                    f"SELECT kafka_partition, max(kafka_offset) AS o FROM {table} GROUP BY 1"
                )
                now = time.monotonic()
                for r in rows:
                    if last.get(r["kafka_partition"]) != r["o"]:
                        last[r["kafka_partition"]] = r["o"]
                        advanced.setdefault(r["kafka_partition"], []).append(now)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(produce()), asyncio.create_task(poll())]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both consumers in the group, every partition moving
            now = time.monotonic()
            moving = {p for p, times in advanced.items() if times[-1] > now - 1.0}
            if len(moving) == partitions and now - min(t[0] for t in advanced.values()) > 3:
                break
            await asyncio.sleep(0.2)
        else:
            print(f"session {session_ms} ms: the group never stored every partition")
            return
        killed_at = time.monotonic()
        consumers[0].send_signal(signal.SIGKILL)
        await asyncio.to_thread(consumers[0].wait)
        while time.monotonic() < killed_at + 120:
            await asyncio.sleep(0.2)
            gaps = {p: gap(times, killed_at) for p, times in advanced.items()}
            if all(g is not None for g in gaps.values()) and time.monotonic() > killed_at + 3:
                break
        stalls = {p: g for p, g in sorted(gaps.items()) if g is None or g > 1.0}
        shown = ", ".join(
            f"{p}: {'not within 120 s' if g is None else f'{g:.1f} s'}" for p, g in stalls.items()
        )
        longest = max((g for g in stalls.values() if g is not None), default=0.0)
        print(
            f"session.timeout.ms {session_ms:>6}: partitions stalled after the kill:"
            f" {shown or 'none'}; failover {longest:.1f} s"
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()
        for proc in consumers:
            if proc.poll() is None:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)
        await drop_usage_tables(pg, settings.postgres.table)
        await pg.execute(f"DROP SCHEMA IF EXISTS {settings.registry.db_schema} CASCADE")
        await pg.close()


def spawn(usagepipe: str, env: dict[str, str], name: str) -> list[subprocess.Popen[bytes]]:
    """Two consumers of the group, each logging to /tmp/<name>-<i>.log."""
    procs = []
    for i in range(2):
        with Path(f"/tmp/{name}-{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [usagepipe, "--log-level", "WARNING", "consume"],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
    return procs


def gap(times: list[float], after: float) -> float | None:
    """Seconds from `after` to the first advance following it, or None if none yet."""
    later = [t for t in times if t > after]
    return later[0] - after if later else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--session-ms", type=int, nargs="+", default=[10_000, 6_000])
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rate", type=float, default=300.0, help="records a second")
    args = parser.parse_args()
    print(f"$ {' '.join(['python', *sys.argv])}")
    for session_ms in args.session_ms:
        asyncio.run(measure(session_ms, args.partitions, args.rate))


if __name__ == "__main__":
    main()
