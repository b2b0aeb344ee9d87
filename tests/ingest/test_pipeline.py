"""The whole path on the real servers: MQTT -> bridge -> Kafka -> consumer -> PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from ingest.dead_letter import DeadLetter
from ingest.mqtt import MqttClient
from ingest.settings import Settings
from schemas.envelope import telemetry_topic
from schemas.errors import Reason
from simulators.plan import FleetPlan
from tests.conftest import cleanup, free_port, isolated
from tests.pipeline import expected_keys, pipeline, publish, read_topic, stored_keys, wait_for
from usagepipe.services import TansuBroker


async def test_many_devices_with_duplicates_store_exactly_the_unique_set(
    settings: Settings,
) -> None:
    plan = FleetPlan(devices=24, messages_per_device=25, seed=11, duplicate_rate=0.1)
    expected = expected_keys(settings, plan)
    async with pipeline(settings) as run:
        report = await publish(settings, plan)
        await wait_for(lambda: run.consumer.report.consumed >= report.sent, "all records")
    keys = await stored_keys(settings)
    assert report.duplicates_sent > 0
    assert report.sent == len(expected) + report.duplicates_sent == 600 + report.duplicates_sent
    assert sorted(keys) == sorted(expected)
    assert run.bridge.report.acked == report.sent
    assert run.consumer.report.stored == len(expected)
    assert run.consumer.report.duplicates == report.duplicates_sent
    assert run.consumer.report.dead_lettered == 0


async def test_kafka_outage_while_devices_publish_loses_nothing(
    base_settings: Settings, test_name: str, tmp_path: Path
) -> None:
    broker = TansuBroker("127.0.0.1", free_port(), tmp_path / "tansu.log")
    broker.start()
    settings = isolated(base_settings, test_name, bootstrap_servers=broker.address)
    before = FleetPlan(devices=6, messages_per_device=30, seed=3, run_id="before")
    during = FleetPlan(devices=6, messages_per_device=30, seed=3, run_id="during")
    try:
        async with pipeline(settings) as run:
            await publish(settings, before)
            await wait_for(lambda: run.consumer.report.stored == 180, "the first 180 rows")

            broker.kill()  # Tansu keeps nothing: the topics are gone with it
            sent = await publish(settings, during)  # Mosquitto takes them meanwhile
            assert sent.sent == 180
            await asyncio.sleep(3)
            # Kafka could not confirm, so the bridge acknowledged none of them.
            assert run.bridge.report.acked == 180

            broker.start()
            await wait_for(lambda: run.consumer.report.stored == 360, "the rows sent during", 120)
        keys = await stored_keys(settings)
        assert sorted(keys) == sorted(
            expected_keys(settings, before) | expected_keys(settings, during)
        )
        assert run.bridge.report.acked >= 360
    finally:
        broker.stop()
        await cleanup(settings)


async def test_poison_message_is_dead_lettered_and_later_messages_are_stored(
    settings: Settings,
) -> None:
    plan = FleetPlan(devices=2, messages_per_device=5, seed=5)
    poison = b'{"device_id": "wm-5-000000", "seq": 1,'  # cut short: not JSON
    async with pipeline(settings) as run:
        async with MqttClient(settings.mqtt, client_id=f"{settings.bridge.client_id}-dev") as dev:
            await (
                await dev.publish(
                    telemetry_topic("wm-5-000000", settings.mqtt.topic_prefix), poison
                )
            )
        await publish(settings, plan)
        await wait_for(lambda: run.consumer.report.consumed == 11, "11 records")
    assert len(await stored_keys(settings)) == 10
    assert run.consumer.report.dead_lettered == 1

    letters = await read_topic(settings, settings.kafka.dlq_topic, 1)
    letter = DeadLetter.from_json(letters[0])
    assert letter.reason is Reason.INVALID_JSON
    assert letter.original == poison
    assert letter.topic == settings.kafka.raw_topic
    assert letter.message == "EOF while parsing a value at line 1 column 38"
    assert (letter.topic, letter.offset) == (settings.kafka.raw_topic, letter.offset)


def test_dead_letter_json_round_trips() -> None:
    from schemas.errors import InvalidTelemetry

    letter = DeadLetter.from_error(
        InvalidTelemetry(Reason.OVERSIZE, "payload is 70000 bytes; the limit is 65536"),
        topic="telemetry.raw",
        partition=2,
        offset=41,
        key=b"wm-1",
        original=b"\xff\x00 raw",
    )
    back = DeadLetter.from_json(letter.to_json(), key=b"wm-1")
    assert back == letter
    assert orjson.loads(letter.to_json())["source"] == {
        "topic": "telemetry.raw",
        "partition": 2,
        "offset": 41,
    }


async def test_offsets_stored_for_a_longer_log_do_not_stall_a_recreated_topic(
    base_settings: Settings, test_name: str, tmp_path: Path
) -> None:
    """The database keeps offsets that a restarted memory broker no longer has: the
    consumer must not wait for records that will never exist."""
    broker = TansuBroker("127.0.0.1", free_port(), tmp_path / "tansu.log")
    broker.start()
    settings = isolated(base_settings, test_name, bootstrap_servers=broker.address)
    first = FleetPlan(devices=6, messages_per_device=20, seed=12, run_id="first")
    second = FleetPlan(devices=2, messages_per_device=3, seed=12, run_id="second")
    try:
        async with pipeline(settings) as run:
            await publish(settings, first)
            await wait_for(lambda: run.consumer.report.stored == 120, "the first 120 rows")
        broker.kill()
        broker.start()  # an empty log; the stored offsets point past its end
        async with pipeline(settings) as run:
            await publish(settings, second)
            await wait_for(lambda: run.consumer.report.stored == 6, "the 6 new rows", 60)
        keys = await stored_keys(settings)
        assert sorted(keys) == sorted(
            expected_keys(settings, first) | expected_keys(settings, second)
        )
    finally:
        broker.stop()
        await cleanup(settings)
