"""MQTT peers for tests of what a broker may do to the bridge: a scripted broker that
sends what the test says (whatever the Receive Maximum, whatever its packet ids), and a
proxy in front of a real broker that counts the PUBLISHes it passes to the client and
the PUBACKs it passes back.

Both frame MQTT packets (a fixed header, a variable-byte remaining length, the rest);
neither checks more of the protocol than it needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import Self

MAX_PACKET = 270_336
"""The Maximum Packet Size the scripted broker announces (the project's broker's)."""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: str, mid: int, payload: bytes) -> bytes:
    """A QoS 1 MQTT v5 PUBLISH without properties."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + mid.to_bytes(2, "big") + b"\x00"
    body += payload
    return b"\x32" + varint(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """(first byte, body, the whole packet as read); IncompleteReadError at the end."""
    header = await reader.readexactly(1)
    raw = bytearray(header)
    length, mult = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        raw.append(byte)
        length += (byte & 127) * mult
        mult <<= 7
        if byte < 128:
            break
    body = await reader.readexactly(length)
    return header[0], body, bytes(raw) + body


class ScriptedBroker:
    """A broker on 127.0.0.1:`port` for one client: CONNACK (no session), SUBACK, then
    `messages` (topic, packet id, payload) in one write, whatever the client's Receive
    Maximum. Records the packet ids of the PUBACKs it gets, in order; answers PINGREQ."""

    def __init__(self, port: int, messages: Sequence[tuple[str, int, bytes]]) -> None:
        self.port = port
        self.messages = list(messages)
        self.pubacks: list[int] = []
        self.all_acked = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, _, _ = await read_packet(reader)
        assert first == 0x10, f"expected CONNECT, got {first:#x}"
        props = b"\x27" + MAX_PACKET.to_bytes(4, "big")  # Maximum Packet Size
        body = b"\x00\x00" + varint(len(props)) + props
        writer.write(b"\x20" + varint(len(body)) + body)
        while True:
            first, body, _ = await read_packet(reader)
            if first >> 4 == 8:  # SUBSCRIBE: grant QoS 1
                suback = body[:2] + b"\x00\x01"
                writer.write(b"\x90" + varint(len(suback)) + suback)
                writer.write(b"".join(publish_packet(*m) for m in self.messages))
            elif first >> 4 == 4:  # PUBACK
                self.pubacks.append(int.from_bytes(body[:2], "big"))
                if len(self.pubacks) >= len(self.messages):
                    self.all_acked.set()
            elif first >> 4 == 12:  # PINGREQ
                writer.write(b"\xd0\x00")
            elif first >> 4 == 14:  # DISCONNECT
                return
            await writer.drain()


def publish_fields(first: int, body: bytes) -> tuple[int, bytes]:
    """The packet id and payload of an MQTT v5 PUBLISH's body (QoS 1 or 2)."""
    topic_end = 2 + int.from_bytes(body[:2], "big")
    mid = int.from_bytes(body[topic_end : topic_end + 2], "big")
    length, mult, i = 0, 1, topic_end + 2
    while True:
        byte = body[i]
        length += (byte & 127) * mult
        mult <<= 7
        i += 1
        if byte < 128:
            return mid, body[i + length :]


class CountingProxy:
    """Forwards 127.0.0.1:`port` to a broker on `target_port`, counting QoS 1 PUBLISHes
    passed to the client and PUBACKs passed back: `unacked` is their difference (what
    the broker has sent and not had acknowledged, in flight or in the socket buffers),
    `peak_unacked` its highest; `acknowledged` holds the payloads of the messages whose
    PUBACK it passed to the broker.

    With `cut_after_pubacks`, the first connection is cut once that many PUBACKs came
    from the client: that PUBACK goes no further, the client's side is closed at once,
    the broker's once it answered a PINGREQ sent after the PUBACKs before it (so it has
    read every one). Later connections are not cut."""

    def __init__(self, port: int, target_port: int, cut_after_pubacks: int | None = None) -> None:
        self.port = port
        self.target_port = target_port
        self.cut_after_pubacks = cut_after_pubacks
        self.connections = 0
        self.publishes = 0
        self.pubacks = 0
        self.peak_unacked = 0
        self.acknowledged: set[bytes] = set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def unacked(self) -> int:
        return self.publishes - self.pubacks

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        for pipe in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError):
                await pipe

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.cut_after_pubacks if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = _Link(down=writer, up=up_writer, cut_after=cut)
        for source, down in ((reader, False), (up_reader, True)):
            task = asyncio.create_task(self._pipe(source, link, down))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, link: _Link, down: bool) -> None:
        writer = link.down if down else link.up
        try:
            while True:
                first, body, raw = await read_packet(reader)
                if link.cut:
                    if down and first == 0xD0:  # our PINGRESP: every PUBACK before it is in
                        return
                    continue  # the broker's last words after the cut: read, dropped
                if down and first >> 4 == 3 and first & 0x06:
                    self.publishes += 1
                    self.peak_unacked = max(self.peak_unacked, self.unacked)
                    mid, payload = publish_fields(first, body)
                    link.sent.setdefault(mid, []).append(payload)
                elif not down and first >> 4 == 4:
                    self.pubacks += 1
                    if link.cut_after is not None and self.pubacks >= link.cut_after:
                        link.cut = True
                        link.down.close()
                        writer.write(b"\xc0\x00")  # PINGREQ
                        return
                    pending = link.sent.get(int.from_bytes(body[:2], "big"))
                    if pending:
                        self.acknowledged.add(pending.pop(0))
                try:
                    writer.write(raw)
                    await writer.drain()
                except (ConnectionError, OSError):
                    if not link.cut:
                        raise
                    # Cut while this waited to be written: read on to the PINGRESP.
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if down or not link.cut:
                writer.close()
            if down and link.cut:
                link.up.close()


class _Link:
    """One proxied connection: its writers toward the client and the broker, and the
    payloads of its PUBLISHes not yet acknowledged, by packet id."""

    def __init__(
        self, *, down: asyncio.StreamWriter, up: asyncio.StreamWriter, cut_after: int | None
    ) -> None:
        self.down = down
        self.up = up
        self.cut_after = cut_after
        self.cut = False
        self.sent: dict[int, list[bytes]] = {}
