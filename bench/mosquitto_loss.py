"""What a Mosquitto crash loses of a bridge's queued session, and what saving it costs.

While the bridge is away, the broker holds its persistent session's messages in memory
and writes its whole in-memory database to `mosquitto.db` only at an autosave. A kill -9
(or a machine crash) loses every message queued since the last save, although each was
PUBACKed to its device. This script measures that on PRIVATE brokers (the project's
rendered deploy/mosquitto/mosquitto.conf, a free port, a run dir of its own), one per
candidate persistence setting:

    1. a bridge-like client (MQTT v5, clean_start False, session expiry 1 h) subscribes
       as the bridge does and disconnects: its session now queues; a clean restart
       saves it and starts the broker's count of changes at 0;
    2. one device login publishes `backlog - 1` QoS 1 messages, each PUBACKed (at most
       1,000 unacknowledged: the broker's Receive Maximum, far below paho's 65,535
       packet ids); for a save every N changes, N dividing the backlog, `backlog - 1`
       is the worst moment (right before a save); a timed save loses whatever came
       after the last one, so the kill's moment decides;
    3. kill -9 of the broker, restart on the same files, reconnect the session and
       count the distinct messages delivered (until all arrived or 3 s of silence).

For each candidate it prints the messages lost, and the cost: the devices' publish
rate, the longest wait for a PUBACK (a save blocks the broker's one thread), broker CPU
seconds and bytes written to disk (/proc/<pid>/io write_bytes) while queueing, the
saves logged, and the same bytes and saves while the restarted broker drains the
session (every PUBACK from the bridge is a change too).

    .venv/bin/python bench/mosquitto_loss.py [--backlog 100000] [--only changes-10000]

Every candidate at 100,000 takes about 4 minutes; at 1,000,000 leave out changes-1000
(its writes grow with the backlog's square: about 140 GB) and allow 17 minutes for
`--only none --only interval-60 --only changes-10000 --only changes-100000`.

It prints figures and asserts nothing (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.mosquitto import DynsecAccounts, prepare_broker_dir
from ingest.settings import MqttSettings, Settings
from usagepipe.services import (
    MosquittoBroker,
    mosquitto_binary,
    mqtt_answers,
    render_mosquitto_config,
)

CANDIDATES: dict[str, list[str]] = {
    # autosave_interval 0: saved only on a clean exit; the rate and cost baseline.
    "none": ["autosave_interval 0"],
    "interval-60": ["autosave_interval 60"],
    "interval-5": ["autosave_interval 5"],
    "changes-1000": ["autosave_on_changes true", "autosave_interval 1000"],
    "changes-10000": ["autosave_on_changes true", "autosave_interval 10000"],
    "changes-100000": ["autosave_on_changes true", "autosave_interval 100000"],
}
"""Lines replacing the template's `autosave_*` ones (interval-60 was the project's until
issue 17; autosave_interval alone is a time in seconds, with autosave_on_changes a count)."""

WINDOW = 1000  # unacknowledged publishes: deploy/mosquitto's max_inflight_messages
PAYLOAD_PAD = "x" * 120  # a telemetry envelope is ~200 bytes


@dataclass
class Figures:
    published: int
    publish_s: float
    max_puback_wait_s: float
    cpu_s: float
    written: int
    saves: int
    delivered: int = 0
    session_present: bool = False
    drain_s: float = 0.0
    drain_written: int = 0
    drain_saves: int = 0


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def saves(broker: MosquittoBroker) -> int:
    return len(re.findall(r"Saving in-memory database", broker.log_path.read_text()))


def dead(pid: int) -> bool:
    """Gone or a zombie: its listening socket is closed (its cmdline empties before)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def launch(broker: MosquittoBroker) -> int:
    """Start mosquitto on the config already written; its pid once it answers MQTT."""
    subprocess.run([str(mosquitto_binary()), "-c", str(broker.config_path), "-d"], check=True)
    deadline = time.monotonic() + 120  # a large file takes a while to load
    while time.monotonic() < deadline:
        pid = broker.running_pid()
        if pid is not None and mqtt_answers(broker.host, broker.port):
            return pid
        time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not come up; see {broker.log_path}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(client_id: str, username: str, password: str) -> paho.Client:
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set(username, password)
    return c


def connect(c: paho.Client, mqtt: MqttSettings, *, clean_start: bool, expiry: int) -> bool:
    """Connect and wait for CONNACK; whether the broker had a session."""
    got = threading.Event()
    present: list[bool] = []

    def on_connect(
        _c: object, _u: object, flags: paho.ConnectFlags, _rc: object, _p: object
    ) -> None:
        present.append(bool(flags.session_present))
        got.set()

    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
    props.SessionExpiryInterval = expiry
    props.ReceiveMaximum = 100  # Mosquitto 2.0.11 overshoots it in a drain (issue 17)
    c.connect(mqtt.host, mqtt.port, clean_start=clean_start, properties=props)
    c.loop_start()
    if not got.wait(30):
        raise RuntimeError("no CONNACK")
    return present[0]


def publish(mqtt: MqttSettings, device: tuple[str, str], topic: str, n: int) -> tuple[float, float]:
    """Publish n QoS 1 messages, each PUBACKed; (seconds, longest wait for a PUBACK)."""
    window = threading.Semaphore(WINDOW)
    sent_at: dict[int, float] = {}
    longest = [0.0]
    done = threading.Event()
    acked = [0]

    def on_publish(_c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
        longest[0] = max(longest[0], time.monotonic() - sent_at.pop(mid, time.monotonic()))
        acked[0] += 1
        window.release()
        if acked[0] == n:
            done.set()

    c = client(f"{device[0]}", *device)
    c.on_publish = on_publish
    connect(c, mqtt, clean_start=True, expiry=0)
    start = time.monotonic()
    for seq in range(n):
        window.acquire()
        info = c.publish(topic, f'{{"seq":{seq},"pad":"{PAYLOAD_PAD}"}}', qos=1)
        sent_at.setdefault(info.mid, time.monotonic())
    if not done.wait(600):
        raise RuntimeError(f"only {acked[0]} of {n} PUBACKed")
    seconds = time.monotonic() - start
    c.disconnect()
    c.loop_stop()
    return seconds, longest[0]


def drain(mqtt: MqttSettings, client_id: str, expected: int) -> tuple[bool, int, float]:
    """Reconnect the session; (session present, distinct messages delivered, seconds)."""
    seen = bytearray(expected + 1)
    count = [0]
    last = [time.monotonic()]

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        seq = int(message.payload[7 : message.payload.index(b",")])
        if not seen[seq]:
            seen[seq] = 1
            count[0] += 1
        last[0] = time.monotonic()

    assert mqtt.username is not None and mqtt.password is not None
    c = client(client_id, mqtt.username, mqtt.password.get_secret_value())
    c.on_message = on_message
    start = time.monotonic()
    present = connect(c, mqtt, clean_start=False, expiry=3600)
    last[0] = time.monotonic()
    while count[0] < expected and time.monotonic() - last[0] < 3:
        time.sleep(0.05)
    seconds = last[0] - start
    c.disconnect()
    c.loop_stop()
    return present, count[0], seconds


def run(name: str, lines: list[str], backlog: int, root: Path) -> Figures:
    broker = MosquittoBroker(free_port(), root / name, tls_port=free_port())
    broker.dir.mkdir(parents=True)
    (broker.dir / "data").mkdir()
    prepare_broker_dir(broker.dir)
    tls = broker.prepare_tls()  # the project's config has its TLS listener too
    kept = [
        line
        for line in render_mosquitto_config(broker.port, broker.dir.parent, tls).splitlines()
        if not line.startswith(("autosave_interval", "autosave_on_changes"))
    ]
    config = "\n".join([*kept, *lines, ""])
    broker.config_path.write_text(config)
    pid = launch(broker)
    try:
        mqtt = broker.mqtt_settings(Settings().mqtt)
        device = (f"loss-{secrets.token_hex(3)}", secrets.token_urlsafe())

        async def add() -> None:
            async with DynsecAccounts(mqtt) as accounts:
                await accounts.add_device(*device)

        asyncio.run(add())
        bridge_id = f"loss-bridge-{secrets.token_hex(3)}"
        assert mqtt.username is not None and mqtt.password is not None
        bridge = client(bridge_id, mqtt.username, mqtt.password.get_secret_value())
        connect(bridge, mqtt, clean_start=False, expiry=3600)
        subscribed = threading.Event()
        bridge.on_subscribe = lambda *_a: subscribed.set()
        bridge.subscribe("devices/+/telemetry", qos=1)
        subscribed.wait(10)
        bridge.disconnect()
        bridge.loop_stop()
        # A clean restart saves the session and zeroes the broker's count of changes
        # (the set-up made a few), so the publishes below are the only changes counted.
        broker.stop(timeout=120)
        pid = launch(broker)

        written0, cpu0, saves0 = write_bytes(pid), cpu_seconds(pid), saves(broker)
        n = backlog - 1
        seconds, longest = publish(mqtt, device, f"devices/{device[0]}/telemetry", n)
        figures = Figures(
            published=n,
            publish_s=seconds,
            max_puback_wait_s=longest,
            cpu_s=cpu_seconds(pid) - cpu0,
            written=write_bytes(pid) - written0,
            saves=saves(broker) - saves0,
        )
        os.kill(pid, signal.SIGKILL)
        while not dead(pid):
            time.sleep(0.01)
        pid = launch(broker)
        written0, saves0 = write_bytes(pid), saves(broker)
        figures.session_present, figures.delivered, figures.drain_s = drain(mqtt, bridge_id, n)
        figures.drain_written = write_bytes(pid) - written0
        figures.drain_saves = saves(broker) - saves0
        return figures
    finally:
        broker.stop(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--only", action="append", choices=sorted(CANDIDATES))
    args = parser.parse_args()
    only = " ".join(f"--only {o}" for o in args.only or [])
    print(f"$ .venv/bin/python bench/mosquitto_loss.py --backlog {args.backlog} {only}".rstrip())
    version = subprocess.run(
        [str(mosquitto_binary()), "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    print(version)
    header = (f"{'setting':<15} {'published':>9} {'lost':>7} {'rate/s':>7} {'max wait':>8}"
              f" {'cpu s':>6} {'written':>9} {'saves':>5} | {'drain s':>7} {'written':>9}"
              f" {'saves':>5}")  # fmt: skip
    print(header)
    root = Path(tempfile.mkdtemp(prefix="mosquitto-loss-", dir=Path.home()))
    try:
        for name in args.only or CANDIDATES:
            f = run(name, CANDIDATES[name], args.backlog, root)
            lost = f.published - f.delivered
            print(f"{name:<15} {f.published:>9,} {lost:>7,} {f.published / f.publish_s:>7,.0f}"
                  f" {f.max_puback_wait_s:>7.2f}s {f.cpu_s:>6.1f} {f.written / 1e6:>7.1f}MB"
                  f" {f.saves:>5} | {f.drain_s:>7.1f} {f.drain_written / 1e6:>7.1f}MB"
                  f" {f.drain_saves:>5}"
                  + ("" if f.session_present else "  (session gone after the kill)"),
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
