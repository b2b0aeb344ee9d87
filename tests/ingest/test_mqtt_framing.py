"""The bridge's MQTT fast path: packets framed out of one buffer, however they are split.

`ingest.mqtt_wire.BufferedClient.read_packets` frames whole packets itself and hands
QoS 0/1 PUBLISHes to a callback without paho's message objects; every other packet
still goes to paho. A `recv` can end anywhere: inside a packet, inside its length,
inside its properties. These tests feed the same stream split at every byte and expect
the same messages, in order, every time. No broker needed.

Like the module they test, they reach into paho's private members (`_sock`, `_ping_t`,
`_out_packet`): they are the check that a paho upgrade left those as the framer needs.
"""

from __future__ import annotations

import socket

import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from ingest.mqtt_wire import BufferedClient, trace_properties


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, mid: int, *, qos: int = 1, props: bytes = b"") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += mid.to_bytes(2, "big")
    body += _varint(len(props)) + props + payload
    return bytes([0x30 | qos << 1]) + _varint(len(body)) + body


class _Socket:
    """Hands out the chunks it was given, one per `recv`, then would block."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        return self.chunks.pop(0)

    def close(self) -> None:
        self.chunks = []
        self.closed = True


def _client(**kwargs: int) -> tuple[BufferedClient, list[tuple[str, int, bytes]]]:
    client = BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id="framing",
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=True,
        **kwargs,
    )
    got: list[tuple[str, int, bytes]] = []

    def handle(topic: str, mid: int, payload: bytes, retain: bool, props: bytes) -> None:
        got.append((topic, mid, payload))

    client.on_publish_received = handle
    return client, got


MESSAGES = [
    ("devices/a/telemetry", 1, b'{"device_id":"a"}', 1, b""),
    ("devices/b/telemetry", 2, b"x" * 300, 1, b"\x01\x01"),  # 2-byte length, a property
    ("devices/c/telemetry", 0, b"qos0", 0, b""),
    ("devices/d/telemetry", 65535, b"", 1, b"\x23\x00\x05"),  # topic alias property
]
STREAM = b"".join(publish(t, p, m, qos=q, props=pr) for t, m, p, q, pr in MESSAGES)
EXPECTED = [(t, m, p) for t, m, p, _, _ in MESSAGES]


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_a_stream_split_anywhere_gives_the_same_messages(cut: int) -> None:
    client, got = _client()
    client._sock = _Socket([STREAM[:cut], STREAM[cut:]])  # type: ignore[assignment]
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == EXPECTED


def test_a_stream_read_a_byte_at_a_time_gives_the_same_messages() -> None:
    client, got = _client()
    client._sock = _Socket([STREAM[i : i + 1] for i in range(len(STREAM))])  # type: ignore[assignment]
    for _ in range(len(STREAM)):
        assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == EXPECTED


def test_other_packets_go_to_paho_between_messages() -> None:
    client, got = _client()
    client._ping_t = 123.0  # a PINGREQ is out; paho clears this on PINGRESP
    pingresp = b"\xd0\x00"
    first, second = publish("devices/a/telemetry", b"1", 7), publish("devices/a/telemetry", b"2", 8)
    client._sock = _Socket([first + pingresp + second])  # type: ignore[assignment]
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client._ping_t == 0
    assert got == [("devices/a/telemetry", 7, b"1"), ("devices/a/telemetry", 8, b"2")]


def test_pubacks_go_out_as_one_write_in_order() -> None:
    client, _ = _client()
    client.on_socket_register_write = lambda *args: None  # an external loop writes
    client.queue_pubacks([1, 300, 65535])
    packet = client._out_packet.popleft()
    assert packet["packet"] == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x2c" + b"\x40\x02\xff\xff"


def _raw_publish(body: bytes, *, qos: int = 1) -> bytes:
    return bytes([0x30 | qos << 1]) + _varint(len(body)) + body


MALFORMED = {
    "topic longer than the packet": _raw_publish(b"\x00\x30devices/a/telemetry"),
    "no room for the packet id": _raw_publish(b"\x00\x01a\x00"),
    "properties length past the packet": _raw_publish(b"\x00\x01a\x00\x07\x05\x01"),
    "properties length never ends": _raw_publish(b"\x00\x01a\x00\x07\x80\x80"),
    "properties length over 4 bytes": _raw_publish(b"\x00\x01a\x00\x07\x80\x80\x80\x80\x01"),
    "QoS 0 with a body of one byte": _raw_publish(b"\x00", qos=0),
}


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_publish_closes_the_connection_after_the_good_ones(packet: bytes) -> None:
    client, got = _client()
    good = publish("devices/a/telemetry", b"ok", 5)
    client._sock = _Socket([good + packet + good])  # type: ignore[assignment]
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert got == [("devices/a/telemetry", 5, b"ok")]


def _socket(client: BufferedClient, chunks: list[bytes]) -> _Socket:
    sock = _Socket(chunks)
    client._sock = sock  # type: ignore[assignment]
    return sock


def test_the_retain_flag_reaches_the_handler() -> None:
    client, _ = _client()
    flags: list[tuple[bytes, bool]] = []
    client.on_publish_received = lambda topic, mid, payload, retain, props: flags.append(
        (payload, retain)
    )
    retained = bytearray(publish("devices/a/telemetry", b"kept", 3))
    retained[0] |= 0x01
    _socket(client, [publish("devices/a/telemetry", b"live", 2) + bytes(retained)])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert flags == [(b"live", False), (b"kept", True)]


def test_a_packet_up_to_the_limit_is_taken() -> None:
    packet = publish("devices/a/telemetry", b"x" * 1000, 9)
    client, got = _client(max_packet_size=len(packet))
    _socket(client, [packet[:10], packet[10:]])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [("devices/a/telemetry", 9, b"x" * 1000)]


def test_a_packet_claiming_more_than_the_limit_closes_before_it_is_buffered() -> None:
    packet = publish("devices/a/telemetry", b"x" * 1000, 9)
    client, got = _client(max_packet_size=len(packet) - 1)
    good = publish("devices/a/telemetry", b"ok", 5)
    # Only the fixed header of the large packet arrives: its claimed length is enough.
    sock = _socket(client, [good + packet[:4], packet[4:]])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE
    assert got == [("devices/a/telemetry", 5, b"ok")]
    assert sock.closed
    assert client._sock is None
    assert (
        client.closed_by_error
        == f"a packet of {len(packet)} bytes, more than the {len(packet) - 1} announced"
    )


def test_a_length_claiming_the_protocol_maximum_closes_without_a_limit_set() -> None:
    client, got = _client(max_packet_size=270_336)
    sock = _socket(client, [b"\x32\xff\xff\xff\x7f"])  # 268,435,455 bytes to follow
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE
    assert got == []
    assert sock.closed


class _Boom(Exception):
    pass


def test_a_handler_exception_closes_the_connection_and_skips_the_rest() -> None:
    client, got = _client()
    calls: list[int] = []

    def handle(topic: str, mid: int, payload: bytes, retain: bool, props: bytes) -> None:
        calls.append(mid)
        if mid == 2:
            raise _Boom("bug in the handler")
        got.append((topic, mid, payload))

    client.on_publish_received = handle
    stream = b"".join(publish("devices/a/telemetry", b"m", mid) for mid in (1, 2, 3))
    sock = _socket(client, [stream, publish("devices/a/telemetry", b"m", 4)])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_UNKNOWN
    assert calls == [1, 2]  # nothing after the failed message is handed on
    assert sock.closed
    assert client.closed_by_error == "handler failed: _Boom('bug in the handler')"
    # A new connection starts from an empty buffer.
    client.reset_buffer()
    _socket(client, [publish("devices/a/telemetry", b"m", 3)])
    client.on_publish_received = lambda topic, mid, payload, retain, props: got.append(
        (topic, mid, payload)
    )
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [mid for _, mid, _ in got] == [1, 3]


def test_a_paho_callback_exception_closes_the_connection() -> None:
    client, _ = _client()

    def on_subscribe(*args: object) -> None:
        raise _Boom("bug in on_subscribe")

    client.on_subscribe = on_subscribe
    suback = b"\x90\x04\x00\x01\x00\x01"  # SUBACK, packet id 1, no properties, QoS 1
    sock = _socket(client, [suback + publish("devices/a/telemetry", b"m", 2)])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_UNKNOWN
    assert sock.closed


def test_a_large_packet_in_many_reads_is_buffered_without_copying_it_each_time() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    packet = publish("devices/a/telemetry", payload, 11)
    client, got = _client()
    chunks = [packet[i : i + 1000] for i in range(0, len(packet), 1000)]
    _socket(client, list(chunks))
    for _ in chunks:
        assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
        # The buffer holds the one incomplete packet, never more than was received.
        assert len(client._buf) - client._pos <= len(packet)
    assert got == [("devices/a/telemetry", 11, payload)]
    assert len(client._buf) == 0


def test_a_hold_stops_before_the_next_publish_and_frame_buffered_goes_on_from_it() -> None:
    client, got = _client()
    client._ping_t = 123.0
    stream = b"".join(publish("devices/a/telemetry", b"m", mid) for mid in (1, 2, 3))

    def handle(topic: str, mid: int, payload: bytes, retain: bool, props: bytes) -> None:
        got.append((topic, mid, payload))
        client.held = mid == 2  # the window is full after the second message

    client.on_publish_received = handle
    _socket(client, [stream + b"\xd0\x00" + publish("devices/a/telemetry", b"m", 4)])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [mid for _, mid, _ in got] == [1, 2]
    assert client.stopped_by_hold
    assert client._ping_t == 123.0  # the PINGRESP waits behind the held PUBLISH
    # Still held: nothing more is framed.
    assert client.frame_buffered() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [mid for _, mid, _ in got] == [1, 2]
    client.held = False
    assert client.frame_buffered() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [mid for _, mid, _ in got] == [1, 2, 3, 4]
    assert client._ping_t == 0
    assert not client.stopped_by_hold
    assert len(client._buf) == client._pos == 0


def test_a_hold_lets_other_packets_and_an_incomplete_publish_through() -> None:
    client, got = _client()
    client._ping_t = 123.0
    client.held = True
    packet = publish("devices/a/telemetry", b"x" * 100, 9)
    _socket(client, [b"\xd0\x00" + packet[:20], packet[20:]])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client._ping_t == 0  # a packet before any PUBLISH is handled
    assert not client.stopped_by_hold  # the PUBLISH is incomplete: reading goes on
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client.stopped_by_hold
    assert got == []
    client.held = False
    assert client.frame_buffered() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [("devices/a/telemetry", 9, b"x" * 100)]


def test_while_held_bytes_waiting_in_the_socket_keep_the_keepalive_clock() -> None:
    client, _ = _client()
    ours, broker = socket.socketpair()
    with ours, broker:
        ours.setblocking(False)
        client._sock = ours
        client._last_bytes_received = 0.0
        client.hold_keepalive()
        assert client._last_bytes_received == 0.0  # nothing waiting: the clock stands
        broker.sendall(b"\xd0\x00")
        client.hold_keepalive()
        assert client._last_bytes_received > 0.0
        assert ours.recv(16) == b"\xd0\x00"  # only peeked: the bytes are still there


def test_while_held_a_connection_the_broker_closed_is_taken_as_lost() -> None:
    client, _ = _client()
    ours, broker = socket.socketpair()
    with ours:
        ours.setblocking(False)
        client._sock = ours
        broker.close()
        assert client.hold_keepalive() == MQTTErrorCode.MQTT_ERR_CONN_LOST
        assert client._sock is None


def _paho_properties(**values: object) -> bytes:
    """PUBLISH properties as paho encodes them (without their length)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: no hints
    for name, value in values.items():
        setattr(props, name, value)
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    length = 1 if packed[0] < 128 else 2
    return packed[length:]


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_properties_reach_the_handler_and_give_the_trace_context() -> None:
    client, _ = _client()
    got: list[bytes] = []
    client.on_publish_received = lambda topic, mid, payload, retain, props: got.append(props)
    props = _paho_properties(
        MessageExpiryInterval=60,
        ContentType="application/json",
        UserProperty=[("tracestate", "v=1"), ("traceparent", TRACEPARENT.decode())],
        SubscriptionIdentifier=[300],
    )
    stream = publish("devices/a/telemetry", b"p", 1, props=props)
    stream += publish("devices/a/telemetry", b"p", 2)
    _socket(client, [stream])
    assert client.read_packets() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [props, b""]
    assert trace_properties(got[0]) == (TRACEPARENT, b"v=1")
    assert trace_properties(got[1]) == (None, None)


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (_paho_properties(UserProperty=[("other", "x")]), (None, None)),
        (_paho_properties(UserProperty=[("traceparent", "junk")]), (b"junk", None)),
        # Two traceparents: malformed (b""), as W3C has a repeated header.
        (_paho_properties(UserProperty=[("traceparent", "a"), ("traceparent", "b")]), (b"", None)),
        (b"\x26\x00\x0btraceparent\x00\x40", (b"", None)),  # a value cut short
        (b"\x7f\x00", (b"", None)),  # not a property MQTT v5 knows
        (b"\x02\x00\x00", (b"", None)),  # a four-byte property cut short
    ],
)
def test_unreadable_trace_properties_are_malformed_not_errors(
    props: bytes, expected: tuple[bytes | None, bytes | None]
) -> None:
    assert trace_properties(props) == expected
