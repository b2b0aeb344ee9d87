"""Fixtures shared by the integration tests: real servers, per-test names.

The servers (Mosquitto on 1884, Tansu on 9092, PostgreSQL on 5432) are brought up once
per session by `usagepipe services up`'s own code, which starts only what is missing.
Each test gets its own MQTT topic prefix, Kafka topics, consumer group, bridge client
id, usage table and registry schema, so tests never see each other's data. Mosquitto
lets in only registered devices: `tests.pipeline.publish` registers the fleet in the
test's registry schema first, and `cleanup` deletes those devices' broker accounts.
The bridge and the registry log in with the local broker's logins (`base_settings`).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Iterator

import asyncpg
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import SecretStr

from ingest.settings import (
    BridgeSettings,
    ConsumerSettings,
    EnrichSettings,
    KafkaSettings,
    MqttSettings,
    PostgresSettings,
    Settings,
    SimulatorSettings,
)
from ingest.tables import drop_usage_tables
from usagepipe import services


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """The environment's settings, with the local broker's bridge and admin logins
    (from `<run_dir>/mosquitto/credentials.json`, which `services up` writes)."""
    settings = Settings()
    services.up(settings)
    return services.with_broker_logins(settings)


@pytest.fixture(scope="session", autouse=True)
def running_services(base_settings: Settings) -> None:
    """Start whatever of the three servers is not running (idempotent)."""
    services.up(base_settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


TEST_OWNER_KEY = "tests-only-owner-key-secret-0123456789abcdef"


def isolated(base: Settings, name: str, **kafka: object) -> Settings:
    """`base` with every name a test could share replaced by one of its own."""
    return Settings(
        mqtt=MqttSettings(**{**base.mqtt.model_dump(), "topic_prefix": f"{name}/"}),
        kafka=KafkaSettings(
            **{
                **base.kafka.model_dump(),
                "raw_topic": f"{name}.raw",
                "dlq_topic": f"{name}.dlq",
                "partitions": 3,
                "session_timeout_ms": 6000,
                "request_timeout_ms": 10000,
                **kafka,
            }
        ),
        bridge=BridgeSettings(client_id=f"{name}-bridge", metrics_port=0, max_inflight=2000),
        consumer=ConsumerSettings(group_id=f"{name}-group", metrics_port=0, batch_wait_ms=50),
        # Tests of other stages publish hand-made device ids the registry does not know;
        # tests/ingest/test_enrich.py sets unregistered="dead_letter", the production default.
        enrich=EnrichSettings(owner_key_secret=SecretStr(TEST_OWNER_KEY), unregistered="store"),
        postgres=PostgresSettings(dsn=base.postgres.dsn, table=f"usage_{name}"),
        simulator=SimulatorSettings(metrics_port=0),
        services=base.services,
        registry=base.registry.model_copy(
            update={"db_schema": f"reg_{name}", "events_topic": f"{name}.registry"}
        ),
    )


@pytest.fixture
def test_name() -> str:
    return "t" + secrets.token_hex(5)


@pytest.fixture
async def settings(base_settings: Settings, test_name: str) -> AsyncIterator[Settings]:
    """The test's own settings, its registry schema migrated: what `usagepipe consume`
    does before it starts a consumer, and the tests start consumers directly."""
    from devices.schema import migrate_registry_at

    s = isolated(base_settings, test_name)
    await migrate_registry_at(s.postgres.dsn.get_secret_value(), s.registry.db_schema)
    yield s
    await cleanup(s)


async def require_timescaledb(s: Settings) -> None:
    """Skip the calling test unless `CREATE EXTENSION timescaledb` works on the server."""
    conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except asyncpg.PostgresError as exc:
        pytest.skip(f"TimescaleDB is not available on this server: {exc}")
    finally:
        await conn.close()


async def cleanup(s: Settings) -> None:
    """Drop the test's usage tables and end the bridge's persistent session on the broker."""
    t = s.postgres.table
    conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
    try:
        await drop_usage_tables(conn, t)
    finally:
        await conn.close()
    await drop_registry(s)
    drop_mqtt_session(s.mqtt, s.bridge.client_id)


async def drop_registry(s: Settings) -> None:
    """Delete the broker accounts of the test's registered devices, then its registry schema."""
    from devices.errors import RegistryUnavailable
    from devices.mosquitto import DynsecAccounts

    schema = s.registry.db_schema
    conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
    try:
        devices: list[str] = []
        if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.devices") is not None:
            devices = [
                r["device_id"] for r in await conn.fetch(f"SELECT device_id FROM {schema}.devices")
            ]
        if devices:
            # A private broker the test already stopped takes its accounts with it.
            with contextlib.suppress(RegistryUnavailable):
                async with DynsecAccounts(s.mqtt) as accounts:
                    await accounts.revoke_devices(devices)
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def on_broker(s: Settings, broker: services.MosquittoBroker) -> Settings:
    """`s` pointed at a private broker: its port, and the logins its first start made."""
    return s.model_copy(update={"mqtt": broker.mqtt_settings(s.mqtt)})


def drop_mqtt_session(mqtt: MqttSettings, client_id: str) -> None:
    """Connect with clean start and no session expiry: the broker forgets the session."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    if mqtt.username is not None and mqtt.password is not None:
        client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
    try:
        client.connect(mqtt.host, mqtt.port, clean_start=True)
    except ConnectionRefusedError:
        return  # a private broker the test stopped: its sessions go with its run dir
    client.loop_start()
    client.disconnect()
    client.loop_stop()


@contextlib.asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain PostgreSQL connection, closed afterwards."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def own_schema(dsn: str, prefix: str) -> AsyncIterator[str]:
    """A schema name of a test's own; the schema and all in it are dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    yield name
    async with connection(dsn) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def tansu_port() -> Iterator[int]:
    yield free_port()
