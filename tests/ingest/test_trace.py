"""Trace context end to end on the real servers: a device's MQTT v5 `traceparent` user
property (or one the bridge starts) on the Kafka record's headers, and in the
consumer's log line for the batch that stored it (`ingest.trace`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry

from ingest.dead_letter import DeadLetter
from ingest.mqtt import MqttClient
from ingest.rate_limit import REPLAY_HEADER
from ingest.settings import Settings
from ingest.trace import TRACEPARENT, TRACESTATE, TraceParent
from schemas.errors import Reason
from simulators.ledger import LedgerWriter, read_ledger
from simulators.plan import FleetPlan, plan_device, traceparent
from simulators.units import device_ids
from tests.pipeline import pipeline, publish, read_to_end, table_letters, wait_for
from usagepipe.cli.logs import JsonFormatter
from usagepipe.dlq import replay

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
DEVICE_PARENT = "00f067aa0ba902b7"
DEVICE_TRACEPARENT = f"00-{TRACE_ID}-{DEVICE_PARENT}-01"


def _sampled(trace_id: str) -> str:
    return f"00-{trace_id}-b7ad6b7169203331-01"


def _tracing(settings: Settings, ratio: float) -> Settings:
    bridge = settings.bridge.model_copy(update={"trace_sample_ratio": ratio})
    return settings.model_copy(update={"bridge": bridge})


def _header(record: ConsumerRecord, name: str) -> bytes | None:
    return next((value for key, value in record.headers if key == name), None)


def _traced(record: ConsumerRecord) -> TraceParent:
    raw = _header(record, TRACEPARENT)
    assert raw is not None, f"record {record.partition}:{record.offset} has no traceparent"
    parent = TraceParent.parse(raw)
    assert parent is not None, f"the bridge wrote a malformed traceparent {raw!r}"
    return parent


def _json_lines(caplog: pytest.LogCaptureFixture, start: str) -> list[dict[str, object]]:
    """The consumer's lines starting with `start`, as `USAGEPIPE_LOG__FORMAT=json` writes."""
    formatter = JsonFormatter()
    return [
        orjson.loads(formatter.format(r))
        for r in caplog.records
        if r.name == "ingest.consumer" and r.getMessage().startswith(start)
    ]


async def _publish(
    settings: Settings, messages: list[tuple[str, bytes, list[tuple[str, str]]]]
) -> None:
    async with MqttClient(settings.mqtt, client_id=f"{settings.bridge.client_id}-dev") as dev:
        pending = [
            await dev.publish(topic, payload, user_properties=props)
            for topic, payload, props in messages
        ]
        await asyncio.gather(*pending)


async def _stored_at(settings: Settings) -> dict[tuple[str, str, int], tuple[int, int]]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        rows = await conn.fetch(
            f"SELECT device_id, boot_id, seq, kafka_partition, kafka_offset"
            f" FROM {settings.postgres.table}"
        )
    finally:
        await conn.close()
    return {
        (r["device_id"], r["boot_id"], r["seq"]): (r["kafka_partition"], r["kafka_offset"])
        for r in rows
    }


def _traced_count(registry: CollectorRegistry, origin: str) -> float:
    value = registry.get_sample_value("usagepipe_bridge_traced_total", {"origin": origin})
    return value or 0.0


async def test_a_device_traceparent_is_followed_from_mqtt_to_its_row(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _tracing(settings, 0.0)
    plan = FleetPlan(devices=1, messages_per_device=3, seed=21)
    (device,) = device_ids(plan)
    traced, malformed, plain = plan_device(plan, device, settings.mqtt.topic_prefix)
    caplog.set_level(logging.INFO, logger="ingest.consumer")
    bridge_metrics = CollectorRegistry()
    async with pipeline(settings, bridge_metrics) as run:
        await _publish(
            settings,
            [
                (
                    traced.topic,
                    traced.payload,
                    [(TRACEPARENT, DEVICE_TRACEPARENT), (TRACESTATE, "vendor=abc")],
                ),
                (malformed.topic, malformed.payload, [(TRACEPARENT, "00-not-a-trace-01")]),
                (plain.topic, plain.payload, []),
            ],
        )
        await wait_for(lambda: run.consumer.report.stored == 3, "the three rows")

    records = {r.value: r for r in await read_to_end(settings, settings.kafka.raw_topic)}
    assert len(records) == 3
    # The device's trace id, with the bridge's span as the new parent, and its state.
    kept = _traced(records[traced.payload])
    assert (kept.trace_id, kept.flags) == (TRACE_ID, 1)
    assert kept.parent_id != DEVICE_PARENT
    assert _header(records[traced.payload], TRACESTATE) == b"vendor=abc"
    # A malformed one: counted, and the message stored under a new trace.
    fresh = _traced(records[malformed.payload])
    assert fresh.trace_id != TRACE_ID
    assert fresh.sampled
    # None, with the bridge starting none (ratio 0): no header at all.
    assert records[plain.payload].headers == ()
    assert run.bridge.report.traced == {"device": 1, "malformed": 1}
    assert _traced_count(bridge_metrics, "device") == 1
    assert _traced_count(bridge_metrics, "malformed") == 1
    assert _traced_count(bridge_metrics, "bridge") == 0

    # The consumer's log names the trace id beside the row's key and Kafka position.
    stored = await _stored_at(settings)
    lines = {line["trace_id"]: line for line in _json_lines(caplog, "stored trace_id=")}
    assert set(lines) == {TRACE_ID, fresh.trace_id}
    for message, trace in ((traced, kept), (malformed, fresh)):
        line = lines[trace.trace_id]
        partition, offset = stored[message.key]
        record = records[message.payload]
        assert (record.partition, record.offset) == (partition, offset)
        assert {k: line[k] for k in ("level", "device_id", "boot_id", "seq")} == {
            "level": "INFO",
            "device_id": device,
            "boot_id": message.key[1],
            "seq": message.key[2],
        }
        assert (line["partition"], line["offset"], line["span_id"]) == (
            partition,
            offset,
            trace.parent_id,
        )
        assert f"trace_id={trace.trace_id} device_id={device}" in str(line["message"])


async def test_the_bridge_starts_a_sampled_trace_for_a_message_without_one(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _tracing(settings, 1.0)
    plan = FleetPlan(devices=1, messages_per_device=2, seed=22)
    (device,) = device_ids(plan)
    messages = plan_device(plan, device, settings.mqtt.topic_prefix)
    caplog.set_level(logging.INFO, logger="ingest.consumer")
    async with pipeline(settings) as run:
        await _publish(settings, [(m.topic, m.payload, []) for m in messages])
        await wait_for(lambda: run.consumer.report.stored == 2, "the two rows")
    records = await read_to_end(settings, settings.kafka.raw_topic)
    traces = {_traced(r).trace_id: r for r in records}
    assert len(traces) == 2
    assert all(_traced(r).sampled for r in records)
    assert run.bridge.report.traced == {"bridge": 2}
    lines = _json_lines(caplog, "stored trace_id=")
    assert {str(line["trace_id"]): line["offset"] for line in lines} == {
        trace_id: record.offset for trace_id, record in traces.items()
    }


async def test_a_refused_message_keeps_its_traceparent_on_the_dead_letter_topic(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _tracing(settings, 0.0)
    plan = FleetPlan(devices=2, messages_per_device=1, seed=23)
    first, second = device_ids(plan)
    (good,) = plan_device(plan, first, settings.mqtt.topic_prefix)
    (other,) = plan_device(plan, second, settings.mqtt.topic_prefix)
    bridge_trace = "0af7651916cd43dd8448eb211c80319c"
    consumer_trace = "5b8efff798038103d269b633813fc60c"
    caplog.set_level(logging.INFO, logger="ingest.consumer")
    async with pipeline(settings) as run:
        await _publish(
            settings,
            [
                # Names another device than its topic's: refused by the bridge.
                (good.topic, other.payload, [(TRACEPARENT, _sampled(bridge_trace))]),
                # Not JSON: refused by the consumer.
                (good.topic, b'{"cut": ', [(TRACEPARENT, _sampled(consumer_trace))]),
            ],
        )
        await wait_for(lambda: run.consumer.report.dead_lettered == 1, "the consumer's letter")
        await wait_for(lambda: run.bridge.report.acked == 2, "both acknowledged")
        for _ in range(200):  # the bridge's letter reaches the table from the topic
            if len(await table_letters(settings)) == 2:
                break
            await asyncio.sleep(0.05)
    letters = await read_to_end(settings, settings.kafka.dlq_topic)
    by_trace = {
        _traced(r).trace_id: DeadLetter.from_json(r.value, r.key, r.headers) for r in letters
    }
    assert set(by_trace) == {bridge_trace, consumer_trace}
    assert by_trace[bridge_trace].reason.value == "device_id_mismatch"
    assert by_trace[consumer_trace].reason.value == "invalid_json"
    assert by_trace[consumer_trace].trace_id == consumer_trace
    # The table, the letters' record, keeps them too (and `usagepipe dlq replay` sends
    # them on with the original).
    stored = {row["reason"]: row["traceparent"] for row in await table_letters(settings)}
    assert {reason: value[3:35] for reason, value in stored.items()} == {
        "device_id_mismatch": bridge_trace,
        "invalid_json": consumer_trace,
    }
    assert all(TraceParent.parse(value.encode()) is not None for value in stored.values())
    (line,) = _json_lines(caplog, "dead letter (invalid_json)")
    assert (line["level"], line["trace_id"], line["device_id"]) == ("INFO", consumer_trace, first)
    assert line["offset"] == by_trace[consumer_trace].offset

    # A replay from the table sends the original on under its trace.
    report = await replay(settings, reason=Reason.INVALID_JSON)
    assert report.replayed == {"invalid_json": 1}
    replayed = [
        r
        for r in await read_to_end(settings, settings.kafka.raw_topic)
        if _header(r, REPLAY_HEADER) is not None
    ]
    assert [_traced(r).trace_id for r in replayed] == [consumer_trace]


async def test_a_simulated_fleet_sends_traceparents_qa_can_find_in_the_log(
    settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    settings = _tracing(settings, 0.0)
    plan = FleetPlan(devices=2, messages_per_device=3, seed=24, trace_share=0.5)
    prefix = settings.mqtt.topic_prefix
    messages = [m for d in device_ids(plan) for m in plan_device(plan, d, prefix)]
    planned = {m.key: traceparent(plan, m.key) for m in messages}
    traced = {key: value[3:35] for key, value in planned.items() if value is not None}
    assert 0 < len(traced) < len(planned) == 6
    caplog.set_level(logging.INFO, logger="ingest.consumer")
    with LedgerWriter(tmp_path / "ledger.jsonl") as ledger:
        async with pipeline(settings) as run:
            report = await publish(settings, plan, ledger)
            await wait_for(lambda: run.consumer.report.stored == 6, "the six rows")
    assert report.sent == 6
    assert run.bridge.report.traced == {"device": len(traced)}
    logged = {
        (str(line["device_id"]), str(line["boot_id"]), int(str(line["seq"]))): line["trace_id"]
        for line in _json_lines(caplog, "stored trace_id=")
    }
    assert logged == traced
    entries = list(read_ledger(tmp_path / "ledger.jsonl"))
    assert {e.key: e.trace_id for e in entries if e.trace_id is not None} == traced
