"""What the project's Mosquitto refuses, measured with real clients on a private broker
(deploy/mosquitto/mosquitto.conf as `services up` renders it): retained publishes,
packets over its Maximum Packet Size; and what the bridge's side of the link does with
a retained delivery, a packet over its own limit and a handler that fails.

paho-mqtt and mosquitto_pub/mosquitto_sub are the devices; the figures the README
quotes come from these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry

from devices.mosquitto import DynsecAccounts
from ingest.bridge import Bridge
from ingest.errors import ConfigurationError
from ingest.metrics import BridgeMetrics
from ingest.mqtt import MqttClient
from ingest.settings import MqttSettings, Settings
from tests.conftest import cleanup, free_port, isolated, on_broker
from tests.pipeline import read_to_end, wait_for
from usagepipe.services import MosquittoBroker

BROKER_MAX_PACKET = 270_336  # deploy/mosquitto/mosquitto.conf: max_packet_size


@dataclass
class Device:
    device_id: str
    secret: str

    @property
    def topic(self) -> str:
        return f"devices/{self.device_id}/telemetry"


@dataclass
class PrivateBroker:
    broker: MosquittoBroker
    mqtt: MqttSettings
    devices: list[Device] = field(default_factory=list)


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    broker = MosquittoBroker(free_port(), tmp_path_factory.mktemp("broker-limits"))
    broker.start()
    try:
        mqtt = broker.mqtt_settings(Settings().mqtt)
        devices = [
            Device(f"broker-limits-{i}-{secrets.token_hex(3)}", secrets.token_urlsafe())
            for i in range(3)
        ]

        async def add() -> None:
            async with DynsecAccounts(mqtt) as accounts:
                for device in devices:
                    await accounts.add_device(device.device_id, device.secret)

        asyncio.run(add())
        yield PrivateBroker(broker, mqtt, devices)
    finally:
        broker.stop()


class PahoDevice:
    """A paho client on its own network thread, recording what the broker answered."""

    def __init__(self, mqtt: MqttSettings, device: Device, protocol: MQTTProtocolVersion) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=protocol
        )
        self.client.username_pw_set(device.device_id, device.secret)
        self.client.reconnect_delay_set(60, 60)  # one connection per test: no resends
        self.connack: Properties | None = None
        self.pubacks: list[str] = []
        self.disconnects: list[str] = []
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(
        self,
        client: object,
        userdata: object,
        flags: object,
        rc: object,
        props: Properties | None,
    ) -> None:
        self.connack = props
        self.connected.set()

    def _on_publish(
        self, client: object, userdata: object, mid: int, rc: object, props: object
    ) -> None:
        self.pubacks.append(str(rc))
        self.answered.set()

    def _on_disconnect(
        self, client: object, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self.disconnects.append(str(rc))
        self.answered.set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.answered.clear()
        self.client.publish(topic, payload, qos=1, retain=retain)
        assert self.answered.wait(10), "the broker neither acknowledged nor disconnected"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def paho_device(
    mqtt: MqttSettings, device: Device, protocol: MQTTProtocolVersion
) -> Iterator[PahoDevice]:
    client = PahoDevice(mqtt, device, protocol)
    try:
        yield client
    finally:
        client.close()


def mosquitto_pub(
    mqtt: MqttSettings, device: Device, version: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mosquitto_pub", "-V", version, "-q", "1", "-d", "-h", mqtt.host,
         "-p", str(mqtt.port), "-i", device.device_id, "-u", device.device_id,
         "-P", device.secret, "-t", device.topic, *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


def test_connack_says_retain_is_unavailable_and_announces_the_packet_limit(
    private_broker: PrivateBroker,
) -> None:
    with paho_device(private_broker.mqtt, private_broker.devices[0], V5) as device:
        assert device.connack is not None
        assert getattr(device.connack, "RetainAvailable", None) == 0
        assert getattr(device.connack, "MaximumPacketSize", None) == BROKER_MAX_PACKET


class Subscriber:
    """The bridge's login reading every device topic, asking for retained messages."""

    def __init__(self, mqtt: MqttSettings) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self.got = threading.Event()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"broker-limits-sub-{secrets.token_hex(3)}",
            protocol=V5,
        )
        assert mqtt.username is not None and mqtt.password is not None
        self.client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        # Retain Handling 0: the broker would send any retained message it kept.
        self.client.subscribe(
            "devices/+/telemetry", options=SubscribeOptions(qos=1, retainHandling=0)
        )
        assert self.subscribed.wait(10)

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        self.received.append((msg.topic, bytes(msg.payload), msg.retain))
        self.got.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_retained_publish_is_refused_and_nothing_is_kept(private_broker: PrivateBroker) -> None:
    mqtt, (first, second, third) = private_broker.mqtt, private_broker.devices

    # paho, MQTT v5: the broker ends the connection with 0x9A; no PUBACK.
    with paho_device(mqtt, first, V5) as device:
        device.publish(first.topic, b'{"kept": "v5"}', retain=True)
        assert device.disconnects == ["Retain not supported"]
        assert device.pubacks == []
    # paho, MQTT 3.1.1: the connection is closed, no reason (3.1.1 has none).
    with paho_device(mqtt, second, V311) as device:
        device.publish(second.topic, b'{"kept": "v311"}', retain=True)
        assert device.disconnects == ["Unspecified error"]
        assert device.pubacks == []
    # mosquitto_pub 3.1.1 -r: the connection is lost, exit 7 (MOSQ_ERR_CONN_LOST).
    done = mosquitto_pub(mqtt, third, "mqttv311", "-r", "-m", '{"kept": "mosquitto_pub"}')
    assert done.returncode == 7
    assert "Error: The connection was lost." in done.stderr
    # mosquitto_pub v5 -r: libmosquitto reads Retain Available = 0 and drops the flag
    # itself; the message goes out as a plain one (r0) and is acknowledged.
    done = mosquitto_pub(mqtt, third, "mqttv5", "-r", "-m", '{"kept": "no"}')
    assert done.returncode == 0, done.stderr
    assert f"sending PUBLISH (d0, q1, r0, m1, '{third.topic}'" in done.stdout
    assert "received PUBACK (Mid: 1, RC:16)" in done.stdout  # no subscriber yet

    # A new subscription asking for retained messages gets none: the first message it
    # sees is the one published after it subscribed.
    subscriber = Subscriber(mqtt)
    try:
        assert mosquitto_pub(mqtt, first, "mqttv5", "-m", "after").returncode == 0
        assert subscriber.got.wait(10)
        assert subscriber.received == [(first.topic, b"after", False)]
    finally:
        subscriber.close()


def test_sizes_below_the_packet_limit_are_acknowledged_and_above_it_disconnect(
    private_broker: PrivateBroker,
) -> None:
    mqtt, (device_v5, device_v311, device_pub) = private_broker.mqtt, private_broker.devices
    overhead = 2 + len(device_v5.topic) + 2 + 1 + 1 + 3  # topic, id, properties, fixed header
    largest = BROKER_MAX_PACKET - overhead - 1
    for device_id, protocol in ((device_v5, V5), (device_v311, V311)):
        with paho_device(mqtt, device_id, protocol) as device:
            # Over the bridge's payload limit, under the broker's packet limit: taken
            # (the bridge dead-letters it as `oversize`), the device stays connected.
            device.publish(device_id.topic, b"x" * largest)
            # (v5 reports that no one subscribes here: the bridge is not running.)
            acked = "No matching subscribers" if protocol == V5 else "Success"
            assert device.pubacks == [acked]
            assert device.disconnects == []
            device.publish(device_id.topic, b"x" * (BROKER_MAX_PACKET + 1))
            assert device.pubacks == [acked]
            expected = "Packet too large" if protocol == V5 else "Unspecified error"
            assert device.disconnects == [expected]
    # mosquitto_pub v5 checks the CONNACK's Maximum Packet Size and sends nothing.
    big = Path(f"/tmp/broker-limits-{secrets.token_hex(3)}")
    big.write_bytes(b"x" * (BROKER_MAX_PACKET + 1))
    try:
        done = mosquitto_pub(mqtt, device_pub, "mqttv5", "-f", str(big))
        assert "sending PUBLISH" not in done.stdout
        done = mosquitto_pub(mqtt, device_pub, "mqttv311", "-f", str(big))
        assert done.returncode == 7
        assert "Error: The connection was lost." in done.stderr
    finally:
        big.unlink()


@pytest.fixture
async def retaining_broker(tmp_path: Path) -> AsyncIterator[MqttSettings]:
    """A plain Mosquitto that keeps retained messages (not usagepipe's config)."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_packet_size {BROKER_MAX_PACKET}\npid_file {tmp_path}/mosquitto.pid\n"
        f"log_dest file {tmp_path}/mosquitto.log\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "mosquitto", "-c", str(conf), start_new_session=True
    )
    try:
        mqtt = MqttSettings(
            port=port, username=None, password=None, admin_username=None, admin_password=None
        )
        for _ in range(100):
            with contextlib.suppress(OSError):
                probe = paho.Client(CallbackAPIVersion.VERSION2, protocol=V5)
                probe.connect("127.0.0.1", port)
                probe.disconnect()
                break
            await asyncio.sleep(0.1)
        yield mqtt
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_bridge_never_ingests_a_retained_message(
    base_settings: Settings, test_name: str, retaining_broker: MqttSettings
) -> None:
    s = isolated(base_settings, test_name)
    s = s.model_copy(
        update={"mqtt": retaining_broker.model_copy(update={"topic_prefix": s.mqtt.topic_prefix})}
    )
    topic = f"{s.mqtt.topic_prefix}devices/broker-limits-r/telemetry"
    kept = b'{"device_id": "broker-limits-r", "seq": 1}'
    live = b'{"device_id": "broker-limits-r", "seq": 2}'
    publish = ["mosquitto_pub", "-V", "mqttv5", "-q", "1", "-p", str(s.mqtt.port), "-t", topic]

    async def run(*args: str | bytes) -> int:
        proc = await asyncio.create_subprocess_exec(*publish, *args)
        return await asyncio.wait_for(proc.wait(), 30)

    assert await run("-r", "-m", kept) == 0
    try:
        bridge = Bridge(s, BridgeMetrics(CollectorRegistry()), stop_after=1)
        running = asyncio.create_task(bridge.run())
        await asyncio.wait_for(bridge.ready.wait(), 30)
        assert await run("-m", live) == 0
        report = await asyncio.wait_for(running, 60)
        assert (report.received, report.acked, report.rejected) == (1, 1, {})
        assert [r.value for r in await read_to_end(s, s.kafka.raw_topic)] == [live]
    finally:
        await cleanup(s)


async def test_the_bridge_refuses_a_packet_limit_not_above_the_brokers(
    base_settings: Settings, test_name: str, private_broker: PrivateBroker
) -> None:
    s = on_broker(isolated(base_settings, test_name), private_broker.broker)
    s = s.model_copy(
        update={"bridge": s.bridge.model_copy(update={"max_packet_bytes": BROKER_MAX_PACKET})}
    )
    try:
        with pytest.raises(ConfigurationError) as refused:
            await Bridge(s, BridgeMetrics(CollectorRegistry())).run()
        assert str(refused.value) == (
            f"USAGEPIPE_BRIDGE__MAX_PACKET_BYTES={BROKER_MAX_PACKET} is not above the broker's"
            f" Maximum Packet Size ({BROKER_MAX_PACKET}) by 1024 bytes: the broker would drop"
            " messages too large for the bridge unseen; raise"
            f" USAGEPIPE_BRIDGE__MAX_PACKET_BYTES to at least {BROKER_MAX_PACKET + 1024} or"
            " lower the broker's max_packet_size"
        )
    finally:
        await cleanup(s)


async def test_a_handler_exception_closes_the_connection_and_the_messages_come_again(
    private_broker: PrivateBroker,
) -> None:
    """QoS 1, persistent session: the message whose handler raised, and any after it,
    are delivered again on the next connection; nothing is lost."""
    mqtt, device = private_broker.mqtt, private_broker.devices[0]
    failed: list[int] = []
    taken: dict[bytes, int] = {}
    client_id = f"broker-limits-handler-{secrets.token_hex(3)}"
    client: MqttClient

    def handle(  # noqa: PLR0917 (the client's callback, positional)
        topic: str, mid: int, payload: bytes, retain: bool, props: bytes, generation: int
    ) -> None:
        if payload == b"3" and not failed:
            failed.append(generation)
            raise RuntimeError("a bug in the handler")
        taken.setdefault(payload, generation)
        client.ack_many([mid], generation)

    client = MqttClient(
        mqtt, client_id=client_id, persistent=True, manual_ack=True,
        subscriptions=["devices/+/telemetry"], on_raw_message=handle,
    )  # fmt: skip
    async with client:
        await client.wait_subscribed()
        for seq in range(1, 6):
            done = await asyncio.to_thread(mosquitto_pub, mqtt, device, "mqttv5", "-m", str(seq))
            assert done.returncode == 0
        await wait_for(lambda: len(taken) == 5, "all 5 messages", 30)
        assert failed == [1]
        assert taken[b"3"] == 2  # delivered again on the second connection
        assert client.generation == 2
        assert sorted(taken) == [b"1", b"2", b"3", b"4", b"5"]
    # End the persistent session.
    ender = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5)
    assert mqtt.username is not None and mqtt.password is not None
    ender.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
    ender.connect(mqtt.host, mqtt.port, clean_start=True)
    ender.disconnect()


async def test_a_payload_under_the_packet_limit_is_dead_lettered_and_the_device_stays(
    base_settings: Settings, test_name: str, private_broker: PrivateBroker
) -> None:
    """265,000 bytes (the issue's "265 KB"): the broker takes it, the bridge dead-letters
    it as `oversize` and acknowledges it, and the device's next message is stored."""
    from ingest.dead_letter import DeadLetterReader
    from schemas.errors import Reason

    s = on_broker(isolated(base_settings, test_name), private_broker.broker)
    s = s.model_copy(update={"mqtt": s.mqtt.model_copy(update={"topic_prefix": ""})})
    device = private_broker.devices[1]
    big = b"x" * 265_000
    small = b'{"device_id": "%s"}' % device.device_id.encode()
    try:
        bridge = Bridge(s, BridgeMetrics(CollectorRegistry()), stop_after=2)
        running = asyncio.create_task(bridge.run())
        await asyncio.wait_for(bridge.ready.wait(), 30)
        with paho_device(s.mqtt, device, V5) as client:
            await asyncio.to_thread(client.publish, device.topic, big)
            await asyncio.to_thread(client.publish, device.topic, small)
            assert client.pubacks == ["Success", "Success"]
            assert client.disconnects == []
        report = await asyncio.wait_for(running, 60)
        assert (report.acked, report.rejected) == (2, {"oversize": 1})
        assert [r.value for r in await read_to_end(s, s.kafka.raw_topic)] == [small]
        async with DeadLetterReader(s.kafka) as reader:
            letters = [stored.letter async for stored in reader]
        assert [(x.reason, x.original) for x in letters if x is not None] == [
            (Reason.OVERSIZE, big)
        ]
    finally:
        await cleanup(s)
