"""`usagepipe demo` as a user runs it, real processes on the real servers: beside a
bridge and a consumer left running by hand (the configured client id, group and
metrics ports), it runs its own under names of its own, says what it found, stores
every unique message once and leaves the running ones running."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import urllib.request
from asyncio.subprocess import Process

from ingest.settings import Settings
from tests.conftest import TEST_OWNER_KEY, drop_mqtt_session, free_port
from tests.pipeline import wait_for


def environment(settings: Settings, bridge_port: int, consumer_port: int) -> dict[str, str]:
    """The test's isolated settings as the variables a user would export."""
    return {
        **os.environ,
        "USAGEPIPE_MQTT__TOPIC_PREFIX": settings.mqtt.topic_prefix,
        "USAGEPIPE_KAFKA__RAW_TOPIC": settings.kafka.raw_topic,
        "USAGEPIPE_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
        "USAGEPIPE_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "USAGEPIPE_POSTGRES__TABLE": settings.postgres.table,
        "USAGEPIPE_REGISTRY__DB_SCHEMA": settings.registry.db_schema,
        "USAGEPIPE_REGISTRY__EVENTS_TOPIC": settings.registry.events_topic,
        "USAGEPIPE_BRIDGE__CLIENT_ID": settings.bridge.client_id,
        "USAGEPIPE_CONSUMER__GROUP_ID": settings.consumer.group_id,
        "USAGEPIPE_CONSUMER__BATCH_WAIT_MS": "50",
        "USAGEPIPE_BRIDGE__METRICS_PORT": str(bridge_port),
        "USAGEPIPE_CONSUMER__METRICS_PORT": str(consumer_port),
        "USAGEPIPE_SIMULATOR__METRICS_PORT": "0",
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET": TEST_OWNER_KEY,
    }


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text: str = resp.read().decode()
            return text
    except OSError:
        return ""


async def start(command: str, env: dict[str, str]) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "usagepipe", command, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def stop(proc: Process) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return out.decode()


async def test_the_demo_beside_a_hand_run_bridge_and_consumer_uses_names_of_its_own(
    settings: Settings,
) -> None:
    bridge_port, consumer_port = free_port(), free_port()
    env = environment(settings, bridge_port, consumer_port)
    bridge = await start("bridge", env)
    consumer = await start("consume", env)
    try:
        await wait_for(
            lambda: "usagepipe_bridge_subscribed 1.0" in scrape(bridge_port), "the bridge", 30
        )
        await wait_for(lambda: "usagepipe_consumer_" in scrape(consumer_port), "the consumer", 30)

        # A seed of its own: the fleet's devices are nobody else's on the shared broker.
        seed = str(1000 + secrets.randbelow(10**6))
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "usagepipe", "--log-level", "WARNING", "demo",
            "--devices", "12", "--window", "1d", "--seed", seed, "--timeout", "90",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(demo.communicate(), 110)
        text = " ".join(out.decode().split())  # rich wraps lines at 80 columns
        assert demo.returncode == 0, text
        assert "OK: every unique message stored once" in text
        assert f"note: a bridge is already running (metrics on 127.0.0.1:{bridge_port}" in text
        assert f"note: a consumer is already running (metrics on 127.0.0.1:{consumer_port}" in text
        assert f"bridge (client id {settings.bridge.client_id}-demo)" in text
        assert f"consumer (group {settings.consumer.group_id}-demo)" in text
        assert "What a planner does next:" in text
        assert "insights serve then open the address it prints (signed in as a planner)" in text

        # The hand-run pair still runs, never thrown out: its session was not taken over.
        assert bridge.returncode is None and consumer.returncode is None
        assert "usagepipe_bridge_subscribed 1.0" in scrape(bridge_port)
        forwarded = [line for line in scrape(bridge_port).splitlines()
                     if line.startswith("usagepipe_bridge_acked_total ")]  # fmt: skip
        assert forwarded and float(forwarded[0].split()[1]) > 0  # the demo's messages too
    finally:
        bridge_out, consumer_out = await stop(bridge), await stop(consumer)
        drop_mqtt_session(settings.mqtt, f"{settings.bridge.client_id}-demo")
    assert "stopped (signal SIGTERM)" in bridge_out, bridge_out
    assert "stopped (signal SIGTERM)" in consumer_out, consumer_out
