"""The bridge: MQTT -> Kafka, acknowledging each MQTT message only after Kafka has it.

    Mosquitto --(QoS 1, persistent session, manual ack)--> bridge --(acks=all)--> Kafka
                <------------- PUBACK once Kafka confirmed ----------------

Messages flow through two tasks: `produce` takes whatever MQTT delivered since its last
turn and hands it to the Kafka producer as one closed record batch per partition
(pipelined: `send_batch()` returns once the batch is queued; partitions chosen by
device id as the producer's default partitioner does), and `acknowledge` waits for
Kafka's confirmations in arrival order and sends the matching PUBACKs in that order, as
MQTT asks, every confirmed run of them in one socket write. A record Kafka refuses is
sent again, on its own and with backoff, before its PUBACK; so a Kafka outage leaves
messages unacknowledged in the broker's session, never lost.

Each record's Kafka timestamp is the moment its message reached the bridge, also when
it is sent again after a Kafka outage: the consumer's per-device ceiling
(`ingest.rate_limit`) judges a device's rate by it.

Per message, the costs that remain are the intake checks and framing: MQTT packets are
framed without paho's per-message objects (`ingest.mqtt_wire`), records are appended to
batches without a coroutine or future each, and PUBACKs go out many to a write.

The bridge holds at most `bridge.max_inflight` messages unacknowledged (received, not
yet PUBACKed or dropped), whatever the broker sends. It announces that number as its
MQTT v5 Receive Maximum, which should be enough; but a broker may overshoot it (Mosquitto
2.0.11, draining a backlog, lets a whole Receive Maximum more out of its queue with each
PUBACK, until everything queued is in flight). So the bridge counts its window itself:
when it is full the MQTT client is held (`MqttClient.hold`: the framer stops before the
next PUBLISH and the socket is not read, so the rest waits in the kernel's buffers and
the broker's queue) and released as PUBACKs free room. A packet id the broker reuses
while its earlier message is unacknowledged is counted and logged (`ingest.mqtt`).

Intake checks only what is cheap and certain before Kafka (`check_payload`): a payload
larger than `bridge.max_payload_bytes` (OVERSIZE), or one whose `device_id` differs from
its topic's (DEVICE_ID_MISMATCH: a device may only speak for itself). A refused message
takes the same path as a good one, as a dead letter for `kafka.dlq_topic` with its MQTT
topic as the source, in the same in-order acknowledgement queue: its PUBACK goes out
once Kafka confirmed the dead letter, and nothing behind it waits longer than that.
Everything else, even a payload that is not JSON, is forwarded as it is: the consumer
refuses it with the precise reason, so no message is refused twice. One more refusal
follows those checks: a message the broker delivered as retained (RETAIN flag set) is
a copy of an earlier publish, not telemetry just sent, and is dead-lettered as
RETAINED. The bridge subscribes with Retain Handling 2 and the project's broker keeps
no retained messages (`retain_available false`), so this guards against brokers that
would.

Trace context (`ingest.trace`): a message's W3C `traceparent` user property goes on its
Kafka record (or its dead letter) as the header `traceparent`, with the bridge's span
as the new parent; a message without one gets a new sampled trace for a fraction
`bridge.trace_sample_ratio` of them, no header for the rest; a malformed one is
counted (`usagepipe_bridge_traced_total{origin="malformed"}`) and replaced by a new
trace, and the message goes on as any other.

The bridge announces `bridge.max_packet_bytes` as its MQTT Maximum Packet Size and
refuses to start when that is not above the broker's own (from CONNACK), because
Mosquitto drops a message larger than its subscriber's limit without a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from ingest.backoff import Backoff, wait_to_start
from ingest.dead_letter import DeadLetter
from ingest.errors import BrokerUnavailable, ConfigurationError
from ingest.kafka import TopicKeeper, ensure_topics, make_producer, running
from ingest.metrics import BridgeMetrics
from ingest.mqtt import LoginRefused, MqttClient, SubscriptionRefused
from ingest.mqtt_wire import trace_properties
from ingest.setting_errors import variable
from ingest.settings import Settings
from ingest.trace import (
    TRACEPARENT,
    TRACESTATE,
    TRACESTATE_MAX_BYTES,
    child_header,
    sampled_header,
    start_header,
)
from schemas.errors import InvalidTelemetry, Reason

log = logging.getLogger(__name__)

FORWARDING_ROOM_BYTES = 1024
"""How much larger than the device's packet the broker's copy to the bridge may be: the
broker may add a Message Expiry Interval (5 bytes), write out a topic the device sent as
an alias (device topics are tens of bytes), and grow the length fields (3 bytes)."""

_HANDOFF_MAX = 4096
"""Most messages handed to the producer in one turn of `produce` (they become one batch
per partition, split further where a batch reaches `kafka.max_batch_bytes`)."""

Headers = list[tuple[str, bytes]]
_NO_HEADERS: Headers = []
"""The headers of a record without trace context (shared, never changed)."""

TRACE_ORIGINS = ("device", "bridge", "malformed")
"""Where a forwarded trace came from: the device's traceparent, one the bridge started
for a message without one (sampled by `bridge.trace_sample_ratio`), or one it started
in place of a malformed traceparent."""


@functools.lru_cache(maxsize=65536)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (murmur2, as the Java
    client and aiokafka do), cached: aiokafka's murmur2 is pure Python, and a device's
    key comes again with every message it sends."""
    index: int = (murmur2(key) & 0x7FFFFFFF) % partitions
    return index


@dataclass(slots=True)
class _InFlight:
    """One MQTT message between its arrival and its PUBACK."""

    mid: int
    generation: int
    topic: str
    """`kafka.raw_topic`, or `kafka.dlq_topic` for a refused message's dead letter."""
    key: bytes
    value: bytes
    arrived_ms: int
    """When the message reached the bridge (Unix ms): its Kafka timestamp, whenever the
    record is (re)sent; the consumer's per-device ceiling judges by it."""
    refused: Reason | None = None
    confirmation: asyncio.Future[object] | None = None
    headers: Headers = field(default_factory=lambda: _NO_HEADERS)
    """The record's Kafka headers: the trace context, if any."""


@dataclass
class BridgeReport:
    """What one run of the bridge did."""

    received: int = 0
    acked: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Messages dead-lettered instead of forwarded (Kafka confirmed), by reason."""
    send_retries: int = 0
    peak_unacked: int = 0
    """The most messages held unacknowledged at once (never above `bridge.max_inflight`)."""
    holds: int = 0
    """Times the window filled and the bridge stopped taking messages until PUBACKs freed room."""
    reused_packet_ids: int = 0
    """Messages that came with the packet id of one still unacknowledged (the broker's
    ids ran out)."""
    elapsed_s: float = 0.0
    stopped_by: str = ""
    per_topic: dict[str, int] = field(default_factory=dict)
    traced: dict[str, int] = field(default_factory=dict)
    """Messages forwarded with a `traceparent` header, by origin (`TRACE_ORIGINS`)."""


def subscription(settings: Settings) -> str:
    """The bridge's topic filter: every device's telemetry, shared when `shared_group`."""
    topic = f"{settings.mqtt.topic_prefix}devices/+/telemetry"
    group = settings.bridge.shared_group
    return f"$share/{group}/{topic}" if group else topic


def device_id_from_topic(topic: str, prefix: str) -> str | None:
    """`{prefix}devices/{device_id}/telemetry` -> `device_id`, or None for other topics."""
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 3 or parts[0] != "devices" or parts[2] != "telemetry" or not parts[1]:
        return None
    return parts[1]


def device_id_from_payload(payload: bytes) -> str | None:
    """The top-level `device_id` string of a JSON object payload, or None if unreadable.

    A full decode with orjson (about 1.5 us for a typical 300-byte message), not a
    search of the bytes: escapes, a `device_id` nested in the body or a key given twice
    would fool a search, and this check is what stops one device speaking for another.
    """
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    device_id = document.get("device_id")
    return device_id if isinstance(device_id, str) else None


def check_packet_limits(bridge_max: int, broker_max: int | None) -> None:
    """Refuse to run when the broker may accept a packet the bridge would not take: the
    broker would drop that message silently instead of delivering it."""
    setting = variable(["bridge", "max_packet_bytes"])
    if broker_max is None:
        raise ConfigurationError(
            "the MQTT broker announced no Maximum Packet Size, so devices may send packets"
            f" larger than the bridge's {setting}={bridge_max}, which the broker would drop"
            " unseen; set max_packet_size in its config (deploy/mosquitto/mosquitto.conf)"
        )
    if broker_max + FORWARDING_ROOM_BYTES > bridge_max:
        raise ConfigurationError(
            f"{setting}={bridge_max} is not above the broker's Maximum Packet Size"
            f" ({broker_max}) by {FORWARDING_ROOM_BYTES} bytes: the broker would drop"
            f" messages too large for the bridge unseen; raise {setting} to at least"
            f" {broker_max + FORWARDING_ROOM_BYTES} or lower the broker's max_packet_size"
        )


def check_payload(payload: bytes, topic: str, topic_device_id: str | None, max_bytes: int) -> None:
    """The bridge's intake checks; raises InvalidTelemetry for a message to dead-letter.

    Only what can be decided cheaply and for certain: the size, and whether the payload
    names the device its topic names. A payload that cannot be read here passes, and
    the consumer refuses it with the precise reason.
    """
    if len(payload) > max_bytes:
        raise InvalidTelemetry(
            Reason.OVERSIZE, f"payload is {len(payload)} bytes, more than the {max_bytes} allowed"
        )
    if topic_device_id is None:
        return
    payload_device_id = device_id_from_payload(payload)
    if payload_device_id is not None and payload_device_id != topic_device_id:
        raise InvalidTelemetry(
            Reason.DEVICE_ID_MISMATCH,
            f"device_id: {payload_device_id!r} in the payload, "
            f"{topic_device_id!r} in the MQTT topic {topic!r}",
        )


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
        self._window = 0
        """Messages received and not yet acknowledged or dropped: those in `_incoming`
        and `_unacked` together, of every connection."""
        self._window_max = settings.bridge.max_inflight
        metrics.window_limit.set(self._window_max)
        self._holding = False
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._accepting = True
        self._mqtt: MqttClient | None = None
        self._topics = TopicKeeper(
            settings.kafka,
            settings.kafka.raw_topic,
            settings.kafka.dlq_topic,
            on_repair=lambda action, n: metrics.topic_repairs.labels(action).inc(n),
        )
        self._trace_ratio = settings.bridge.trace_sample_ratio
        self._traced = {origin: metrics.traced.labels(origin) for origin in TRACE_ORIGINS}
        self._traced_told: dict[str, int] = {}
        self._random = random.Random().random
        self.ready = asyncio.Event()
        """Set once the broker confirmed the subscription: devices may publish."""
        self._kafka_state = "connecting"
        """`ok` while the producer runs and Kafka confirms what it is sent, else why not."""
        self.report = BridgeReport()

    @property
    def connected(self) -> bool:
        """True while the MQTT connection is up."""
        return self._mqtt is not None and self._mqtt.connected.is_set()

    def readiness(self) -> dict[str, str]:
        """`GET /ready`'s checks (`ingest.readiness`): the MQTT connection and its
        subscription, and Kafka; read from the probe server's thread."""
        if not self.connected:
            mqtt = "not connected"
        elif not self.ready.is_set():
            mqtt = "connected, not subscribed yet"
        else:
            mqtt = "ok"
        return {"mqtt": mqtt, "kafka": self._topics.unreachable or self._kafka_state}

    def _kafka_failed(self, exc: KafkaError) -> None:
        self._metrics.errors.labels("kafka_send").inc()
        self._topics.nudge(unknown_topic=isinstance(exc, UnknownTopicOrPartitionError))
        self.report.send_retries += 1
        self._kafka_state = f"sends failing: {exc!r}"

    def stop(self, why: str = "requested") -> None:
        """Stop taking messages, finish what Kafka already has, then close."""
        if not self._stopping.is_set():
            self.report.stopped_by = why
            self._stopping.set()

    async def run(self) -> BridgeReport:
        """Forward until stopped. Kafka or the MQTT broker not up yet at start is waited
        for, with the usual backoff and a log line a try, for `bridge.start_wait_s` or
        until a stop; once subscribed, the MQTT client reconnects by itself and Kafka
        sends are retried, and a failure neither can retry ends the bridge."""
        report = await wait_to_start(
            self._start,
            who="bridge",
            log=log,
            retry_on=(BrokerUnavailable, KafkaError),
            wait_s=self._settings.bridge.start_wait_s,
            started=self.ready.is_set,
            stopping=self._stopping,
            on_retry=self._metrics.errors.labels("start").inc,
        )
        if report is None:
            log.info("bridge stopped before it started (%s)", self.report.stopped_by)
            return self.report
        return report

    async def _start(self) -> BridgeReport:
        """`_run()`, with a refused login made what it is: a wrong setting, not a broker
        to wait for."""
        try:
            return await self._run()
        except LoginRefused as exc:
            names = variable(["mqtt", "username"]), variable(["mqtt", "password"])
            raise ConfigurationError(f"{exc} (are {names[0]} and {names[1]} right?)") from exc

    async def _run(self) -> BridgeReport:
        s = self._settings
        started = time.monotonic()
        self._kafka_state = "connecting"
        await ensure_topics(s.kafka, s.kafka.raw_topic, s.kafka.dlq_topic)
        producer = make_producer(s.kafka, client_id=s.bridge.client_id)
        mqtt = MqttClient(
            s.mqtt,
            client_id=s.bridge.client_id,
            persistent=True,
            manual_ack=True,
            receive_maximum=s.bridge.max_inflight,
            subscriptions=[subscription(s)],
            on_raw_message=self._on_message,
            max_packet_size=s.bridge.max_packet_bytes,
            on_reused_id=self._on_reused_id,
            on_lost=self._metrics.errors.labels("mqtt_disconnect").inc,
        )
        self._mqtt = mqtt
        async with running(producer), mqtt:
            self._kafka_state = "ok"
            check_packet_limits(s.bridge.max_packet_bytes, mqtt.broker_max_packet_size)
            try:
                await mqtt.wait_subscribed()
            except SubscriptionRefused as exc:
                prefix = variable(["mqtt", "topic_prefix"])
                raise SubscriptionRefused(
                    exc.topic,
                    f"{exc.reason}; the bridge's login {s.mqtt.username!r} may not read it"
                    f" (is {prefix}={s.mqtt.topic_prefix!r} right?)",
                ) from exc
            self._metrics.subscribed.set(1)
            self.ready.set()
            log.info("bridge subscribed; forwarding to Kafka topic %s", s.kafka.raw_topic)
            async with asyncio.TaskGroup() as tasks:
                producing = tasks.create_task(self._produce(producer), name="bridge-produce")
                acking = tasks.create_task(self._acknowledge(producer), name="bridge-ack")
                keeper = tasks.create_task(self._topics.run(), name="bridge-topics")
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
                keeper.cancel()
                if timer is not None:
                    timer.cancel()
            self._metrics.subscribed.set(0)
            await producer.flush()
        self._kafka_state = "stopped"
        self.report.elapsed_s = time.monotonic() - started
        log.info(
            "bridge stopped (%s): %d received, %d acknowledged in %.1fs",
            self.report.stopped_by,
            self.report.received,
            self.report.acked,
            self.report.elapsed_s,
        )
        return self.report

    def _on_reused_id(self, mid: int) -> None:
        self.report.reused_packet_ids += 1
        self._metrics.reused_packet_ids.inc()

    async def _timer(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop(f"after {seconds:g}s")

    def _trace(self, props: bytes, device_id: str | None) -> Headers:
        """The Kafka headers carrying a message's trace context (see the module's
        docstring); `props` are its MQTT v5 properties, `b""` for none. Bytes in,
        bytes out, and counted by `_produce`: this runs for every message."""
        raw = tracestate = None
        if props:
            raw, tracestate = trace_properties(props)
        if raw is not None:
            header = child_header(raw)
            origin = "device"
            if header is None:
                origin, header, tracestate = "malformed", start_header(), None
        elif self._trace_ratio and self._random() < self._trace_ratio:
            origin, header = "bridge", start_header()
        else:
            return _NO_HEADERS
        traced = self.report.traced
        traced[origin] = traced.get(origin, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            trace_id = header[3:35].decode()
            if origin == "malformed":
                log.debug(
                    "malformed traceparent %r from %s; started trace_id=%s instead",
                    raw,
                    device_id,
                    trace_id,
                    extra={"device_id": device_id, "trace_id": trace_id},
                )
            elif sampled_header(header):
                log.debug(
                    "forwarding trace_id=%s span_id=%s (%s) of %s",
                    trace_id,
                    header[36:52].decode(),
                    origin,
                    device_id,
                    extra={"device_id": device_id, "trace_id": trace_id},
                )
        if tracestate and len(tracestate) <= TRACESTATE_MAX_BYTES:
            return [(TRACEPARENT, header), (TRACESTATE, tracestate)]
        return [(TRACEPARENT, header)]

    def _count_traced(self) -> None:
        """Bring `usagepipe_bridge_traced_total` up to the report's counts (once a turn
        of `_produce`, not once a message: a counter's increment takes a lock)."""
        for origin, count in self.report.traced.items():
            told = self._traced_told.get(origin, 0)
            if count > told:
                self._traced[origin].inc(count - told)
                self._traced_told[origin] = count

    def _on_message(  # noqa: PLR0917 (the framer's callback, called positionally per message)
        self, topic: str, mid: int, payload: bytes, retain: bool, props: bytes, generation: int
    ) -> None:
        if not self._accepting:
            return  # not acknowledged: stays in the session, delivered again later
        self.report.received += 1
        s = self._settings
        arrived_ms = time.time_ns() // 1_000_000
        device_id = device_id_from_topic(topic, s.mqtt.topic_prefix)
        key = (device_id or topic).encode()
        headers = self._trace(props, device_id)
        try:
            check_payload(payload, topic, device_id, s.bridge.max_payload_bytes)
            if retain:
                raise InvalidTelemetry(
                    Reason.RETAINED,
                    f"the broker delivered a retained message on {topic!r}: a copy of an"
                    " earlier publish, not telemetry just sent",
                )
        except InvalidTelemetry as error:
            trace_id = headers[0][1][3:35].decode() if headers else None
            log.debug(
                "dead-lettering a message on %s: %s%s",
                topic,
                error,
                "" if trace_id is None else f" trace_id={trace_id}",
                extra={"device_id": device_id, "reason": error.reason.value, "trace_id": trace_id},
            )
            letter = DeadLetter.from_error(
                error, topic=topic, partition=None, offset=None, key=key, original=payload
            )
            item = _InFlight(
                mid,
                generation,
                s.kafka.dlq_topic,
                key,
                letter.to_json(),
                arrived_ms,
                error.reason,
                headers=headers,
            )
        else:
            item = _InFlight(
                mid, generation, s.kafka.raw_topic, key, payload, arrived_ms, headers=headers
            )
        self._incoming.append(item)
        if not self._incoming_ready.is_set():
            self._incoming_ready.set()
        self._window += 1
        self.report.peak_unacked = max(self.report.peak_unacked, self._window)
        if self._window >= self._window_max and not self._holding:
            self._holding = True
            self.report.holds += 1
            self._metrics.holds.inc()
            assert self._mqtt is not None
            self._mqtt.hold()

    async def _produce(self, producer: AIOKafkaProducer) -> None:
        incoming = self._incoming
        while True:
            if not incoming:
                self._incoming_ready.clear()
                await self._incoming_ready.wait()
                continue
            items = [incoming.popleft() for _ in range(min(len(incoming), _HANDOFF_MAX))]
            self._metrics.received.inc(len(items))
            if self.report.traced:
                self._count_traced()
            self._metrics.inflight.set(self._window)
            self._metrics.inflight_peak.set(self.report.peak_unacked)
            await self._send_batches(producer, items)
            self._unacked.extend(items)
            self._unacked_ready.set()
            self._metrics.awaiting_kafka.set(len(self._unacked))

    async def _send_batches(self, producer: AIOKafkaProducer, items: list[_InFlight]) -> None:
        """Hand `items` to the producer as closed batches, one or more per partition.

        Each item's `confirmation` becomes its batch's future. A closed batch is sent
        at once (no linger): the batching already happened while the last one was
        being handed over.
        """
        groups: dict[tuple[str, int], list[_InFlight]] = {}
        counts: dict[str, int] = {}
        for item in items:
            count = counts.get(item.topic)
            if count is None:
                count = counts[item.topic] = len(await producer.partitions_for(item.topic))
            groups.setdefault((item.topic, partition_for(item.key, count)), []).append(item)
        for (topic, partition), group in groups.items():
            batch = producer.create_batch()
            members: list[_InFlight] = []
            for item in group:
                key, value, at, headers = item.key, item.value, item.arrived_ms, item.headers
                if batch.append(key=key, value=value, timestamp=at, headers=headers) is None:
                    if members:
                        await self._submit(producer, batch, topic, partition, members)
                    batch, members = producer.create_batch(), []
                    if batch.append(key=key, value=value, timestamp=at, headers=headers) is None:
                        item.confirmation = await self._send(producer, item)  # too large alone
                        continue
                members.append(item)
            if members:
                await self._submit(producer, batch, topic, partition, members)

    async def _submit(
        self,
        producer: AIOKafkaProducer,
        batch: BatchBuilder,
        topic: str,
        partition: int,
        members: Sequence[_InFlight],
    ) -> None:
        batch.close()
        try:
            fut: asyncio.Future[object] = await producer.send_batch(
                batch, topic, partition=partition
            )
        except KafkaError as exc:
            self._kafka_failed(exc)
            log.warning("Kafka took no batch (%r); sending its records one by one", exc)
            for item in members:
                item.confirmation = await self._send(producer, item)
            return
        for item in members:
            item.confirmation = fut

    async def _send(self, producer: AIOKafkaProducer, item: _InFlight) -> asyncio.Future[object]:
        """Hand one record to the producer, retrying while Kafka cannot take it."""
        backoff = Backoff()
        while True:
            try:
                fut: asyncio.Future[object] = await producer.send(
                    item.topic,
                    value=item.value,
                    key=item.key,
                    timestamp_ms=item.arrived_ms,
                    headers=item.headers or None,
                )
                return fut
            except KafkaError as exc:
                self._kafka_failed(exc)
                log.warning("Kafka send failed (%r); retrying in %.1fs", exc, backoff.delay_s)
                await backoff.wait()

    def _capped(self) -> bool:
        return self._stop_after is not None and self.report.acked >= self._stop_after

    async def _acknowledge(self, producer: AIOKafkaProducer) -> None:
        mqtt = self._mqtt
        assert mqtt is not None
        unacked = self._unacked
        while True:
            if not unacked:
                self._drained.set()
                self._unacked_ready.clear()
                await self._unacked_ready.wait()
                continue
            item = unacked[0]
            confirmation = item.confirmation
            assert confirmation is not None
            if not confirmation.done():
                await asyncio.wait((confirmation,))
            exc = confirmation.exception()
            if exc is not None:
                if not isinstance(exc, KafkaError):
                    raise exc
                self._kafka_failed(exc)
                log.warning("Kafka did not confirm a record (%r); sending it again", exc)
                item.confirmation = await self._send(producer, item)
                continue
            self._kafka_state = "ok"  # Kafka confirmed a record
            if self._capped():
                # A hard cap: the rest stay unacknowledged in the broker's session and
                # come again to the next run (Kafka may then see them twice; the store
                # keeps one row).
                self.stop(f"after {self._stop_after} messages")
                self._drained.set()
                return
            self._ack_confirmed(mqtt)

    def _ack_confirmed(self, mqtt: MqttClient) -> None:
        """PUBACK the confirmed run at the head of the queue (one connection's), in order."""
        unacked = self._unacked
        generation = unacked[0].generation
        room = len(unacked)
        if self._stop_after is not None:
            room = min(room, self._stop_after - self.report.acked)
        mids: list[int] = []
        while unacked and len(mids) < room:
            item = unacked[0]
            confirmation = item.confirmation
            assert confirmation is not None
            if (
                item.generation != generation
                or not confirmation.done()
                or confirmation.exception() is not None
            ):
                break
            unacked.popleft()
            mids.append(item.mid)
            if item.refused is not None:
                self._metrics.rejected.labels(item.refused.value).inc()
                rejected = self.report.rejected
                rejected[item.refused.value] = rejected.get(item.refused.value, 0) + 1
        self._metrics.produced.inc(len(mids))
        self._window -= len(mids)
        self._metrics.inflight.set(self._window)
        self._metrics.awaiting_kafka.set(len(unacked))
        if self._holding and self._window < self._window_max:
            self._holding = False
            mqtt.release()
        if mqtt.ack_many(mids, generation):
            self._metrics.acked.inc(len(mids))
            self.report.acked += len(mids)
            if self._capped():
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
