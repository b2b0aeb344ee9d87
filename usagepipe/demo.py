"""`usagepipe demo`: the whole path on the real servers, leaving a planner-ready dataset.

services up -> db migrate -> the fleet's units provisioned with their history (bought,
registered, some handed over: `simulators.history`) -> bridge and consumer as their
own processes -> the fleet plays four weeks of household usage ending now, as fast as
it can (`simulators.cli.demo_plan`; duplicates included) -> wait until the store holds
every unique message (the consumer without the per-device ceiling: `PLAYBACK`) ->
stop both (SIGTERM) -> materialise the rollups and run every planners' report -> print
what happened, how much of each report is shown at k, and what a planner does next.

Beside a bridge or consumer already running (what "Run the path by hand" leaves), the
demo runs its own under names of their own (`own_names`), because sharing theirs
breaks it:

- the MQTT client id: a second connection under the running bridge's id takes its
  session over, and each reconnecting bridge then throws the other out;
- the consumer group: the running consumer would be given some of the partitions and
  store their rows with its own settings (perhaps another table, or stale code),
  while the demo waits for rows that never come to its table;
- the metrics ports: the running bridge's answers the demo's readiness check while
  the demo's own bridge could not start.

The demo's bridge keeps its broker session only a minute after it stops, so the
broker does not queue every later run's messages for it. A running bridge also
forwards the demo's messages (each reaches Kafka twice and is stored once); a running
consumer of the same table may store some of the demo's rows first, which count: the
demo checks the rows of its fleet's boots, whoever stored them, so rows that were all
stored never make it report a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.table import Table

from ingest.kafka import ensure_topics
from ingest.settings import Settings
from ingest.store import UsageStore
from insights.filters import Filters
from insights.privacy import Privacy
from insights.reports import REPORTS
from insights.runner import run_report
from schemas.errors import UsagepipeError
from simulators.cli import fleet_failure, plan_from_args, provision_fleet, run_fleet
from simulators.plan import FleetPlan
from simulators.report import FleetReport
from usagepipe import services

READY_S = 60.0
"""The bridge subscribes within seconds; a refusal (a wrong login or topic prefix) it
only logs, so the demo stops waiting after this long and shows the log."""
SESSION_EXPIRY_S = 60
"""How long the broker keeps the demo bridge's session after the demo."""
PLAYBACK = {"USAGEPIPE_CONSUMER__DEVICE_RATE_PER_S": "0"}
"""The demo's consumer runs without the per-device ceiling: the fleet plays four weeks
in about half a minute, so a busy appliance sends hundreds of messages in seconds,
which from a real one would be a flood (`ingest.rate_limit`)."""
NEXT_REPORT = ("regions", "cycles", "heatmap", "adoption", "cohorts", "programs")
"""The report the demo suggests, the first of these that shows segments."""


@dataclass(frozen=True)
class OwnNames:
    """The demo's bridge and consumer identities, and where their metrics are served."""

    bridge_client_id: str
    consumer_group_id: str
    bridge_metrics_port: int
    consumer_metrics_port: int

    def environment(self) -> dict[str, str]:
        return {
            "USAGEPIPE_BRIDGE__CLIENT_ID": self.bridge_client_id,
            "USAGEPIPE_CONSUMER__GROUP_ID": self.consumer_group_id,
            "USAGEPIPE_BRIDGE__METRICS_PORT": str(self.bridge_metrics_port),
            "USAGEPIPE_CONSUMER__METRICS_PORT": str(self.consumer_metrics_port),
            "USAGEPIPE_MQTT__SESSION_EXPIRY_S": str(SESSION_EXPIRY_S),
        }


def own_names(settings: Settings) -> OwnNames:
    """The configured client id and group with `-demo` appended (stable across demo
    runs, so the demo's group resumes from its stored offsets), and free ports."""
    return OwnNames(
        f"{settings.bridge.client_id}-demo",
        f"{settings.consumer.group_id}-demo",
        _free_port(),
        _free_port(),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _spawn(command: str, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "usagepipe", command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


def _scrape(port: int) -> str | None:
    """A component's /metrics text, or None while nothing serves it."""
    if port == 0:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text: str = resp.read().decode()
            return text
    except (OSError, ValueError):
        return None


def _metric(port: int, name: str) -> float | None:
    """One sample from a component's /metrics, or None while it is not serving."""
    for line in (_scrape(port) or "").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def running_beside(settings: Settings) -> list[str]:
    """What already runs on the configured metrics ports (a hand-run bridge, consumer),
    each as a line saying what the demo does about it."""
    notes = []
    bridge = _scrape(settings.bridge.metrics_port) or ""
    if "usagepipe_bridge_" in bridge:
        notes.append(
            f"a bridge is already running (metrics on 127.0.0.1:{settings.bridge.metrics_port},"
            f" client id {settings.bridge.client_id!r} unless it was started otherwise): it"
            " forwards the demo's messages too, which are stored once"
        )
    consumer = _scrape(settings.consumer.metrics_port) or ""
    if "usagepipe_consumer_" in consumer:
        notes.append(
            "a consumer is already running (metrics on"
            f" 127.0.0.1:{settings.consumer.metrics_port}): it may store some of the demo's"
            " rows first, with its own settings; stop it for a demo of this checkout alone"
        )
    return notes


def _problems(log: Path, lines: int = 5) -> list[str]:
    """The last warnings and errors of this run's part of a log (else its last lines)."""
    try:
        text = log.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return []
    worrying = [line for line in text if " ERROR " in line or " WARNING " in line]
    return (worrying or text)[-lines:]


def _usagepipe() -> str:
    """How to call this checkout's console script from here."""
    for candidate in (Path(sys.argv[0]), Path(sys.executable).with_name("usagepipe")):
        if candidate.name == "usagepipe" and candidate.exists():
            with contextlib.suppress(ValueError):
                return str(candidate.resolve().relative_to(Path.cwd()))
            return str(candidate)
    return "usagepipe"


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    console = Console()
    console.rule("usagepipe demo")
    console.print(services.format_table(services.up(settings)), highlight=False, soft_wrap=True)
    plan = plan_from_args(args, settings)
    try:
        return asyncio.run(_demo(settings, plan, args.timeout, console))
    except (UsagepipeError, BaseExceptionGroup) as exc:
        failure = fleet_failure(exc)
        if failure is None:
            raise
        console.print(f"[red]usagepipe demo: {failure}", highlight=False)
        return 1


async def _demo(settings: Settings, plan: FleetPlan, timeout_s: float, console: Console) -> int:
    run_dir = settings.services.run_dir
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    for note in running_beside(settings):
        console.print(f"note: {note}", highlight=False)
    names = own_names(settings)
    fleet = await provision_fleet(settings, plan, console)

    started = time.monotonic()
    bridge = _spawn("bridge", run_dir / "demo-bridge.log", names.environment())
    consumer = _spawn("consume", run_dir / "demo-consume.log", {**names.environment(), **PLAYBACK})
    try:
        deadline = started + timeout_s
        ready_by = started + min(READY_S, timeout_s)
        if not await _bridge_subscribed(bridge, names, ready_by, run_dir, console):
            return 1
        ready_s = time.monotonic() - started
        console.print(
            f"bridge (client id {names.bridge_client_id}) and consumer (group"
            f" {names.consumer_group_id}) up in {ready_s:.1f}s; {_describe(plan)}",
            highlight=False,
        )
        publishing = time.monotonic()
        report = await run_fleet(settings, plan, console, fleet)
        played = time.monotonic()
        console.print(
            f"fleet sent {report.sent:,} messages in {report.elapsed_s:.1f}s "
            f"({report.rate:,.0f} msg/s)",
            highlight=False,
        )
        async with UsageStore(settings.postgres) as store:
            stored = await _all_stored(
                store, report, consumer, deadline=deadline, run_dir=run_dir, console=console
            )
            if stored is None:
                return 1
            caught_up = time.monotonic()
            summary, top = await _read_back(store, report.boot_ids)
    finally:
        _stop(bridge, consumer)

    ok = _print_read_back(
        console,
        report,
        stored,
        summary,
        top,
        elapsed=caught_up - publishing,
        after_puback=caught_up - played,
    )

    reporting = time.monotonic()
    coverage = await report_coverage(settings)
    _print_coverage(console, settings, coverage, time.monotonic() - reporting)
    return 0 if ok else 1


async def _bridge_subscribed(
    bridge: subprocess.Popen[bytes],
    names: OwnNames,
    ready_by: float,
    run_dir: Path,
    console: Console,
) -> bool:
    """Wait for the demo's bridge to subscribe; if it exits or `ready_by` passes first,
    show the last problems in its log and say no."""
    while _metric(names.bridge_metrics_port, "usagepipe_bridge_subscribed") != 1.0:
        if bridge.poll() is not None or time.monotonic() > ready_by:
            log = run_dir / "demo-bridge.log"
            console.print(
                f"[red]the bridge did not subscribe within {READY_S:g}s; {log} says:",
                highlight=False,
            )
            for line in _problems(log):
                console.print(f"  {line}", highlight=False, markup=False)
            return False
        await asyncio.sleep(0.2)
    return True


async def _stored(store: UsageStore, boot_ids: list[str]) -> int:
    """How many rows of the fleet's boots the store holds, whoever stored them."""
    rows = await store.fetch(
        "SELECT count(*) AS n FROM {table} WHERE boot_id = ANY($1::text[])", boot_ids
    )
    return int(rows[0]["n"])


async def _all_stored(
    store: UsageStore,
    report: FleetReport,
    consumer: subprocess.Popen[bytes],
    *,
    deadline: float,
    run_dir: Path,
    console: Console,
) -> int | None:
    """Wait until the store holds every unique message the fleet sent, and say how many
    rows it holds; None (after saying why) if the consumer stops or `deadline` passes."""
    while True:
        stored = await _stored(store, report.boot_ids)
        if stored >= report.unique_keys:
            return stored
        if time.monotonic() > deadline or consumer.poll() is not None:
            await asyncio.sleep(1.0)  # a last look: rows stored meanwhile count
            stored = await _stored(store, report.boot_ids)
            if stored >= report.unique_keys:
                return stored
            why = "the consumer stopped" if consumer.poll() is not None else "time is up"
            console.print(
                f"[red]only {stored:,} of {report.unique_keys:,} messages were stored"
                f" ({why}); see {run_dir}/demo-*.log"
            )
            return None
        await asyncio.sleep(0.2)


async def _read_back(
    store: UsageStore, boot_ids: list[str]
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """The fleet's stored usage per category, and its most frequent events."""
    summary = await store.fetch(
        """
        SELECT split_part(schema, '.', 1) AS category, count(*) AS events,
               count(DISTINCT device_id) AS devices,
               min(event_time) AS first, max(event_time) AS last
        FROM {table} WHERE boot_id = ANY($1::text[])
        GROUP BY 1 ORDER BY 2 DESC
        """,
        boot_ids,
    )
    top = await store.fetch(
        """
        SELECT schema, count(*) AS events FROM {table}
        WHERE boot_id = ANY($1::text[]) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 8
        """,
        boot_ids,
    )
    return summary, top


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    """SIGTERM to each process still running, then wait for each (killed after 30 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()


def _print_read_back(
    console: Console,
    report: FleetReport,
    stored: int,
    summary: list[asyncpg.Record],
    top: list[asyncpg.Record],
    *,
    elapsed: float,
    after_puback: float,
) -> bool:
    """Print the usage read back and the counts, `elapsed` seconds from the first publish
    to the last row; whether every unique message was stored exactly once."""
    table = Table(title="usage read back from PostgreSQL")
    for col in ("category", "events", "devices", "first event (UTC)", "last event (UTC)"):
        table.add_column(col, justify="right" if col in ("events", "devices") else "left")
    for row in summary:
        table.add_row(
            row["category"],
            f"{row['events']:,}",
            f"{row['devices']:,}",
            f"{row['first'].astimezone(UTC):%Y-%m-%d %H:%M}",
            f"{row['last'].astimezone(UTC):%Y-%m-%d %H:%M}",
        )
    console.print(table)
    console.print(
        "most frequent events: " + ", ".join(f"{r['schema']} {r['events']:,}" for r in top),
        highlight=False,
    )
    dropped = report.sent - stored
    console.print(
        f"messages sent {report.sent:,} (of which {report.duplicates_sent:,} duplicates) | "
        f"stored {stored:,} | duplicates dropped {dropped:,} | "
        f"first publish to last row {elapsed:.1f}s = {report.sent / elapsed:,.0f} msg/s end to"
        f" end; the last row {after_puback:.1f}s after the last PUBACK",
        highlight=False,
    )
    ok = stored == report.unique_keys and dropped == report.duplicates_sent
    console.print("[green]OK: every unique message stored once" if ok else "[red]MISMATCH")
    return ok


def _describe(plan: FleetPlan) -> str:
    duplicates = plan.faults.dup if plan.usage else plan.duplicate_rate
    if plan.usage:
        assert plan.window is not None and plan.sim_start is not None
        pace = f"at {plan.speed:,.0f}x" if plan.speed else "as fast as possible"
        return (
            f"fleet of {plan.devices:,} devices: {plan.window.days:g} days of household usage"
            f" from {plan.sim_start:%Y-%m-%d %H:%M %Z} to now, {pace};"
            f" {duplicates:.0%} sent twice"
        )
    return (
        f"fleet of {plan.devices:,} devices x {plan.messages_per_device} messages"
        f" (the {plan.mix} mix), {duplicates:.0%} sent twice"
    )


@dataclass(frozen=True)
class Coverage:
    """One report over the default range: segments with their numbers shown, and all."""

    report: str
    shown: int
    segments: int
    marketing: bool


async def report_coverage(settings: Settings) -> list[Coverage]:
    """Every planners' report (cohorts by channel and by tier) over the reports' default
    range (the 28 days up to the current hour), at `insights.k_anonymity`, after the
    rollups are materialised: how many segments show their numbers."""
    async with UsageStore(settings.postgres) as store:
        await store.migrate()  # applies nothing: reads the table's layout
        await store.refresh_rollups(wait=True)
    filters = Filters.parse(max_days=settings.insights.max_range_days)
    privacy = Privacy(settings.insights.k_anonymity, settings.registry.db_schema)
    runs: list[tuple[str, str, dict[str, str | None]]] = []
    for name in REPORTS:
        if name == "cohorts":
            runs += [(name, f"{name} --by {by}", {"by": by}) for by in ("channel", "tier")]
        else:
            runs.append((name, name, {}))
    out = []
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        for name, label, options in runs:
            report = await run_report(
                conn,
                name,
                filters,
                table=settings.postgres.table,
                privacy=privacy,
                options=options,
                timezone=settings.insights.timezone,
            )
            records = report.records()
            shown = sum(1 for r in records if r["suppressed_reason"] is None)
            out.append(Coverage(label, shown, len(records), report.spec.marketing))
    finally:
        await conn.close()
    return out


def _print_coverage(
    console: Console, settings: Settings, coverage: list[Coverage], seconds: float
) -> None:
    k = settings.insights.k_anonymity
    table = Table(
        title=f"planners' reports, the 28 days up to now, k = {k} (run in {seconds:.1f}s)",
        caption=(
            "* marketing-usable: owners active now with analytics and marketing consent in force"
        ),
    )
    for col in ("report", "segments shown", "of"):
        table.add_column(col, justify="left" if col == "report" else "right")
    for c in coverage:
        table.add_row(c.report + (" *" if c.marketing else ""), f"{c.shown:,}", f"{c.segments:,}")
    console.print(table)
    empty = [c.report for c in coverage if c.shown == 0]
    if empty:
        console.print(
            f"[yellow]no segment shown at k = {k} by: {', '.join(empty)}; play more appliances"
            " or days (--devices, --window)",
            highlight=False,
        )
    cli = _usagepipe()
    host, port = settings.insights.http_host, settings.insights.http_port
    console.print("What a planner does next:", highlight=False)
    # The dashboard needs a planner's token (`ingest.auth`): locally `insights serve`
    # prints the address with one from the dev signer in its fragment.
    signed_in = (
        "the address it prints (signed in as a planner)"
        if settings.auth.issuer is None
        else f"http://{host}:{port}/#token=<a planner's token from {settings.auth.issuer}>"
    )
    console.print(f"  {cli} insights serve    then open {signed_in}", highlight=False)
    suggested = next((c for n in NEXT_REPORT for c in coverage if c.report == n and c.shown), None)
    if suggested is not None:
        console.print(
            f"  {cli} report {suggested.report}    ({suggested.shown} of {suggested.segments}"
            " segments shown; --format csv, --chart FILE.png; `report --help` lists all eight)",
            highlight=False,
        )
