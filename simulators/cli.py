"""`usagepipe simulate`: run a seeded fleet and print what it sent."""

from __future__ import annotations

import argparse
import asyncio
import secrets

from prometheus_client import CollectorRegistry
from rich.console import Console

from ingest.metrics import SimulatorMetrics, serve_metrics
from ingest.settings import Settings
from simulators.fleet import Fleet, FleetPlan, FleetReport


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


async def run_fleet(settings: Settings, plan: FleetPlan, console: Console) -> FleetReport:
    """Run `plan` against the configured broker, showing progress on `console`."""
    registry = CollectorRegistry()
    total = plan.devices * plan.messages_per_device

    def progress(report: FleetReport) -> None:
        console.print(f"  sent {report.sent:,} of ~{total:,}", highlight=False)

    with serve_metrics(registry, settings.simulator.metrics_port):
        fleet = Fleet(
            settings.mqtt,
            plan,
            SimulatorMetrics(registry),
            max_inflight=settings.simulator.max_inflight_per_client,
            progress=progress if total >= 5000 else None,
        )
        return await fleet.run()


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    console = Console()
    plan = plan_from_args(args)
    report = asyncio.run(run_fleet(settings, plan, console))
    console.print(
        f"fleet: {report.devices} devices sent {report.sent:,} messages "
        f"({report.duplicates_sent:,} duplicates, {report.unique_keys:,} unique) "
        f"in {report.elapsed_s:.1f}s = {report.rate:,.0f} msg/s; run id {plan.run_id}",
        highlight=False,
    )
    return 0
