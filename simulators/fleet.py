"""A seeded fleet of virtual appliances publishing telemetry over MQTT at QoS 1.

The fleet is a set of manufactured units: six simulated product models (one per
category, `SIM-WM` ... `SIM-RV`) and, for device `i`, the serial `{fleet}-{seed}-{i:06d}`
with a registration code derived from it. Device ids are the registry's
(`devices.records.device_id_for(model, serial)`), so `device_ids(plan)` and
`category_of` need no database; `simulators.provision` registers the units, which
gives each device its MQTT secret.

Each device is its own MQTT connection (client id = device id, username = device id,
password = its secret), as a real appliance is, and publishes to
`devices/{device_id}/telemetry`. Everything a device sends follows from the seed and
the run id, so a run can be repeated message for message; the run id goes into the
boot ids, so two runs with the same seed are different boots of the same devices and
do not collide in the store.

A share of messages is sent twice, byte for byte (`duplicate_rate`), as a device does
when it misses a PUBACK: the pipeline must store each key once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import orjson

from devices.records import Category, ProductModel, device_id_for
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


SIM_MODELS = {
    category: ProductModel(
        f"SIM-{CATEGORY_PREFIX[category].upper()}",
        Category(category),
        f"Simulated {category.replace('_', ' ')}",
        date(2025, 1, 1),
    )
    for category in CATEGORY_PREFIX
}
"""The simulator's product model per category (model numbers `SIM-WM`, `SIM-DR`, ...)."""

_CATEGORY_OF_MODEL = {model.model_number: category for category, model in SIM_MODELS.items()}
_FLEET_NAME = re.compile(r"^[A-Za-z0-9]{1,16}$")


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
    fleet: str = "sim"
    """Names this fleet's units (it starts their serial numbers): two fleets that must
    not share devices on one broker and registry use different names."""

    def __post_init__(self) -> None:
        if not _FLEET_NAME.match(self.fleet):
            raise ValueError(f"fleet {self.fleet!r} must be 1-16 letters or digits")


@dataclass(frozen=True, slots=True)
class FleetUnit:
    """One simulated unit as the factory made it, and the device id it registers as."""

    model: ProductModel
    serial_number: str
    registration_code: str
    device_id: str

    @property
    def category(self) -> str:
        return self.model.category.value


def fleet_units(plan: FleetPlan) -> list[FleetUnit]:
    """The fleet's units, categories in turn; the same for the same fleet name and seed.

    The registration codes follow from the serials so that a re-run can register the
    same units again; a real unit's code is random and printed inside it.
    """
    categories = list(CATEGORY_PREFIX)
    units = []
    for i in range(plan.devices):
        model = SIM_MODELS[categories[i % len(categories)]]
        serial = f"{plan.fleet}-{plan.seed}-{i:06d}".upper()
        code = hashlib.blake2s(f"code:{serial}".encode(), digest_size=5).hexdigest().upper()
        units.append(FleetUnit(model, serial, code, device_id_for(model.model_number, serial)))
    return units


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
    """The fleet's device ids, as the registry derives them from model and serial."""
    return [unit.device_id for unit in fleet_units(plan)]


def category_of(device_id: str) -> str:
    """The category of a simulated device, from the model number its id starts with.

    Hand-made ids that start with a category's short prefix (`wm-43-000000`, as tests
    write them for messages of unregistered devices) map by that prefix.
    """
    category = _CATEGORY_OF_MODEL.get(device_id.rsplit("-", 1)[0])
    if category is None:
        prefix = device_id.split("-", 1)[0]
        category = next((c for c, p in CATEGORY_PREFIX.items() if p == prefix), None)
    if category is None:
        raise ValueError(f"{device_id!r} is not a simulated device's id")
    return category


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
    """Connects the planned devices and publishes their messages; an async component.

    `credentials` maps each device id to its MQTT secret (`simulators.provision`);
    each device then logs in as itself. Without it devices use the settings' login,
    which only a broker open to anonymous clients accepts for device topics.
    """

    def __init__(
        self,
        settings: MqttSettings,
        plan: FleetPlan,
        metrics: SimulatorMetrics,
        *,
        credentials: Mapping[str, str] | None = None,
        max_inflight: int = 200,
        connect_concurrency: int = 50,
        progress: Callable[[FleetReport], None] | None = None,
    ) -> None:
        if credentials is not None:
            missing = [d for d in device_ids(plan) if d not in credentials]
            if missing:
                raise ValueError(
                    f"no MQTT secret for {len(missing)} of the plan's devices (first:"
                    f" {missing[0]}); provision the fleet first"
                )
        self._settings = settings
        self._plan = plan
        self._credentials = credentials
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
        username = password = None
        if self._credentials is not None:
            username, password = device_id, self._credentials[device_id]
        client = MqttClient(
            self._settings,
            client_id=device_id,
            max_inflight=self._max_inflight,
            username=username,
            password=password,
        )
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
