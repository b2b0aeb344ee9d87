"""Each service on its own: stopping after N, SIGTERM, metrics, settings, the README."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from ingest.bridge import Bridge, device_id_from_topic
from ingest.metrics import BridgeMetrics, serve_metrics
from ingest.settings import KafkaSettings, PostgresSettings, Settings, markdown_table
from simulators.plan import FleetPlan
from tests.conftest import free_port
from tests.pipeline import expected_keys, publish, stored_keys, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"


async def test_bridge_stops_after_n_and_the_session_keeps_the_rest(settings: Settings) -> None:
    """A bridge that stops after 50 of 80 messages leaves 30 in its persistent session;
    the next run under the same client id forwards exactly those."""
    plan = FleetPlan(devices=4, messages_per_device=20, seed=21)
    first = Bridge(settings, BridgeMetrics(CollectorRegistry()), stop_after=50)
    run = asyncio.create_task(first.run(), name="first-bridge")
    await asyncio.wait_for(first.ready.wait(), 30)
    await publish(settings, plan)
    report = await asyncio.wait_for(run, 60)
    assert (report.acked, report.stopped_by) == (50, "after 50 messages")

    second = Bridge(settings, BridgeMetrics(CollectorRegistry()), stop_after=30)
    report2 = await asyncio.wait_for(second.run(), 60)
    assert report2.acked == 30
    assert report.received + report2.received >= 80


@pytest.mark.parametrize("command", ["bridge", "consume"])
async def test_service_process_stops_cleanly_on_sigterm(settings: Settings, command: str) -> None:
    port = free_port()
    section = "BRIDGE" if command == "bridge" else "CONSUMER"
    env = {
        **os.environ,
        "USAGEPIPE_MQTT__TOPIC_PREFIX": settings.mqtt.topic_prefix,
        "USAGEPIPE_KAFKA__RAW_TOPIC": settings.kafka.raw_topic,
        "USAGEPIPE_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
        "USAGEPIPE_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "USAGEPIPE_BRIDGE__CLIENT_ID": settings.bridge.client_id,
        "USAGEPIPE_CONSUMER__GROUP_ID": settings.consumer.group_id,
        "USAGEPIPE_POSTGRES__TABLE": settings.postgres.table,
        f"USAGEPIPE_{section}__METRICS_PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "usagepipe",
        command,
        "--duration",
        "120",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_for(lambda: _scrape(port) is not None, f"{command} metrics", 30)
        await asyncio.sleep(1.0)  # let it finish starting up: stop must work mid-run
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "stopped (signal SIGTERM)" in text
    assert re.search(rf"^{'bridge' if command == 'bridge' else 'consumer'}: 0 ", text, re.M)


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            body: str = resp.read().decode()
            return body
    except OSError:
        return None


async def test_pipeline_metrics_are_served(settings: Settings) -> None:
    registry = CollectorRegistry()
    metrics = BridgeMetrics(registry)
    port = free_port()
    with serve_metrics(registry, port):
        bridge = Bridge(settings, metrics, stop_after=12)
        run = asyncio.create_task(bridge.run(), name="metrics-bridge")
        await asyncio.wait_for(bridge.ready.wait(), 30)
        await publish(settings, FleetPlan(devices=3, messages_per_device=4, seed=2))
        await asyncio.wait_for(run, 60)
        text = await asyncio.to_thread(_scrape, port)
    assert text is not None
    assert "usagepipe_bridge_received_total 12.0" in text
    assert "usagepipe_bridge_acked_total 12.0" in text
    assert "usagepipe_bridge_inflight_messages 0.0" in text


async def test_consumer_stops_after_n_records(settings: Settings) -> None:
    from ingest.consumer import Consumer
    from ingest.metrics import ConsumerMetrics
    from tests.pipeline import pipeline

    plan = FleetPlan(devices=2, messages_per_device=10, seed=4)
    async with pipeline(settings) as running:
        await publish(settings, plan)
        await wait_for(lambda: running.consumer.report.stored == 20, "20 rows")
    assert sorted(await stored_keys(settings)) == sorted(expected_keys(settings, plan))
    again = Consumer(settings, ConsumerMetrics(CollectorRegistry()), stop_after_s=0.5)
    report = await asyncio.wait_for(again.run(), 60)
    assert (report.consumed, report.stopped_by) == (0, "after 0.5s")


def test_topic_to_device_id() -> None:
    assert device_id_from_topic("devices/wm-1/telemetry", "") == "wm-1"
    assert device_id_from_topic("t1/devices/wm-1/telemetry", "t1/") == "wm-1"
    assert device_id_from_topic("devices/wm-1/status", "") is None
    assert device_id_from_topic("devices//telemetry", "") is None
    assert device_id_from_topic("devices/a/b/telemetry", "") is None
    assert device_id_from_topic("other/devices/wm-1/telemetry", "t1/") is None


def test_unsafe_kafka_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="acks"):
        KafkaSettings(acks="1")
    with pytest.raises(ValidationError, match="not a plain lower-case SQL identifier"):
        PostgresSettings(table="usage; drop table x")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("USAGEPIPE_BRIDGE__MAX_INFLIGHT", "500")
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert s.bridge.max_inflight == 500
    monkeypatch.setenv("USAGEPIPE_BRIDGE__MAX_INFLIGHT", "70000")
    with pytest.raises(ValidationError, match="max_inflight"):
        Settings()


def test_readme_lists_every_setting() -> None:
    text = README.read_text()
    start = text.index("<!-- settings:begin -->\n") + len("<!-- settings:begin -->\n")
    end = text.index("<!-- settings:end -->")
    assert text[start:end] == markdown_table(), (
        "README.md's settings table is out of date: replace the lines between the "
        "settings markers with the output of `usagepipe settings --markdown`"
    )


async def test_bridge_rides_out_a_broker_restart(
    base_settings: Settings, test_name: str, tmp_path: Path
) -> None:
    """Mosquitto restarts mid-stream: the bridge reconnects to its persistent session
    (kept on disk by the broker) and every message is stored once."""
    from tests.conftest import cleanup, isolated, on_broker
    from tests.pipeline import pipeline
    from usagepipe.services import MosquittoBroker

    broker = MosquittoBroker(free_port(), tmp_path)
    broker.start()
    s = isolated(base_settings, test_name)
    s = on_broker(s, broker)  # its port and its own logins
    before = FleetPlan(devices=4, messages_per_device=15, seed=8, run_id="before")
    after = FleetPlan(devices=4, messages_per_device=15, seed=8, run_id="after")
    try:
        async with pipeline(s) as run:
            await publish(s, before)
            await wait_for(lambda: run.consumer.report.stored == 60, "the first 60 rows")
            broker.stop()
            await wait_for(lambda: not run.bridge.connected, "the bridge to notice", 30)
            broker.start()
            await wait_for(lambda: run.bridge.connected, "the bridge to reconnect", 30)
            await publish(s, after)
            await wait_for(lambda: run.consumer.report.stored == 120, "all 120 rows")
        assert sorted(await stored_keys(s)) == sorted(
            expected_keys(s, before) | expected_keys(s, after)
        )
    finally:
        broker.stop()
        await cleanup(s)


def test_dormancy_policy_has_its_short_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGEPIPE_DORMANCY_DAYS", "30")
    assert Settings().registry.dormancy_days == 30
    monkeypatch.setenv("USAGEPIPE_REGISTRY__DORMANCY_DAYS", "90")
    assert Settings().registry.dormancy_days == 90  # the full name wins
    monkeypatch.setenv("USAGEPIPE_REGISTRY__DORMANCY_DAYS", "0")
    with pytest.raises(ValidationError, match="dormancy_days"):
        Settings()
