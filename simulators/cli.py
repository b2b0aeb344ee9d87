"""`usagepipe simulate`: provision a seeded fleet, run it, and print what it sent.

    usagepipe simulate --devices 1000 --duration 60s --seed 7 \\
        --faults dup=0.01,reorder=0.01,malformed=0.001 --ledger run.jsonl

plays a week of household usage (`--window 7d`, ending now unless `--sim-start`) in
about a minute, writing every message and its expected fate to `run.jsonl`, which
`usagepipe verify run.jsonl` then checks against the database and the dead letters.

`usagepipe demo` plays `demo_plan`: by default four weeks of usage of 1,200 appliances
ending now, as fast as possible, enough for every planners' report to show segments
at k = 10; `--mix uniform` plays the plain mode's uniform stress mix instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.live import Live
from rich.table import Table

from devices.errors import RegistryError
from ingest.errors import BrokerUnavailable, ConfigurationError
from ingest.kafka import ensure_topics
from ingest.metrics import SimulatorMetrics, serve_metrics
from ingest.setting_errors import variable
from ingest.settings import Settings
from schemas.errors import UsagepipeError
from simulators.faults import FAULT_NAMES, FaultRates, parse_faults
from simulators.fleet import Fleet
from simulators.history import HistoryError
from simulators.ledger import LedgerWriter
from simulators.plan import FleetPlan, Mix
from simulators.provision import ProvisionedFleet, open_registry, provision
from simulators.report import FleetReport

_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def span(text: str) -> timedelta:
    """`90`, `90s`, `5m`, `12h`, `7d`, `2w` -> a timedelta."""
    try:
        if text and text[-1] in _SPAN_UNITS:
            seconds = float(text[:-1]) * _SPAN_UNITS[text[-1]]
        else:
            seconds = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 60s, 5m, 7d)") from exc
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be longer than zero")
    return timedelta(seconds=seconds)


def _instant(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from exc
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a time zone (2026-11-16T00:00+09:00)")
    return at


def add_simulate_options(p: argparse.ArgumentParser) -> None:
    """`usagepipe simulate`'s options, which `plan_from_args` reads."""
    _add_devices(p, 10)
    # Usage mode: --messages caps each device.
    p.add_argument("--messages", type=int, default=0, help="messages per device (0)")
    _add_repeatable_options(p, duplicates=0.0)
    _add_rate(p)
    p.add_argument(
        "--window", type=span, default=timedelta(days=7), help="simulated time to play (7d)"
    )
    p.add_argument(
        "--sim-start",
        type=_instant,
        default=None,
        help="start of the window, ISO with zone (default: now minus the window)",
    )
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="simulated seconds per real second, e.g. 2000 (0: as fast as possible)",
    )
    pace.add_argument(
        "--duration", type=span, default=None, help="fit the window into this wall time, e.g. 60s"
    )
    p.add_argument(
        "--faults",
        default="",
        help=f"fault rates, e.g. dup=0.01,reorder=0.01 or all=0.001 ({', '.join(FAULT_NAMES)})",
    )
    p.add_argument(
        "--ledger", type=Path, default=None, help="write every message and its fate here (JSONL)"
    )
    p.add_argument(
        "--trace-share",
        type=float,
        default=0.0,
        help="share of messages sent with a sampled W3C traceparent user property (0)",
    )


DEMO_DEVICES = 1200
"""The demo's fleet: 200 appliances of each model. Fewer leave the smaller segments of
the marketing-usable reports (a quarter of households consent to marketing) and of
the error codes per model and firmware below k = 10."""
DEMO_WINDOW = timedelta(days=28)
"""The demo's usage: the 28 days up to now, the reports' default range."""
DEMO_DUPLICATES = 0.02
DEMO_MESSAGES = 100
"""`--mix uniform`: messages per device (the plain mode)."""


def add_demo_options(p: argparse.ArgumentParser) -> None:
    """`usagepipe demo`'s fleet options; their defaults make `demo_plan`'s dataset."""
    _add_devices(p, DEMO_DEVICES)
    p.add_argument(
        "--window",
        type=span,
        default=DEMO_WINDOW,
        help=f"usage to play, ending now ({DEMO_WINDOW.days}d)",
    )
    p.add_argument(
        "--mix",
        choices=["usage", "uniform"],
        default="usage",
        help="usage: the households' usage over --window (default); uniform: every schema"
        " alike, --messages per device a few seconds apart (a stress mix, not a dataset)",
    )
    p.add_argument(
        "--messages",
        type=int,
        default=None,
        help=f"usage: cap per device (0: none, the default); uniform: per device ({DEMO_MESSAGES})",
    )
    _add_repeatable_options(p, duplicates=DEMO_DUPLICATES)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="simulated seconds per real second (0: as fast as possible)",
    )
    _add_rate(pace)


def _add_devices(p: argparse.ArgumentParser, devices: int) -> None:
    p.add_argument("--devices", type=int, default=devices, help=f"fleet size ({devices:,})")


def _add_repeatable_options(p: argparse.ArgumentParser, duplicates: float) -> None:
    """`--duplicates`, `--seed` and `--run-id`: what makes a run's messages the same again."""
    p.add_argument(
        "--duplicates",
        type=float,
        default=duplicates,
        help=f"share of messages sent twice, byte for byte ({duplicates})",
    )
    p.add_argument("--seed", type=int, default=7, help="seed for everything the fleet sends")
    p.add_argument(
        "--run-id",
        default=None,
        help="goes into the boot ids: same seed and run id, same messages (default: new)",
    )


def _add_rate(options: argparse._ActionsContainer) -> None:
    """`--rate`, on the parser (`simulate`) or in a group of pace options (`demo`)."""
    options.add_argument(
        "--rate", type=float, default=0.0, help="messages/s for the whole fleet (0: no limit)"
    )


def demo_plan(
    *,
    devices: int = DEMO_DEVICES,
    window: timedelta = DEMO_WINDOW,
    mix: Mix = "usage",
    messages: int | None = None,
    duplicates: float = DEMO_DUPLICATES,
    seed: int = 7,
    run_id: str | None = None,
    speed: float = 0.0,
    rate: float = 0.0,
    settings: Settings | None = None,
) -> FleetPlan:
    """The plan `usagepipe demo` plays; its defaults are the demo's dataset (tested to
    give every report unsuppressed segments at k = 10: tests/usagepipe/test_demo_dataset.py).

    "usage": `window` of household usage ending now (`simulators.traffic`), `duplicates`
    as the `dup` fault; "uniform": the plain mode's uniform stress mix, `messages` per
    device a few seconds apart."""
    if devices < 1:
        raise SystemExit("--devices must be at least 1")
    if not 0.0 <= duplicates <= 1.0:
        raise SystemExit("--duplicates is a share between 0 and 1")
    run_id = run_id or secrets.token_hex(4)
    if mix == "uniform":
        count = DEMO_MESSAGES if messages is None else messages
        if count < 1:
            raise SystemExit("--messages must be at least 1")
        return FleetPlan(
            devices=devices,
            messages_per_device=count,
            seed=seed,
            run_id=run_id,
            duplicate_rate=duplicates,
            rate=rate,
            mix="uniform",
        )
    if messages is not None and messages < 0:
        raise SystemExit("--messages must be 0 (no cap) or more")
    return FleetPlan(
        devices=devices,
        messages_per_device=messages or 0,
        seed=seed,
        run_id=run_id,
        rate=rate,
        window=window,
        speed=speed,
        faults=FaultRates(dup=duplicates),
        **_limits(settings),  # type: ignore[arg-type]
    )


def _limits(settings: Settings | None) -> dict[str, float]:
    """The consumer's skew and the bridge's size limit, which a usage plan respects."""
    if settings is None:
        return {}
    return {
        "max_future_skew_s": float(settings.consumer.max_future_skew_s),
        "max_payload_bytes": settings.bridge.max_payload_bytes,
    }


def plan_from_args(args: argparse.Namespace, settings: Settings | None = None) -> FleetPlan:
    """The fleet plan the command-line options describe.

    `demo` (it has `--mix`): `demo_plan`. `simulate`: a usage plan, where `--messages`
    caps each device (0: no cap) and `--duplicates` is the `dup` fault's rate unless
    `--faults` sets it; without `--window` (the benchmarks' own parsers), the plain plan.
    """
    if getattr(args, "mix", None) is not None:
        return demo_plan(
            devices=args.devices,
            window=args.window,
            mix=args.mix,
            messages=args.messages,
            duplicates=args.duplicates,
            seed=args.seed,
            run_id=args.run_id,
            speed=args.speed,
            rate=args.rate,
            settings=settings,
        )
    if args.devices < 1:
        raise SystemExit("--devices must be at least 1")
    if not 0.0 <= args.duplicates <= 1.0:
        raise SystemExit("--duplicates is a share between 0 and 1")
    trace_share = getattr(args, "trace_share", 0.0)
    if not 0.0 <= trace_share <= 1.0:
        raise SystemExit("--trace-share is a share between 0 and 1")
    run_id = args.run_id or secrets.token_hex(4)
    window: timedelta | None = getattr(args, "window", None)
    if window is None:
        if args.messages < 1:
            raise SystemExit("--messages must be at least 1")
        return FleetPlan(
            devices=args.devices,
            messages_per_device=args.messages,
            seed=args.seed,
            run_id=run_id,
            duplicate_rate=args.duplicates,
            rate=args.rate,
            trace_share=trace_share,
        )
    if args.messages < 0:
        raise SystemExit("--messages must be 0 (no cap) or more")
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        raise SystemExit(f"--faults: {exc}") from None
    if args.duplicates and "dup=" not in args.faults:
        faults = parse_faults(f"{args.faults},dup={args.duplicates}")
    speed = args.speed
    if args.duration is not None:
        speed = window / args.duration
    return FleetPlan(
        devices=args.devices,
        messages_per_device=args.messages,
        seed=args.seed,
        run_id=run_id,
        rate=args.rate,
        window=window,
        sim_start=args.sim_start,
        speed=speed,
        faults=faults,
        trace_share=trace_share,
        **_limits(settings),  # type: ignore[arg-type]
    )


def raise_fd_limit(devices: int) -> None:
    """Raise the open-file limit to the hard limit; refuse a fleet that cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = devices + 256  # one socket per device, plus Kafka, PostgreSQL, files
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"usagepipe simulate: {devices} devices need about {needed} open files, but the"
            f" hard limit is {hard}; raise it (ulimit -Hn, or LimitNOFILE= for a service)"
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
        f" already registered and given new secrets, {fleet.transferred} handed over to a new"
        f" household inside the span) in {fleet.elapsed_s:.1f}s"
        f" = {len(fleet.credentials) / max(fleet.elapsed_s, 1e-9):,.0f} devices/s",
        highlight=False,
    )
    return fleet


def _progress_table(report: FleetReport, elapsed: float) -> Table:
    table = Table(show_header=False, box=None)
    table.add_row("devices connected", f"{report.connected:,} of {report.devices:,}")
    table.add_row("messages planned", f"{report.planned:,}")
    table.add_row("acknowledged", f"{report.sent:,}  ({report.sent / max(elapsed, 1e-9):,.0f}/s)")
    table.add_row("refused (expected)", f"{report.refused:,}")
    faults = ", ".join(f"{k} {v:,}" for k, v in sorted(report.faults.items())) or "none"
    table.add_row("faults injected", faults)
    if report.surprises:
        table.add_row("[red]surprises", f"[red]{len(report.surprises):,}")
    return table


@contextlib.asynccontextmanager
async def _live_progress(
    console: Console, report: Callable[[], FleetReport]
) -> AsyncIterator[None]:
    """A live progress table on a terminal; nothing when output is not a TTY."""
    if not console.is_terminal:
        yield
        return
    started = time.monotonic()
    with Live(console=console, refresh_per_second=4, transient=True) as live:

        async def refresh() -> None:
            while True:
                live.update(_progress_table(report(), time.monotonic() - started))
                await asyncio.sleep(0.25)

        task = asyncio.create_task(refresh(), name="simulate-progress")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def run_fleet(
    settings: Settings,
    plan: FleetPlan,
    console: Console,
    fleet: ProvisionedFleet | None = None,
    ledger: Path | None = None,
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

    with (
        serve_metrics(
            registry, settings.simulator.metrics_port, variable(["simulator", "metrics_port"])
        ),
        contextlib.ExitStack() as files,
    ):
        writer = files.enter_context(LedgerWriter(ledger)) if ledger is not None else None
        devices = Fleet(
            settings.mqtt,
            plan,
            SimulatorMetrics(registry),
            credentials=credentials,
            max_inflight=settings.simulator.max_inflight_per_client,
            progress=progress if total >= 5000 and not plan.usage else None,
            ledger=writer,
        )
        async with _live_progress(console, lambda: devices.report):
            return await devices.run()


def fleet_failure(exc: BaseException) -> str | None:
    """What went wrong, in one line, when running a fleet failed for a reason outside
    the simulator (the broker refused a device, a server is down), else None: the
    device tasks' errors arrive as an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := fleet_failure(inner)) is not None:
                return found
        return None
    if isinstance(exc, UsagepipeError):
        hint = ""
        if isinstance(exc, BrokerUnavailable) and "Not authorized" in str(exc):
            hint = (
                " (another run on this broker may have given the same simulated device a new"
                " secret: fleets of the same name and seed share their devices; use --seed)"
            )
        return f"{exc}{hint}"
    return None


def _span_text(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    console = Console()
    plan = plan_from_args(args, settings)
    raise_fd_limit(plan.devices)
    # One line per device connection and registration says nothing at fleet scale.
    for name in ("ingest.mqtt", "devices.registry"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    if plan.usage:
        assert plan.sim_start is not None and plan.window is not None
        pace = f"at {plan.speed:,.0f}x" if plan.speed else "as fast as possible"
        console.print(
            f"fleet of {plan.devices:,} devices, seed {plan.seed}, run id {plan.run_id}: "
            f"{_span_text(plan.window)} of usage from {plan.sim_start:%Y-%m-%d %H:%M %Z} {pace}; "
            f"faults: {plan.faults}",
            highlight=False,
        )
    try:
        report = asyncio.run(run_fleet(settings, plan, console, ledger=args.ledger))
    except (RegistryError, HistoryError) as exc:
        console.print(f"[red]usagepipe simulate: cannot provision the fleet: {exc}")
        return 2
    except ConfigurationError:
        raise  # a setting to change (a port in use): the console script names it, exit 2
    except (UsagepipeError, BaseExceptionGroup) as exc:
        failure = fleet_failure(exc)
        if failure is None:
            raise
        console.print(f"[red]usagepipe simulate: {failure}", highlight=False)
        return 1
    console.print(
        f"fleet: {report.devices} devices sent {report.sent:,} messages "
        f"({report.duplicates_sent:,} duplicates, {report.unique_keys:,} unique) "
        f"in {report.elapsed_s:.1f}s = {report.rate:,.0f} msg/s; run id {plan.run_id}",
        highlight=False,
    )
    if plan.usage:
        faults = ", ".join(f"{k} {v:,}" for k, v in sorted(report.faults.items())) or "none"
        console.print(
            f"connected in {report.connect_s:.1f}s; refused by the broker as planned:"
            f" {report.refused:,}; faults injected: {faults}",
            highlight=False,
        )
    if args.ledger is not None:
        console.print(f"ledger: {args.ledger} ({report.planned:,} lines)", highlight=False)
    if report.surprises:
        for line in report.surprises[:20]:
            console.print(f"[red]unexpected: {line}", highlight=False)
        print(f"usagepipe simulate: {len(report.surprises)} unexpected outcomes", file=sys.stderr)
        return 1
    return 0
