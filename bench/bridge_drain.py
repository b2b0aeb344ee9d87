"""The bridge's backlog drain: messages queued in its persistent session, then timed.

    nice -n 10 .venv/bin/python bench/bridge_drain.py [--messages 100000] [--publishers 3]
        [--window 20000]

Starts a private Mosquitto (the project's rendered deploy/mosquitto/mosquitto.conf: its
queue holds at most 1,000,000 messages for a session, and it saves every 10,000 changes)
and a private Tansu (free ports, a temporary run dir), opens the bridge's persistent
session once, then publishes the backlog while the bridge is away: valid fleet messages
from 1,000 devices (~330 bytes each), from `--publishers` processes, each one MQTT
connection with at most 1,000 QoS 1 messages awaiting PUBACK (the broker's Receive
Maximum; paho's 16-bit packet ids would run out past 65,535). Then it starts the bridge
(`bridge.max_inflight` = `--window`) and times it until Kafka confirmed the last message
and the bridge acknowledged it. CPU and peak RSS are this process's, which while draining
is the bridge's alone (the publishers were child processes, gone by then).

Then it reads the whole raw topic back and counts every record by (device, boot, seq)
against what was published: lost (published, never in Kafka) and duplicated (in Kafka
more than once). It prints the figures and the command to reproduce them, and exits 1
unless nothing was lost or duplicated and the bridge never held more than its window.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from ingest.bridge import Bridge
from ingest.metrics import BridgeMetrics
from ingest.mqtt import MqttClient
from ingest.settings import BridgeSettings, KafkaSettings, MqttSettings, Settings
from schemas.catalog import SCHEMA_NAMES, current_version
from schemas.envelope import envelope_dict
from schemas.examples import example_body
from usagepipe.services import MosquittoBroker, TansuBroker

DEVICES = 1000
QUEUE_CAP = 1_000_000
"""deploy/mosquitto/mosquitto.conf's max_queued_messages: the broker drops (silently)
what a session is queued beyond it."""
PUBLISHER_WINDOW = 1000
"""QoS 1 publishes awaiting PUBACK per publisher: the broker's own Receive Maximum
(max_inflight_messages in deploy/mosquitto/mosquitto.conf)."""
START = datetime.now(UTC) - timedelta(hours=2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def message(i: int, prefix: str, rng: random.Random) -> tuple[str, bytes]:
    """Message `i` of the backlog: device `i % 1000`, boot b1, seq `i // 1000`."""
    device = f"bench-{i % DEVICES:04d}"
    schema = rng.choice(SCHEMA_NAMES)
    doc = envelope_dict(
        device_id=device,
        boot_id="b1",
        seq=i // DEVICES,
        event_time=START + timedelta(milliseconds=i),
        schema_name=schema,
        schema_version=current_version(schema),
        body=example_body(schema, rng),
    )
    return f"{prefix}devices/{device}/telemetry", orjson.dumps(doc)


def share(count: int, publisher: int, publishers: int) -> Iterator[int]:
    """The message indexes of one publisher: whole devices, so each device's messages
    keep their order."""
    for i in range(count):
        if i % DEVICES % publishers == publisher:
            yield i


def peak_rss_mb(pid: int | None) -> float:
    """A process's peak resident set (VmHWM), in MB; 0 if unknown."""
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def index_of(value: bytes) -> int | None:
    """The backlog index of a record, from its (device, boot, seq)."""
    try:
        doc = orjson.loads(value)
        device, boot, seq = doc["device_id"], doc["boot_id"], doc["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if boot != "b1" or not device.startswith("bench-"):
        return None
    return int(seq) * DEVICES + int(device[len("bench-") :])


def publish_share(
    mqtt: dict[str, object], password: str, count: int, publisher: int, publishers: int
) -> int:
    """One publisher process: its share of the backlog, QoS 1; how many were PUBACKed."""
    settings = MqttSettings(**{**mqtt, "password": SecretStr(password)})

    async def run() -> int:
        rng = random.Random(7 + publisher)
        async with MqttClient(
            settings, client_id=f"bench-publisher-{publisher}", max_inflight=PUBLISHER_WINDOW
        ) as client:
            pending = []
            for i in share(count, publisher, publishers):
                pending.append(await client.publish(*message(i, settings.topic_prefix, rng)))
            await asyncio.gather(*pending)
            return len(pending)

    return asyncio.run(run())


async def read_back(kafka: KafkaSettings, count: int) -> tuple[bytearray, int]:
    """How many times each backlog index is in the raw topic, and records not of it."""
    seen = bytearray(count)
    strangers = 0
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(kafka.raw_topic, p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning()
        ends = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            for records in batch.values():
                for record in records:
                    i = index_of(record.value) if record.value is not None else None
                    if i is None or not 0 <= i < count:
                        strangers += 1
                    else:
                        seen[i] = min(seen[i] + 1, 255)
    finally:
        await consumer.stop()
    return seen, strangers


async def main(count: int, publishers: int, window: int) -> int:
    print(
        f"$ nice -n 10 .venv/bin/python bench/bridge_drain.py --messages {count}"
        f" --publishers {publishers} --window {window}"
    )
    if count > QUEUE_CAP:
        print(f"--messages: at most {QUEUE_CAP:,} (the broker's max_queued_messages)")
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="usagepipe-bench-"))
    mosquitto = MosquittoBroker(free_port(), run_dir)
    tansu = TansuBroker("127.0.0.1", free_port(), run_dir / "tansu.log")
    mosquitto.start()
    tansu.start()
    try:
        settings = Settings(
            mqtt=mosquitto.mqtt_settings(MqttSettings(topic_prefix="bench/")),
            kafka=KafkaSettings(bootstrap_servers=tansu.address),
            bridge=BridgeSettings(metrics_port=0, max_inflight=window),
        )
        # Open the persistent session, then leave: the backlog queues for it.
        await Bridge(settings, BridgeMetrics(CollectorRegistry()), stop_after_s=0.2).run()

        started = time.perf_counter()
        mqtt = settings.mqtt.model_dump(exclude={"password"})
        password = settings.mqtt.password.get_secret_value() if settings.mqtt.password else ""
        with multiprocessing.get_context("spawn").Pool(publishers) as pool:
            jobs = [
                pool.apply_async(publish_share, (mqtt, password, count, k, publishers))
                for k in range(publishers)
            ]
            published = sum(job.get() for job in jobs)
        publish_s = time.perf_counter() - started
        print(
            f"backlog: {published:,} messages PUBACKed by the broker in {publish_s:.1f}s"
            f" ({published / publish_s:,.0f} msg/s from {publishers} publishers) while the"
            " bridge was away"
        )

        cpu = time.process_time()
        bridge = Bridge(
            settings,
            BridgeMetrics(CollectorRegistry()),
            stop_after=count,
            stop_after_s=max(600.0, count / 1000),
        )
        report = await bridge.run()
        cpu = time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        acked = max(report.acked, 1)
        print(
            f"drain: {report.acked:,} messages into Kafka and acknowledged in "
            f"{report.elapsed_s:.2f}s = {report.acked / report.elapsed_s:,.0f} msg/s; "
            f"CPU {cpu:.2f}s = {cpu / acked * 1e6:.1f} us/message "
            f"({cpu / acked * 1e6:.0f} CPU-ms per 1,000); peak RSS {rss:.0f} MB"
        )
        broker_rss = peak_rss_mb(mosquitto.running_pid())
        print(
            f"window: peak {report.peak_unacked:,} unacknowledged (bridge.max_inflight"
            f" {window:,}); held {report.holds:,} times; packet ids reused while in use:"
            f" {report.reused_packet_ids:,}; the broker's peak RSS {broker_rss:,.0f} MB"
        )

        seen, strangers = await read_back(settings.kafka, count)
        lost = seen.count(0)
        duplicated = sum(n - 1 for n in seen if n > 1)
        print(
            f"Kafka: {count - lost:,} of {count:,} published messages present; lost {lost:,};"
            f" duplicated {duplicated:,}; other records {strangers:,}"
        )
        bounded = report.peak_unacked <= window
        return 0 if lost == 0 and duplicated == 0 and strangers == 0 and bounded else 1
    finally:
        mosquitto.stop()
        tansu.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument(
        "--window", type=int, default=BridgeSettings().max_inflight, help="bridge.max_inflight"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.messages, args.publishers, args.window)))
