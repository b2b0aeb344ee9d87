"""A client id's persistent session on the broker, dropped: `usagepipe bridge --forget-session`.

A bridge keeps a persistent session under its fixed client id (`bridge.client_id`,
clean_start False, `mqtt.session_expiry_s`), and the broker queues every message its
subscription matches while it is away. A retired bridge id (a renamed bridge, one of a
shared group taken out of service) keeps queueing until its session expires, on disk
and in the broker's memory. MQTT v5 lets the owner of a client id end its session at
once, and this module does that:

    CONNECT     that client id, clean_start False and no Session Expiry Interval: the
                broker resumes the session if it has one (CONNACK Session Present says
                whether it did) and, the expiry now being 0, ends it with this connection
    DISCONNECT  Session Expiry Interval 0, saying so explicitly

Everything queued for the session goes with it. For an id that took every message that
repeats what the live bridge has; a member of a shared group was queued its turn of the
group's messages, which nobody else has (drain it first: README, "What a broker crash
can lose"). A client connected with that id at the
moment (a bridge still running) is disconnected by the broker (session taken over) and
loses its queue: the CLI refuses the configured bridge's own id unless forced.
"""

from __future__ import annotations

import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.errors import BrokerUnavailable
from ingest.settings import MqttSettings


def forget_session(settings: MqttSettings, client_id: str, timeout_s: float = 10.0) -> bool:
    """End `client_id`'s session on the broker, and all it queued; whether there was one.

    Logs in with `settings`' login (the bridge's). Raises `BrokerUnavailable` when the
    broker cannot be reached or refuses the connection.
    """
    where = f"{settings.host}:{settings.port}"
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    connack: list[tuple[bool, ReasonCode]] = []
    closed: list[bool] = []

    def on_connect(
        _c: paho.Client, _u: object, flags: paho.ConnectFlags, reason: ReasonCode, _p: object
    ) -> None:
        connack.append((flags.session_present, reason))

    def on_disconnect(_c: paho.Client, _u: object, _f: object, _r: object, _p: object) -> None:
        closed.append(True)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
    # One message at a time: what the resumed session delivers before DISCONNECT is
    # dropped with it anyway.
    props.ReceiveMaximum = 1
    try:
        client.connect(
            settings.host,
            settings.port,
            keepalive=settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
    except OSError as exc:
        raise BrokerUnavailable(f"MQTT broker {where} unreachable: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    try:
        while not connack:
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(f"MQTT broker {where} closed the connection before CONNACK")
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"MQTT broker {where} sent no CONNACK")
        present, reason = connack[0]
        if reason.is_failure:
            raise BrokerUnavailable(f"MQTT broker {where} refused {client_id}: {reason}")
        end = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
        end.SessionExpiryInterval = 0
        client.disconnect(properties=end)
        while not closed and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        return present
    finally:
        if not closed:
            client.disconnect()
            client.loop(timeout=0.1)
