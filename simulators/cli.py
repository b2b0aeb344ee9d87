"""`usagepipe simulate`: provision a seeded fleet, run it, and print what it sent."""

from __future__ import annotations

import argparse
import asyncio
import secrets

from prometheus_client import CollectorRegistry
from rich.console import Console

from devices.errors import RegistryError
from ingest.kafka import ensure_topics
from ingest.metrics import SimulatorMetrics, serve_metrics
from ingest.settings import Settings
from simulators.fleet import Fleet, FleetPlan, FleetReport
from simulators.provision import ProvisionedFleet, open_registry, provision


def plan_from_args(args: argparse.Namespace) -> FleetPlan:
    """The fleet plan the command-line options describe."""
    for name in ("devices", "messages"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if not 0.0 <= args.duplicates <= 1.0:
        raise SystemExit("--duplicates is a share between 0 and 1")
    return FleetPlan(
        devices=args.devices,
        messages_per_device=args.messages,
        seed=args.seed,
        run_id=args.run_id or secrets.token_hex(4),
        duplicate_rate=args.duplicates,
        rate=args.rate,
    )


async def provision_fleet(
    settings: Settings, plan: FleetPlan, console: Console
) -> ProvisionedFleet:
    """Register `plan`'s devices in the configured registry (and so on the broker)."""
    await ensure_topics(settings.kafka, settings.registry.events_topic)
    async with open_registry(settings) as registry:
        fleet = await provision(registry, plan)
    console.print(
        f"provisioned {len(fleet.credentials)} devices in registry schema"
        f" {settings.registry.db_schema!r} ({fleet.registered} registered, {fleet.reissued}"
        f" already registered and given new secrets) in {fleet.elapsed_s:.1f}s",
        highlight=False,
    )
    return fleet


async def run_fleet(
    settings: Settings, plan: FleetPlan, console: Console, fleet: ProvisionedFleet | None = None
) -> FleetReport:
    """Run `plan` against the configured broker, showing progress on `console`.

    Provisions the fleet first unless `fleet` (an earlier `provision_fleet`) is given.
    """
    if fleet is None:
        fleet = await provision_fleet(settings, plan, console)
    credentials = fleet.credentials
    registry = CollectorRegistry()
    total = plan.devices * plan.messages_per_device

    def progress(report: FleetReport) -> None:
        console.print(f"  sent {report.sent:,} of ~{total:,}", highlight=False)

    with serve_metrics(registry, settings.simulator.metrics_port):
        devices = Fleet(
            settings.mqtt,
            plan,
            SimulatorMetrics(registry),
            credentials=credentials,
            max_inflight=settings.simulator.max_inflight_per_client,
            progress=progress if total >= 5000 else None,
        )
        return await devices.run()


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    console = Console()
    plan = plan_from_args(args)
    try:
        report = asyncio.run(run_fleet(settings, plan, console))
    except RegistryError as exc:
        console.print(f"[red]usagepipe simulate: cannot provision the fleet: {exc}")
        return 2
    console.print(
        f"fleet: {report.devices} devices sent {report.sent:,} messages "
        f"({report.duplicates_sent:,} duplicates, {report.unique_keys:,} unique) "
        f"in {report.elapsed_s:.1f}s = {report.rate:,.0f} msg/s; run id {plan.run_id}",
        highlight=False,
    )
    return 0
