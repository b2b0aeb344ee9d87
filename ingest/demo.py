"""`usagepipe demo`: the whole path on the real servers, with a summary read back.

services up -> db migrate -> the fleet's devices registered (each gets its broker
account) -> bridge and consumer as their own processes
-> a seeded fleet publishes (duplicates included) -> wait until the store holds
every unique message -> stop both (SIGTERM) -> print what happened, from the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ingest import services
from ingest.kafka import ensure_topics
from ingest.settings import Settings
from ingest.store import UsageStore
from simulators.cli import plan_from_args, provision_fleet, run_fleet
from simulators.fleet import FleetPlan


def _spawn(command: str, log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ingest", command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )


def _metric(port: int, name: str) -> float | None:
    """One sample from a component's /metrics, or None while it is not serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text: str = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    console = Console()
    console.rule("usagepipe demo")
    console.print(services.format_table(services.up(settings)), highlight=False, soft_wrap=True)
    plan = plan_from_args(args)
    return asyncio.run(_demo(settings, plan, args.timeout, console))


async def _demo(settings: Settings, plan: FleetPlan, timeout_s: float, console: Console) -> int:
    run_dir = settings.services.run_dir
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    fleet = await provision_fleet(settings, plan, console)

    started = time.monotonic()
    bridge = _spawn("bridge", run_dir / "demo-bridge.log")
    consumer = _spawn("consume", run_dir / "demo-consume.log")
    try:
        deadline = started + timeout_s
        while _metric(settings.bridge.metrics_port, "usagepipe_bridge_subscribed") != 1.0:
            if bridge.poll() is not None or time.monotonic() > deadline:
                console.print(f"[red]the bridge did not start; see {run_dir}/demo-bridge.log")
                return 1
            await asyncio.sleep(0.2)
        ready_s = time.monotonic() - started
        console.print(
            f"bridge and consumer up in {ready_s:.1f}s; fleet of {plan.devices} devices x "
            f"{plan.messages_per_device} messages, {plan.duplicate_rate:.0%} sent twice",
            highlight=False,
        )
        publishing = time.monotonic()
        report = await run_fleet(settings, plan, console, fleet)
        console.print(
            f"fleet sent {report.sent:,} messages in {report.elapsed_s:.1f}s "
            f"({report.rate:,.0f} msg/s)",
            highlight=False,
        )
        async with UsageStore(settings.postgres) as store:
            stored = 0
            while True:
                rows = await store.fetch(
                    "SELECT count(*) AS n FROM {table} WHERE boot_id = ANY($1::text[])",
                    report.boot_ids,
                )
                stored = int(rows[0]["n"])
                if stored >= report.unique_keys:
                    break
                if time.monotonic() > deadline or consumer.poll() is not None:
                    console.print(
                        f"[red]only {stored} of {report.unique_keys} messages were stored; "
                        f"see {run_dir}/demo-*.log"
                    )
                    return 1
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - publishing
            summary = await store.fetch(
                """
                SELECT split_part(schema, '.', 1) AS category, count(*) AS events,
                       count(DISTINCT device_id) AS devices,
                       min(event_time) AS first, max(event_time) AS last
                FROM {table} WHERE boot_id = ANY($1::text[])
                GROUP BY 1 ORDER BY 2 DESC
                """,
                report.boot_ids,
            )
            top = await store.fetch(
                """
                SELECT schema, count(*) AS events FROM {table}
                WHERE boot_id = ANY($1::text[]) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 8
                """,
                report.boot_ids,
            )
    finally:
        for proc in (bridge, consumer):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (bridge, consumer):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()

    table = Table(title="usage read back from PostgreSQL")
    for col in ("category", "events", "devices", "first event", "last event"):
        table.add_column(col)
    for row in summary:
        table.add_row(
            row["category"],
            f"{row['events']:,}",
            str(row["devices"]),
            f"{row['first']:%Y-%m-%d %H:%M}",
            f"{row['last']:%Y-%m-%d %H:%M}",
        )
    console.print(table)
    console.print(
        "most frequent events: " + ", ".join(f"{r['schema']} {r['events']}" for r in top),
        highlight=False,
    )
    dropped = report.sent - stored
    console.print(
        f"messages sent {report.sent:,} (of which {report.duplicates_sent:,} duplicates) | "
        f"stored {stored:,} | duplicates dropped {dropped:,} | "
        f"first publish to last row {elapsed:.1f}s = {report.sent / elapsed:,.0f} msg/s end to end",
        highlight=False,
    )
    ok = stored == report.unique_keys and dropped == report.duplicates_sent
    console.print("[green]OK: every unique message stored once" if ok else "[red]MISMATCH")
    return 0 if ok else 1
