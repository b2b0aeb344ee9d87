"""A bridge or consumer started before its servers waits for them, with a log line a
try, instead of exiting; a login the broker refuses is not waited on; a stop asked for
meanwhile ends the wait. The servers "come up" when a forwarder to the real one starts
listening on the port the service was given."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from ingest.bridge import Bridge
from ingest.consumer import Consumer
from ingest.errors import ConfigurationError
from ingest.metrics import BridgeMetrics, ConsumerMetrics
from ingest.mqtt import LoginRefused
from ingest.settings import Settings
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.conftest import free_port
from tests.pipeline import produce_at, stored_keys, wait_for
from tests.proxy import Forwarder


def with_dsn_port(settings: Settings, port: int) -> tuple[Settings, int]:
    """`settings` with PostgreSQL at `port`; and the real server's port."""
    url = urlsplit(settings.postgres.dsn.get_secret_value())
    real = url.port or 5432
    moved = url._replace(netloc=url.netloc.replace(f":{real}", f":{port}"))
    postgres = settings.postgres.model_copy(update={"dsn": SecretStr(urlunsplit(moved))})
    return settings.model_copy(update={"postgres": postgres}), real


def start_tries(metrics: CollectorRegistry, stage: str) -> float:
    """How often `stage` (bridge, consumer) tried to start and could not."""
    value = metrics.get_sample_value(f"usagepipe_{stage}_errors_total", {"kind": "start"})
    return value or 0.0


async def test_a_consumer_started_before_postgresql_waits_for_it(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    moved, real = with_dsn_port(settings, port)
    plan = FleetPlan(devices=1, messages_per_device=5, seed=66)
    (device,) = device_ids(plan)
    messages = plan_device(plan, device, settings.mqtt.topic_prefix)
    await produce_at(settings, device, [m.payload for m in messages], [time.time_ns() // 10**6] * 5)

    metrics = CollectorRegistry()
    consumer = Consumer(moved, ConsumerMetrics(metrics), client_id="startup")
    caplog.set_level(logging.WARNING, logger="ingest.consumer")
    task = asyncio.create_task(consumer.run())
    async with Forwarder(port, real) as postgres:
        await wait_for(lambda: start_tries(metrics, "consumer") >= 2, "two tries at start")
        assert not task.done()
        await postgres.start()
        await wait_for(lambda: consumer.report.stored == 5, "the 5 records stored")
        consumer.stop()
        await task
    assert sorted(await stored_keys(settings)) == sorted(m.key for m in messages)
    waits = [r.getMessage() for r in caplog.records if "cannot start yet" in r.getMessage()]
    assert len(waits) >= 2
    assert waits[:2] == [
        f"consumer cannot start yet (PostgreSQL unreachable: [Errno 111] Connect call failed"
        f" ('127.0.0.1', {port})); retrying in {delay}s"
        for delay in (0.1, 0.2)
    ]


async def test_a_bridge_started_before_kafka_waits_for_it(settings: Settings) -> None:
    port = free_port()
    real = int(settings.kafka.bootstrap_servers.rsplit(":", 1)[1])
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}"})
    metrics = CollectorRegistry()
    bridge = Bridge(settings.model_copy(update={"kafka": kafka}), BridgeMetrics(metrics))
    task = asyncio.create_task(bridge.run())
    async with Forwarder(port, real) as broker:
        await wait_for(lambda: start_tries(metrics, "bridge") >= 1, "a try at start")
        assert not bridge.ready.is_set()
        await broker.start()
        async with asyncio.timeout(60):
            await bridge.ready.wait()
        bridge.stop("test over")
        await task


async def test_a_stop_while_waiting_ends_the_wait(settings: Settings) -> None:
    moved, _ = with_dsn_port(settings, free_port())
    metrics = CollectorRegistry()
    consumer = Consumer(moved, ConsumerMetrics(metrics), client_id="startup-stop")
    task = asyncio.create_task(consumer.run())
    await wait_for(lambda: start_tries(metrics, "consumer") >= 1, "a try at start")
    consumer.stop("test over")
    async with asyncio.timeout(10):
        report = await task
    assert (report.stopped_by, report.consumed) == ("test over", 0)


async def test_a_bridge_whose_login_is_refused_does_not_wait(settings: Settings) -> None:
    mqtt = settings.mqtt.model_copy(update={"password": SecretStr("not-the-password")})
    bridge = Bridge(settings.model_copy(update={"mqtt": mqtt}), BridgeMetrics(CollectorRegistry()))
    async with asyncio.timeout(30):
        with pytest.raises(ConfigurationError) as refused:
            await bridge.run()
    assert isinstance(refused.value.__cause__, LoginRefused)
    assert str(refused.value).startswith(
        f"MQTT broker refused {settings.bridge.client_id}: Not authorized (are "
    )
