"""MQTT intake: a paho-mqtt client driven by the running asyncio loop.

paho does the protocol; the asyncio loop tells it when its socket can be read or
written, through paho's documented external-loop hooks (`on_socket_open`,
`on_socket_register_write`, ...). There is no network thread, so callbacks run on the
loop and can touch asyncio objects directly. The bridge (a persistent-session
subscriber that acknowledges by hand) and the fleet simulator (publishers) share it.

Packets are read by `ingest.mqtt_wire.BufferedClient`, paho's client with a faster
framer (the one module that touches paho's private API); this module uses only public
methods.

Two things paho leaves to its user are done here:
- Bounded in-flight publishing: paho numbers messages with 16-bit ids and, with more
  than 65,535 queued in one client, reuses ids and silently loses messages. `publish`
  waits for a free slot (`max_inflight`) before handing paho a message.
- Reconnection: a lost connection is retried with jittered backoff; subscriptions are
  renewed on every CONNACK. Manual acks carry the connection's generation, because a
  message id from a previous connection means nothing on the next one (the broker
  redelivers those messages itself). A connection the framer closed for an error (a
  packet over `max_packet_size`, a malformed one, a handler that raised) is reopened
  after a backoff that grows while such errors repeat, so a message that fails every
  time it is delivered does not spin the loop.

Two more things the bridge needs of a manual-ack subscriber, because a broker may send
more than the Receive Maximum the client announced (Mosquitto 2.0.11 does, with a backlog
queued: each PUBACK lets a whole Receive Maximum more out of its queue):
- Holding: `hold()` stops taking messages (the framer stops before the next PUBLISH and
  the socket is no longer read, so what the broker sends waits in the kernel's buffers
  and the broker's queue) until `release()`. The bridge holds while its window is full.
- Packet ids in use: a PUBLISH whose packet id is that of a message received on this
  connection and not yet acknowledged means the broker ran out of ids (it has more than
  65,535 in flight) and reused one. It is counted (`reused_packet_ids`, `on_reused_id`)
  and logged (the first ten, then every thousandth), and taken as the new message it
  is: PUBACKs go out in the order the messages came, and a broker matches a PUBACK to
  the oldest message in flight with its id (Mosquitto does), so each acknowledges the
  right one.

Subscriptions ask for Retain Handling 2: the broker sends no retained message when a
subscription is made. usagepipe's topics carry streams, never last values, and a
retained message handed to every new subscriber would be ingested again each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.backoff import Backoff
from ingest.errors import BrokerUnavailable, ConfigurationError
from ingest.mqtt_wire import PROTOCOL_MAX_PACKET, BufferedClient
from ingest.settings import MqttSettings
from schemas.errors import UsagepipeError

log = logging.getLogger(__name__)

_NO_RETAINED = SubscribeOptions.RETAIN_DO_NOT_SEND
"""Retain Handling 2: no retained messages when a subscription is made."""

MessageHandler = Callable[[paho.MQTTMessage, int], None]
"""Called on the loop for each message, with the connection generation it arrived on."""

RawMessageHandler = Callable[[str, int, bytes, bool, bytes, int], None]
"""`PublishHandler` (topic, packet id, payload, RETAIN flag, properties) plus the
connection generation the message arrived on."""

_ERROR_BACKOFF_RESET_S = 60.0
"""A connection the framer closed for an error this long after the previous one starts
the reconnect backoff afresh."""


class SubscriptionRefused(ConfigurationError):
    """The broker refused a subscription (SUBACK failure): this login may not read the
    topic filter. Configuration, not an outage: asking again gets the same answer."""

    def __init__(self, topic: str, reason: object) -> None:
        self.topic = topic
        self.reason = str(reason)
        super().__init__(f"the MQTT broker refused the subscription to {topic!r}: {reason}")


class LoginRefused(BrokerUnavailable):
    """The broker refused the login (CONNACK: bad user name or password, not authorized,
    banned). A device's client keeps retrying, as its secret may be reissued meanwhile;
    the bridge at start does not (a ConfigurationError: the login settings are wrong)."""

    retriable = False


LOGIN_REFUSALS = frozenset({0x86, 0x87, 0x8A, 0x8C})
"""CONNACK reason codes that refuse the login itself (paho gives a v3.1.1 refusal its v5 code)."""


class PublishRefused(UsagepipeError):
    """The broker answered a QoS 1 publish with a failure reason code (MQTT v5 PUBACK).
    Not retriable: the broker gives this login the same answer again."""

    retriable = False

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"broker refused publish to {topic!r}: {reason}")
        self.topic = topic
        self.reason = reason


class MqttClient:
    """One MQTT v5 connection, usable as an async context manager.

    `persistent=True` keeps the session (and the broker's queue for it) for
    `settings.session_expiry_s` while the client is away. `receive_maximum` caps how
    many unacknowledged messages the broker sends this client at once.

    Messages go to `on_message` (paho's `MQTTMessage`) or, on the fast path that skips
    paho's message objects, to `on_raw_message` (topic, packet id, payload, RETAIN flag,
    properties' bytes, generation; manual-ack only, acknowledged with `ack_many`).

    `hold()` and `release()` stop and resume taking messages (manual-ack subscribers);
    `on_reused_id` is called with a packet id the broker sent again while its message
    was unacknowledged; `on_lost` each time an open connection is lost (not at `close()`).

    `max_packet_size` is announced in CONNECT as MQTT v5 Maximum Packet Size and
    enforced on every packet read: the broker sends nothing larger (Mosquitto drops such
    a message without a word), and a packet claiming more closes the connection. The
    broker's own limit, from its CONNACK, is `broker_max_packet_size`.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        persistent: bool = False,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        subscriptions: Sequence[str] = (),
        on_message: MessageHandler | None = None,
        on_raw_message: RawMessageHandler | None = None,
        max_inflight: int = 100,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 10.0,
        max_packet_size: int | None = None,
        on_reused_id: Callable[[int], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_lost = on_lost
        self.client_id = client_id
        self._persistent = persistent
        self._receive_maximum = receive_maximum
        self._subscriptions = tuple(subscriptions)
        self._on_message = on_message
        if on_raw_message is not None and not manual_ack:
            raise ValueError("on_raw_message needs manual_ack: its messages are acked by hand")
        self._on_raw_message = on_raw_message
        self._connect_timeout_s = connect_timeout_s
        self._max_packet_size = max_packet_size
        self._client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
            max_packet_size=max_packet_size or PROTOCOL_MAX_PACKET,
        )
        user = username if username is not None else settings.username
        if user is not None:
            secret = password
            if secret is None and settings.password is not None:
                secret = settings.password.get_secret_value()
            self._client.username_pw_set(user, secret)
        # paho's own window matches ours, so it never queues beyond what we allow.
        self._client.max_inflight_messages_set(max_inflight)
        self._inflight = asyncio.Semaphore(max_inflight)
        self._pending: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        """Set once the broker confirmed every subscription on the current connection."""
        self._subacked = asyncio.Event()
        self._refused: SubscriptionRefused | None = None
        self.generation = 0
        self.broker_max_packet_size: int | None = None
        """The Maximum Packet Size the broker announced in its last CONNACK (None: none)."""
        self._error_backoff = Backoff()
        self._last_error_at: float | None = None
        self._held = False
        self._reading = False
        """Whether the loop watches the socket for reading (not while a hold stopped it)."""
        self._unacked_ids: dict[int, int] = {}
        """Packet ids received on this connection and not yet acknowledged (manual-ack
        fast path), each with how many of its messages are unacknowledged: 2 or more only
        when the broker reused an id in use."""
        self._on_reused_id = on_reused_id
        self.reused_packet_ids = 0
        """PUBLISHes that came with the packet id of a message still unacknowledged."""
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        if on_raw_message is not None:
            self._client.on_publish_received = self._handle_raw_message
        self._client.on_publish = self._handle_publish
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_socket_open = self._socket_open
        self._client.on_socket_close = self._socket_close
        self._client.on_socket_register_write = self._register_write
        self._client.on_socket_unregister_write = self._unregister_write

    # -- lifetime -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK."""
        self._loop = asyncio.get_running_loop()
        await self._connect_once()
        self._schedule_tick()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (a persistent session stays on the broker). Idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        if self.connected.is_set():
            self._lost.clear()
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._lost.wait()
        sock = self._client.socket()
        if sock is not None:
            self._socket_close(self._client, None, sock)
            self._client.close_socket()
        for topic, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailable(f"closed before PUBACK for {topic!r}"))
        self._pending.clear()

    async def _connect_once(self) -> None:
        loop = self._loop
        assert loop is not None
        self._connack = loop.create_future()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
        if self._persistent:
            props.SessionExpiryInterval = self._settings.session_expiry_s
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        if self._max_packet_size is not None:
            props.MaximumPacketSize = self._max_packet_size
        where = f"{self._settings.host}:{self._settings.port}"
        try:
            if self.generation == 0:
                self._client.connect(
                    self._settings.host,
                    self._settings.port,
                    keepalive=self._settings.keepalive_s,
                    clean_start=not self._persistent,
                    properties=props,
                )
            else:
                self._client.reconnect()
        except OSError as exc:
            raise BrokerUnavailable(f"MQTT broker {where} unreachable: {exc}") from exc
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._connack
        except TimeoutError as exc:
            raise BrokerUnavailable(f"MQTT broker {where} sent no CONNACK") from exc

    def _schedule_tick(self) -> None:
        # A timer callback, not a task per connection: a fleet holds thousands of
        # connections, and keepalive needs attention only a few times per interval.
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(self._settings.keepalive_s / 4, self._tick)

    def _tick(self) -> None:
        """Keepalive: paho sends PINGREQ when due and notices a peer gone silent."""
        if self._closing:
            return
        if self.connected.is_set():
            if not self._reading:
                self._client.hold_keepalive()
            self._client.loop_misc()
        self._schedule_tick()

    async def _reconnect(self, closed_by_error: str | None = None) -> None:
        """Reconnect with jittered backoff until connected or closed; after a connection
        the framer closed for an error, wait a backoff of its own first."""
        if closed_by_error is not None:
            assert self._loop is not None
            now = self._loop.time()
            last, self._last_error_at = self._last_error_at, now
            if last is None or now - last > _ERROR_BACKOFF_RESET_S:
                self._error_backoff = Backoff()
            log.warning(
                "%s closed its connection (%s); reconnecting in %.1fs",
                self.client_id,
                closed_by_error,
                self._error_backoff.delay_s,
            )
            await self._error_backoff.wait()
        backoff = Backoff()
        while not self._closing and not self.connected.is_set():
            try:
                await self._connect_once()
            except BrokerUnavailable as exc:
                log.warning("%s: %s; retrying in %.1fs", self.client_id, exc, backoff.delay_s)
                await backoff.wait()

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        *,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> asyncio.Future[None]:
        """Hand one message to the broker once an in-flight slot is free, with MQTT v5
        `user_properties` (name, value) if any (a device's `traceparent`).

        Returns a future that resolves on PUBACK (or fails with `PublishRefused`). A
        message sent while the link is down is resent by paho after reconnecting.
        """
        await self._inflight.acquire()
        properties = None
        if user_properties:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: no hints
            properties.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._inflight.release()
            raise BrokerUnavailable(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        if qos == 0:
            self._inflight.release()
            fut.set_result(None)
        else:
            self._pending[info.mid] = (topic, fut)
        return fut

    def ack_many(self, mids: Sequence[int], generation: int) -> bool:
        """Acknowledge messages received on connection `generation` (manual-ack mode),
        their PUBACKs in one write.

        Returns False, sending nothing, when that connection is gone: the broker keeps
        the messages in the session and delivers them again.
        """
        if generation != self.generation or not self.connected.is_set():
            return False
        mids = [mid for mid in mids if mid]  # QoS 0 (id 0) is never acknowledged
        if mids:
            unacked = self._unacked_ids
            for mid in mids:
                count = unacked.pop(mid, 1)
                if count > 1:
                    unacked[mid] = count - 1
            self._client.queue_pubacks(mids)
        return True

    def hold(self) -> None:
        """Take no more messages until `release()`: the framer stops before the next
        PUBLISH, and the socket is not read once one is waiting (so the CONNACK and
        SUBACK of a reconnect still are). Keepalive goes on meanwhile."""
        self._held = True
        self._client.held = True

    def release(self) -> None:
        """Take messages again after `hold()`: first those already received, then the
        socket's (on the next turn of the loop, not inside the caller)."""
        if not self._held:
            return
        self._held = False
        self._client.held = False
        assert self._loop is not None
        self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self._held or self._closed:
            return
        self._client.frame_buffered()
        if not self._client.stopped_by_hold:
            self._watch_reading(True)

    def _watch_reading(self, on: bool) -> None:
        sock = self._client.socket()
        if on == self._reading or sock is None:
            return
        assert self._loop is not None
        if on:
            self._loop.add_reader(sock, self._readable)
        else:
            self._loop.remove_reader(sock)
        self._reading = on

    # -- paho callbacks (all run on the loop) -----------------------------------------

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._connack
        if reason_code.is_failure:
            if fut is not None and not fut.done():
                error = LoginRefused if reason_code.value in LOGIN_REFUSALS else BrokerUnavailable
                fut.set_exception(error(f"MQTT broker refused {self.client_id}: {reason_code}"))
            return
        self.generation += 1
        self._unacked_ids.clear()  # ids of the last connection mean nothing on this one
        self.broker_max_packet_size = (
            getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        )
        log.info(
            "%s connected (session present: %s, generation %d)",
            self.client_id,
            flags.session_present,
            self.generation,
        )
        if self._subscriptions:
            self._client.subscribe(
                [
                    (topic, SubscribeOptions(qos=1, retainHandling=_NO_RETAINED))
                    for topic in self._subscriptions
                ]
            )
        self.connected.set()
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self._lost.set()
        if self._closing:
            return
        log.warning("%s lost its connection: %s", self.client_id, reason_code)
        if self._on_lost is not None and self.generation > 0:
            self._on_lost()
        reconnecting = self._reconnecting is not None and not self._reconnecting.done()
        # Only a link that once worked is re-established; a refused first CONNECT is
        # the caller's error to see.
        if self._loop is not None and self.generation > 0 and not reconnecting:
            self._reconnecting = self._loop.create_task(
                self._reconnect(self._client.closed_by_error),
                name=f"mqtt-reconnect:{self.client_id}",
            )

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg, self.generation)

    def _handle_raw_message(
        self, topic: str, mid: int, payload: bytes, retain: bool, props: bytes
    ) -> None:
        assert self._on_raw_message is not None
        if mid:
            unacked = self._unacked_ids
            count = unacked.get(mid, 0)
            unacked[mid] = count + 1
            if count:
                self._reused_id(mid, topic)
        self._on_raw_message(topic, mid, payload, retain, props, self.generation)

    def _reused_id(self, mid: int, topic: str) -> None:
        self.reused_packet_ids += 1
        if self._on_reused_id is not None:
            self._on_reused_id(mid)
        if self.reused_packet_ids > 10 and self.reused_packet_ids % 1000:
            return  # the first ten, then every thousandth: a broker that does it, does it a lot
        log.warning(
            "%s: the broker sent packet id %d (on %s) while a message it sent with that id"
            " is unacknowledged: it has more than 65,535 messages in flight to this client;"
            " taking both, acknowledged in the order they came (%d reused so far)",
            self.client_id,
            mid,
            topic,
            self.reused_packet_ids,
        )

    def _handle_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        self._inflight.release()
        topic, fut = entry
        if fut.done():
            return
        if reason_code.is_failure:
            fut.set_exception(PublishRefused(topic, str(reason_code)))
        else:
            fut.set_result(None)

    def _handle_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [
            (topic, code)
            for topic, code in zip(self._subscriptions, reason_codes, strict=False)
            if code.is_failure
        ]
        for topic, code in refused:
            log.error("%s: subscription to %r refused: %s", self.client_id, topic, code)
        if refused:
            self._refused = SubscriptionRefused(*refused[0])
        else:
            self.subscribed.set()
        self._subacked.set()

    async def wait_subscribed(self) -> None:
        """Return once the broker confirmed every subscription; raise
        `SubscriptionRefused` when it refused one (waiting on `subscribed` would wait
        forever: the broker's answer does not change by asking again)."""
        while not self.subscribed.is_set():
            if self._refused is not None:
                raise self._refused
            self._subacked.clear()
            await self._subacked.wait()

    # -- socket hooks: the asyncio loop drives paho's socket ---------------------------

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._client.reset_buffer()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(sock, self._readable)
        self._reading = True

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._reading = False

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._client.loop_write)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    def _readable(self) -> None:
        self._client.read_packets()
        if self._client.stopped_by_hold:
            # A PUBLISH waits in the buffer: leave the rest in the socket until released.
            self._watch_reading(False)
