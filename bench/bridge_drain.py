"""The bridge's backlog drain: messages queued in its persistent session, then timed.

    .venv/bin/python bench/bridge_drain.py [--messages 100000]

Starts a private Mosquitto and a private Tansu (free ports, a temporary run dir), opens
the bridge's persistent session once, publishes the backlog while the bridge is away
(valid fleet messages from 1,000 devices, ~330 bytes each), then starts the bridge and
times it until Kafka confirmed the last message and the bridge acknowledged it. CPU is
this process's, which while draining is the bridge's alone. Prints the figures and the
command to reproduce them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from ingest.bridge import Bridge
from ingest.metrics import BridgeMetrics
from ingest.mqtt import MqttClient
from ingest.settings import BridgeSettings, KafkaSettings, MqttSettings, Settings
from schemas.catalog import SCHEMA_NAMES, current_version
from schemas.envelope import envelope_dict
from schemas.examples import example_body
from usagepipe.services import MosquittoBroker, TansuBroker


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def backlog(count: int, prefix: str) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    start = datetime.now(UTC) - timedelta(hours=2)
    out = []
    for i in range(count):
        device = f"bench-{i % 1000:04d}"
        schema = rng.choice(SCHEMA_NAMES)
        doc = envelope_dict(
            device_id=device,
            boot_id="b1",
            seq=i // 1000,
            event_time=start + timedelta(milliseconds=i),
            schema_name=schema,
            schema_version=current_version(schema),
            body=example_body(schema, rng),
        )
        out.append((f"{prefix}devices/{device}/telemetry", orjson.dumps(doc)))
    return out


async def main(count: int) -> int:
    print(f"$ .venv/bin/python bench/bridge_drain.py --messages {count}")
    run_dir = Path(tempfile.mkdtemp(prefix="usagepipe-bench-"))
    mosquitto = MosquittoBroker(free_port(), run_dir)
    tansu = TansuBroker("127.0.0.1", free_port(), run_dir / "tansu.log")
    mosquitto.start()
    tansu.start()
    try:
        settings = Settings(
            mqtt=mosquitto.mqtt_settings(MqttSettings(topic_prefix="bench/")),
            kafka=KafkaSettings(bootstrap_servers=tansu.address),
            bridge=BridgeSettings(metrics_port=0),
        )
        # Open the persistent session, then leave: the backlog queues for it.
        await Bridge(settings, BridgeMetrics(CollectorRegistry()), stop_after_s=0.2).run()
        messages = backlog(count, settings.mqtt.topic_prefix)
        started = time.perf_counter()
        async with MqttClient(settings.mqtt, client_id="bench-publisher", max_inflight=1000) as pub:
            pending = [await pub.publish(topic, payload) for topic, payload in messages]
            await asyncio.gather(*pending)
        published = time.perf_counter() - started
        print(
            f"backlog: {count:,} messages published in {published:.1f}s while the bridge was away"
        )

        cpu = time.process_time()
        bridge = Bridge(settings, BridgeMetrics(CollectorRegistry()), stop_after=count)
        report = await bridge.run()
        cpu = time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"drain: {report.acked:,} messages into Kafka and acknowledged in "
            f"{report.elapsed_s:.2f}s = {report.acked / report.elapsed_s:,.0f} msg/s; "
            f"CPU {cpu:.2f}s = {cpu / report.acked * 1e6:.0f} us/message "
            f"({cpu / report.acked * 1000 * 1000:.0f} CPU-ms per 1,000); peak RSS {rss:.0f} MB"
        )
        return 0 if report.acked == count else 1
    finally:
        mosquitto.stop()
        tansu.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    sys.exit(asyncio.run(main(parser.parse_args().messages)))
