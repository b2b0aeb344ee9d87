"""A seeded fleet of virtual appliances publishing telemetry over MQTT at QoS 1.

Each device is its own MQTT connection (client id = device id), as a real appliance is,
and publishes to `devices/{device_id}/telemetry`. Everything a device sends follows
from the seed and the run id, so a run can be repeated message for message; the run id
goes into the boot ids, so two runs with the same seed are different boots of the same
devices and do not collide in the store.

A share of messages is sent twice, byte for byte (`duplicate_rate`), as a device does
when it misses a PUBACK: the pipeline must store each key once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from ingest.metrics import SimulatorMetrics
from ingest.mqtt import MqttClient
from ingest.settings import MqttSettings
from schemas.catalog import SCHEMA_NAMES, current_version
from schemas.envelope import envelope_dict, telemetry_topic
from schemas.examples import example_body

log = logging.getLogger(__name__)

CATEGORY_PREFIX = {
    "washer": "wm",
    "dryer": "dr",
    "refrigerator": "rf",
    "air_conditioner": "ac",
    "air_purifier": "ap",
    "robot_vacuum": "rv",
}


@dataclass(frozen=True)
class FleetPlan:
    """What the fleet sends: how many devices, how many messages each, how often twice."""

    devices: int
    messages_per_device: int
    seed: int = 7
    run_id: str = "run"
    duplicate_rate: float = 0.0
    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(hours=1))
    """Event time of each device's first message; later ones follow a few seconds apart."""
    rate: float = 0.0
    """Messages per second for the whole fleet; 0 sends as fast as the broker takes them."""


@dataclass(frozen=True, slots=True)
class Message:
    """One planned publish."""

    key: tuple[str, str, int]
    topic: str
    payload: bytes
    duplicate: bool


@dataclass
class FleetReport:
    """What the fleet did, counted on the broker's PUBACKs."""

    devices: int = 0
    sent: int = 0
    duplicates_sent: int = 0
    unique_keys: int = 0
    elapsed_s: float = 0.0
    boot_ids: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def device_ids(plan: FleetPlan) -> list[str]:
    """The fleet's device ids: categories in turn, numbered per fleet."""
    categories = list(CATEGORY_PREFIX)
    return [
        f"{CATEGORY_PREFIX[categories[i % len(categories)]]}-{plan.seed}-{i:06d}"
        for i in range(plan.devices)
    ]


def category_of(device_id: str) -> str:
    prefix = device_id.split("-", 1)[0]
    return next(c for c, p in CATEGORY_PREFIX.items() if p == prefix)


def plan_device(plan: FleetPlan, device_id: str, topic_prefix: str = "") -> list[Message]:
    """Every message one device sends in this plan, duplicates included, in send order."""
    rng = random.Random(f"{plan.seed}:{device_id}")
    category = category_of(device_id)
    schemas = [name for name in SCHEMA_NAMES if name.split(".", 1)[0] == category]
    boot_id = hashlib.blake2s(f"{plan.run_id}:{device_id}".encode(), digest_size=6).hexdigest()
    topic = telemetry_topic(device_id, topic_prefix)
    event_time = plan.start + timedelta(seconds=rng.uniform(0, 60))
    out: list[Message] = []
    for seq in range(plan.messages_per_device):
        event_time += timedelta(seconds=rng.uniform(1, 10))
        schema = rng.choice(schemas)
        body = example_body(schema, rng)
        doc = envelope_dict(
            device_id=device_id,
            boot_id=boot_id,
            seq=seq,
            event_time=event_time,
            schema_name=schema,
            schema_version=current_version(schema),
            body=body,
        )
        msg = Message((device_id, boot_id, seq), topic, orjson.dumps(doc), False)
        out.append(msg)
        if plan.duplicate_rate and rng.random() < plan.duplicate_rate:
            out.append(Message(msg.key, topic, msg.payload, True))
    return out


class Fleet:
    """Connects the planned devices and publishes their messages; an async component."""

    def __init__(
        self,
        settings: MqttSettings,
        plan: FleetPlan,
        metrics: SimulatorMetrics,
        *,
        max_inflight: int = 200,
        connect_concurrency: int = 50,
        progress: Callable[[FleetReport], None] | None = None,
    ) -> None:
        self._settings = settings
        self._plan = plan
        self._metrics = metrics
        self._max_inflight = max_inflight
        self._connect_slots = asyncio.Semaphore(connect_concurrency)
        self._progress = progress
        self.report = FleetReport()

    async def run(self) -> FleetReport:
        plan = self._plan
        started = time.monotonic()
        ids = device_ids(plan)
        per_device_rate = plan.rate / len(ids) if plan.rate > 0 and ids else 0.0
        async with asyncio.TaskGroup() as tasks:
            for device_id in ids:
                tasks.create_task(
                    self._device(device_id, per_device_rate), name=f"device:{device_id}"
                )
        self.report.devices = len(ids)
        self.report.elapsed_s = time.monotonic() - started
        return self.report

    async def _device(self, device_id: str, rate: float) -> None:
        messages = plan_device(self._plan, device_id, self._settings.topic_prefix)
        client = MqttClient(self._settings, client_id=device_id, max_inflight=self._max_inflight)
        async with self._connect_slots:
            await client.connect()
        self._metrics.connected.inc()
        try:
            pending: list[asyncio.Future[None]] = []
            interval = 1.0 / rate if rate > 0 else 0.0
            next_at = time.monotonic()
            for msg in messages:
                if interval:
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                fut = await client.publish(msg.topic, msg.payload)
                fut.add_done_callback(self._counter(msg.duplicate))
                pending.append(fut)
            await asyncio.gather(*pending)
            if messages:
                self.report.boot_ids.append(messages[0].key[1])
            self.report.unique_keys += len({m.key for m in messages})
        finally:
            await client.close()
            self._metrics.connected.dec()

    def _counter(self, duplicate: bool) -> Callable[[asyncio.Future[None]], None]:
        kind = "duplicate" if duplicate else "original"

        def count(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            self.report.sent += 1
            self.report.duplicates_sent += duplicate
            self._metrics.published.labels(kind).inc()
            if self._progress is not None and self.report.sent % 1000 == 0:
                self._progress(self.report)

        return count
