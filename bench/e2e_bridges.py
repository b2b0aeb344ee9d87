"""The e2e benchmark's bridges alone (no consumer): ours and PyPI's mq-bridge, in turn.

- live: a bridge running, the fleet publishing into it as fast as it can; the bridge
  is load-limited when its last record reached Kafka within 0.5 s of the last PUBACK.
- drain: each bridge's persistent session opened (a probe message forwarded), the
  bridge stopped, one backlog published for all of them (the broker queues it in every
  session), then each bridge started in turn and timed from its first record in Kafka
  to its last (the records' CreateTime). CPU is the process's less what its start cost
  (measured when its session was opened).

Each bridge writes to a topic of its own; every record is checked against the ledger's
payload digests: nothing missing, no duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2e_procs import ROUTE_SCRIPT, Service, mq_bridge_route, read_topic, say, wait_idle

from ingest.mqtt import MqttClient
from simulators.ledger import digest, read_ledger

if TYPE_CHECKING:
    from e2e import Bench


def start_bridge(bench: Bench, kind: str, client_id: str, topic: str) -> Service:
    log = bench.dir / f"{kind}-{client_id}.log"
    if client_id not in bench.sessions:
        bench.sessions.append(client_id)
    if kind == "usagepipe":
        env = {**bench.env, "USAGEPIPE_BRIDGE__CLIENT_ID": client_id,
               "USAGEPIPE_KAFKA__RAW_TOPIC": topic}  # fmt: skip
        return Service(kind, [bench.usagepipe, "--log-level", "INFO", "bridge"], env, log)
    assert bench.peer_python is not None
    route = mq_bridge_route(bench.settings, client_id=client_id, topic=topic,
                            max_inflight=bench.settings.bridge.max_inflight)  # fmt: skip
    argv = [str(bench.peer_python), str(ROUTE_SCRIPT), json.dumps(route)]
    return Service(kind, argv, dict(os.environ), log)


async def probe(bench: Bench, topic: str, service: Service, timeout_s: float = 60) -> None:
    """Publish probes until one reaches `topic`: the bridge is subscribed."""
    device = f"probe{secrets.token_hex(3)}"
    payload = json.dumps({"device_id": device}).encode()
    deadline = time.monotonic() + timeout_s
    async with MqttClient(bench.settings.mqtt, client_id=f"{bench.name}-probe") as client:
        while time.monotonic() < deadline:
            if not service.alive():
                raise SystemExit(f"{service.name} exited; see {service.log}")
            await (await client.publish(f"{bench.settings.mqtt.topic_prefix}devices/"
                                        f"{device}/telemetry", payload))  # fmt: skip
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                if await read_topic(bench.settings, topic, idle_s=0.3):
                    return
    raise SystemExit(f"{service.name} forwarded no probe to {topic}; see {service.log}")


def ledger_digests(ledgers: list[Path]) -> Counter[str]:
    return Counter(e.digest for path in ledgers for e in read_ledger(path))


async def measure_topic(
    bench: Bench, service: Service, topic: str, ledgers: list[Path], since: float
) -> dict[str, Any]:
    """Wait until `service` is idle and `topic` holds every ledger message; figures."""
    want = ledger_digests(ledgers)
    deadline = time.monotonic() + 600
    while True:
        await wait_idle(service, quiet_s=1.0)
        records = [r for r in await read_topic(bench.settings, topic) if b"probe" not in r.value]
        got = Counter(digest(r.value) for r in records)
        missing = sum((want - got).values())
        if not missing or time.monotonic() > deadline or not service.alive():
            break
    extra = sum((got - want).values())
    stamps = sorted(r.timestamp_ms for r in records if r.timestamp_ms >= since * 1000 - 5)
    span = (stamps[-1] - stamps[0]) / 1000 if len(stamps) > 1 else float("nan")
    return {
        "records": len(records),
        "expected": sum(want.values()),
        "missing": missing,
        "duplicates": extra,
        "first_to_last_record_s": span,
        "msg_s": (len(stamps) - 1) / span if span and span > 0 else float("nan"),
        "last_record_at": stamps[-1] / 1000 if stamps else float("nan"),
        "cpu_s": service.cpu_s(),
        "peak_rss_mb": service.peak_rss_mb(),
    }


async def bridges_alone(bench: Bench) -> None:
    kinds = ["usagepipe"]
    if bench.peer_python is not None:
        kinds.append("mq-bridge")
    # Live: the fleet publishing as fast as it can into a running bridge.
    for kind in kinds:
        topic = f"{bench.name}.{kind}.live"
        bench.topics.append(topic)
        service = start_bridge(bench, kind, f"{bench.name}-{kind}-live", topic)
        try:
            await probe(bench, topic, service)
            cpu0 = service.cpu_s()
            per_device = math.ceil(bench.sizes.live / (bench.args.publishers * bench.args.devices))
            first_ledger = len(bench.ledgers)
            run = await bench.load(f"live{kind[:3]}", per_device=per_device, duplicates=0.0)
            figures = await measure_topic(bench, service, topic, bench.ledgers[first_ledger:],
                                               run["go_at"])  # fmt: skip
        finally:
            service.stop()
        figures["cpu_s"] -= cpu0
        figures["cpu_s_per_1000"] = figures["cpu_s"] / run["sent"] * 1000
        figures["publish_msg_s"] = run["publish_rate"]
        lag = figures["last_record_at"] - run["last_puback"]
        figures["last_record_after_last_puback_s"] = lag
        figures["limited_by"] = "load" if lag <= 0.5 else "bridge"
        bench.results[f"live_{kind}"] = figures
        say(f"live {kind}: {figures['msg_s']:,.0f} msg/s into Kafka (publishers"
            f" {run['publish_rate']:,.0f} msg/s; {figures['limited_by']}-limited),"
            f" {figures['cpu_s_per_1000'] * 1000:.0f} CPU-ms per 1,000,"
            f" missing {figures['missing']}")  # fmt: skip

    # Drain: each bridge's session opened, the bridge stopped, one backlog queued for
    # all of them, then each started in turn and timed.
    startup: dict[str, float] = {}
    for kind in kinds:
        topic = f"{bench.name}.{kind}.drain"
        bench.topics.append(topic)
        service = start_bridge(bench, kind, f"{bench.name}-{kind}-drain", topic)
        try:
            await probe(bench, topic, service)
            await asyncio.sleep(0.5)
            startup[kind] = service.cpu_s()
        finally:
            service.stop()
    per_device = math.ceil(bench.sizes.drain / (bench.args.publishers * bench.args.devices))
    first_ledger = len(bench.ledgers)
    backlog = await bench.load("drain", per_device=per_device, duplicates=0.0)
    say(f"backlog: {backlog['sent']:,} messages queued for {len(kinds)} stopped bridges"
        f" at {backlog['publish_rate']:,.0f} msg/s")  # fmt: skip
    for kind in kinds:
        topic = f"{bench.name}.{kind}.drain"
        started = time.time()
        service = start_bridge(bench, kind, f"{bench.name}-{kind}-drain", topic)
        try:
            figures = await measure_topic(bench, service, topic, bench.ledgers[first_ledger:],
                                               started)  # fmt: skip
        finally:
            service.stop()
        figures["startup_cpu_s"] = startup[kind]
        figures["cpu_s_with_startup"] = figures["cpu_s"]
        figures["cpu_s"] -= startup[kind]
        figures["cpu_s_per_1000"] = figures["cpu_s"] / backlog["sent"] * 1000
        figures["from_process_start_msg_s"] = backlog["sent"] / (
            figures["last_record_at"] - started
        )
        bench.results[f"drain_{kind}"] = figures
        say(f"drain {kind}: {figures['msg_s']:,.0f} msg/s first to last record"
            f" ({figures['from_process_start_msg_s']:,.0f} from process start),"
            f" {figures['cpu_s_per_1000'] * 1000:.0f} CPU-ms per 1,000, peak RSS"
            f" {figures['peak_rss_mb']:.0f} MB, missing {figures['missing']}")  # fmt: skip
