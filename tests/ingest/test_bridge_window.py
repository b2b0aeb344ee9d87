"""The bridge holds at most `bridge.max_inflight` messages unacknowledged, whatever the
broker sends (README, "How the bridge bounds what is in flight").

A scripted broker (tests/mqtt_peers.py) sends far more than the Receive Maximum at once
and reuses a packet id in use; a real, private Mosquitto (deploy/mosquitto's config,
2.0.x) drains a backlog to the bridge through a proxy that counts what passes. Kafka is
the shared broker, with the test's own topics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.bridge import Bridge
from ingest.metrics import BridgeMetrics
from ingest.mqtt import MqttClient
from ingest.settings import BridgeSettings, MqttSettings, Settings
from tests.conftest import free_port
from tests.mqtt_peers import CountingProxy, ScriptedBroker
from tests.pipeline import publish_payloads, read_to_end, wait_for
from usagepipe.services import MosquittoBroker


def _with(
    settings: Settings, *, port: int, window: int, mqtt: MqttSettings | None = None
) -> Settings:
    bridge = BridgeSettings(**{**settings.bridge.model_dump(), "max_inflight": window})
    base = mqtt if mqtt is not None else settings.mqtt
    return settings.model_copy(
        update={"mqtt": base.model_copy(update={"port": port}), "bridge": bridge}
    )


def _messages(settings: Settings, mids: list[int]) -> list[tuple[str, int, bytes]]:
    prefix = settings.mqtt.topic_prefix
    return [
        (
            f"{prefix}devices/dev-{n % 7}/telemetry",
            mid,
            b'{"device_id":"dev-%d","n":%d}' % (n % 7, n),
        )
        for n, mid in enumerate(mids)
    ]


async def _drain(settings: Settings, count: int) -> tuple[Bridge, CollectorRegistry]:
    registry = CollectorRegistry()
    bridge = Bridge(settings, BridgeMetrics(registry), stop_after=count)
    async with asyncio.timeout(120):
        await bridge.run()
    return bridge, registry


async def test_a_broker_ignoring_receive_maximum_gets_no_more_than_the_window_taken(
    settings: Settings,
) -> None:
    window, count = 50, 1000
    messages = _messages(settings, list(range(1, count + 1)))
    async with ScriptedBroker(free_port(), messages) as broker:
        bridge, registry = await _drain(_with(settings, port=broker.port, window=window), count)

    assert broker.pubacks == list(range(1, count + 1))  # every one, once, in order
    assert bridge.report.acked == count
    assert bridge.report.peak_unacked == window
    assert registry.get_sample_value("usagepipe_bridge_inflight_peak_messages") == window
    assert bridge.report.holds == registry.get_sample_value("usagepipe_bridge_holds_total")
    assert bridge.report.holds > 0
    assert bridge.report.reused_packet_ids == 0
    raw = await read_to_end(settings, settings.kafka.raw_topic)
    assert sorted(r.value for r in raw) == sorted(payload for _, _, payload in messages)


async def test_a_packet_id_reused_while_in_use_is_counted_logged_and_both_messages_kept(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    messages = _messages(settings, [7, 7, 8])
    caplog.set_level(logging.WARNING, logger="ingest.mqtt")
    async with ScriptedBroker(free_port(), messages) as broker:
        bridge, registry = await _drain(_with(settings, port=broker.port, window=50), 3)

    assert broker.pubacks == [7, 7, 8]  # one PUBACK per message, in the order they came
    assert bridge.report.reused_packet_ids == 1
    assert registry.get_sample_value("usagepipe_bridge_reused_packet_ids_total") == 1
    warnings = [r.getMessage() for r in caplog.records if "packet id 7" in r.getMessage()]
    assert len(warnings) == 1
    assert "while a message it sent with that id is unacknowledged" in warnings[0]
    raw = await read_to_end(settings, settings.kafka.raw_topic)
    assert sorted(r.value for r in raw) == sorted(payload for _, _, payload in messages)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    private = MosquittoBroker(free_port(), Path(tmp_path_factory.mktemp("bridge-window")))
    private.start()
    try:
        yield private
    finally:
        private.stop()


async def _queue_backlog(settings: Settings, count: int) -> list[tuple[str, int, bytes]]:
    """Open the bridge's persistent session and leave, then publish `count` messages:
    they queue for it."""
    opening = Bridge(settings, BridgeMetrics(CollectorRegistry()))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(opening.run())
        async with asyncio.timeout(30):
            await opening.ready.wait()
        opening.stop("session open")
    messages = _messages(settings, list(range(count)))
    by_topic: dict[str, list[bytes]] = {}
    for topic, _, payload in messages:
        by_topic.setdefault(topic, []).append(payload)
    for n, (topic, payloads) in enumerate(by_topic.items()):
        await publish_payloads(settings, f"{settings.bridge.client_id}-pub{n}", topic, payloads)
    return messages


async def test_a_backlog_larger_than_the_window_drains_each_message_once_within_it(
    settings: Settings, mosquitto: MosquittoBroker
) -> None:
    window, count = 100, 3000
    mqtt = mosquitto.mqtt_settings(settings.mqtt)
    direct = _with(settings, port=mosquitto.port, window=window, mqtt=mqtt)
    messages = await _queue_backlog(direct, count)

    async with CountingProxy(free_port(), mosquitto.port) as proxy:
        bridge, registry = await _drain(
            _with(settings, port=proxy.port, window=window, mqtt=mqtt), count
        )

    assert bridge.report.acked == count
    assert bridge.report.peak_unacked == window
    assert registry.get_sample_value("usagepipe_bridge_inflight_peak_messages") == window
    assert (proxy.publishes, proxy.pubacks) == (count, count)  # none redelivered
    raw = await read_to_end(settings, settings.kafka.raw_topic)
    assert sorted(r.value for r in raw) == sorted(payload for _, _, payload in messages)


async def test_the_window_holds_across_a_reconnect_and_nothing_is_lost(
    settings: Settings, mosquitto: MosquittoBroker
) -> None:
    window, count = 100, 3000
    mqtt = mosquitto.mqtt_settings(settings.mqtt)
    direct = _with(settings, port=mosquitto.port, window=window, mqtt=mqtt)
    messages = await _queue_backlog(direct, count)

    # The connection is cut once 1,000 PUBACKs passed (the 1,000th is lost with it): what
    # the bridge held from it is dropped as Kafka confirms it, the broker redelivers what
    # it has no PUBACK for, and the window counts both connections' messages.
    payloads = {payload for _, _, payload in messages}
    registry = CollectorRegistry()
    async with CountingProxy(free_port(), mosquitto.port, cut_after_pubacks=1000) as proxy:
        bridge = Bridge(
            _with(settings, port=proxy.port, window=window, mqtt=mqtt), BridgeMetrics(registry)
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(bridge.run())
            try:
                await wait_for(lambda: proxy.acknowledged == payloads, "a PUBACK for each")
            finally:
                bridge.stop("test over")

    assert proxy.connections == 2
    assert proxy.pubacks > count  # the second connection acknowledged what was redelivered
    assert bridge.report.peak_unacked == window
    # The lost connection is counted; at the end the window is empty.
    errors = registry.get_sample_value("usagepipe_bridge_errors_total", {"kind": "mqtt_disconnect"})
    assert errors == 1
    assert registry.get_sample_value("usagepipe_bridge_window_limit_messages") == window
    assert registry.get_sample_value("usagepipe_bridge_inflight_messages") == 0
    assert registry.get_sample_value("usagepipe_bridge_awaiting_kafka_messages") == 0
    raw = await read_to_end(settings, settings.kafka.raw_topic)
    assert {r.value for r in raw} == payloads
    # Some twice: those Kafka had from the first connection that the broker had no
    # PUBACK for (the bridge's window, and PUBACKs written into the cut connection).
    assert len(raw) >= count


async def test_a_held_client_keeps_its_connection_through_many_keepalives(
    settings: Settings, mosquitto: MosquittoBroker
) -> None:
    # keepalive 1 s (below the setting's floor of 5, for a short test): held for 5 s,
    # the broker would drop a client that sent nothing for 1.5 s, and paho would drop
    # a broker whose PINGRESP it did not see within a keepalive.
    mqtt = mosquitto.mqtt_settings(settings.mqtt).model_copy(update={"keepalive_s": 1})
    topic = f"{mqtt.topic_prefix}devices/dev-1/telemetry"
    got: list[tuple[int, int]] = []
    two = asyncio.Event()

    def on_message(  # noqa: PLR0917 (the client's callback, positional)
        topic: str, mid: int, payload: bytes, retain: bool, props: bytes, generation: int
    ) -> None:
        got.append((mid, generation))
        if len(got) == 2:
            client.hold()
            two.set()

    client = MqttClient(
        mqtt,
        client_id=f"{settings.bridge.client_id}-held",
        manual_ack=True,
        receive_maximum=100,
        subscriptions=[topic],
        on_raw_message=on_message,
    )
    async with client:
        await client.wait_subscribed()
        payloads = [b'{"device_id":"dev-1","n":%d}' % n for n in range(10)]
        await publish_payloads(
            settings.model_copy(update={"mqtt": mqtt}), "held-pub", topic, payloads
        )
        async with asyncio.timeout(30):
            await two.wait()
        await asyncio.sleep(5)
        assert (len(got), client.generation, client.connected.is_set()) == (2, 1, True)
        client.release()
        await wait_for(lambda: len(got) == 10, "the other 8 messages")
        assert client.ack_many([mid for mid, _ in got], 1)
        assert (client.generation, client.connected.is_set()) == (1, True)
        assert {generation for _, generation in got} == {1}
        assert len({mid for mid, _ in got}) == 10
