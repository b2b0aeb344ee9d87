"""The publishers: a fleet of virtual appliances sending its plan over MQTT at QoS 1.

Each device is its own MQTT connection (client id = device id, username = device id,
password = its secret), as a real appliance is, and publishes what `simulators.plan`
gives it to `devices/{device_id}/telemetry`. At most `max_inflight` publishes per
connection await their PUBACK, and at most `connect_concurrency` devices connect at
once. What the broker acknowledged and refused is counted in the run's
`simulators.report.FleetReport`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta

from ingest.errors import BrokerUnavailable
from ingest.metrics import SimulatorMetrics
from ingest.mqtt import MqttClient, PublishRefused
from ingest.settings import MqttSettings
from simulators.ledger import Entry, LedgerWriter, Outcome, digest
from simulators.plan import FleetPlan, plan_device, traceparent, usage_traffic
from simulators.report import FleetReport
from simulators.traffic import Message
from simulators.units import device_ids, unregistered_units

log = logging.getLogger(__name__)


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
                _numbered(i, usage_traffic(plan, d, prefix, registered=reg))
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
                self._ledger.write(_entry(msg, traceparent(self._plan, msg.key)))
            client = clients[index]
            if client is None:
                continue  # an unregistered unit: its messages go nowhere
            boots.add(msg.key[1])
            keys.add(msg.key)
            self._outstanding += 1
            self._drained.clear()
            fut = await client.publish(msg.topic, msg.payload, user_properties=self._trace(msg))
            fut.add_done_callback(self._settled(msg))
            if self.report.planned % 5000 == 0:
                report()
        if self._outstanding:
            await self._drained.wait()
        report()
        self.report.boot_ids = sorted(boots)
        self.report.unique_keys = len(keys)

    def _trace(self, msg: Message) -> list[tuple[str, str]]:
        """The MQTT v5 user properties `msg` is sent with: its traceparent, if the plan's
        `trace_share` gives it one."""
        value = traceparent(self._plan, msg.key)
        return [] if value is None else [("traceparent", value)]

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
                    self._ledger.write(_entry(msg, traceparent(self._plan, msg.key)))
                fut = await client.publish(msg.topic, msg.payload, user_properties=self._trace(msg))
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


def _entry(msg: Message, traced: str | None) -> Entry:
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
        None if traced is None else traced[3:35],
    )
