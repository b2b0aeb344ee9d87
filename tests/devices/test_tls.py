"""Devices on TLS with real clients: mosquitto_pub over the TLS listener with a
certificate the registry signed from the device's CSR, on a private Mosquitto started
with the project's own config (deploy/mosquitto/mosquitto.conf as `services up`
renders it: TLS listener, device CA, revocation list) on free ports.

The registry is real (PostgreSQL, the broker's dynamic-security accounts, the CA's
revocation list with SIGHUP to the broker's pid); what arrives is watched by a paho
client logged in as the bridge on the plain loopback listener. "Not delivered" is
shown without waiting for a time: the device then publishes a marker at QoS 1 from
a new connection, and the marker must be the next and only message to arrive.

WM-100 (the washer) logs in with certificates only; DR-200 (the dryer) may use a
password (`registry.password_models`).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import asyncpg
import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties

from devices.certificates import DeviceCA, check_csr, ensure_local_ca
from devices.factory_import import import_units
from devices.mosquitto import DynsecAccounts
from devices.records import Purchase, PurchaseChannel, Registration
from devices.registry import Registry
from ingest.settings import MqttSettings, RegistrySettings
from schemas.envelope import telemetry_topic
from tests.conftest import free_port
from tests.devices.catalog import DRYER, DSN, UNITS_CSV, WASHER, new_owner
from tests.devices.device_keys import csr_for, write_device_files
from tests.devices.fakes import RecordingPublisher
from tests.devices.test_broker_accounts import connack
from tests.pipeline import wait_for
from usagepipe.services import MosquittoBroker

SHOP = Purchase(PurchaseChannel.OWN_STORE)
CLIENT_TIMEOUT_S = 20
"""A bound on each mosquitto_pub run, so a hung client fails the test instead of the
suite; a run that finishes normally takes a fraction of a second."""


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private broker per test: device accounts and the revocation list are the
    test's own (device ids derive from the catalog's serials, the same in every test)."""
    broker = MosquittoBroker(
        free_port(), tmp_path / "run", tls_port=free_port(), password_tls_port=free_port()
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mqtt(tls_broker: MosquittoBroker) -> MqttSettings:
    """The private broker's plain listener and logins; no topic prefix (the broker is
    the test's own), whatever the environment says."""
    return tls_broker.mqtt_settings(MqttSettings())


@pytest.fixture
async def registry(
    reg_schema: str, tls_broker: MosquittoBroker, mqtt: MqttSettings, pg: asyncpg.Connection
) -> AsyncIterator[Registry]:
    """A real registry driving the private broker: its accounts, its revocation list."""
    settings = RegistrySettings(
        db_schema=reg_schema,
        secret_hash_log2_n=10,
        ca_cert_file=tls_broker.ca_cert_file,
        ca_key_file=tls_broker.ca_key_file,
        crl_file=tls_broker.crl_file,
        broker_pid_file=tls_broker.pid_path,
        password_models=["DR-200"],
    )
    async with (
        DynsecAccounts(mqtt) as accounts,
        Registry(settings, publisher=RecordingPublisher(), broker=accounts, dsn=DSN) as reg,
    ):
        await reg.add_product_model(WASHER)
        await reg.add_product_model(DRYER)
        await import_units(
            pg, UNITS_CSV.splitlines(keepends=True), schema=reg_schema, hash_log2_n=10
        )
        yield reg


@dataclass(frozen=True)
class DeviceFiles:
    """What a device keeps: its key (never sent) and the certificate it was given."""

    key: Path
    cert: Path


def keep(directory: Path, key: CertificateIssuerPrivateKeyTypes, cert_pem: str) -> DeviceFiles:
    key_path, cert_path = write_device_files(directory, secrets.token_hex(4), key, cert_pem)
    return DeviceFiles(key_path, cert_path)


async def register_with_csr(
    registry: Registry, tmp_path: Path, owner: UUID, serial: str = "SN0001"
) -> tuple[Registration, DeviceFiles]:
    """Register a washer with a CSR made on the "device"; its key stays in a file."""
    key, csr = csr_for()
    done = await registry.register(
        owner, "WM-100", serial, f"CODE-{serial[2:]}-7KQ2-M9DX", SHOP, csr=csr
    )
    assert done.certificate is not None
    return done, keep(tmp_path, key, done.certificate)


@dataclass(frozen=True)
class PubResult:
    returncode: int
    output: str

    @property
    def connected(self) -> bool:
        return "received CONNACK (0)" in self.output

    @property
    def puback(self) -> str | None:
        """The reason code of the PUBACK, as mosquitto_pub -d prints it (`RC:135`)."""
        for line in self.output.splitlines():
            if "received PUBACK" in line:
                return line.rsplit("RC:", 1)[1].rstrip(")")
        return None


def mosquitto_pub(
    broker: MosquittoBroker,
    device: DeviceFiles | None,
    topic: str,
    message: str,
) -> PubResult:
    """One QoS 1 publish over the TLS listener (MQTT v5), as a device would send it;
    `device` None sends no client certificate. mosquitto_pub exits 0 even when the
    publish is refused, so its debug output (-d) is the outcome."""
    assert broker.tls_port is not None
    command = [
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.tls_port),
        "--cafile", str(broker.ca_cert_file), "-V", "mqttv5", "-q", "1", "-d",
        "-t", topic, "-m", message,
    ]  # fmt: skip
    if device is not None:
        command += ["--cert", str(device.cert), "--key", str(device.key)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
    )
    return PubResult(done.returncode, done.stdout + done.stderr)


class Watcher:
    """The bridge's view: a paho client on the plain loopback listener, subscribed to
    every device's telemetry, keeping (topic, payload) in order of arrival."""

    def __init__(self, mqtt: MqttSettings) -> None:
        self.messages: list[tuple[str, str]] = []
        self._read = 0
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"tls-watcher-{secrets.token_hex(3)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        assert mqtt.username is not None and mqtt.password is not None
        self.client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(mqtt.host, mqtt.port)
        self.client.subscribe(telemetry_topic("+", mqtt.topic_prefix), qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the watcher's SUBACK"

    def _on_message(self, client: object, userdata: object, message: paho.MQTTMessage) -> None:
        self.messages.append((message.topic, message.payload.decode()))

    async def next_is(self, topic: str, payload: str) -> None:
        """Wait for the next message not yet looked at (it may have arrived already);
        it must be (topic, payload), and the only one."""
        seen = self._read
        await wait_for(lambda: len(self.messages) > seen, f"{payload!r} on {topic}", 10)
        assert self.messages[seen:] == [(topic, payload)]
        self._read = len(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def watcher(mqtt: MqttSettings) -> Iterator[Watcher]:
    w = Watcher(mqtt)
    try:
        yield w
    finally:
        w.close()


class LiveDevice:
    """A device's long-lived TLS connection (paho, MQTT v5), recording how it ends."""

    def __init__(self, broker: MosquittoBroker, device_id: str, files: DeviceFiles) -> None:
        self.disconnects: list[str] = []
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(broker.ca_cert_file), certfile=str(files.cert), keyfile=str(files.key)
        )
        self.client.reconnect_delay_set(3600, 3600)  # one connection: no reconnects
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        assert broker.tls_port is not None
        self.client.connect("127.0.0.1", broker.tls_port)
        self.client.loop_start()
        assert self.connected.wait(10), "the live device's CONNACK"

    def _on_connect(
        self, client: object, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if str(rc) == "Success":
            self.connected.set()

    def _on_disconnect(
        self,
        client: object,
        userdata: object,
        flags: object,
        rc: object,
        props: Properties | None,
    ) -> None:
        self.disconnects.append(str(rc))
        self.connected.clear()

    def publish(self, topic: str, payload: str) -> str:
        """Publish at QoS 1 and wait for the PUBACK; its reason."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return "Success" if info.rc == 0 else str(info.rc)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


REVOKED = "SSLV3_ALERT_CERTIFICATE_REVOKED"
UNKNOWN_CA = "TLSV1_ALERT_UNKNOWN_CA"
NO_CERTIFICATE = "SSLV3_ALERT_HANDSHAKE_FAILURE"


def handshake_alert(broker: MosquittoBroker, device: DeviceFiles | None) -> str:
    """The alert the broker ends a TLS 1.2 handshake with (OpenSSL's name for it), or
    "completed"."""
    assert broker.tls_port is not None
    context = ssl.create_default_context(cafile=str(broker.ca_cert_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if device is not None:
        context.load_cert_chain(str(device.cert), str(device.key))
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                return "completed"
        except ssl.SSLError as exc:
            return str(exc.reason)


def refused(broker: MosquittoBroker, device: DeviceFiles | None, topic: str, alert: str) -> None:
    """The device cannot connect, and the broker says why with `alert`.

    mosquitto_pub gets no CONNACK. Over TLS 1.3 (what it negotiates) the server checks
    the client's certificate after the client's side of the handshake is done, so it
    prints the alert or only a lost connection, whichever its first read meets; over
    TLS 1.2, which the listener also accepts, the alert is part of the handshake, so
    the reason is read from a TLS 1.2 handshake (Python's ssl).
    """
    result = mosquitto_pub(broker, device, topic, "refused?")
    assert not result.connected, result.output
    assert result.returncode != 0 and result.puback is None, result.output
    assert handshake_alert(broker, device) == alert


async def test_a_device_with_a_signed_certificate_publishes_over_tls(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher, tmp_path: Path
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    done, files = await register_with_csr(registry, tmp_path, owner)
    topic = telemetry_topic(done.device_id)
    result = await asyncio.to_thread(mosquitto_pub, tls_broker, files, topic, "hello over tls")
    assert (result.returncode, result.connected, result.puback) == (0, True, "0"), result.output
    await watcher.next_is(topic, "hello over tls")


async def test_no_certificate_or_another_cas_is_refused_at_the_handshake(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher, tmp_path: Path
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    done, files = await register_with_csr(registry, tmp_path, owner)
    topic = telemetry_topic(done.device_id)

    await asyncio.to_thread(refused, tls_broker, None, topic, NO_CERTIFICATE)

    # A CA of the attacker's own, signing the real device's id: same CN, other issuer.
    other = tmp_path / "other-ca"
    ensure_local_ca(other / "ca.crt", other / "ca.key")
    key, csr = csr_for()
    forged = DeviceCA.load(other / "ca.crt", other / "ca.key").sign_device(
        check_csr(csr), done.device_id, days=30, at=done.valid_from
    )
    foreign = keep(tmp_path, key, forged.pem)
    await asyncio.to_thread(refused, tls_broker, foreign, topic, UNKNOWN_CA)

    ok = await asyncio.to_thread(mosquitto_pub, tls_broker, files, topic, "marker")
    assert ok.puback == "0", ok.output
    await watcher.next_is(topic, "marker")


async def test_a_publish_to_a_foreign_topic_is_refused_and_not_delivered(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher, tmp_path: Path
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    done, files = await register_with_csr(registry, tmp_path, owner, "SN0001")
    other, _ = await register_with_csr(registry, tmp_path, owner, "SN0002")
    foreign = await asyncio.to_thread(
        mosquitto_pub, tls_broker, files, telemetry_topic(other.device_id), "not mine"
    )
    assert (foreign.connected, foreign.puback) == (True, "135"), foreign.output  # Not authorized
    topic = telemetry_topic(done.device_id)
    ok = await asyncio.to_thread(mosquitto_pub, tls_broker, files, topic, "marker")
    assert ok.puback == "0", ok.output
    await watcher.next_is(topic, "marker")


async def test_revocation_cuts_a_live_tls_connection_off_and_refuses_the_next(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher, tmp_path: Path
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    done, files = await register_with_csr(registry, tmp_path, owner, "SN0001")
    bystander, bystander_files = await register_with_csr(registry, tmp_path, owner, "SN0002")
    topic = telemetry_topic(done.device_id)
    pid = tls_broker.running_pid()
    assert pid is not None
    live = LiveDevice(tls_broker, done.device_id, files)
    other = LiveDevice(tls_broker, bystander.device_id, bystander_files)
    try:
        assert await asyncio.to_thread(live.publish, topic, "before") == "Success"
        await watcher.next_is(topic, "before")

        assert await registry.revoke_credentials(done.device_id, owner) is True
        await wait_for(lambda: live.disconnects != [], "the broker to drop the device", 10)
        assert live.disconnects == ["Administrative action"]

        await asyncio.to_thread(refused, tls_broker, files, topic, REVOKED)
        # The SIGHUP that loaded the new revocation list dropped nobody else.
        assert other.disconnects == []
        other_topic = telemetry_topic(bystander.device_id)
        assert await asyncio.to_thread(other.publish, other_topic, "still here") == "Success"
        await watcher.next_is(other_topic, "still here")
    finally:
        live.close()
        other.close()
    assert tls_broker.running_pid() == pid


async def test_after_a_transfer_the_old_certificate_is_refused(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher, tmp_path: Path
) -> None:
    seller = await registry.create_owner(new_owner(), source="test")
    buyer = await registry.create_owner(new_owner("Bob Buyer"), source="test")
    done, old = await register_with_csr(registry, tmp_path, seller)
    topic = telemetry_topic(done.device_id)
    pid = tls_broker.running_pid()
    live = LiveDevice(tls_broker, done.device_id, old)
    try:
        handed = await registry.transfer(done.device_id, seller, buyer, SHOP)
        assert (handed.password_login, handed.certificate) == (False, None)
        await wait_for(lambda: live.disconnects != [], "the broker to drop the device", 10)
    finally:
        live.close()
    await asyncio.to_thread(refused, tls_broker, old, topic, REVOKED)
    # The buyer's unit makes a new key and gets its certificate with one call.
    key, csr = csr_for()
    issued = await registry.renew_certificate(done.device_id, buyer, csr)
    new = keep(tmp_path, key, issued.pem)
    ok = await asyncio.to_thread(mosquitto_pub, tls_broker, new, topic, "buyer's key")
    assert ok.puback == "0", ok.output
    await watcher.next_is(topic, "buyer's key")
    assert tls_broker.running_pid() == pid


async def test_renewal_is_one_call_and_the_previous_certificate_runs_out_by_itself(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher, tmp_path: Path
) -> None:
    """The design: a renewal revokes nothing, so a device that has not yet stored its
    new certificate (or lost the answer) stays connected; revoking the credentials
    ends every certificate at once."""
    owner = await registry.create_owner(new_owner(), source="test")
    done, old = await register_with_csr(registry, tmp_path, owner)
    topic = telemetry_topic(done.device_id)
    key, csr = csr_for()
    issued = await registry.renew_certificate(done.device_id, owner, csr)
    new = keep(tmp_path, key, issued.pem)
    assert issued.serial != x509.load_pem_x509_certificate(old.cert.read_bytes()).serial_number
    for files, message in ((new, "new certificate"), (old, "old certificate")):
        result = await asyncio.to_thread(mosquitto_pub, tls_broker, files, topic, message)
        assert result.puback == "0", result.output
        await watcher.next_is(topic, message)

    assert await registry.revoke_credentials(done.device_id, owner) is True
    for files in (new, old):
        await asyncio.to_thread(refused, tls_broker, files, topic, REVOKED)


async def test_password_logins_are_for_the_listed_models_only(
    registry: Registry, mqtt: MqttSettings
) -> None:
    """`registry.password_models` is ["DR-200"]: the dryer gets a password the broker
    takes; the washer gets none (the API shows null), and the secret the registry drew
    for it was never given to the broker."""
    owner = await registry.create_owner(new_owner(), source="test")
    dryer = await registry.register(owner, "DR-200", "SN0003", "CODE-0003-7KQ2-M9DX", SHOP)
    assert (dryer.password_login, dryer.certificate) == (True, None)
    login = await asyncio.to_thread(
        connack, mqtt, dryer.device_id, (dryer.device_id, dryer.mqtt_secret)
    )
    assert login == "Success"

    washer = await registry.register(
        owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, csr=csr_for()[1]
    )
    assert (washer.password_login, washer.certificate is not None) == (False, True)
    login = await asyncio.to_thread(
        connack, mqtt, washer.device_id, (washer.device_id, washer.mqtt_secret)
    )
    assert login == "Not authorized"


def password_pub(
    broker: MosquittoBroker, login: Registration, topic: str, message: str
) -> PubResult:
    """One QoS 1 publish over the password TLS listener: server certificate checked,
    the device's id as username and client id, its MQTT password."""
    assert broker.password_tls_port is not None
    command = [
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.password_tls_port),
        "--cafile", str(broker.ca_cert_file), "-V", "mqttv5", "-q", "1", "-d",
        "-i", login.device_id, "-u", login.device_id, "-P", login.mqtt_secret,
        "-t", topic, "-m", message,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
    )
    return PubResult(done.returncode, done.stdout + done.stderr)


async def test_password_models_log_in_over_tls_without_a_client_certificate(
    registry: Registry, tls_broker: MosquittoBroker, watcher: Watcher
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    dryer = await registry.register(owner, "DR-200", "SN0003", "CODE-0003-7KQ2-M9DX", SHOP)
    topic = telemetry_topic(dryer.device_id)
    ok = await asyncio.to_thread(password_pub, tls_broker, dryer, topic, "dryer over tls")
    assert (ok.connected, ok.puback) == (True, "0"), ok.output
    await watcher.next_is(topic, "dryer over tls")

    washer = await registry.register(
        owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, csr=csr_for()[1]
    )
    wrong = await asyncio.to_thread(
        password_pub, tls_broker, washer, telemetry_topic(washer.device_id), "no password"
    )
    assert not wrong.connected and "Connection error: Not authorized" in wrong.output, wrong.output
    # The certificate listener still asks the dryer for a certificate.
    await asyncio.to_thread(refused, tls_broker, None, topic, NO_CERTIFICATE)
