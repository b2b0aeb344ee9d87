"""The consumer's per-record log lines carry the device, partition and offset as fields
of their own (what `USAGEPIPE_LOG__FORMAT=json` writes out, `usagepipe.cli.logs`)."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.metrics import ConsumerMetrics
from ingest.settings import Settings
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.pipeline import produce_at


async def test_a_dead_letter_is_logged_with_its_device_partition_and_offset(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    plan = FleetPlan(devices=1, messages_per_device=3, seed=5)
    (device,) = device_ids(plan)
    good = [m.payload for m in plan_device(plan, device, settings.mqtt.topic_prefix)]
    payloads = [good[0], b'{"truncated": ', good[1]]
    now = time.time_ns() // 1_000_000
    await produce_at(settings, device, payloads, [now] * 3)
    caplog.set_level(logging.DEBUG, logger="ingest.consumer")
    consumer = Consumer(settings, ConsumerMetrics(CollectorRegistry()), stop_after=3)
    report = await consumer.run()
    assert (report.stored, report.dead_lettered) == (2, 1)
    (line,) = [r for r in caplog.records if r.getMessage().startswith("dead letter (")]
    fields = {k: line.__dict__[k] for k in ("device_id", "partition", "offset", "reason")}
    assert fields == {
        "device_id": device,
        "partition": fields["partition"],
        "offset": 1,
        "reason": "invalid_json",
    }
    assert isinstance(fields["partition"], int)
