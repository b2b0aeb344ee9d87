"""The raw limit of each transport stage on this machine, without usagepipe's code.

    .venv/bin/python bench/raw_stages.py [--messages 50000] [--size 330]

- MQTT relay: one plain paho-mqtt publisher process -> Mosquitto -> one plain paho
  subscriber process, QoS 1 both ways, the publisher keeping at most 1,000 messages
  in flight (paho reuses 16-bit ids past 65,535). Timed from the first publish to the
  last message received.
- Kafka produce: aiokafka with acks=all, pipelined sends (no send_and_wait per message).
- (asyncpg COPY into the usage table's shape is measured by bench/store.py.)

The servers are the local ones (`usagepipe services up`); the broker logins come from
the run dir like the CLI's. Prints one line per stage and the command to reproduce.

One publisher thread behind a semaphore is the limit of this relay figure, not
Mosquitto: `bench/e2e.py` measures the same stages with several publisher processes
on paho's own loop, side by side with the pipeline, and is the figure to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import secrets
import sys
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType
from typing import Any

import paho.mqtt.client as paho
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from paho.mqtt.enums import CallbackAPIVersion

from ingest.kafka import make_producer
from ingest.settings import Settings
from usagepipe.services import with_broker_logins


def _client(settings: Settings, client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    mqtt = settings.mqtt
    if mqtt.username is not None:
        password = mqtt.password.get_secret_value() if mqtt.password else None
        client.username_pw_set(mqtt.username, password)
    return client


def _subscriber(
    settings: Settings, topic: str, count: int, ready: EventType, out: Queue[Any]
) -> None:
    done = threading.Event()
    got = 0
    first = 0.0

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        nonlocal got, first
        if got == 0:
            first = time.perf_counter()
        got += 1
        if got >= count:
            done.set()

    client = _client(settings, f"bench-sub-{secrets.token_hex(3)}")
    client.on_message = on_message
    client.on_subscribe = lambda *args: ready.set()
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    done.wait(300)
    out.put((got, time.perf_counter()))
    client.loop_stop()
    client.disconnect()


def _publisher(settings: Settings, topic: str, count: int, size: int, out: Queue[Any]) -> None:
    window = threading.Semaphore(1000)
    client = _client(settings, f"bench-pub-{secrets.token_hex(3)}")
    client.on_publish = lambda *args: window.release()
    client.max_inflight_messages_set(1000)
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    payload = b"x" * size
    started = time.perf_counter()
    for _ in range(count):
        window.acquire()
        client.publish(topic, payload, qos=1)
    for _ in range(1000):
        window.acquire()
    out.put(started)
    client.loop_stop()
    client.disconnect()


def mqtt_relay(settings: Settings, count: int, size: int) -> float:
    """Messages/s through Mosquitto from one paho process to another, QoS 1."""
    topic = f"bench{secrets.token_hex(3)}/devices/relay/telemetry"
    ready = mp.Event()
    results: Queue[Any] = mp.Queue()
    starts: Queue[Any] = mp.Queue()
    sub = mp.Process(target=_subscriber, args=(settings, topic, count, ready, results))
    sub.start()
    if not ready.wait(30):
        raise SystemExit("the subscriber did not subscribe (broker logins?)")
    pub = mp.Process(target=_publisher, args=(settings, topic, count, size, starts))
    pub.start()
    started = starts.get(timeout=300)
    got, ended = results.get(timeout=300)
    pub.join()
    sub.join()
    if got < count:
        raise SystemExit(f"the subscriber received {got} of {count}")
    return float(count / (ended - started))


async def kafka_produce(settings: Settings, count: int, size: int) -> float:
    """Records/s produced with acks=all, pipelined."""
    topic = f"bench.raw.{secrets.token_hex(3)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, settings.kafka.partitions, 1)])
    finally:
        await admin.close()
    producer = make_producer(settings.kafka, client_id="bench")
    await producer.start()
    try:
        payload = b"x" * size
        started = time.perf_counter()
        pending = [
            await producer.send(topic, payload, key=f"dev-{i % 1000}".encode())
            for i in range(count)
        ]
        await asyncio.gather(*pending)
        return count / (time.perf_counter() - started)
    finally:
        await producer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=330, help="payload bytes (a fleet message)")
    args = parser.parse_args()
    print(f"$ .venv/bin/python bench/raw_stages.py --messages {args.messages} --size {args.size}")
    settings = with_broker_logins(Settings())
    relay = mqtt_relay(settings, args.messages, args.size)
    print(f"mqtt relay (paho -> mosquitto -> paho, QoS 1): {relay:10,.0f} msg/s")
    produce = asyncio.run(kafka_produce(settings, args.messages, args.size))
    print(f"kafka produce (aiokafka, acks=all, pipelined): {produce:10,.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
