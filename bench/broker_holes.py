"""Holes a live consumer meets in one partition's offsets, with two producers writing it.

Apache Kafka makes a partition's records readable in offset order. The local broker
(Tansu, memory storage) can make a later batch readable before an earlier one when two
producers write the same partition, so a consumer that fetches at that moment moves
past the earlier batch (read again from the beginning, the log has no hole). This
script counts both, on a topic of its own, for `--seconds`:

    plain     an aiokafka consumer checking that each record's offset follows the last
    guarded   the same reads through `ingest.offsets.ContiguousOffsets`, which cuts a
              fetch at a hole and reads the partition again from it (what the
              usagepipe consumer and the dead-letter reader do)

    .venv/bin/python bench/broker_holes.py [--seconds 20] [--batch 4]

It prints figures and asserts nothing (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from ingest.metrics import ConsumerMetrics
from ingest.offsets import ContiguousOffsets
from ingest.settings import Settings


async def produce(servers: str, topic: str, name: str, batch: int, stop: asyncio.Event) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=1)
    await producer.start()
    sent = 0
    try:
        while not stop.is_set():
            records = producer.create_batch()
            for i in range(batch):
                records.append(key=None, value=f"{name}-{sent}-{i}".encode(), timestamp=None)
            done = await producer.send_batch(records, topic, partition=0)
            sent += batch
            if sent % (2 * batch) == 0:
                await done
    finally:
        await producer.stop()
    return sent


async def read(servers: str, topic: str, seconds: float, guarded: bool) -> tuple[int, int, int]:
    """(records read, holes met, of those read again by the guard)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50)  # fmt: skip
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    metrics = CollectorRegistry()
    guard = ContiguousOffsets(consumer, ConsumerMetrics(metrics))
    expected, holes, got = 0, 0, 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=100)
            if guarded:
                records = guard.admit(records)
            for batch in records.values():
                for record in batch:
                    holes += record.offset > expected
                    expected = max(expected, record.offset + 1)
                    got += 1
    finally:
        await consumer.stop()
    again = metrics.get_sample_value(
        "usagepipe_consumer_offset_holes_total", {"outcome": "read_again"}
    )
    return got, holes, int(again or 0)


async def one(servers: str, seconds: float, batch: int, guarded: bool) -> None:
    topic = f"holes{secrets.token_hex(3)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        stop = asyncio.Event()
        producers = [asyncio.create_task(produce(servers, topic, n, batch, stop)) for n in "ab"]
        got, holes, again = await read(servers, topic, seconds, guarded)
        stop.set()
        sent = sum(await asyncio.gather(*producers))
        kind = "guarded" if guarded else "plain  "
        print(f"{kind}  {sent:>9,} records sent, {got:>9,} read live, {holes} holes passed"
              f" ({again} fetches cut and read again)")  # fmt: skip
    finally:
        await admin.delete_topics([topic])
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=4, help="records per producer batch")
    args = parser.parse_args()
    servers = Settings().kafka.bootstrap_servers
    print(f"$ .venv/bin/python bench/broker_holes.py --seconds {args.seconds:g}"
          f" --batch {args.batch}   (broker {servers})")  # fmt: skip
    for guarded in (False, True):
        await one(servers, args.seconds, args.batch, guarded)


if __name__ == "__main__":
    asyncio.run(main())
