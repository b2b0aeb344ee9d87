"""The demo's dataset is planner-ready: played in full, every one of the eight reports
shows unsuppressed segments at the default k = 10, marketing-usable ones included.

The plan is `simulators.cli.demo_plan()` with its defaults, the very function and
defaults `usagepipe demo` plays (1,200 appliances, the 28 days up to now, 2 % sent
twice), not a scaled copy: k-anonymity is about how many owners a segment has, which
a smaller fleet would not show. What the test leaves out is only transport: no MQTT
(broker and bridge forward bytes unchanged; `tests/simulators/test_history_pipeline.py` runs a fleet
through them), so the units' broker accounts are collected, not made, and every
planned payload, duplicates included, goes straight to the test's raw topic. From
there it is the demo's own path: the real consumer validates, enriches from the
registry the fleet was provisioned in (with each unit's history) and stores; then
`usagepipe.demo.report_coverage`, which the demo prints, materialises the rollups and
runs every report over the default range. About a minute on a 2-core machine.
"""

from __future__ import annotations

import asyncio

import asyncpg
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.settings import Settings
from insights.reports import REPORTS
from simulators.cli import DEMO_DEVICES, DEMO_WINDOW, demo_plan
from simulators.plan import FleetPlan, plan_device
from simulators.provision import CollectedAccounts, open_registry, provision
from simulators.units import device_ids
from usagepipe.demo import report_coverage


async def produce_plan(settings: Settings, plan: FleetPlan) -> tuple[int, int]:
    """Every message of `plan` (duplicates too) to the raw topic, keyed by device as the
    bridge keys them; returns (records, unique keys)."""
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    producer = make_producer(settings.kafka, client_id="test-demo-dataset")
    await producer.start()
    sent, keys = 0, 0
    try:
        for device in device_ids(plan):
            key = device.encode()
            for msg in plan_device(plan, device, settings.mqtt.topic_prefix):
                await producer.send(settings.kafka.raw_topic, msg.payload, key=key)
                sent += 1
                keys += not msg.duplicate
        await producer.flush()
    finally:
        await producer.stop()
    return sent, keys


async def test_the_demos_dataset_gives_every_report_unsuppressed_segments_at_k_10(
    settings: Settings,
) -> None:
    plan = demo_plan(run_id="dataset", settings=settings)
    assert (plan.devices, plan.window, plan.usage) == (DEMO_DEVICES, DEMO_WINDOW, True)
    assert settings.insights.k_anonymity == 10
    try:
        await check_dataset(settings, plan)
    finally:
        # The devices have no broker accounts of this test's making (collected), but
        # their ids are the demo's: the cleanup must not delete a running demo's.
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {settings.registry.db_schema} CASCADE")
        finally:
            await conn.close()


async def check_dataset(settings: Settings, plan: FleetPlan) -> None:
    await ensure_topics(settings.kafka, settings.registry.events_topic)
    async with open_registry(settings, broker=CollectedAccounts()) as registry:
        fleet = await provision(registry, plan)
    assert fleet.registered == DEMO_DEVICES and fleet.transferred > 0

    sent, unique = await produce_plan(settings, plan)
    consumer = Consumer(settings, ConsumerMetrics(CollectorRegistry()), stop_after=sent)
    done = await asyncio.wait_for(consumer.run(), 90)
    assert (done.stored, done.duplicates, done.dead_lettered) == (unique, sent - unique, 0)

    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        unknown = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE purchase_channel IS NULL) AS channel,"
            " count(*) FILTER (WHERE firmware IS NULL) AS firmware"
            f" FROM {settings.postgres.table}"
        )
    finally:
        await conn.close()
    # Every event fell in an ownership period, and every device's firmware was known.
    assert unknown is not None and dict(unknown) == {"channel": 0, "firmware": 0}

    coverage = {c.report: c for c in await report_coverage(settings)}
    assert {name.split()[0] for name in coverage} == set(REPORTS)
    empty = {name: (c.shown, c.segments) for name, c in coverage.items() if c.shown == 0}
    assert empty == {}
    assert {name for name, c in coverage.items() if c.marketing} == {
        "regions",
        "adoption",
        "cohorts --by channel",
        "cohorts --by tier",
    }
