"""The e2e benchmark's processes and measuring tools: services, Kafka topics, rows.

- `Service`: one long-running process (a `usagepipe bridge` or `consume`, or the peer
  mq-bridge route), its log in a file, its CPU seconds and peak RSS read from
  `/proc/<pid>` (all threads, so a Rust core's threads count too).
- `read_topic`: every record of a Kafka topic with its producer timestamp (CreateTime,
  which Tansu keeps), read after the fact so no reader competes with a bridge for CPU.
- `wait_idle`: until a process stopped using CPU (a bridge that drained its backlog).
- `RowPoller`: times sampled messages from their publish until their rows are
  queryable in the usage table.
- The peer: `ensure_mq_bridge` installs PyPI's `mq-bridge` into a virtualenv of its own
  (never the project's), and `mq_bridge_route` writes its MQTT -> Kafka route.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from pathlib import Path
from typing import IO, Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.settings import Settings

MQ_BRIDGE_VERSION = "1.2.0"
MQ_BRIDGE_VENV = Path.home() / ".cache/usagepipe-bench/mq-bridge-venv"
ROUTE_SCRIPT = Path(__file__).with_name("mq_bridge_route.py")
_TICK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    """A progress line, time-stamped (UTC)."""
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", flush=True)


def pid_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def servers_cpu_s(run_dir: Path) -> dict[str, float]:
    """CPU seconds so far of the local servers: our Mosquitto and Tansu (by their pid
    files) and every PostgreSQL process (by name: the cluster is the machine's)."""
    out = {}
    for name, pidfile in (("mosquitto", run_dir / "mosquitto/mosquitto.pid"),
                          ("tansu", run_dir / "tansu.pid")):  # fmt: skip
        with contextlib.suppress(OSError, ValueError):
            out[name] = pid_cpu_s(int(pidfile.read_text().split()[0]))
    postgres = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    postgres += pid_cpu_s(int(entry.name))
    out["postgres"] = postgres
    return out


class Service:
    """One process of the system under test, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log: IO[bytes] = log.open("ab")
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._last_cpu = 0.0
        self._last_rss = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds so far (the last reading once it has exited)."""
        if self.proc.poll() is None:
            self._last_cpu = pid_cpu_s(self.pid) or self._last_cpu
        return self._last_cpu

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) so far."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self._last_rss = int(line.split()[1]) / 1024
        except OSError:
            pass
        return self._last_rss

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 40.0) -> int:
        if self.alive():
            self.cpu_s()
            self.peak_rss_mb()
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


async def db_migrate(usagepipe: str | Path, env: dict[str, str]) -> None:
    """`usagepipe db migrate` with `env`; a failure ends the benchmark with its message."""
    migrate = await asyncio.create_subprocess_exec(
        str(usagepipe), "db", "migrate", env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await migrate.communicate()
    if migrate.returncode != 0:
        raise SystemExit(f"usagepipe db migrate failed: {err.decode()[-2000:]}")


async def wait_idle(service: Service, *, quiet_s: float = 1.0, timeout_s: float = 300.0) -> None:
    """Until `service` has used no more than 2 % of a core for `quiet_s` seconds."""
    deadline = time.monotonic() + timeout_s
    last, since = service.cpu_s(), time.monotonic()
    while time.monotonic() < deadline and service.alive():
        await asyncio.sleep(0.1)
        cpu = service.cpu_s()
        if cpu - last > 0.02 * (time.monotonic() - since) + 0.011:
            last, since = cpu, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


@dataclass(frozen=True)
class TopicRecord:
    timestamp_ms: int
    value: bytes


async def read_topic(settings: Settings, topic: str, idle_s: float = 1.0) -> list[TopicRecord]:
    """Every record of `topic` from the start (no consumer group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = await consumer._client._wait_on_metadata(topic)  # no public way to wait
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[TopicRecord] = []
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=50_000)
            if not batch:
                return out
            for records in batch.values():
                out.extend(TopicRecord(r.timestamp, r.value) for r in records)
    finally:
        await consumer.stop()


async def count_rows(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


class RowPoller:
    """Publish -> queryable-row latency of sampled messages.

    Publishers send (key, wall-clock publish time) for every n-th message; every
    `interval_s` this asks the usage table which pending keys have a row. A row found
    by a query that started at `t` was queryable by `t`, so its latency is `t` minus
    its publish time: an upper bound, at most one interval (plus a query) late.
    """

    # The message ids' table, written in the rows' own transaction, by its primary key:
    # the raw table has no index on the message id (migration 007), so polling it scanned
    # the whole table every interval, which on a soak's growing table took PostgreSQL
    # from 11 % to 37 % of a core and slowed the pipeline it measured.
    QUERY = (
        "SELECT u.device_id, u.boot_id, u.seq FROM {table}_ids u"
        " JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS k(d, b, s)"
        " ON u.device_id = k.d AND u.boot_id = k.b AND u.seq = k.s"
    )

    def __init__(self, dsn: str, table: str, samples: Queue[Any], interval_s: float = 0.02):
        self._dsn = dsn
        self._query = self.QUERY.format(table=table)
        self._samples = samples
        self.interval_s = interval_s
        self.pending: dict[tuple[str, str, int], float] = {}
        self.published: dict[tuple[str, str, int], float] = {}
        self.latencies: list[float] = []
        self.timeline: list[tuple[float, float]] = []
        """(publish time, latency) of every sample found, for where the slow ones were."""

    def _take_samples(self) -> None:
        while True:
            try:
                key, published = self._samples.get_nowait()
            except queue.Empty:
                return
            self.pending[tuple(key)] = self.published[tuple(key)] = published

    async def run(self, publishing_done: asyncio.Event, timeout_after_done_s: float) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            deadline = None
            while True:
                self._take_samples()
                if publishing_done.is_set():
                    self._take_samples()
                    deadline = deadline or time.monotonic() + timeout_after_done_s
                    if not self.pending or time.monotonic() > deadline:
                        return
                if self.pending:
                    keys = list(self.pending)
                    asked = time.time()
                    rows = await conn.fetch(
                        self._query,
                        [k[0] for k in keys],
                        [k[1] for k in keys],
                        [k[2] for k in keys],
                    )
                    for row in rows:
                        published = self.pending.pop((row[0], row[1], row[2]), None)
                        if published is not None:
                            self.latencies.append(asked - published)
                            self.timeline.append((published, asked - published))
                await asyncio.sleep(self.interval_s)
        finally:
            await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def per_second(timeline: list[tuple[float, float]]) -> list[list[float]]:
    """[second since the first publish, p50, max] of the latencies, per second published."""
    if not timeline:
        return []
    start = min(t for t, _ in timeline)
    seconds: dict[int, list[float]] = {}
    for t, latency in timeline:
        seconds.setdefault(int(t - start), []).append(latency)
    return [[s, round(percentile(v, 0.5), 3), round(max(v), 3)] for s, v in sorted(seconds.items())]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# -- the peer: mq-bridge in a virtualenv of its own --------------------------------------


def ensure_mq_bridge() -> tuple[Path | None, str]:
    """The mq-bridge venv's interpreter (created on first use), or None and why not."""
    python = MQ_BRIDGE_VENV / "bin/python"
    check = [
        str(python),
        "-c",
        "import mq_bridge, importlib.metadata as m; print(m.version('mq-bridge'))",
    ]
    if python.exists():
        found = subprocess.run(check, capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip() == MQ_BRIDGE_VERSION:
            return python, f"mq-bridge {MQ_BRIDGE_VERSION} in {MQ_BRIDGE_VENV}"
    base = Path(sys.base_prefix) / "bin/python3"
    steps = [
        [str(base), "-m", "venv", str(MQ_BRIDGE_VENV)],
        [str(python), "-m", "pip", "install", "-q", f"mq-bridge=={MQ_BRIDGE_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return None, f"{' '.join(step)} failed: {done.stderr.strip()[-500:]}"
    found = subprocess.run(check, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        return None, f"mq_bridge does not import: {found.stderr.strip()[-500:]}"
    return python, f"mq-bridge {found.stdout.strip()} installed into {MQ_BRIDGE_VENV}"


TOOLS_VENV = Path.home() / ".cache/usagepipe-bench/tools-venv"
PY_SPY_VERSION = "0.4.3"


def ensure_py_spy() -> Path:
    """py-spy (for `--profile`), installed on first use into a virtualenv of its own."""
    py_spy = TOOLS_VENV / "bin/py-spy"
    if not py_spy.exists():
        base = Path(sys.base_prefix) / "bin/python3"
        subprocess.run([str(base), "-m", "venv", str(TOOLS_VENV)], check=True)
        pip = [str(TOOLS_VENV / "bin/python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"py-spy=={PY_SPY_VERSION}"], check=True)
    return py_spy


def mq_bridge_route(
    settings: Settings, *, client_id: str, topic: str, max_inflight: int
) -> dict[str, Any]:
    """The peer's route: our Mosquitto (the bridge's login, a persistent session, QoS 1,
    acked after Kafka confirmed: mq-bridge's default manual ack) -> our Kafka (acks=all,
    no compression and no idempotence, as our producer runs on Tansu)."""
    mqtt = settings.mqtt
    assert mqtt.username is not None and mqtt.password is not None
    return {
        "input": {
            "mqtt": {
                "url": f"tcp://{mqtt.host}:{mqtt.port}",
                "topic": f"{mqtt.topic_prefix}devices/+/telemetry",
                "username": mqtt.username,
                "password": mqtt.password.get_secret_value(),
                "client_id": client_id,
                "qos": 1,
                "protocol": "v5",
                "clean_session": False,
                "session_expiry_interval": mqtt.session_expiry_s,
                "max_inflight": max_inflight,
                # Its default (100) deadlocks a restart that finds a backlog bigger
                # than the channel: the route never reports ready. Room for a whole
                # Receive Maximum, as our bridge has.
                "queue_capacity": max_inflight,
            }
        },
        "output": {
            "kafka": {
                "url": settings.kafka.bootstrap_servers,
                "topic": topic,
                "partitions": settings.kafka.partitions,
                "producer_options": [
                    ["acks", "all"],
                    ["enable.idempotence", "false"],
                    ["compression.type", "none"],
                ],
            }
        },
        "required_delivery": "at_least_once",
        # A restart facing a large backlog takes longer than the default 5 s to report
        # ready; the drain is timed on the records, so a longer wait costs nothing.
        "startup_timeout_ms": 60_000,
    }
