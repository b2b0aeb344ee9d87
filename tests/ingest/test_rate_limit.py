"""The per-device ceiling (`ingest.rate_limit`): a device over its rate has the excess
dead-lettered `rate_limited`, counted by model, and replayable; other devices, a backlog
read late and a replay are never limited.

The end-to-end tests use a rate so low (one message per 1,000 s) that no token comes
back during a test: a device then gets exactly `device_burst` messages through, however
fast or slow the machine runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

import asyncpg
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from ingest.consumer import Consumer
from ingest.dead_letter import DeadLetterReader
from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.rate_limit import REPLAY_HEADER, DeviceRateLimiter
from ingest.settings import Settings
from schemas.errors import Reason
from simulators.plan import FleetPlan, plan_device
from simulators.units import device_ids
from tests.pipeline import (
    pipeline,
    provisioned,
    publish_payloads,
    read_to_end,
    stored_keys,
    wait_for,
)
from usagepipe.dlq import replay

TP = TopicPartition("rate.raw", 0)


def record(key: bytes | None, ts: int, offset: int = 0, *, replay_of: str = "") -> ConsumerRecord:
    headers = ((REPLAY_HEADER, replay_of.encode()),) if replay_of else ()
    return ConsumerRecord(TP.topic, TP.partition, offset, ts, 0, key, b"{}", None, 0, 2, headers)


def admitted(limiter: DeviceRateLimiter, key: bytes, times: Sequence[int]) -> list[bool]:
    return [limiter.admit(TP, record(key, ts)) for ts in times]


def test_a_burst_passes_then_one_message_per_token() -> None:
    limiter = DeviceRateLimiter(rate_per_s=1.0, burst=3)
    # Three at once pass, the fourth at the same millisecond does not; a token a second.
    assert admitted(limiter, b"a", [0, 0, 0, 0, 999, 1000, 1500, 2000, 2000]) == [
        True,
        True,
        True,
        False,
        False,
        True,
        False,
        True,
        False,
    ]


def test_devices_have_buckets_of_their_own() -> None:
    limiter = DeviceRateLimiter(rate_per_s=1.0, burst=2)
    assert admitted(limiter, b"flood", [0] * 10).count(True) == 2
    assert admitted(limiter, b"calm", [0, 0]) == [True, True]


def test_spaced_records_pass_however_fast_they_are_read() -> None:
    """What a backlog is: records a second apart by their timestamps, judged at once."""
    limiter = DeviceRateLimiter(rate_per_s=1.0, burst=1)
    assert all(admitted(limiter, b"a", [i * 1000 for i in range(100)]))


def test_replayed_keyless_and_untimed_records_pass_and_take_no_token() -> None:
    limiter = DeviceRateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.admit(TP, record(b"a", 0))
    assert all(limiter.admit(TP, record(b"a", 0, replay_of="rate_limited")) for _ in range(5))
    assert all(limiter.admit(TP, record(None, 0)) for _ in range(5))
    assert all(limiter.admit(TP, record(b"a", -1)) for _ in range(5))
    assert not limiter.admit(TP, record(b"a", 0))


def test_zero_turns_the_ceiling_off() -> None:
    limiter = DeviceRateLimiter(rate_per_s=0.0, burst=1)
    assert not limiter.enabled
    assert all(admitted(limiter, b"a", [0] * 100))
    assert limiter.devices() == 0


def test_timestamps_stepping_back_refill_nothing() -> None:
    limiter = DeviceRateLimiter(rate_per_s=1.0, burst=1)
    assert admitted(limiter, b"a", [5000, 1000, 5999, 6000]) == [True, False, False, True]


def test_full_buckets_are_forgotten_and_a_rebalance_drops_the_partitions_given_away() -> None:
    limiter = DeviceRateLimiter(rate_per_s=1.0, burst=2)
    for i in range(50):
        limiter.admit(TP, record(f"d{i}".encode(), 0))
    assert limiter.devices() == 50
    # Two seconds on, every one of those buckets is full again: forgotten.
    limiter.admit(TP, record(b"late", 2000))
    assert limiter.devices() == 1
    other = TopicPartition(TP.topic, 1)
    limiter.admit(other, record(b"x", 0))
    limiter.keep_only({other})
    assert limiter.devices() == 1
    limiter.keep_only(set())
    assert limiter.devices() == 0


def ceiling(settings: Settings, rate: float, burst: int) -> Settings:
    consumer = settings.consumer.model_copy(
        update={"device_rate_per_s": rate, "device_burst": burst}
    )
    return settings.model_copy(update={"consumer": consumer})


async def models(settings: Settings) -> dict[str, str]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            f"SELECT device_id, model_number FROM {settings.registry.db_schema}.devices"
        )
    finally:
        await conn.close()
    return {r["device_id"]: r["model_number"] for r in rows}


async def test_a_flooding_device_is_limited_and_its_replayed_excess_stored(
    settings: Settings,
) -> None:
    """Over MQTT, the bridge and the consumer: one device sends 30 messages at once, a
    burst of 10 allowed; the other sends its 5 alongside. Exactly 10 of the first are
    stored, its 20 others dead-lettered `rate_limited` (counted under its model), all of
    the second's stored; a replay of the letters stores the 20 and limits none."""
    settings = ceiling(settings, rate=0.001, burst=10)
    plan = FleetPlan(devices=2, messages_per_device=30, seed=61)
    flood, calm = device_ids(plan)
    secrets = await provisioned(settings, plan)
    model = (await models(settings))[flood]
    prefix = settings.mqtt.topic_prefix
    flood_msgs = plan_device(plan, flood, prefix)
    calm_msgs = plan_device(plan, calm, prefix)[:5]
    metrics = CollectorRegistry()

    before_ms = time.time_ns() // 1_000_000
    async with pipeline(settings, consumer_registry=metrics) as run:
        await asyncio.gather(
            publish_payloads(
                settings,
                flood,
                flood_msgs[0].topic,
                [m.payload for m in flood_msgs],
                secrets[flood],
            ),
            publish_payloads(
                settings, calm, calm_msgs[0].topic, [m.payload for m in calm_msgs], secrets[calm]
            ),
        )
        after_ms = time.time_ns() // 1_000_000
        await wait_for(lambda: run.consumer.report.consumed == 35, "35 records")
        report = run.consumer.report
        assert (report.stored, report.dead_lettered, report.rate_limited) == (15, 20, 20)
        stored = Counter(device for device, _, _ in await stored_keys(settings))
        assert stored == {flood: 10, calm: 5}
        assert set(await stored_keys(settings)) >= {m.key for m in calm_msgs}
        assert (
            metrics.get_sample_value(
                "usagepipe_consumer_dead_letters_total", {"reason": "rate_limited", "model": model}
            )
            == 20
        )

        async with DeadLetterReader(settings.kafka) as reader:
            letters = [s.letter async for s in reader if s.letter is not None]
        assert Counter((x.reason, x.key) for x in letters) == {
            (Reason.RATE_LIMITED, flood.encode()): 20
        }
        # The first ten the device sent passed: the excess is the last twenty.
        assert {x.original for x in letters} == {m.payload for m in flood_msgs[10:]}

        replayed = await replay(settings, reason=Reason.RATE_LIMITED)
        assert replayed.replayed == {"rate_limited": 20}
        await wait_for(lambda: run.consumer.report.consumed == 55, "the 20 replayed")
        assert (report.stored, report.dead_lettered, report.rate_limited) == (35, 20, 20)

    assert sorted(await stored_keys(settings)) == sorted(m.key for m in [*flood_msgs, *calm_msgs])
    # The bridge stamped each record with the time it arrived there.
    raw = await read_to_end(settings, settings.kafka.raw_topic)
    bridged = [r for r in raw if not r.headers]
    assert len(bridged) == 35
    assert all(before_ms <= r.timestamp <= after_ms for r in bridged)
    assert [dict(r.headers) for r in raw if r.headers] == [{REPLAY_HEADER: b"rate_limited"}] * 20


async def produce_at(
    settings: Settings, device: str, payloads: Sequence[bytes], times: Sequence[int]
) -> None:
    """`payloads` to the raw topic keyed by `device`, with the Kafka timestamps `times`
    (ms): as the bridge would have produced them had they arrived then."""
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    producer = make_producer(settings.kafka, client_id="test-rate-produce")
    await producer.start()
    try:
        pending = [
            await producer.send(
                settings.kafka.raw_topic, payload, key=device.encode(), timestamp_ms=at
            )
            for payload, at in zip(payloads, times, strict=True)
        ]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def test_a_backlog_read_after_a_consumer_restart_is_not_limited(settings: Settings) -> None:
    """A device that sent a message every 2 s (rate 1/s, burst 5): 40 records, half read
    by one consumer, the rest piled up while none ran and read at once by the next. All
    stored; meanwhile a device that sent 20 in the same millisecond gets its burst of 5
    through, in that same consumer."""
    settings = ceiling(settings, rate=1.0, burst=5)
    plan = FleetPlan(devices=2, messages_per_device=40, seed=62)
    steady, burst = device_ids(plan)
    prefix = settings.mqtt.topic_prefix
    steady_msgs = plan_device(plan, steady, prefix)
    burst_msgs = plan_device(plan, burst, prefix)[:20]
    start = time.time_ns() // 1_000_000 - 120_000
    times = [start + 2000 * i for i in range(40)]

    await produce_at(settings, steady, [m.payload for m in steady_msgs[:20]], times[:20])
    first = Consumer(settings, ConsumerMetrics(CollectorRegistry()), client_id="rate-first")
    task = asyncio.create_task(first.run())
    await wait_for(lambda: first.report.stored == 20, "the first half")
    first.stop()
    await task

    await produce_at(settings, steady, [m.payload for m in steady_msgs[20:]], times[20:])
    await produce_at(settings, burst, [m.payload for m in burst_msgs], [start] * 20)
    second = Consumer(settings, ConsumerMetrics(CollectorRegistry()), client_id="rate-second")
    task = asyncio.create_task(second.run())
    await wait_for(lambda: second.report.consumed == 40, "the backlog")
    second.stop()
    await task

    assert (second.report.stored, second.report.rate_limited) == (25, 15)
    stored = Counter(device for device, _, _ in await stored_keys(settings))
    assert stored == {steady: 40, burst: 5}


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_rate_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S", value)
    with pytest.raises(ValueError, match="device_rate_per_s"):
        Settings()
