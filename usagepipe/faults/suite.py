"""Running one scenario: names of its own, the pipeline's processes, a simulated fleet
with a ledger, the harm done while the fleet plays, `usagepipe verify`, and the fates
expected against those found."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from ingest.kafka import ensure_topics, make_producer
from ingest.settings import Settings
from simulators.ledger import Entry
from simulators.verify import Reconciliation, verify
from usagepipe.faults.processes import Process, scrape
from usagepipe.faults.proxy import HarmfulProxy
from usagepipe.faults.servers import FaultServers, usagepipe_command

CONSUMER_COUNTERS = (
    "usagepipe_consumer_stored_total",
    "usagepipe_consumer_duplicates_total",
    "usagepipe_consumer_consumed_total",
)
BRIDGE_COUNTERS = ("usagepipe_bridge_produced_total", "usagepipe_bridge_acked_total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    """The simulated fleet a scenario plays: `usagepipe simulate` arguments."""

    devices: int = 120
    duration_s: int = 30
    window: str = "7d"
    faults: str = "dup=0.01,reorder=0.01,malformed=0.002"
    seed: int = 11


@dataclass
class Run:
    """One scenario's run: its servers, names, environment, processes and findings."""

    name: str
    servers: FaultServers
    dir: Path
    fleet: Fleet
    env: dict[str, str]
    consumer_env: dict[str, str]
    consumer: Process
    bridge: Process
    consumer_metrics_port: int
    bridge_metrics_port: int
    extra: list[Entry] = field(default_factory=list)
    """Ledger entries of records the scenario produced itself (poison, resends, a flood)."""
    notes: list[str] = field(default_factory=list)
    """What the scenario measured, a line each, for the report."""
    checks: list[tuple[str, str, str, bool]] = field(default_factory=list)
    """(what, expected, observed, ok) beyond the ledger's fates."""
    allowed_missing: int = 0
    """Messages the scenario may lose by design (a memory-only Kafka broker restarted)."""

    @property
    def ledger(self) -> Path:
        return self.dir / "ledger.jsonl"

    def settings(self) -> Settings:
        """The scenario's settings, as its processes read them."""
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            return Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def check(self, what: str, expected: object, observed: object, ok: bool) -> None:
        self.checks.append((what, str(expected), str(observed), ok))

    async def rows(self, device: str | None = None, *, letters: bool = False) -> int:
        """Rows in the scenario's usage table (its dead-letter table with `letters`), of
        `device` only if given; 0 while the table does not exist."""
        table = self.settings().postgres.table + ("_dead_letters" if letters else "")
        conn = await asyncpg.connect(self.servers.dsn)
        try:
            if await conn.fetchval("SELECT to_regclass($1)", table) is None:
                return 0
            if device is None:
                return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            query = f"SELECT count(*) FROM {table} WHERE device_id = $1"
            return int(await conn.fetchval(query, device))
        finally:
            await conn.close()

    def consumer_counters(self) -> dict[str, float]:
        return scrape(self.consumer_metrics_port, CONSUMER_COUNTERS)

    def bridge_counters(self) -> dict[str, float]:
        return scrape(self.bridge_metrics_port, BRIDGE_COUNTERS)

    async def produce(self, records: list[tuple[str, bytes]]) -> None:
        """(device id, payload) records straight to the raw topic, as the bridge would."""
        s = self.settings()
        await ensure_topics(s.kafka, s.kafka.raw_topic, s.kafka.dlq_topic)
        producer = make_producer(s.kafka, client_id=f"{self.name}-produce")
        await producer.start()
        try:
            pending = [
                await producer.send(s.kafka.raw_topic, payload, key=device.encode())
                for device, payload in records
            ]
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    async def command(self, *args: str, timeout_s: float = 300) -> tuple[int, str]:
        """A `usagepipe` command with the scenario's environment: exit status and output."""
        done = await asyncio.to_thread(
            subprocess.run,
            [usagepipe_command(), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr


Harm = Callable[[Run], Awaitable[None]]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.25)
    return False


@dataclass
class Result:
    """What a scenario found: the ledger's reconciliation, the output of `usagepipe
    verify`, and the scenario's own checks."""

    name: str
    reconciliation: Reconciliation
    verify_status: int
    verify_output: str
    run: Run
    seconds: float

    @property
    def missing(self) -> int:
        return sum(1 for d in self.reconciliation.discrepancies if d.startswith("missing row"))

    @property
    def ok(self) -> bool:
        others = [d for d in self.reconciliation.discrepancies if not d.startswith("missing row")]
        within = self.missing <= self.run.allowed_missing
        exact = self.verify_status == 0 or (self.run.allowed_missing and within and not others)
        return bool(exact) and all(ok for *_, ok in self.run.checks)


async def run_scenario(
    servers: FaultServers,
    name: str,
    fleet: Fleet,
    *,
    harm: Harm | None,
    before: Harm | None = None,
    proxy: HarmfulProxy | None = None,
    extra_env: dict[str, str] | None = None,
) -> Result:
    """Play `fleet` through a bridge and a consumer of their own; `before` runs once both
    are up, `harm` once the fleet's traffic reaches the table; then verify the ledger."""
    started = time.monotonic()
    tag = f"f{name}{secrets.token_hex(2)}"
    run_dir = servers.root / "scenarios" / tag
    run_dir.mkdir(parents=True)
    consumer_port, bridge_port = free_port(), free_port()
    env = {
        **servers.env(),
        "USAGEPIPE_KAFKA__RAW_TOPIC": f"{tag}.raw",
        "USAGEPIPE_KAFKA__DLQ_TOPIC": f"{tag}.dlq",
        "USAGEPIPE_REGISTRY__EVENTS_TOPIC": f"{tag}.registry",
        "USAGEPIPE_POSTGRES__TABLE": f"usage_{tag}",
        "USAGEPIPE_REGISTRY__DB_SCHEMA": f"reg_{tag}",
        "USAGEPIPE_CONSUMER__GROUP_ID": f"{tag}-consumers",
        "USAGEPIPE_BRIDGE__CLIENT_ID": f"{tag}-bridge",
        "USAGEPIPE_CONSUMER__METRICS_PORT": str(consumer_port),
        "USAGEPIPE_BRIDGE__METRICS_PORT": str(bridge_port),
        "USAGEPIPE_SIMULATOR__METRICS_PORT": "0",
        "USAGEPIPE_ENRICH__UNREGISTERED": "store",  # the scenarios' own records' devices
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET": secrets.token_hex(32),
        **(extra_env or {}),
    }
    consumer_env = dict(env)
    if proxy is not None:
        consumer_env.update(servers.env(postgres_port=proxy.port))
    consumer = Process("consumer", ["consume"], consumer_env, run_dir / "consumer.log")
    bridge = Process("bridge", ["bridge"], env, run_dir / "bridge.log")
    run = Run(
        tag,
        servers,
        run_dir,
        fleet,
        env,
        consumer_env,
        consumer,
        bridge,
        consumer_port,
        bridge_port,
    )
    async with contextlib.AsyncExitStack() as stack:
        if proxy is not None:
            await stack.enter_async_context(proxy)
        consumer.start()
        bridge.start()
        stack.callback(consumer.stop)
        stack.callback(bridge.stop)
        if before is not None:
            await before(run)
        simulate = Process(
            "simulate",
            [
                "simulate",
                "--devices",
                str(fleet.devices),
                "--duration",
                f"{fleet.duration_s}s",
                "--window",
                fleet.window,
                "--seed",
                str(fleet.seed),
                "--run-id",
                tag,
                "--faults",
                fleet.faults,
                "--ledger",
                str(run.ledger),
            ],
            env,
            run_dir / "simulate.log",
        )
        simulate.start()
        if harm is not None:

            async def flowing() -> bool:
                return await run.rows() >= 8 * fleet.devices or not simulate.alive

            if not await wait_for(flowing, 120):
                run.notes.append("traffic never reached the table; harm done anyway")
            await harm(run)
        status = await asyncio.to_thread(simulate.wait, fleet.duration_s * 4 + 180)
        if status is None:
            simulate.kill()
        run.check("usagepipe simulate exit status", 0, status, status == 0)
        if status != 0:
            run.notes.append(f"simulate said: {simulate.tail(6)}")
        if run.extra:
            with run.ledger.open("ab") as out:
                for entry in run.extra:
                    out.write(entry.to_json() + b"\n")
        s = run.settings()
        reconciliation = await verify(s, run.ledger, timeout_s=90)
        status, output = await run.command("verify", str(run.ledger), "--timeout", "10")
        counters = run.consumer_counters()
        rows = await run.rows()
        stored = int(counters["usagepipe_consumer_stored_total"])
        if consumer.starts == 1:  # one process wrote every row: its counter must say so
            run.check("consumer stored_total = rows in the table", rows, stored, stored == rows)
        else:
            run.notes.append(f"rows {rows:,}; the last consumer process counted {stored:,}")
    return Result(tag, reconciliation, status, output, run, time.monotonic() - started)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    return _ANSI.sub("", text)
