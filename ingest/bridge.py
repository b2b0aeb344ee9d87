"""The bridge: MQTT -> Kafka, acknowledging each MQTT message only after Kafka has it.

    Mosquitto --(QoS 1, persistent session, manual ack)--> bridge --(acks=all)--> Kafka
                <------------- PUBACK once Kafka confirmed ----------------

Messages flow through two tasks: `produce` hands each MQTT message to the Kafka producer
(pipelined: `send()` returns once the record is batched), and `acknowledge` waits for
Kafka's confirmations in arrival order and sends the matching PUBACKs in that order, as
MQTT asks. A record Kafka refuses is sent again, with backoff, before its PUBACK; so a
Kafka outage leaves messages unacknowledged in the broker's session, never lost.

How many messages are in flight is bounded by the MQTT v5 Receive Maximum the bridge
announces: the broker sends no more until the bridge acknowledges some.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import BridgeMetrics
from ingest.mqtt import MqttClient
from ingest.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _InFlight:
    """One MQTT message between its arrival and its PUBACK."""

    mid: int
    generation: int
    key: bytes
    value: bytes
    confirmation: asyncio.Future[object] | None = None


@dataclass
class BridgeReport:
    """What one run of the bridge did."""

    received: int = 0
    acked: int = 0
    send_retries: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""
    per_topic: dict[str, int] = field(default_factory=dict)


def device_id_from_topic(topic: str, prefix: str) -> str | None:
    """`{prefix}devices/{device_id}/telemetry` -> `device_id`, or None for other topics."""
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 3 or parts[0] != "devices" or parts[2] != "telemetry" or not parts[1]:
        return None
    return parts[1]


class Bridge:
    """Forwards device telemetry from MQTT to Kafka topic `kafka.raw_topic`.

    Stops by itself after `stop_after` acknowledged messages or `stop_after_s` seconds,
    or when `stop()` is called (the CLI calls it on SIGTERM/SIGINT).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: BridgeMetrics,
        *,
        stop_after: int | None = None,
        stop_after_s: float | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stop_after = stop_after
        self._stop_after_s = stop_after_s
        self._drain_timeout_s = drain_timeout_s
        self._incoming: deque[_InFlight] = deque()
        self._incoming_ready = asyncio.Event()
        self._unacked: deque[_InFlight] = deque()
        self._unacked_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._accepting = True
        self._mqtt: MqttClient | None = None
        self.ready = asyncio.Event()
        """Set once the broker confirmed the subscription: devices may publish."""
        self.report = BridgeReport()

    def stop(self, why: str = "requested") -> None:
        """Stop taking messages, finish what Kafka already has, then close."""
        if not self._stopping.is_set():
            self.report.stopped_by = why
            self._stopping.set()

    async def run(self) -> BridgeReport:
        s = self._settings
        started = time.monotonic()
        await ensure_topics(s.kafka, s.kafka.raw_topic, s.kafka.dlq_topic)
        producer = make_producer(s.kafka, client_id=s.bridge.client_id)
        mqtt = MqttClient(
            s.mqtt,
            client_id=s.bridge.client_id,
            persistent=True,
            manual_ack=True,
            receive_maximum=s.bridge.max_inflight,
            subscriptions=[f"{s.mqtt.topic_prefix}devices/+/telemetry"],
            on_message=self._on_message,
        )
        self._mqtt = mqtt
        await producer.start()
        try:
            async with mqtt:
                await mqtt.subscribed.wait()
                self._metrics.subscribed.set(1)
                self.ready.set()
                log.info("bridge subscribed; forwarding to Kafka topic %s", s.kafka.raw_topic)
                async with asyncio.TaskGroup() as tasks:
                    producing = tasks.create_task(self._produce(producer), name="bridge-produce")
                    acking = tasks.create_task(self._acknowledge(producer), name="bridge-ack")
                    timer = None
                    if self._stop_after_s is not None:
                        timer = tasks.create_task(self._timer(self._stop_after_s), name="timer")
                    await self._stopping.wait()
                    # Stop taking input; what Kafka has not been handed yet stays
                    # unacknowledged in the broker's session and comes again next time.
                    self._accepting = False
                    producing.cancel()
                    await self._drain()
                    acking.cancel()
                    if timer is not None:
                        timer.cancel()
                self._metrics.subscribed.set(0)
                await producer.flush()
        finally:
            await producer.stop()
        self.report.elapsed_s = time.monotonic() - started
        log.info(
            "bridge stopped (%s): %d received, %d acknowledged in %.1fs",
            self.report.stopped_by,
            self.report.received,
            self.report.acked,
            self.report.elapsed_s,
        )
        return self.report

    async def _timer(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop(f"after {seconds:g}s")

    def _on_message(self, msg: paho.MQTTMessage, generation: int) -> None:
        if not self._accepting:
            return  # not acknowledged: stays in the session, delivered again later
        self.report.received += 1
        self._metrics.received.inc()
        device_id = device_id_from_topic(msg.topic, self._settings.mqtt.topic_prefix)
        key = (device_id or msg.topic).encode()
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        self._incoming.append(_InFlight(msg.mid, generation, key, payload))
        self._metrics.inflight.inc()
        self._incoming_ready.set()

    async def _produce(self, producer: AIOKafkaProducer) -> None:
        topic = self._settings.kafka.raw_topic
        while True:
            if not self._incoming:
                self._incoming_ready.clear()
                await self._incoming_ready.wait()
                continue
            item = self._incoming.popleft()
            item.confirmation = await self._send(producer, topic, item)
            self._unacked.append(item)
            self._unacked_ready.set()

    async def _send(
        self, producer: AIOKafkaProducer, topic: str, item: _InFlight
    ) -> asyncio.Future[object]:
        """Hand one record to the producer, retrying while Kafka cannot take it."""
        backoff = 0.1
        while True:
            try:
                fut: asyncio.Future[object] = await producer.send(
                    topic, value=item.value, key=item.key
                )
                return fut
            except KafkaError as exc:
                self._metrics.errors.labels("kafka_send").inc()
                self.report.send_retries += 1
                log.warning("Kafka send failed (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)

    async def _acknowledge(self, producer: AIOKafkaProducer) -> None:
        topic = self._settings.kafka.raw_topic
        mqtt = self._mqtt
        assert mqtt is not None
        while True:
            if not self._unacked:
                self._drained.set()
                self._unacked_ready.clear()
                await self._unacked_ready.wait()
                continue
            item = self._unacked[0]
            assert item.confirmation is not None
            try:
                await asyncio.shield(item.confirmation)
            except KafkaError as exc:
                self._metrics.errors.labels("kafka_send").inc()
                self.report.send_retries += 1
                log.warning("Kafka did not confirm a record (%r); sending it again", exc)
                item.confirmation = await self._send(producer, topic, item)
                continue
            if self._stop_after is not None and self.report.acked >= self._stop_after:
                # A hard cap: the rest stay unacknowledged in the broker's session and
                # come again to the next run (Kafka may then see them twice; the store
                # keeps one row).
                self.stop(f"after {self._stop_after} messages")
                self._drained.set()
                return
            self._unacked.popleft()
            self._metrics.produced.inc()
            self._metrics.inflight.dec()
            if mqtt.ack(item.mid, item.generation):
                self._metrics.acked.inc()
                self.report.acked += 1
                if self._stop_after is not None and self.report.acked >= self._stop_after:
                    self.stop(f"after {self._stop_after} messages")

    async def _drain(self) -> None:
        """Wait, until the deadline, for Kafka to confirm what it was handed; ack those."""
        if not self._unacked:
            return
        log.info("draining %d messages Kafka was handed", len(self._unacked))
        capped = self._stop_after is not None and self.report.acked >= self._stop_after
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drain_timeout_s):
                while self._unacked and not capped:
                    self._drained.clear()
                    await self._drained.wait()
                    capped = self._stop_after is not None and self.report.acked >= self._stop_after
        if self._unacked:
            log.warning(
                "%d messages unconfirmed at the drain deadline; the broker keeps them",
                len(self._unacked),
            )
