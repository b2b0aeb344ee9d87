"""CPU time of the bridge's MQTT framer (`ingest.mqtt_wire.BufferedClient.read_packets`).

Feeds the framer byte streams from memory, as the socket would hand them over in reads
of `--chunk` bytes, and prints the CPU seconds each took:

    large     one PUBLISH of `--large-mib` MiB arriving over many reads: linear if each
              read costs what it brings, quadratic if the buffer is copied on every read
    small     `--small` PUBLISHes of 300 bytes back to back (the bridge's usual load)

    .venv/bin/python bench/mqtt_framing.py [--large-mib 32] [--small 200000] [--chunk 262144]

No broker is involved. It prints figures and asserts nothing (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import time

from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest.mqtt_wire import BufferedClient


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, mid: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + mid.to_bytes(2, "big") + b"\x00"
    body += payload
    return b"\x32" + _varint(len(body)) + body


class _Socket:
    """Hands out `data` in reads of `chunk` bytes, then would block."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._view = memoryview(data)
        self._pos = 0
        self._chunk = chunk

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._view):
            raise BlockingIOError
        n = min(size, self._chunk)
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return out

    def close(self) -> None:
        self._pos = len(self._view)


def cpu_seconds(stream: bytes, chunk: int) -> tuple[float, int]:
    """CPU seconds to frame `stream`, and the messages handed on."""
    client = BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id="bench-framing",
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=True,
    )
    count = 0

    def handle(*args: object) -> None:
        nonlocal count
        count += 1

    client.on_publish_received = handle
    client._sock = _Socket(stream, chunk)  # type: ignore[assignment]  # paho private
    reads = -(-len(stream) // chunk)
    started = time.process_time()
    for _ in range(reads):
        client.read_packets()
    return time.process_time() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--large-mib", type=int, default=32)
    parser.add_argument("--small", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=256 * 1024)
    args = parser.parse_args()
    large = publish("devices/bench/telemetry", b"x" * (args.large_mib << 20), 1)
    seconds, count = cpu_seconds(large, args.chunk)
    print(
        f"large: one {args.large_mib} MiB PUBLISH in {-(-len(large) // args.chunk)} reads"
        f" of {args.chunk} bytes: {seconds:.3f} s CPU ({count} message)"
    )
    body = b'{"device_id":"bench"}'.ljust(300, b" ")
    small = b"".join(
        publish("devices/bench/telemetry", body, i % 65535 + 1) for i in range(args.small)
    )
    seconds, count = cpu_seconds(small, args.chunk)
    print(
        f"small: {args.small} PUBLISHes of 300 bytes: {seconds:.3f} s CPU,"
        f" {seconds / max(count, 1) * 1e6:.2f} us each ({count} messages)"
    )


if __name__ == "__main__":
    main()
