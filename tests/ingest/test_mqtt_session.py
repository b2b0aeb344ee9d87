"""A retired bridge id's session dropped (`ingest.mqtt_session`, `usagepipe bridge
--forget-session`), on a private broker (deploy/mosquitto/mosquitto.conf as `services up`
renders it): its queued messages go with it, and a client id without a session says so.

paho-mqtt clients are the retired bridge and the device; each test has its own ids.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.mosquitto import DynsecAccounts
from ingest.mqtt_session import forget_session
from ingest.settings import MqttSettings, Settings
from tests.conftest import free_port
from tests.usagepipe.test_cli import environment, one_line, usagepipe
from usagepipe.services import MosquittoBroker


@dataclass
class Broker:
    mqtt: MqttSettings
    device_id: str
    device_secret: str

    @property
    def topic(self) -> str:
        return f"devices/{self.device_id}/telemetry"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    private = MosquittoBroker(free_port(), tmp_path_factory.mktemp("mqtt-session"))
    private.start()
    try:
        mqtt = private.mqtt_settings(Settings().mqtt)
        device = Broker(mqtt, f"mqtt-session-{secrets.token_hex(3)}", secrets.token_urlsafe())

        async def add() -> None:
            async with DynsecAccounts(mqtt) as accounts:
                await accounts.add_device(device.device_id, device.device_secret)

        asyncio.run(add())
        yield device
    finally:
        private.stop()


class Session:
    """A bridge-like client: MQTT v5, clean_start False, a session expiry of an hour."""

    def __init__(self, mqtt: MqttSettings, client_id: str) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        assert mqtt.username is not None and mqtt.password is not None
        self.client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
        self.received: list[bytes] = []
        self.session_present: bool | None = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.marker = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
        props.SessionExpiryInterval = 3600
        self.client.connect(mqtt.host, mqtt.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, _c: object, _u: object, flags: paho.ConnectFlags, *_: object) -> None:
        self.session_present = flags.session_present
        self.connected.set()

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        self.received.append(bytes(message.payload))
        if message.payload == b"marker":
            self.marker.set()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker: Broker, payloads: list[bytes]) -> None:
    """The device publishes each payload at QoS 1 and waits for its PUBACK."""
    device = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=broker.device_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    device.username_pw_set(broker.device_id, broker.device_secret)
    device.connect(broker.mqtt.host, broker.mqtt.port)
    device.loop_start()
    try:
        for payload in payloads:
            device.publish(broker.topic, payload, qos=1).wait_for_publish(10)
    finally:
        device.disconnect()
        device.loop_stop()


def queue_for(broker: Broker, client_id: str, messages: int) -> None:
    """A session for `client_id` subscribed to the device's topic, away, with messages queued."""
    retired = Session(broker.mqtt, client_id)
    retired.subscribe(broker.topic)
    retired.close()
    publish(broker, [f"queued-{i}".encode() for i in range(messages)])


def what_a_reconnect_finds(broker: Broker, client_id: str) -> tuple[bool | None, list[bytes]]:
    """Reconnect `client_id`, subscribe, publish a marker: (session present, messages
    received up to the marker). The broker sends a session's queued messages before any
    later one, so a marker alone means nothing was queued."""
    again = Session(broker.mqtt, client_id)
    try:
        again.subscribe(broker.topic)
        publish(broker, [b"marker"])
        assert again.marker.wait(10)
        return again.session_present, again.received
    finally:
        again.close()


def test_a_dropped_session_takes_its_queue_with_it(broker: Broker) -> None:
    client_id = f"retired-bridge-{secrets.token_hex(3)}"
    queue_for(broker, client_id, 25)

    assert forget_session(broker.mqtt, client_id) is True

    assert what_a_reconnect_finds(broker, client_id) == (False, [b"marker"])


def test_a_kept_session_still_delivers_its_queue(broker: Broker) -> None:
    """The control: without forget_session the same steps find the session and its queue."""
    client_id = f"kept-bridge-{secrets.token_hex(3)}"
    queue_for(broker, client_id, 25)

    present, received = what_a_reconnect_finds(broker, client_id)

    assert present is True
    assert received == [f"queued-{i}".encode() for i in range(25)] + [b"marker"]
    forget_session(broker.mqtt, client_id)


def test_a_client_id_without_a_session_says_so(broker: Broker) -> None:
    assert forget_session(broker.mqtt, f"never-connected-{secrets.token_hex(3)}") is False


def cli_environment(broker: Broker, tmp_path: Path, bridge_id: str) -> dict[str, str]:
    """The private broker's port and logins, and a run dir of the test's own."""
    mqtt = broker.mqtt
    assert mqtt.username and mqtt.password and mqtt.admin_username and mqtt.admin_password
    return environment(
        USAGEPIPE_MQTT__PORT=str(mqtt.port),
        USAGEPIPE_MQTT__USERNAME=mqtt.username,
        USAGEPIPE_MQTT__PASSWORD=mqtt.password.get_secret_value(),
        USAGEPIPE_MQTT__ADMIN_USERNAME=mqtt.admin_username,
        USAGEPIPE_MQTT__ADMIN_PASSWORD=mqtt.admin_password.get_secret_value(),
        USAGEPIPE_BRIDGE__CLIENT_ID=bridge_id,
        USAGEPIPE_BRIDGE__METRICS_PORT="0",
        USAGEPIPE_SERVICES__RUN_DIR=str(tmp_path),
    )


def test_the_command_drops_a_retired_id_and_says_so(broker: Broker, tmp_path: Path) -> None:
    retired = f"retired-bridge-{secrets.token_hex(3)}"
    env = cli_environment(broker, tmp_path, bridge_id=f"live-bridge-{secrets.token_hex(3)}")
    queue_for(broker, retired, 3)
    where = f"127.0.0.1:{broker.mqtt.port}"

    first = usagepipe("bridge", "--forget-session", retired, env=env)
    second = usagepipe("bridge", "--forget-session", retired, env=env)

    assert (first.returncode, first.stdout) == (
        0,
        f"session of {retired!r} on {where} dropped, with everything queued for it\n",
    )
    assert (second.returncode, second.stdout) == (
        0,
        f"{retired!r} had no session on {where}; nothing dropped\n",
    )
    assert what_a_reconnect_finds(broker, retired) == (False, [b"marker"])


def test_the_bridges_own_id_needs_force(broker: Broker, tmp_path: Path) -> None:
    own = f"live-bridge-{secrets.token_hex(3)}"
    env = cli_environment(broker, tmp_path, bridge_id=own)
    queue_for(broker, own, 3)

    refused = usagepipe("bridge", "--forget-session", own, env=env)
    forced = usagepipe("bridge", "--forget-session", own, "--force", env=env)

    assert refused.returncode == 2
    assert one_line(refused) == (
        f"usagepipe bridge: {own!r} is this bridge's own client id (USAGEPIPE_BRIDGE__CLIENT_ID);"
        " dropping its session loses everything queued for it: add --force to do it anyway"
    )
    assert forced.returncode == 0
    assert forced.stdout.startswith(f"session of {own!r} on ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--force"], "usagepipe bridge: --force goes with --forget-session CLIENT_ID"),
        (
            ["--forget-session", "old", "--duration", "5s"],
            "usagepipe bridge: --forget-session does not bridge; drop --max-messages and"
            " --duration",
        ),
        (["--forget-session", ""], "usagepipe bridge: --forget-session: not an MQTT client id: ''"),
    ],
)
def test_mistakes_are_one_line(
    broker: Broker, tmp_path: Path, argv: list[str], message: str
) -> None:
    done = usagepipe("bridge", *argv, env=cli_environment(broker, tmp_path, "live-bridge"))

    assert (done.returncode, one_line(done)) == (2, message)


def test_a_broker_that_does_not_answer_is_one_line(broker: Broker, tmp_path: Path) -> None:
    env = cli_environment(broker, tmp_path, "live-bridge")
    port = free_port()
    env["USAGEPIPE_MQTT__PORT"] = str(port)

    done = usagepipe("bridge", "--forget-session", "old-bridge", env=env)

    assert done.returncode == 1
    assert one_line(done).startswith(f"usagepipe bridge: MQTT broker 127.0.0.1:{port} unreachable:")
