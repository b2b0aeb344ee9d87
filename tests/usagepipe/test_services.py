"""`usagepipe.services` against real Tansu, Mosquitto and PostgreSQL processes.

Every broker here is private: free ports and a tmp run dir, so the shared services on
1884, 9092 and 5432 (which other tests use concurrently) are never stopped or
restarted. PostgreSQL is the machine's cluster; the tests only connect to it, and
create and drop a database of their own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from ingest.settings import (
    KafkaSettings,
    MqttSettings,
    PostgresSettings,
    ServicesSettings,
    Settings,
)
from usagepipe import services
from usagepipe.services import (
    PORT_TAKEN,
    RUNNING_NOT_OURS,
    RUNNING_OURS,
    STARTED,
    STOPPED,
    PortInUse,
    ServiceError,
    ServiceState,
    TansuBroker,
)

BROKERS: list[services.ServiceName] = ["kafka", "mqtt"]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_settings(run_dir: Path, mqtt_port: int, kafka_port: int, dsn: str = PG_DSN) -> Settings:
    return Settings(
        mqtt=MqttSettings(port=mqtt_port, tls_port=free_port(), tls_host="127.0.0.1"),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}"),
        postgres=PostgresSettings(dsn=SecretStr(dsn)),
        services=ServicesSettings(run_dir=run_dir),
    )


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Settings]:
    """Settings for private brokers on free ports; whatever `up` started is stopped."""
    settings = make_settings(tmp_path / "run", free_port(), free_port())
    yield settings
    services.down(settings, BROKERS)


def pid_of(state: ServiceState) -> int:
    """The pid in a `started` state's detail (`pid N, ...`)."""
    assert state.state == STARTED
    return int(state.detail.removeprefix("pid ").split(",")[0])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_up_status_down_private_brokers(private: Settings, tmp_path: Path) -> None:
    mqtt_addr = f"127.0.0.1:{private.mqtt.port}"
    kafka_addr = private.kafka.bootstrap_servers

    first = services.up(private, BROKERS)
    assert [(s.name, s.address, s.state) for s in first] == [
        ("kafka (tansu)", kafka_addr, STARTED),
        ("mqtt (mosquitto)", mqtt_addr, STARTED),
    ]
    tansu_pid, mosquitto_pid = pid_of(first[0]), pid_of(first[1])
    run_dir = private.services.run_dir
    assert (run_dir / "tansu.pid").read_text().strip() == str(tansu_pid)
    assert (run_dir / "mosquitto/mosquitto.pid").read_text().strip() == str(mosquitto_pid)
    assert services.kafka_answers("127.0.0.1", int(kafka_addr.rsplit(":", 1)[1]))
    assert services.mqtt_answers("127.0.0.1", private.mqtt.port)

    expected_running = [
        ("kafka (tansu)", kafka_addr, RUNNING_OURS.format(pid=tansu_pid)),
        ("mqtt (mosquitto)", mqtt_addr, RUNNING_OURS.format(pid=mosquitto_pid)),
    ]
    assert [(s.name, s.address, s.state) for s in services.status(private, BROKERS)] == (
        expected_running
    )
    # Idempotent: a second `up` finds both answering and starts nothing.
    assert [(s.name, s.address, s.state) for s in services.up(private, BROKERS)] == (
        expected_running
    )

    # Another run dir did not start them: it reports them and `down` leaves them alone.
    other = private.model_copy(
        update={"services": ServicesSettings(run_dir=tmp_path / "other-run")}
    )
    assert [s.state for s in services.status(other, BROKERS)] == [RUNNING_NOT_OURS] * 2
    left = services.down(other, BROKERS)
    assert [(s.state, s.detail) for s in left] == [
        (RUNNING_NOT_OURS, "left running: usagepipe did not start it")
    ] * 2
    assert alive(tansu_pid)
    assert alive(mosquitto_pid)

    stopped = services.down(private, BROKERS)
    assert [(s.name, s.state, s.detail) for s in stopped] == [
        ("kafka (tansu)", STOPPED, f"stopped pid {tansu_pid}"),
        ("mqtt (mosquitto)", STOPPED, f"stopped pid {mosquitto_pid}"),
    ]
    assert not alive(tansu_pid)
    assert not alive(mosquitto_pid)
    assert not (run_dir / "tansu.pid").exists()
    assert not (run_dir / "mosquitto/mosquitto.pid").exists()
    assert [s.state for s in services.status(private, BROKERS)] == [STOPPED, STOPPED]
    assert [(s.state, s.detail) for s in services.down(private, BROKERS)] == [
        (STOPPED, "was not running")
    ] * 2


def test_up_refuses_to_orphan_a_broker_after_a_port_change(private: Settings) -> None:
    [started] = services.up(private, ["mqtt"])
    pid = pid_of(started)
    moved = private.model_copy(update={"mqtt": MqttSettings(port=free_port())})
    with pytest.raises(ServiceError) as error:
        services.up(moved, ["mqtt"])
    assert f"already has a Mosquitto running (pid {pid}) on another port" in str(error.value)
    assert [s.state for s in services.status(private, ["mqtt"])] == [RUNNING_OURS.format(pid=pid)]


@pytest.fixture
def plain_listener() -> Iterator[int]:
    """A TCP listener that accepts connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_port_taken_by_plain_listener(tmp_path: Path, plain_listener: int) -> None:
    settings = make_settings(tmp_path / "run", plain_listener, plain_listener)
    holder = f"pid {os.getpid()} ("

    with pytest.raises(PortInUse) as mqtt_error:
        services.up(settings, ["mqtt"])
    message = str(mqtt_error.value)
    assert f"127.0.0.1:{plain_listener} is held by {holder}" in message
    assert "which does not answer MQTT" in message
    assert "USAGEPIPE_MQTT__PORT" in message

    with pytest.raises(PortInUse) as kafka_error:
        services.up(settings, ["kafka"])
    message = str(kafka_error.value)
    assert f"127.0.0.1:{plain_listener} is held by {holder}" in message
    assert "USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS" in message

    with pytest.raises(ServiceError) as both:
        services.up(settings, BROKERS)
    assert str(both.value).startswith("services up failed:\nkafka: ")
    assert "\nmqtt: " in str(both.value)
    assert both.value.states == []

    assert [s.state for s in services.status(settings, BROKERS)] == [PORT_TAKEN] * 2
    assert not (settings.services.run_dir / "tansu.pid").exists()
    assert not (settings.services.run_dir / "mosquitto/mosquitto.pid").exists()


def test_rendered_mosquitto_config(tmp_path: Path) -> None:
    tls = services.BrokerTls(18831, "0.0.0.0", tmp_path / "ca.crt", tmp_path / "s.crt",
                             tmp_path / "s.key", tmp_path / "crl.pem")  # fmt: skip
    text = services.render_mosquitto_config(18830, tmp_path, tls)
    lines = {line for line in text.splitlines() if line and not line.startswith("#")}
    assert "listener 18830 127.0.0.1" in lines
    tls_lines = text.split("listener 18831 0.0.0.0\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert tls_lines == [
        f"cafile {tmp_path.resolve()}/ca.crt",
        f"certfile {tmp_path.resolve()}/s.crt",
        f"keyfile {tmp_path.resolve()}/s.key",
        f"crlfile {tmp_path.resolve()}/crl.pem",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]
    assert "# (off: USAGEPIPE_MQTT__PASSWORD_TLS_PORT is unset)" in text
    with_passwords = services.BrokerTls(
        18831, "0.0.0.0", tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key",
        tmp_path / "crl.pem", password_port=18832,
    )  # fmt: skip
    text = services.render_mosquitto_config(18830, tmp_path, with_passwords)
    password_lines = text.split("listener 18832 0.0.0.0\n", 1)[1].split("\n\n", 1)[0]
    assert password_lines.splitlines() == [
        f"certfile {tmp_path.resolve()}/s.crt",
        f"keyfile {tmp_path.resolve()}/s.key",
        "tls_version tlsv1.2",
    ]
    assert f"persistence_location {tmp_path.resolve()}/mosquitto/data/" in lines
    assert f"pid_file {tmp_path.resolve()}/mosquitto/mosquitto.pid" in lines
    for option in (
        "persistence true",
        "autosave_on_changes true",
        "autosave_interval 10000",
        "persistent_client_expiration 7d",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "allow_anonymous false",
        f"plugin {services.dynsec_plugin_path()}",
        f"plugin_opt_config_file {tmp_path.resolve()}/mosquitto/dynamic-security.json",
        "set_tcp_nodelay true",
    ):
        assert option in lines
    assert "$" not in text


class Subscriber:
    """A persistent-session MQTT v5 subscriber that records payloads."""

    def __init__(self, port: int, client_id: str, topic: str, login: tuple[str, str]) -> None:
        self.port = port
        self.login = login
        self.client_id = client_id
        self.topic = topic
        self.payloads: list[bytes] = []
        self.session_present: bool | None = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        # One paho client per connection: a second loop_start() on the same client
        # leaks the first loop's socket pair.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: object,
        props: object,
    ) -> None:
        self.session_present = flags.session_present
        self.connected.set()

    def _on_subscribe(self, *args: object) -> None:
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.payloads.append(bytes(msg.payload))

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
        props.SessionExpiryInterval = 600
        self.connected.clear()
        self.client = self._new_client()
        self.client.username_pw_set(*self.login)
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_all(port: int, topic: str, count: int, login: tuple[str, str]) -> None:
    publisher = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex}", protocol=mqtt.MQTTv5
    )
    publisher.max_inflight_messages_set(200)
    publisher.max_queued_messages_set(0)
    publisher.username_pw_set(*login)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    try:
        infos = [publisher.publish(topic, str(i).encode(), qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
    finally:
        publisher.disconnect()
        publisher.loop_stop()


def test_mosquitto_queues_for_offline_persistent_session(private: Settings) -> None:
    """2,000 QoS 1 messages (twice Mosquitto's default queue) wait for an offline
    persistent session, across a broker restart, and all arrive exactly once."""
    services.up(private, ["mqtt"])
    port = private.mqtt.port
    logins = services.MosquittoBroker(port, private.services.run_dir).logins()
    assert logins is not None
    # The bridge's login may subscribe to prefixed telemetry and (on a local broker,
    # for tests) publish there too.
    login = (logins.bridge_username, logins.bridge_password)
    topic = f"t{uuid.uuid4().hex[:8]}/devices/dev-1/telemetry"
    subscriber = Subscriber(port, f"sub-{uuid.uuid4().hex}", topic, login)
    subscriber.connect()
    assert subscriber.session_present is False
    subscriber.client.subscribe(topic, qos=1)
    assert subscriber.subscribed.wait(10)
    subscriber.disconnect()

    publish_all(port, topic, 2000, login)

    # The session and its queue survive a stop/start (persistence, saved on SIGTERM).
    assert [s.state for s in services.down(private, ["mqtt"])] == [STOPPED]
    assert [s.state for s in services.up(private, ["mqtt"])] == [STARTED]

    subscriber.connect()
    try:
        assert subscriber.session_present is True
        deadline = time.monotonic() + 30
        while len(subscriber.payloads) < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # any duplicate would arrive now
    finally:
        subscriber.disconnect()
    assert sorted(int(p) for p in subscriber.payloads) == list(range(2000))


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def test_private_tansu_kill_and_restart(tmp_path: Path) -> None:
    """A test can run its own Tansu, crash it and bring it back; memory storage means
    the restarted broker has forgotten its topics."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = TansuBroker("127.0.0.1", port, tmp_path / "tansu.log")
    with broker:
        first_pid = broker.pid
        assert first_pid is not None
        await _create_topic(bootstrap, "services.restart")
        assert "services.restart" in await _topics(bootstrap)

        with pytest.raises(PortInUse, match=f"127.0.0.1:{port} is held by pid {first_pid}"):
            TansuBroker("127.0.0.1", port, tmp_path / "second.log").start()

        broker.kill()
        assert broker.pid is None
        assert not alive(first_pid)
        assert not services.kafka_answers("127.0.0.1", port)

        second_pid = broker.start()
        assert second_pid != first_pid
        assert services.kafka_answers("127.0.0.1", port)
        assert "services.restart" not in await _topics(bootstrap)
    assert not alive(second_pid)
    assert not services.port_open("127.0.0.1", port)


def test_postgres_reported_and_never_stopped(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "run", free_port(), free_port())
    [state] = services.status(settings, ["postgres"])
    assert (state.name, state.address, state.state) == (
        "postgres",
        "127.0.0.1:5432",
        RUNNING_NOT_OURS,
    )
    assert state.detail.startswith("PostgreSQL ")
    [left] = services.down(settings, ["postgres"])
    assert (left.state, left.detail) == (
        RUNNING_NOT_OURS,
        "left running: usagepipe never stops the machine's PostgreSQL",
    )
    assert services.port_open("127.0.0.1", 5432)


async def _database_exists(name: str) -> bool:
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        return bool(found == 1)
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


def test_up_creates_missing_database(tmp_path: Path) -> None:
    name = f"usagepipe_services_{uuid.uuid4().hex[:12]}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    settings = make_settings(tmp_path / "run", free_port(), free_port(), dsn)
    try:
        [before] = services.status(settings, ["postgres"])
        assert before.detail == f"database {name} is missing (`services up` creates it)"
        [state] = services.up(settings, ["postgres"])
        assert (state.state, state.detail) == (RUNNING_NOT_OURS, f"created database {name}")
        assert asyncio.run(_database_exists(name))
        [again] = services.up(settings, ["postgres"])
        assert again.detail.endswith(f", database {name}")
    finally:
        asyncio.run(_drop_database(name))


def test_postgres_refusal_is_explained(tmp_path: Path) -> None:
    dsn = "postgresql://usagepipe_no_such_role@127.0.0.1:5432/test"
    settings = make_settings(tmp_path / "run", free_port(), free_port(), dsn)
    with pytest.raises(ServiceError) as error:
        services.up(settings, ["postgres"])
    message = str(error.value)
    assert message.startswith("PostgreSQL on 127.0.0.1:5432 refused user usagepipe_no_such_role: ")
    assert message.endswith("set USAGEPIPE_POSTGRES__DSN to credentials it accepts")
    # `status` shows the same reason in the table instead of failing.
    [state] = services.status(settings, ["postgres"])
    assert state.state == RUNNING_NOT_OURS
    assert state.detail == f"not usable: {message}"


def test_format_table() -> None:
    table = services.format_table(
        [
            ServiceState("kafka (tansu)", "127.0.0.1:9092", RUNNING_NOT_OURS, "pid 7"),
            ServiceState("mqtt (mosquitto)", "127.0.0.1:1884", STOPPED),
        ]
    )
    assert table == (
        "SERVICE           ADDRESS         STATE               DETAIL\n"
        "kafka (tansu)     127.0.0.1:9092  running (not ours)  pid 7\n"
        "mqtt (mosquitto)  127.0.0.1:1884  stopped\n"
    )


def test_the_local_ca_and_revocation_list_fill_unset_registry_settings(tmp_path: Path) -> None:
    """What `services up` made in the run dir is what the CLI's registry uses, unless
    the settings name their own files (as production does)."""
    settings = make_settings(tmp_path, free_port(), free_port())
    assert services.with_broker_logins(settings).registry == settings.registry  # nothing yet
    broker = services.MosquittoBroker.of(settings)
    broker.prepare_tls()
    filled = services.with_broker_logins(settings).registry
    ca_cert, ca_key = services.local_ca_files(tmp_path)
    assert (filled.ca_cert_file, filled.ca_key_file) == (ca_cert, ca_key)
    assert (filled.crl_file, filled.broker_pid_file) == (broker.crl_file, broker.pid_path)
    own = settings.registry.model_copy(
        update={"crl_file": tmp_path / "elsewhere.pem", "ca_cert_file": tmp_path / "x.crt"}
    )
    kept = services.with_broker_logins(settings.model_copy(update={"registry": own})).registry
    assert (kept.crl_file, kept.broker_pid_file) == (tmp_path / "elsewhere.pem", None)
    assert (kept.ca_cert_file, kept.ca_key_file) == (tmp_path / "x.crt", None)
