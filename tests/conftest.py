"""Fixtures shared by the integration tests: real servers, per-test names.

The servers (Mosquitto on 1884, Tansu on 9092, PostgreSQL on 5432) are brought up once
per session by `usagepipe services up`'s own code, which starts only what is missing.
Each test gets its own MQTT topic prefix, Kafka topics, consumer group, bridge client
id and usage table, so tests never see each other's data.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator, Iterator

import asyncpg
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest import services
from ingest.settings import (
    BridgeSettings,
    ConsumerSettings,
    KafkaSettings,
    MqttSettings,
    PostgresSettings,
    Settings,
    SimulatorSettings,
)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session", autouse=True)
def running_services(base_settings: Settings) -> None:
    """Start whatever of the three servers is not running (idempotent)."""
    services.up(base_settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
        postgres=PostgresSettings(dsn=base.postgres.dsn, table=f"usage_{name}"),
        simulator=SimulatorSettings(metrics_port=0),
        services=base.services,
        registry=base.registry,
    )


@pytest.fixture
def test_name() -> str:
    return "t" + secrets.token_hex(5)


@pytest.fixture
async def settings(base_settings: Settings, test_name: str) -> AsyncIterator[Settings]:
    s = isolated(base_settings, test_name)
    yield s
    await cleanup(s)


async def cleanup(s: Settings) -> None:
    """Drop the test's table and end the bridge's persistent session on the broker."""
    conn = await asyncpg.connect(s.postgres.dsn.get_secret_value())
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {s.postgres.table}")
    finally:
        await conn.close()
    drop_mqtt_session(s.mqtt, s.bridge.client_id)


def drop_mqtt_session(mqtt: MqttSettings, client_id: str) -> None:
    """Connect with clean start and no session expiry: the broker forgets the session."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.connect(mqtt.host, mqtt.port, clean_start=True)
    client.loop_start()
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def tansu_port() -> Iterator[int]:
    yield free_port()
