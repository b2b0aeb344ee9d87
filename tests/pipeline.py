"""Running the pipeline inside a test: bridge and consumer as tasks, plus waiting helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry

from ingest.bridge import Bridge
from ingest.consumer import Consumer
from ingest.metrics import BridgeMetrics, ConsumerMetrics, SimulatorMetrics
from ingest.settings import Settings
from simulators.fleet import Fleet, FleetPlan, FleetReport, device_ids, plan_device


@dataclass
class Running:
    bridge: Bridge
    consumer: Consumer


@contextlib.asynccontextmanager
async def pipeline(settings: Settings) -> AsyncIterator[Running]:
    """Bridge and consumer running until the block ends, then stopped cleanly."""
    bridge = Bridge(settings, BridgeMetrics(CollectorRegistry()))
    consumer = Consumer(settings, ConsumerMetrics(CollectorRegistry()))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(bridge.run(), name="test-bridge")
        tasks.create_task(consumer.run(), name="test-consumer")
        try:
            async with asyncio.timeout(30):
                await bridge.ready.wait()
            yield Running(bridge, consumer)
        finally:
            bridge.stop("test over")
            consumer.stop("test over")


async def publish(settings: Settings, plan: FleetPlan) -> FleetReport:
    return await Fleet(settings.mqtt, plan, SimulatorMetrics(CollectorRegistry())).run()


def expected_keys(settings: Settings, plan: FleetPlan) -> set[tuple[str, str, int]]:
    prefix = settings.mqtt.topic_prefix
    return {m.key for d in device_ids(plan) for m in plan_device(plan, d, prefix)}


async def stored_keys(settings: Settings) -> list[tuple[str, str, int]]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(f"SELECT device_id, boot_id, seq FROM {settings.postgres.table}")
    finally:
        await conn.close()
    return [(r["device_id"], r["boot_id"], r["seq"]) for r in rows]


async def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.05)
