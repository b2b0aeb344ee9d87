"""The bridge's intake checks: oversize and device_id_mismatch are dead-lettered at the
bridge, with their MQTT topic as the source, and nothing else is held up by them."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import CollectorRegistry

from ingest.bridge import check_payload, device_id_from_payload
from ingest.dead_letter import DeadLetterReader
from ingest.settings import Settings
from schemas.errors import InvalidTelemetry, Reason
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.pipeline import pipeline, publish_payloads, read_to_end, stored_keys, wait_for


async def test_oversize_and_mismatch_are_dead_lettered_between_stored_messages(
    settings: Settings,
) -> None:
    plan = FleetPlan(devices=2, messages_per_device=6, seed=41)
    device, other_device = device_ids(plan)
    good = plan_device(plan, device, settings.mqtt.topic_prefix)
    topic = good[0].topic
    # Valid JSON, and otherwise a valid message: only its size is wrong.
    oversize = good[0].payload + b" " * settings.bridge.max_payload_bytes
    # A valid message of another device, published on this device's topic.
    other = plan_device(plan, other_device, settings.mqtt.topic_prefix)[0].payload
    sequence = [m.payload for m in good[:3]] + [oversize, other] + [m.payload for m in good[3:]]

    registry = CollectorRegistry()
    async with pipeline(settings, registry) as run:
        await publish_payloads(settings, device, topic, sequence)
        await wait_for(lambda: run.consumer.report.stored == 6, "the 6 good messages")
        await wait_for(lambda: run.bridge.report.acked == 8, "8 PUBACKs")

    assert sorted(await stored_keys(settings)) == sorted(m.key for m in good)
    async with DeadLetterReader(settings.kafka) as reader:
        letters = [stored.letter async for stored in reader]
    assert len(letters) == 2
    by_reason = {letter.reason: letter for letter in letters if letter is not None}
    assert set(by_reason) == {Reason.OVERSIZE, Reason.DEVICE_ID_MISMATCH}
    for letter in by_reason.values():
        assert letter.kind == "mqtt"
        assert (letter.topic, letter.partition, letter.offset) == (topic, None, None)
        assert letter.key == device.encode()
    assert by_reason[Reason.OVERSIZE].original == oversize
    assert by_reason[Reason.OVERSIZE].message == (
        f"payload is {len(oversize)} bytes, more than the "
        f"{settings.bridge.max_payload_bytes} allowed"
    )
    assert by_reason[Reason.DEVICE_ID_MISMATCH].original == other
    assert by_reason[Reason.DEVICE_ID_MISMATCH].message == (
        f"device_id: '{other_device}' in the payload, '{device}' in the MQTT topic '{topic}'"
    )

    raw = await read_to_end(settings, settings.kafka.raw_topic)
    assert sorted(r.value for r in raw) == sorted(m.payload for m in good)
    assert run.bridge.report.rejected == {"oversize": 1, "device_id_mismatch": 1}
    assert run.consumer.report.dead_lettered == 0
    for reason in ("oversize", "device_id_mismatch"):
        sample = registry.get_sample_value("usagepipe_bridge_rejected_total", {"reason": reason})
        assert sample == 1.0
    assert registry.get_sample_value("usagepipe_bridge_acked_total") == 8.0


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        (b'{"device_id": "wm-1", "seq": 1}', "wm-1"),
        (b'{"device_id": "wm\\u002d1"}', "wm-1"),  # an escape a byte search would miss
        (b'{"body": {"device_id": "x"}, "device_id": "wm-1"}', "wm-1"),  # nested first
        (b'{"device_id": "x", "device_id": "wm-1"}', "wm-1"),  # the last one counts
        (b'{"device_id": 17}', None),
        (b'["device_id", "wm-1"]', None),
        (b'{"device_id": "wm-1", "seq": NaN}', None),  # unreadable here: the consumer's
        (b'{"device_id": "wm-1\xff"}', None),
        (b'{"device_id": "wm-1", ', None),
    ],
)
def test_device_id_from_payload(payload: bytes, found: str | None) -> None:
    assert device_id_from_payload(payload) == found


def test_unreadable_payload_passes_the_bridge_for_the_consumer_to_refuse() -> None:
    for payload in (b"\xff\xfe", b"not json", b'{"device_id": "other", "x": NaN}', b"[]"):
        check_payload(payload, "devices/wm-1/telemetry", "wm-1", max_bytes=1024)


def test_payload_at_the_limit_passes_and_one_byte_more_is_oversize() -> None:
    payload = orjson.dumps({"device_id": "wm-1", "pad": "x" * 100})
    check_payload(payload, "devices/wm-1/telemetry", "wm-1", max_bytes=len(payload))
    with pytest.raises(InvalidTelemetry) as refused:
        check_payload(payload + b" ", "devices/wm-1/telemetry", "wm-1", max_bytes=len(payload))
    assert refused.value.reason is Reason.OVERSIZE
