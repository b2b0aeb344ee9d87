"""What trace context costs (`ingest.trace`): should the bridge start a trace for every
message, or sample? Prints, per message, on this machine:

    bridge      CPU of the bridge's trace step (`Bridge._trace`) for a message without
                a traceparent at bridge.trace_sample_ratio 0, 1e-4 and 1, and for one
                with a device's traceparent (read from its MQTT properties, parsed, a
                child span made)
    record      CPU of appending the record to a Kafka batch with the header and
                without, and the bytes the header adds to each record (a plan's
                payload, uncompressed: the producer compresses nothing)
    consumer    CPU of the consumer's per-batch trace log (`ingest.consumer._log_stored`)
                over `--batch` rows with no trace headers, with unsampled traces (INFO:
                no line), and all sampled (consumer.trace_log_max lines a batch, to
                /dev/null through the JSON formatter)

and what those come to at `--rate` messages a second (150k: the bridge's measured
ceiling). No servers are involved; it prints figures and asserts nothing.

    .venv/bin/python bench/trace.py [--messages 200000] [--batch 5000] [--rate 150000]
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import ConsumerRecord
from aiokafka.producer.message_accumulator import BatchBuilder
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry

from ingest.bridge import Bridge
from ingest.consumer import _log_stored
from ingest.metrics import BridgeMetrics
from ingest.rows import UsageRow
from ingest.settings import BridgeSettings, ConsumerSettings, Settings
from ingest.trace import TRACEPARENT, TraceParent
from simulators.plan import FleetPlan, plan_device
from usagepipe.cli.logs import JsonFormatter

DEVICE_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _bridge(ratio: float) -> Bridge:
    settings = Settings(bridge=BridgeSettings(trace_sample_ratio=ratio, metrics_port=0))
    return Bridge(settings, BridgeMetrics(CollectorRegistry()))


def _device_properties() -> bytes:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: no hints
    props.UserProperty = [("traceparent", DEVICE_TRACEPARENT)]
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed[1:]  # without its one-byte length, as the framer hands them over


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - started) / n * 1e6


def _append_us(payload: bytes, headers: list[tuple[str, bytes]], n: int) -> tuple[float, float]:
    """CPU a record and bytes a record of appending `n` records to 512 KiB batches."""
    started = time.process_time()
    total, records, batch = 0, 0, BatchBuilder(512 * 1024, 0)
    for _ in range(n):
        if batch.append(key=b"wm-000001", value=payload, timestamp=None, headers=headers) is None:
            total += batch.size()
            batch = BatchBuilder(512 * 1024, 0)
            batch.append(key=b"wm-000001", value=payload, timestamp=None, headers=headers)
            records = 0
        records += 1
    seconds = time.process_time() - started
    total += batch.size()
    return seconds / n * 1e6, total / n


def _rows(n: int, traceparent: str | None) -> list[UsageRow]:
    headers = [] if traceparent is None else [(TRACEPARENT, traceparent.encode())]
    now = datetime.now(UTC)
    return [
        UsageRow(
            "wm-000001",
            "b1",
            i,
            now,
            "s",
            1,
            {},
            0,
            i,
            source=ConsumerRecord("raw", 0, i, 0, 0, b"k", b"{}", None, 1, 2, headers),
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--rate", type=int, default=150_000)
    args = parser.parse_args()
    n, rate = args.messages, args.rate

    def at_rate(us: float) -> str:
        return f"{us * rate / 1e6 * 100:.1f}% of a core at {rate} msg/s"

    print(f"bridge: the trace step a message ({n} messages)")
    device_props = _device_properties()
    figures = {}
    for label, ratio, props in (
        ("no traceparent, ratio 0", 0.0, b""),
        ("no traceparent, ratio 1e-4 (default)", 1e-4, b""),
        ("no traceparent, ratio 1 (every message)", 1.0, b""),
        ("device traceparent (any ratio)", 0.0, device_props),
    ):
        bridge = _bridge(ratio)
        us = _per_call_us(functools.partial(bridge._trace, props, "wm-000001"), n)
        figures[label] = us
        print(f"  {label:42s} {us:6.2f} us  {at_rate(us)}")

    print(f"record: appending to a Kafka batch ({n} records)")
    payload = plan_device(FleetPlan(devices=1, messages_per_device=1), "wm-000001")[0].payload
    header = [(TRACEPARENT, TraceParent.start().header())]
    bare_us, bare_bytes = _append_us(payload, [], n)
    traced_us, traced_bytes = _append_us(payload, header, n)
    extra = traced_bytes - bare_bytes
    print(f"  without a header  {bare_us:6.2f} us  {bare_bytes:6.1f} bytes a record")
    print(f"  with traceparent  {traced_us:6.2f} us  {traced_bytes:6.1f} bytes a record")
    print(
        f"  the header adds {traced_us - bare_us:.2f} us and {extra:.1f} bytes"
        f" ({extra / bare_bytes * 100:.0f}% of a {len(payload)}-byte payload's record):"
        f" {extra * rate / 1e6:.1f} MB/s more into Kafka at {rate} msg/s, before replication"
    )
    every = figures["no traceparent, ratio 1 (every message)"] + traced_us - bare_us
    print(f"  a trace for every message, bridge side: {every:.2f} us, {at_rate(every)}")

    print(f"consumer: the trace log of a batch of {args.batch} rows (INFO, JSON to /dev/null)")
    log = logging.getLogger("ingest.consumer")
    with open("/dev/null", "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        cap = ConsumerSettings().trace_log_max
        unsampled = DEVICE_TRACEPARENT[:-2] + "00"
        for label, tp in (
            ("no trace headers", None),
            ("every row traced, unsampled", unsampled),
            (f"every row sampled ({cap} lines a batch)", DEVICE_TRACEPARENT),
        ):
            rows = _rows(args.batch, tp)
            runs = max(1, n // args.batch)
            us = _per_call_us(functools.partial(_log_stored, rows, [], cap), runs) / args.batch
            print(f"  {label:42s} {us:6.3f} us a row  {at_rate(us)}")
        log.removeHandler(handler)


if __name__ == "__main__":
    main()
