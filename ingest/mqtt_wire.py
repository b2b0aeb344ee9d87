"""The bridge's MQTT wire framer: paho's `Client` reading whole packets out of one buffer.

Fenced off on purpose. This is the one module of usagepipe that uses paho's private
API, and it does so for speed alone: paho reads a packet as one byte of command, then
the remaining length a byte at a time, then the body (three or more system calls and a
dozen dict updates per packet), and builds a `Properties` object, an `MQTTMessage` and
a debug log line for every PUBLISH. Profiled, that capped the bridge near the broker's
rate; framing here takes what the socket holds in one `recv` and leaves paho the
protocol. paho has no public hook for any of it, so `BufferedClient` reaches into the
members listed below, each use marked `# paho private:` where it happens (as aiomqtt
marks its own). paho-mqtt is pinned to a major version in pyproject.toml; a paho
upgrade must re-read these and run tests/ingest/test_mqtt_framing.py, which feeds
this module byte streams without a broker.

The framer holds to three rules: no packet larger than the Maximum Packet Size the
client announced is buffered (the connection closes when its length is read); what is
received is copied into the buffer once, however many reads a packet takes (a read
offset, compacted rarely, not a new buffer per read); and any error, a malformed packet
or an exception from a handler, closes the connection, so that no byte after it is ever
taken for the start of a packet and the broker redelivers what was not acknowledged.

It can also be held (`held`): framing stops at the next PUBLISH, which stays in the
buffer with everything after it until `frame_buffered()` is called. The owner stops
reading the socket meanwhile, so what the broker sends waits in the kernel's buffers
and the broker's own queue: that is how the bridge bounds what it holds unacknowledged
whatever the broker sends (`ingest.mqtt`). While held, `hold_keepalive()` keeps paho's
keepalive clock running on bytes waiting unread in the socket: the broker's PINGRESP
sits behind the PUBLISHes not yet read.

    _sock, _sock_recv(), _sock_close()    the socket paho owns
    _in_packet, _InPacket                 paho's packet being read, handed whole
    _packet_handle()                      paho's handler for one read packet
    _loop_rc_handle()                     paho's reaction to a read error (disconnect)
    _last_bytes_received                  paho's keepalive clock (also while held)
    _packet_queue()                       paho's outgoing queue (the PUBACKs' one write)

`ingest.mqtt` (the asyncio client) uses only `BufferedClient`'s public methods.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes

from schemas.errors import UsagepipeError

if TYPE_CHECKING:
    from paho.mqtt.client import _InPacket  # paho private: the read-packet dict's type

log = logging.getLogger(__name__)

PublishHandler = Callable[[str, int, bytes, bool, bytes], None]
"""Called on the loop for each QoS 0/1 PUBLISH: topic, packet id (0 for QoS 0), payload,
its RETAIN flag, and its MQTT v5 properties as sent (`b""` for none, the usual case;
`trace_properties` reads the trace context out of them)."""

_READ_CHUNK = 256 * 1024
_PUBACK = struct.Struct("!BBH")

PROTOCOL_MAX_PACKET = 268_435_455 + 5
"""The largest packet MQTT can frame: a remaining length of 2^28 - 1 after a fixed header
of at most 5 bytes."""

_COMPACT_BYTES = 1024 * 1024
"""Framed bytes kept at the front of the buffer before it is compacted. Compacting moves
only the incomplete tail, so the cost per byte received stays constant however long a
packet takes to arrive; compacting on every read would be the same (CPython deletes a
bytearray's front in place), this only makes it rare."""


def _publish_fields(
    buf: bytes | bytearray, start: int, end: int, *, qos1: bool
) -> tuple[str, int, int, int] | None:
    """A QoS 0/1 MQTT v5 PUBLISH whose body is `buf[start:end]`: its topic, packet id
    (0 for QoS 0), where its properties start and where its payload starts; None if the
    topic, packet id or properties do not fit in the body (a malformed packet)."""
    if end - start < 2:
        return None
    topic_end = start + 2 + (buf[start] << 8 | buf[start + 1])
    if topic_end > end:
        return None
    topic = buf[start + 2 : topic_end].decode("utf-8", "replace")
    mid = 0
    if qos1:
        if topic_end + 2 > end:
            return None
        mid = buf[topic_end] << 8 | buf[topic_end + 1]
        topic_end += 2
    # Properties: a variable byte integer length (at most 4 bytes), then the properties.
    plen, mult, j = 0, 1, topic_end
    while True:
        if j >= end or j - topic_end >= 4:
            return None
        byte = buf[j]
        plen += (byte & 127) * mult
        mult <<= 7
        j += 1
        if byte < 128:
            break
    if j + plen > end:
        return None
    return topic, mid, j, j + plen


_NO_PROPERTIES = b""

# The MQTT v5 properties by the size of their value (MQTT v5 2.2.2.2), to step over
# those that are not user properties.
_FIXED_SIZE = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
}
_LENGTH_PREFIXED = frozenset((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F))
_SUBSCRIPTION_ID = 0x0B
_USER_PROPERTY = 0x26
_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"


def trace_properties(props: bytes) -> tuple[bytes | None, bytes | None]:
    """The values of the user properties `traceparent` and `tracestate` (W3C Trace
    Context's MQTT binding) among a PUBLISH's `props` (as the framer hands them over,
    without their length), each None where there is none.

    The traceparent is `b""` (a malformed one, for the caller to count) when the
    properties cannot be read to their end or name more than one traceparent: the
    broker checked them, so that should never happen, and the message is forwarded
    either way."""
    traceparent: bytes | None = None
    tracestate: bytes | None = None
    i, end = 0, len(props)
    while i < end:
        prop = props[i]
        i += 1
        if prop == _USER_PROPERTY:
            if i + 2 > end:
                return b"", tracestate
            name_end = i + 2 + (props[i] << 8 | props[i + 1])
            if name_end + 2 > end:
                return b"", tracestate
            value_end = name_end + 2 + (props[name_end] << 8 | props[name_end + 1])
            if value_end > end:
                return b"", tracestate
            name = props[i + 2 : name_end]
            if name == _TRACEPARENT:
                if traceparent is not None:
                    return b"", tracestate
                traceparent = props[name_end + 2 : value_end]
            elif name == _TRACESTATE:
                tracestate = props[name_end + 2 : value_end]
            i = value_end
        elif prop in _LENGTH_PREFIXED:
            if i + 2 > end:
                return b"", tracestate
            i += 2 + (props[i] << 8 | props[i + 1])
        elif prop == _SUBSCRIPTION_ID:
            start = i
            while i < end and props[i] & 0x80 and i - start < 3:
                i += 1
            i += 1
        elif (size := _FIXED_SIZE.get(prop)) is not None:
            i += size
        else:
            return b"", tracestate  # not a property MQTT v5 knows
    if i > end:
        return b"", tracestate
    return traceparent, tracestate


class FramingError(UsagepipeError):
    """A packet from the broker that cannot be framed or was refused; `rc` is paho's code
    for the connection's end. Caught inside `read_packets`, which closes the connection:
    retriable, the client reconnects."""

    retriable = True

    def __init__(self, rc: MQTTErrorCode, message: str) -> None:
        super().__init__(message)
        self.rc = rc


def _idle_packet() -> _InPacket:
    """paho's `_in_packet` between packets (a new dict each time: paho mutates it).
    paho private: the shape of paho-mqtt 2.x's `_InPacket`."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


class BufferedClient(paho.Client):
    """paho's Client reading whole packets out of one large buffer.

    paho reads a packet as one byte of command, then the remaining length a byte at a
    time, then the body: three or more system calls and a dozen dict updates per
    packet, which caps a subscriber near the broker's rate. `read_packets` takes what
    the socket has in one `recv`, frames every whole packet in it, and hands each to
    paho's own handler (`_packet_handle`), so paho still does the protocol.

    With `on_publish_received` set, a QoS 0 or 1 PUBLISH skips paho's handler: paho
    would build an MQTT v5 `Properties` object, an `MQTTMessage` and a debug log line
    for every message (a quarter of the bridge's CPU, profiled), where the bridge needs
    only the topic, the packet id, the payload and the properties' bytes (read only
    when there are any, for the trace context). QoS 2 still goes through paho.
    """

    def __init__(
        self, *args: Any, max_packet_size: int = PROTOCOL_MAX_PACKET, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet_size = max_packet_size
        """The largest whole packet (fixed header included) accepted from the broker: what
        the client announces as Maximum Packet Size in its CONNECT. A packet claiming more
        is a protocol error (MQTT v5 3.1.2.11.4) and closes the connection before any of
        it is buffered."""
        self._buf = bytearray()
        """Bytes received but not yet framed, from `_pos` on: an incomplete packet, or
        what a hold left (at most a read's worth and a packet)."""
        self._pos = 0
        self.on_publish_received: PublishHandler | None = None
        self.held = False
        """While True, framing stops before the next whole PUBLISH (see `frame_buffered`)."""
        self.stopped_by_hold = False
        """Whether the last framing stopped at a whole PUBLISH because `held` was set: the
        buffer holds it, and reading the socket can wait until the hold ends."""
        self.closed_by_error: str | None = None
        """Why `read_packets` last closed the connection itself (a packet over the limit,
        a malformed one, a handler that raised); None after a clean read or an EOF."""

    def reset_buffer(self) -> None:
        """Forget what the last connection left (called when a socket opens)."""
        self._buf = bytearray()
        self._pos = 0
        self.closed_by_error = None
        self.stopped_by_hold = False

    def read_packets(self) -> MQTTErrorCode:
        """Read what the socket holds and handle every whole packet in it.

        Any framing error, and any exception from a handler (ours or paho's), closes the
        connection: the bytes after a failed packet cannot be trusted to start a packet,
        and a message whose handler failed was not taken. Nothing of this connection is
        acknowledged any more (`MqttClient.ack_many` sends nothing for a lost
        connection), so with a persistent session the broker delivers every unacknowledged
        message again after the reconnect.
        """
        try:
            data = self._sock_recv(_READ_CHUNK)  # paho private: recv on paho's socket
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError:
            # paho private: paho's own handling of a failed read (closes, calls back).
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:  # EOF
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)  # paho private
        self.closed_by_error = None
        # Nothing left over (the common case): frame the received bytes as they are. A
        # tail no longer than what arrived (a packet cut by the last read): one new bytes
        # object of both, O(len(data)). A longer one (a large packet arriving over many
        # reads): append to the buffer, amortised O(len(data)), never a copy of it all.
        rest = len(self._buf) - self._pos
        buf: bytes | bytearray
        if not rest:
            buf, pos = data, 0
        elif rest <= len(data):
            with memoryview(self._buf) as view:
                buf, pos = b"".join((view[self._pos :], data)), 0
            self._buf, self._pos = bytearray(), 0
        else:
            self._buf += data
            buf, pos = self._buf, self._pos
        rc = self._frame_and_keep(buf, pos)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last_bytes_received = time.monotonic()  # paho private: keepalive clock
        return rc

    def frame_buffered(self) -> MQTTErrorCode:
        """Handle the whole packets already received and not yet framed (those a hold
        left in the buffer), without reading the socket; stops again if held."""
        if self._sock is None or len(self._buf) == self._pos:  # paho private: socket
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._frame_and_keep(self._buf, self._pos)

    def hold_keepalive(self) -> MQTTErrorCode:
        """While held: bytes waiting unread in the socket show the broker alive, as
        paho's keepalive would have seen had they been read (the PINGRESP it waits for
        is among them, behind the PUBLISHes not read yet). With nothing waiting the
        clock stands, so paho's keepalive notices a broker gone silent; a broker that
        closed the connection (its end reached, nothing unread before it) is taken as
        lost at once, as a read would have; one that reset it fails the next PINGREQ."""
        sock = self._sock  # paho private: paho's socket
        if not isinstance(sock, socket.socket):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            # The raw socket's recv, also under TLS: bytes arrived, encrypted or not.
            waiting = socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError included: nothing waiting
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if not waiting:
            self.reset_buffer()
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)  # paho private
        self._last_bytes_received = time.monotonic()  # paho private: keepalive clock
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _frame_and_keep(self, buf: bytes | bytearray, pos: int) -> MQTTErrorCode:
        """Frame `buf` from `pos`; keep the incomplete (or held) rest for later."""
        try:
            pos = self._frame(buf, pos)
        except FramingError as error:
            log.warning("%s from the broker; closing the connection", error)
            return self._close_on_error(error.rc, str(error))
        except Exception as exc:  # a handler's bug: log it whole, close, reconnect
            log.exception("handling a packet from the broker failed; closing the connection")
            return self._close_on_error(MQTTErrorCode.MQTT_ERR_UNKNOWN, f"handler failed: {exc!r}")
        if self._sock is None:  # paho private: paho dropped the socket (DISCONNECT)
            self.reset_buffer()
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if buf is self._buf:
            self._pos = pos
            if pos == len(buf):
                self.reset_buffer()
            elif pos >= _COMPACT_BYTES:
                del self._buf[:pos]
                self._pos = 0
        elif pos < len(buf):
            self._buf, self._pos = bytearray(memoryview(buf)[pos:]), 0  # the tail, once
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _close_on_error(self, rc: MQTTErrorCode, why: str) -> MQTTErrorCode:
        self.reset_buffer()
        self.closed_by_error = why
        return self._loop_rc_handle(rc)  # paho private: close the socket, call back

    def _frame(self, buf: bytes | bytearray, pos: int) -> int:
        """Handle every whole packet in `buf` from `pos` on; return where the first
        incomplete one starts (or the PUBLISH a hold stopped at). Raises `FramingError`
        for a packet that cannot be framed."""
        end_of_data = len(buf)
        self.stopped_by_hold = False
        fast = self.on_publish_received
        limit = self.max_packet_size
        while end_of_data - pos >= 2:
            header = buf[pos]
            # Remaining length: a variable byte integer of at most 4 bytes.
            length, mult, i, framed = 0, 1, pos + 1, False
            while i < end_of_data:
                byte = buf[i]
                length += (byte & 127) * mult
                mult <<= 7
                i += 1
                if byte < 128:
                    framed = True
                    break
                if i - pos > 4:
                    raise FramingError(
                        MQTTErrorCode.MQTT_ERR_PROTOCOL, "remaining length over 4 bytes"
                    )
            if not framed:
                break  # the length itself is incomplete
            end = i + length
            if end - pos > limit:
                raise FramingError(
                    MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE,
                    f"a packet of {end - pos} bytes, more than the {limit} announced",
                )
            if end > end_of_data:
                break  # the packet is incomplete: keep it for the next read
            if fast is not None and header & 0xF0 == 0x30 and header & 0x06 < 0x04:
                if self.held:
                    self.stopped_by_hold = True
                    return pos  # this PUBLISH and the rest wait for `frame_buffered`
                fields = _publish_fields(buf, i, end, qos1=bool(header & 0x06))
                if fields is None:
                    raise FramingError(MQTTErrorCode.MQTT_ERR_PROTOCOL, "malformed PUBLISH")
                topic, mid, props_start, payload_start = fields
                props = (
                    bytes(buf[props_start:payload_start])
                    if payload_start > props_start
                    else _NO_PROPERTIES
                )
                fast(topic, mid, bytes(buf[payload_start:end]), bool(header & 0x01), props)
            else:
                # paho private: the packet as paho's reader would have left it, whole.
                self._in_packet = {
                    "command": header,
                    "have_remaining": 1,
                    "remaining_count": list(buf[pos + 1 : i]),
                    "remaining_mult": mult,
                    "remaining_length": length,
                    "packet": bytearray(buf[i:end]),
                    "to_process": 0,
                    "pos": 0,
                }
                try:
                    rc = self._packet_handle()  # paho private: paho handles the packet
                except MalformedPacket:
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                finally:
                    self._in_packet = _idle_packet()  # paho private
                if rc:
                    raise FramingError(rc, f"paho refused a packet: {paho.error_string(rc)}")
                # paho private: paho drops its socket when the packet closed the
                # connection (DISCONNECT).
                if self._sock is None:
                    return end
            pos = end
        return pos

    def queue_pubacks(self, mids: Sequence[int]) -> None:
        """Send the PUBACKs (success, no properties) of `mids` as one write."""
        packet = b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids])
        self._packet_queue(PacketTypes.PUBACK << 4, packet, 0, 0)  # paho private: out queue

    def close_socket(self) -> None:
        """Close paho's socket without a DISCONNECT (what paho's `loop_stop` would do)."""
        self._sock_close()  # paho private: paho has no public close of its socket
