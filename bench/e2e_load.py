"""The e2e benchmark's load and raw MQTT relay, each run in processes of its own.

- `run_load`: one publisher process of the simulated fleet. Its devices (registered by
  the benchmark, `simulators.provision`) each log in as themselves on their own MQTT
  connection, as `usagepipe simulate` does, and publish their planned messages
  (`simulators.plan.plan_device`: the simulator's payloads, keys and duplicates) at
  QoS 1, round-robin across devices, each device's in order, at most `max_inflight`
  unacknowledged per connection. Every message is written to the ledger before it is
  published; every `sample_every`-th has its wall-clock publish time sent to the
  parent, which times it until its row is queryable. With `rate` it paces itself; with
  `duration_s` it stops publishing then.
- `relay_publisher` / `relay_subscriber`: plain paho-mqtt (paho's own network code, no
  usagepipe code) for the raw relay limit: publishers keep a bounded window of QoS 1
  messages in flight with paho's `max_inflight_messages_set` and `on_publish`, driven by
  paho's own `loop()`; one subscriber receives at QoS 1.

Processes are started with the `spawn` method; everything passed is picklable.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest.mqtt import MqttClient
from ingest.settings import MqttSettings
from simulators.ledger import Entry, LedgerWriter, Outcome, digest
from simulators.plan import FleetPlan, plan_device
from simulators.traffic import Message
from simulators.units import device_ids

SPAWN = mp.get_context("spawn")
"""Every process of the benchmark starts fresh: no state of the parent's event loop."""


@dataclass(frozen=True)
class LoadJob:
    """What one publisher process sends."""

    index: int
    mqtt: MqttSettings
    fleet: str
    seed: int
    run_id: str
    devices: int
    credentials: dict[str, str]
    messages_per_device: int
    mix: Literal["uniform", "usage"]
    """How schemas are drawn (`simulators.plan.FleetPlan.mix`)."""
    start: datetime
    """Event time of the devices' first messages (they follow a few seconds apart)."""
    ledger: str
    duplicate_rate: float = 0.0
    rate: float = 0.0
    """Messages per second for this process; 0 publishes as fast as the broker takes them."""
    duration_s: float | None = None
    sample_every: int = 0
    """Every n-th message's publish time goes to the parent (0: none)."""
    max_inflight: int = 100


@dataclass
class LoadResult:
    """What one publisher process did (wall-clock times, `time.time()`)."""

    index: int
    sent: int = 0
    acked: int = 0
    failed: int = 0
    stored_expected: int = 0
    first_publish: float = 0.0
    last_puback: float = 0.0
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _entry(msg: Message) -> Entry:
    device_id, boot, seq = msg.key
    outcome = Outcome.DUPLICATE if msg.duplicate else Outcome.STORED
    return Entry(device_id, boot, seq, digest(msg.payload), outcome, None, msg.duplicate)


def run_load(
    job: LoadJob,
    ready: Queue,  # type: ignore[type-arg]
    go: Event,
    samples: Queue | None,  # type: ignore[type-arg]
    results: Queue,  # type: ignore[type-arg]
) -> None:
    """Process entry point: connect, say ready, wait for `go`, publish, report."""
    result = LoadResult(job.index)
    try:
        asyncio.run(_load(job, ready, go, samples, result))
    except Exception as exc:  # reported to the parent, which decides
        result.errors.append(repr(exc))
        ready.put(job.index)
    results.put(result)


async def _load(
    job: LoadJob,
    ready: Queue,  # type: ignore[type-arg]
    go: Event,
    samples: Queue | None,  # type: ignore[type-arg]
    result: LoadResult,
) -> None:
    plan = FleetPlan(
        devices=job.devices,
        messages_per_device=job.messages_per_device,
        mix=job.mix,
        seed=job.seed,
        run_id=job.run_id,
        duplicate_rate=job.duplicate_rate,
        start=job.start,
        fleet=job.fleet,
    )
    ids = device_ids(plan)
    per_device = [plan_device(plan, d, job.mqtt.topic_prefix) for d in ids]
    order = [  # round-robin across devices, each device's messages in its own order
        (i, m)
        for row in itertools.zip_longest(*per_device)
        for i, m in enumerate(row)
        if m is not None
    ]
    clients = [
        MqttClient(
            job.mqtt,
            client_id=d,
            username=d,
            password=job.credentials[d],
            max_inflight=job.max_inflight,
        )
        for d in ids
    ]
    slots = asyncio.Semaphore(20)

    async def connect(client: MqttClient) -> None:
        async with slots:
            await client.connect()

    async with asyncio.TaskGroup() as tasks:
        for client in clients:
            tasks.create_task(connect(client))
    outstanding = 0
    drained = asyncio.Event()
    drained.set()

    def settled(fut: asyncio.Future[None]) -> None:
        nonlocal outstanding
        outstanding -= 1
        if fut.cancelled() or fut.exception() is not None:
            result.failed += 1
            if len(result.errors) < 5:
                result.errors.append(repr(fut.exception()))
        else:
            result.acked += 1
            result.last_puback = time.time()
        if outstanding == 0:
            drained.set()

    try:
        ready.put(job.index)
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        cpu = _cpu_s()
        interval = 1.0 / job.rate if job.rate > 0 else 0.0
        started = next_at = time.monotonic()
        result.first_publish = time.time()
        with LedgerWriter(Path(job.ledger)) as ledger:
            for n, (index, msg) in enumerate(order):
                if interval:
                    next_at += interval
                    if (delay := next_at - time.monotonic()) > 0:
                        await asyncio.sleep(delay)
                if job.duration_s is not None and time.monotonic() - started >= job.duration_s:
                    break
                ledger.write(_entry(msg))
                result.stored_expected += not msg.duplicate
                published_at = time.time()
                outstanding += 1
                drained.clear()
                fut = await clients[index].publish(msg.topic, msg.payload)
                fut.add_done_callback(settled)
                result.sent += 1
                if (
                    samples is not None
                    and job.sample_every
                    and n % job.sample_every == 0
                    and not msg.duplicate
                ):
                    samples.put((msg.key, published_at))
        await drained.wait()
        result.cpu_s = _cpu_s() - cpu
    finally:
        for client in clients:
            await client.close()


# -- the raw relay: plain paho-mqtt both ends --------------------------------------------


def _paho(mqtt: MqttSettings, client_id: str) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    if mqtt.username is not None:
        password = mqtt.password.get_secret_value() if mqtt.password else None
        client.username_pw_set(mqtt.username, password)
    return client


def relay_subscriber(
    mqtt: MqttSettings,
    topic: str,
    count: int,
    ready: Event,
    results: Queue,  # type: ignore[type-arg]
) -> None:
    """Receive `count` messages at QoS 1 (paho acknowledges each); report (got, first, last)."""
    done = threading.Event()
    state = {"got": 0, "first": 0.0, "last": 0.0}

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        if state["got"] == 0:
            state["first"] = now
        state["got"] += 1
        state["last"] = now
        if state["got"] >= count:
            done.set()

    client = _paho(mqtt, f"bench-relay-sub-{secrets.token_hex(3)}")
    client.on_message = on_message
    client.on_subscribe = lambda *args: ready.set()
    client.connect(mqtt.host, mqtt.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    done.wait(300)
    results.put((state["got"], state["first"], state["last"]))
    client.loop_stop()
    client.disconnect()


@dataclass(frozen=True)
class RelayJob:
    """One relay publisher: `count` of `payloads` (cycled) to `topic`, `window` in flight."""

    mqtt: MqttSettings
    topic: str
    payloads: list[bytes]
    count: int
    window: int


def relay_publisher(job: RelayJob, go: Event, results: Queue) -> None:  # type: ignore[type-arg]
    """Publish `job.count` messages at QoS 1, at most `job.window` awaiting PUBACK, from
    paho's own loop in this thread; report (first publish, last PUBACK, CPU seconds)."""
    acked = 0

    def on_publish(*args: Any) -> None:
        nonlocal acked
        acked += 1

    mqtt, count, window, payloads = job.mqtt, job.count, job.window, job.payloads
    client = _paho(mqtt, f"bench-relay-pub-{secrets.token_hex(3)}")
    client.on_publish = on_publish
    client.max_inflight_messages_set(window)
    client.connect(mqtt.host, mqtt.port)
    client.loop(timeout=1.0)  # CONNACK
    go.wait()
    cpu = _cpu_s()
    first = time.time()
    sent = 0
    while acked < count:
        while sent < count and sent - acked < window:
            client.publish(job.topic, payloads[sent % len(payloads)], qos=1)
            sent += 1
        client.loop(timeout=0.05)
    results.put((first, time.time(), _cpu_s() - cpu))
    client.disconnect()
