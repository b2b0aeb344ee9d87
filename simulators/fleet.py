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
import functools
import hashlib
import heapq
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import orjson

from devices.records import Category, ProductModel, device_id_for
from ingest.errors import BrokerUnavailable
from ingest.metrics import SimulatorMetrics
from ingest.mqtt import MqttClient, PublishRefused
from ingest.settings import MqttSettings
from schemas.catalog import SCHEMA_NAMES, current_version
from schemas.envelope import envelope_dict, telemetry_topic
from schemas.examples import example_body
from simulators.faults import FaultRates
from simulators.ledger import Entry, LedgerWriter, Outcome, digest
from simulators.traffic import KST, Message, device_traffic, unregistered_count

log = logging.getLogger(__name__)

CATEGORY_PREFIX = {
    "washer": "wm",
    "dryer": "dr",
    "refrigerator": "rf",
    "air_conditioner": "ac",
    "air_purifier": "ap",
    "robot_vacuum": "rv",
}


# When each simulated model went on sale: the fleet is an installed base bought over
# the years since (`simulators.history`), so a window may start no earlier than a
# month or so after the newest of these.
LAUNCHED_ON = {
    "washer": date(2021, 3, 2),
    "dryer": date(2021, 9, 6),
    "refrigerator": date(2020, 4, 1),
    "air_conditioner": date(2022, 2, 14),
    "air_purifier": date(2022, 8, 22),
    "robot_vacuum": date(2023, 3, 13),
}

SIM_MODELS = {
    category: ProductModel(
        f"SIM-{CATEGORY_PREFIX[category].upper()}",
        Category(category),
        f"Simulated {category.replace('_', ' ')}",
        LAUNCHED_ON[category],
    )
    for category in CATEGORY_PREFIX
}
"""The simulator's product model per category (model numbers `SIM-WM`, `SIM-DR`, ...)."""

_CATEGORY_OF_MODEL = {model.model_number: category for category, model in SIM_MODELS.items()}
_FLEET_NAME = re.compile(r"^[A-Za-z0-9]{1,16}$")


Mix = Literal["uniform", "usage"]


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
    mix: Mix = "uniform"
    """Plain mode: how each message's schema is drawn from its category's. "uniform":
    every schema alike (a sixth of a washer's messages are firmware installations, a
    stress on the registry). "usage": in the shares the usage model produces over a year
    (`usage_mix`): door openings by the dozen a day, firmware a few times a year."""
    fleet: str = "sim"
    """Names this fleet's units (it starts their serial numbers): two fleets that must
    not share devices on one broker and registry use different names."""
    window: timedelta | None = None
    """Usage mode: the span of simulated time the fleet plays, events from the usage
    model (`simulators.traffic`); `messages_per_device` then caps each device (0: no
    cap). None: the plain mode, `messages_per_device` messages a few seconds apart."""
    sim_start: datetime | None = None
    """Usage mode: where the window starts (default: `clock` minus the window)."""
    speed: float = 0.0
    """Usage mode: simulated seconds per wall-clock second; 0 plays as fast as it can."""
    faults: FaultRates = field(default_factory=FaultRates)
    clock: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    """The real time the plan is made: events are never sent dated after it (plus the
    allowed skew) except by the `skew` fault, which dates its messages days after it."""
    max_future_skew_s: float = 300.0
    """The consumer's allowed skew; the fleet holds back events not yet within it."""
    max_payload_bytes: int = 65536
    """The bridge's size limit, which `oversize` messages exceed."""
    handover_share: float = 0.03
    """Share of units that change hands (resold, given away) inside the played span
    (`simulators.traffic.handover`): the registry attributes what they send before
    that to the seller, after it to the buyer."""

    def __post_init__(self) -> None:
        if not _FLEET_NAME.match(self.fleet):
            raise ValueError(f"fleet {self.fleet!r} must be 1-16 letters or digits")
        if not 0.0 <= self.handover_share <= 1.0:
            raise ValueError("handover_share is a share between 0 and 1")
        if self.window is not None:
            if self.window <= timedelta(0):
                raise ValueError("the window must be longer than zero")
            start = self.sim_start or self.clock - self.window
            object.__setattr__(self, "sim_start", start.astimezone(KST))

    @property
    def usage(self) -> bool:
        return self.window is not None


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


@dataclass
class FleetReport:
    """What the fleet did, counted on the broker's PUBACKs."""

    devices: int = 0
    sent: int = 0
    duplicates_sent: int = 0
    unique_keys: int = 0
    elapsed_s: float = 0.0
    boot_ids: list[str] = field(default_factory=list)
    connected: int = 0
    planned: int = 0
    """Messages taken from the plan so far (each one is a ledger line)."""
    refused: int = 0
    """Publishes and connections the broker refused, as the plan expected."""
    faults: Counter[str] = field(default_factory=Counter)
    """Faults injected so far, by name."""
    surprises: list[str] = field(default_factory=list)
    """What the broker did that the plan did not expect (should stay empty)."""
    connect_s: float = 0.0
    lag_s: float = 0.0
    """How far behind its schedule the fleet ran at worst (time-compressed mode)."""

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def unregistered_units(plan: FleetPlan) -> list[FleetUnit]:
    """Units that join the fleet without ever being registered (`unregistered` fault)."""
    categories = list(CATEGORY_PREFIX)
    units = []
    for i in range(unregistered_count(plan)):
        model = SIM_MODELS[categories[i % len(categories)]]
        serial = f"{plan.fleet}-{plan.seed}-X{i:05d}".upper()
        units.append(FleetUnit(model, serial, "", device_id_for(model.model_number, serial)))
    return units


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
    if plan.usage:
        return list(_traffic(plan, device_id, topic_prefix))
    rng = random.Random(f"{plan.seed}:{device_id}")
    category = category_of(device_id)
    if plan.mix == "usage":
        schemas, weights = usage_mix(category)
    else:
        schemas = [name for name in SCHEMA_NAMES if name.split(".", 1)[0] == category]
        weights = None
    boot_id = hashlib.blake2s(f"{plan.run_id}:{device_id}".encode(), digest_size=6).hexdigest()
    topic = telemetry_topic(device_id, topic_prefix)
    event_time = plan.start + timedelta(seconds=rng.uniform(0, 60))
    out: list[Message] = []
    for seq in range(plan.messages_per_device):
        event_time += timedelta(seconds=rng.uniform(1, 10))
        schema = rng.choice(schemas) if weights is None else rng.choices(schemas, weights)[0]
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
            out.append(Message(msg.key, topic, msg.payload, True, outcome=Outcome.DUPLICATE))
    return out


@functools.cache
def usage_mix(category: str) -> tuple[list[str], list[int]]:
    """The schemas a device of `category` sends, each with how many messages of it the
    usage model (`simulators.traffic`) gives two such devices over a year, faults off:
    the shares `FleetPlan(mix="usage")` draws from. Schemas the model never sends in a
    year are left out."""
    plan = FleetPlan(devices=2 * len(CATEGORY_PREFIX), messages_per_device=0, seed=1,
                     fleet="mix", window=timedelta(days=365))  # fmt: skip
    counts: Counter[str] = Counter()
    for device_id in device_ids(plan):
        if category_of(device_id) == category:
            counts.update(orjson.loads(m.payload)["schema"] for m in _traffic(plan, device_id, ""))
    names = sorted(counts)
    return names, [counts[n] for n in names]


def _traffic(
    plan: FleetPlan, device_id: str, topic_prefix: str, *, registered: bool = True
) -> Iterator[Message]:
    """A device's usage-mode traffic; its `foreign_topic` messages go to the next device."""
    ids, positions = _fleet_index(plan.fleet, plan.seed, plan.devices)
    neighbour = None
    if len(ids) > 1:
        neighbour = ids[(positions.get(device_id, -1) + 1) % len(ids)]
    return device_traffic(
        plan,
        device_id,
        category_of(device_id),
        topic_prefix=topic_prefix,
        neighbour=neighbour,
        registered=registered,
    )


@functools.lru_cache(maxsize=8)
def _fleet_index(fleet: str, seed: int, devices: int) -> tuple[list[str], dict[str, int]]:
    """The fleet's device ids and each one's position (computed once per fleet: a
    device id costs two hashes, and each of 10,000 devices needs its neighbour's)."""
    ids = device_ids(FleetPlan(devices=devices, messages_per_device=0, seed=seed, fleet=fleet))
    return ids, {d: i for i, d in enumerate(ids)}


class Fleet:
    """Connects the planned devices and publishes their messages; an async component.

    `credentials` maps each device id to its MQTT secret (`simulators.provision`);
    each device then logs in as itself. Without it devices use the settings' login,
    which only a broker open to anonymous clients accepts for device topics.

    A plain plan (no `window`) runs each device as fast as the broker takes it. A
    usage plan connects every device first, then plays all devices' traffic merged in
    send-time order, at `plan.speed` (or as fast as it can), writing each message to
    `ledger` as it goes.
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
        ledger: LedgerWriter | None = None,
        on_connected: Callable[[], Awaitable[None]] | None = None,
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
        self._ledger = ledger
        self._on_connected = on_connected
        """Awaited once every device is connected, before the first publish (benchmarks)."""
        self._outstanding = 0
        self._open: list[MqttClient] = []
        self._drained = asyncio.Event()
        self.report = FleetReport()

    async def run(self) -> FleetReport:
        plan = self._plan
        started = time.monotonic()
        if plan.usage:
            await self._play()
            self.report.elapsed_s = time.monotonic() - started
            return self.report
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

    # -- usage mode ------------------------------------------------------------------

    def _client(self, device_id: str, registered: bool) -> MqttClient:
        username = password = None
        if self._credentials is not None:
            username = device_id
            password = self._credentials[device_id] if registered else "not-registered"
        return MqttClient(
            self._settings,
            client_id=device_id,
            max_inflight=self._max_inflight,
            username=username,
            password=password,
        )

    async def _connect(self, client: MqttClient, registered: bool) -> MqttClient | None:
        async with self._connect_slots:
            try:
                await client.connect()
            except BrokerUnavailable as exc:
                await client.close()
                if registered or "refused" not in str(exc):
                    raise
                self.report.refused += 1  # an unregistered unit: CONNACK "not authorized"
                return None
        if not registered:
            self.report.surprises.append(f"unregistered {client.client_id} was let in")
        self.report.connected += 1
        self._metrics.connected.inc()
        self._open.append(client)
        return client

    async def _play(self) -> None:
        plan = self._plan
        assert plan.sim_start is not None
        prefix = self._settings.topic_prefix
        ids = device_ids(plan)
        units = [(d, True) for d in ids]
        units += [(u.device_id, False) for u in unregistered_units(plan)]
        self.report.devices = len(units)
        connect_started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tasks:
                connecting = [
                    tasks.create_task(self._connect(self._client(d, reg), reg), name=f"connect:{d}")
                    for d, reg in units
                ]
            clients = [t.result() for t in connecting]
            self.report.connect_s = time.monotonic() - connect_started
            if self._on_connected is not None:
                await self._on_connected()
            streams = [
                _numbered(i, _traffic(plan, d, prefix, registered=reg))
                for i, (d, reg) in enumerate(units)
            ]
            await self._publish_all(heapq.merge(*streams), clients)
        finally:
            # Every connection made, also when another device's connect failed.
            for client in self._open:
                await client.close()
                self._metrics.connected.dec()
            self._open.clear()

    async def _publish_all(
        self,
        merged: Iterator[tuple[datetime | None, int, int, Message]],
        clients: list[MqttClient | None],
    ) -> None:
        plan = self._plan
        assert plan.sim_start is not None
        report = self._report_progress()
        started = time.monotonic()
        hold = timedelta(seconds=plan.max_future_skew_s / 2)
        interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
        next_at = started
        boots: set[str] = set()
        keys: set[tuple[str, str, int]] = set()
        for send_at, index, _, msg in merged:
            assert send_at is not None
            if plan.speed > 0:
                due = started + (send_at - plan.sim_start).total_seconds() / plan.speed
                delay = due - time.monotonic()
                if delay > 0.002:
                    await asyncio.sleep(delay)
                else:
                    self.report.lag_s = max(self.report.lag_s, -delay)
            ahead = send_at - datetime.now(UTC) - hold
            if ahead > timedelta(0):  # never date an event beyond the consumer's skew
                await asyncio.sleep(ahead.total_seconds())
            if interval:
                next_at += interval
                if (delay := next_at - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
            self.report.planned += 1
            if msg.fault:
                self.report.faults[msg.fault.split(":", 1)[0]] += 1
            if self._ledger is not None:
                self._ledger.write(_entry(msg))
            client = clients[index]
            if client is None:
                continue  # an unregistered unit: its messages go nowhere
            boots.add(msg.key[1])
            keys.add(msg.key)
            self._outstanding += 1
            self._drained.clear()
            fut = await client.publish(msg.topic, msg.payload)
            fut.add_done_callback(self._settled(msg))
            if self.report.planned % 5000 == 0:
                report()
        if self._outstanding:
            await self._drained.wait()
        report()
        self.report.boot_ids = sorted(boots)
        self.report.unique_keys = len(keys)

    def _report_progress(self) -> Callable[[], None]:
        def report() -> None:
            if self._progress is not None:
                self._progress(self.report)

        return report

    def _settled(self, msg: Message) -> Callable[[asyncio.Future[None]], None]:
        expect_refusal = msg.outcome is Outcome.REFUSED_BY_BROKER

        def settled(fut: asyncio.Future[None]) -> None:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._drained.set()
            if fut.cancelled():
                return
            exc = fut.exception()
            name = "/".join(map(str, msg.key))
            if isinstance(exc, PublishRefused) and expect_refusal:
                self.report.refused += 1
            elif exc is not None:
                self.report.surprises.append(f"{name}: {exc}")
            elif expect_refusal:
                self.report.surprises.append(
                    f"{name}: the broker accepted a publish to {msg.topic}"
                )
            else:
                self.report.sent += 1
                self.report.duplicates_sent += msg.duplicate
                self._metrics.published.labels("duplicate" if msg.duplicate else "original").inc()

        return settled

    # -- plain mode ------------------------------------------------------------------

    async def _device(self, device_id: str, rate: float) -> None:
        messages = plan_device(self._plan, device_id, self._settings.topic_prefix)
        client = self._client(device_id, True)
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
                if self._ledger is not None:
                    self._ledger.write(_entry(msg))
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


def _numbered(
    index: int, messages: Iterator[Message]
) -> Iterator[tuple[datetime | None, int, int, Message]]:
    """Sort keys for merging devices' traffic: send time, then device, then position."""
    for n, msg in enumerate(messages):
        yield msg.send_at, index, n, msg


def _entry(msg: Message) -> Entry:
    device_id, boot, seq = msg.key
    return Entry(
        device_id,
        boot,
        seq,
        digest(msg.payload),
        msg.outcome,
        msg.reason,
        msg.duplicate,
        msg.fault,
    )
