"""`usagepipe`: the one console script; every service of the pipeline is a subcommand.

    usagepipe services up|status|down     the local servers (Mosquitto, Kafka, PostgreSQL)
    usagepipe settings                    every setting, its variable, default and meaning
    usagepipe db migrate|refresh|retention  create/upgrade the usage tables; materialise
                                          the rollups (plain PostgreSQL); drop expired data
    usagepipe simulate ...                a seeded fleet publishing telemetry
    usagepipe verify LEDGER               did the pipeline keep what the fleet sent?
    usagepipe bridge                      MQTT -> Kafka
    usagepipe consume                     Kafka -> PostgreSQL
    usagepipe demo                        all of the above, end to end, with a summary
    usagepipe registry ...                the device registry: units, owners, registration
    usagepipe report NAME ...             planners' reports: table, CSV, Parquet, JSON, charts
    usagepipe insights serve              planners' read-only HTTP API and web page

Only this module reads the environment (`Settings()`) and configures logging.

A user's mistake is one line on stderr and exit status 2, never a traceback: a bad
option (argparse, without its usage block), a bad setting (`ingest.setting_errors`
names the variable and what it allows), a port another process holds. Output into a
pipe closed early (`usagepipe dlq list | head -3`) ends quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_settings import SettingsError

from ingest.errors import ConfigurationError, UsagepipeError
from ingest.metrics import serve_metrics
from ingest.setting_errors import explain, variable
from ingest.settings import Settings

log = logging.getLogger("usagepipe")

_Report_co = TypeVar("_Report_co", covariant=True)
_Report = TypeVar("_Report")


def _duration(text: str) -> float:
    """`90`, `90s`, `5m`, `1h` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 30, 30s, 5m)")
    return seconds


def _count(text: str) -> int:
    """A whole number, 0 or more (an offset, a partition, a limit)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number of 0 or more: {text!r}")
    return value


def _add_stop_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-messages", type=int, default=None, help=f"stop after this many {what}")
    p.add_argument(
        "--duration", type=_duration, default=None, help="stop after this long (30s, 5m)"
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    """argparse with a mistake as one line: `usagepipe: argument --log-level: invalid
    choice: 'LOUD' (choose from ...)`, without the usage block argparse prints first
    (`--help` shows it). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)" if "required" in message else ""
        self.exit(2, f"{self.prog}: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="usagepipe",
        description="Appliance usage telemetry: MQTT -> Kafka -> PostgreSQL.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"{', '.join(LOG_LEVELS)}, in any case (INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    services = sub.add_parser("services", help="start, check or stop the local servers")
    services.add_argument("action", choices=["up", "status", "down"])

    settings_cmd = sub.add_parser("settings", help="list every setting: variable, default, meaning")
    settings_cmd.add_argument(
        "--markdown", action="store_true", help="as the Markdown table the README carries"
    )

    contract = sub.add_parser(
        "asyncapi", help="print, write or check the AsyncAPI contract (schemas/asyncapi.json)"
    )
    target = contract.add_mutually_exclusive_group()
    target.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the models")
    target.add_argument("--write", metavar="PATH", help="write the document to PATH")

    db = sub.add_parser("db", help="database schema and retention")
    db.add_argument(
        "action",
        choices=["migrate", "refresh", "retention"],
        help="migrate: create/upgrade the usage tables; refresh: materialise the rollups'"
        " noted buckets now (plain PostgreSQL; consumers do it every"
        " postgres.rollup_refresh_s); retention: drop expired raw data",
    )

    bridge = sub.add_parser("bridge", help="forward MQTT telemetry to Kafka")
    _add_stop_options(bridge, "acknowledged messages")

    consume = sub.add_parser("consume", help="validate telemetry from Kafka and store it")
    _add_stop_options(consume, "Kafka records")

    sim = sub.add_parser("simulate", help="run a seeded fleet of virtual appliances")
    # --- simulate and verify (issue 6: simulators/cli.py, simulators/verify.py) ---------
    from simulators.cli import add_usage_options, span

    _add_fleet_options(sim, messages=0)  # usage mode: --messages caps each device
    add_usage_options(sim)
    verify = sub.add_parser(
        "verify", help="reconcile a fleet's ledger with the usage table and dead letters"
    )
    verify.add_argument("ledger", help="the JSONL ledger `simulate --ledger` wrote")
    verify.add_argument(
        "--timeout", type=span, default=span("60s"), help="wait this long to catch up (60s)"
    )
    # --- end of simulate and verify -----------------------------------------------------

    from devices.cli import register_commands

    register_commands(sub)

    # --- planners' reports and API (issue 8: insights/cli.py) ---------------
    from insights.cli import register_commands as register_insights

    register_insights(sub)

    # --- dlq: the dead-letter topic (usagepipe/dlq.py) -----------------------------
    from schemas.errors import Reason

    dlq = sub.add_parser("dlq", help="list, show and replay dead letters (telemetry.dlq)")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    reasons = [reason.value for reason in Reason]
    dlq_list = dlq_sub.add_parser("list", help="the newest dead letters, as a table")
    reason_help = f"only letters of this reason: {', '.join(reasons)}"
    dlq_list.add_argument("--reason", choices=reasons, metavar="REASON", help=reason_help)
    dlq_list.add_argument(
        "--limit", type=_count, default=50, help="show the newest N letters (50; 0: all)"
    )
    dlq_show = dlq_sub.add_parser("show", help="one dead letter in full, original bytes too")
    dlq_show.add_argument(
        "position",
        help="PARTITION:OFFSET in the dead-letter topic, as `dlq list` prints it",
    )
    dlq_replay = dlq_sub.add_parser(
        "replay",
        help="produce dead letters' original bytes to telemetry.raw again, after a fix",
        description=(
            "Produce the selected dead letters' original bytes, with their original keys, "
            "to the raw topic (acks=all), where the consumer validates them again. Messages "
            "already stored are dropped as duplicates (same device, boot and seq); a message "
            "that is still invalid is dead-lettered again, as a new letter: that is expected. "
            "Letters refused for device_id_mismatch are never replayed."
        ),
    )
    dlq_replay.add_argument("--reason", choices=reasons, metavar="REASON", help=reason_help)
    dlq_replay.add_argument(
        "--partition",
        type=_count,
        default=None,
        metavar="P",
        help="only this dead-letter partition",
    )
    dlq_replay.add_argument(
        "--from-offset",
        type=_count,
        default=0,
        metavar="N",
        help="first dead-letter offset, included, in every partition read (0)",
    )
    dlq_replay.add_argument(
        "--to-offset",
        type=_count,
        default=None,
        metavar="N",
        help="last dead-letter offset, included, in every partition read",
    )
    dlq_replay.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; produce nothing"
    )
    # --- end of dlq ------------------------------------------------------------------

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on a simulated fleet; leaves a planner-ready dataset",
    )
    from simulators.cli import add_demo_options

    add_demo_options(demo)
    demo.add_argument(
        "--timeout", type=_duration, default=900.0, help="give up after this long (900s)"
    )
    return parser


def _add_fleet_options(
    p: argparse.ArgumentParser, devices: int = 10, messages: int = 10, duplicates: float = 0.0
) -> None:
    p.add_argument("--devices", type=int, default=devices, help=f"fleet size ({devices})")
    p.add_argument(
        "--messages", type=int, default=messages, help=f"messages per device ({messages})"
    )
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
    p.add_argument(
        "--rate", type=float, default=0.0, help="messages/s for the whole fleet (0: no limit)"
    )


class Service(Protocol[_Report_co]):
    """A long-running stage: runs until it stops itself or is told to stop."""

    def stop(self, why: str = ...) -> None: ...

    async def run(self) -> _Report_co: ...


def _serve(
    port: int, setting: str, make: Callable[[CollectorRegistry], Service[_Report]]
) -> _Report:
    """Run the service `make` builds, with its metrics on `port` (moved by the variable
    `setting`), until it ends; SIGTERM/SIGINT stop it cleanly."""
    registry = CollectorRegistry()

    async def main() -> _Report:
        service = make(registry)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop, f"signal {sig.name}")
        return await service.run()

    with serve_metrics(registry, port, setting):
        return asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run one command; returns its exit status.

    Output to a pipe closed early ends quietly, as Python's documentation recommends
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe): stdout is pointed
    at /dev/null so the interpreter's last flush cannot fail, and the status is 1.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


def _prog(args: argparse.Namespace) -> str:
    """`usagepipe registry serve`: the command as typed, for the start of a message."""
    words = ["usagepipe", args.command]
    for sub in ("action", "registry_command", "insights_command"):
        if isinstance(getattr(args, sub, None), str):
            words.append(getattr(args, sub))
    if args.command == "report":
        words.append(args.name)
    return " ".join(words)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka logs every retried connection at ERROR; ours say what matters.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        for line in explain(exc, os.environ):
            print(f"usagepipe: {line}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings)
    except UsagepipeError as exc:
        # A port in use or unsafe settings (2: fix them), or a server that does not
        # answer (1: start it, then try again): one line, the command and the reason.
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
    except OSError as exc:
        if exc.filename is None:
            raise
        # A path the user gave that cannot be read or written (`--out`, `--chart`).
        print(f"{_prog(args)}: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    # --- broker logins (issue 4): unset MQTT logins come from the local broker's
    # <run_dir>/mosquitto/credentials.json, which `services up` writes; production
    # sets USAGEPIPE_MQTT__USERNAME/PASSWORD/ADMIN_USERNAME/ADMIN_PASSWORD instead.
    from usagepipe.services import ServiceError, with_broker_logins

    try:
        settings = with_broker_logins(settings)
    except ServiceError as exc:
        print(f"usagepipe: {exc}", file=sys.stderr)
        return 2
    # --- end of broker logins

    if args.command == "services":
        from usagepipe import services

        action = {"up": services.up, "status": services.status, "down": services.down}
        try:
            states = action[args.action](settings)
        except services.ServiceError as exc:
            print(f"usagepipe services {args.action}: {exc}", file=sys.stderr)
            return 1
        print(services.format_table(states))
        return 0

    if args.command == "settings":
        from ingest.settings import describe, markdown_table

        if args.markdown:
            print(markdown_table(), end="")
            return 0
        for var, default, doc in describe():
            print(f"{var}={default}\n    {doc}")
        return 0

    if args.command == "asyncapi":
        from schemas import asyncapi

        flags = (
            ["--check", args.check] if args.check else ["--write", args.write] if args.write else []
        )
        return asyncapi.main(flags)

    if args.command == "db":
        from ingest.errors import UsagepipeError
        from ingest.store import UsageStore

        async def db_action() -> str:
            async with UsageStore(settings.postgres) as store:
                report = await store.migrate()
                layout = report.layout
                if args.action == "migrate":
                    applied = ", ".join(report.applied) or "none pending"
                    return (
                        f"usage table {store.table!r} is up to date ({applied}); layout: "
                        f"{layout.kind}, partitions of "
                        f"{layout.partition_interval.total_seconds() / 3600:g} h"
                    )
                if args.action == "refresh":
                    done = await store.refresh_rollups(wait=True)
                    if done is None:
                        return f"{store.table!r} is on TimescaleDB: its refresh policies do this"
                    return (
                        f"rollups of {store.table!r} refreshed: {done.hours} hours and"
                        f" {done.days} days recomputed, {done.skipped} hours before the"
                        f" retained data skipped, in {done.seconds:.3f} s"
                    )
                dropped = await store.drop_expired()
                return f"retention on {store.table!r} dropped: {', '.join(dropped) or 'nothing'}"

        try:
            print(asyncio.run(db_action()))
        except UsagepipeError as exc:
            print(f"usagepipe db {args.action}: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.command == "bridge":
        from ingest.bridge import Bridge
        from ingest.metrics import BridgeMetrics

        bridge_report = _serve(
            settings.bridge.metrics_port,
            variable(["bridge", "metrics_port"]),
            lambda registry: Bridge(
                settings,
                BridgeMetrics(registry),
                stop_after=args.max_messages,
                stop_after_s=args.duration,
            ),
        )
        print(f"bridge: {bridge_report.received} received, {bridge_report.acked} acknowledged")
        return 0

    if args.command == "consume":
        from devices.errors import RegistryError
        from devices.registry import migrate_registry_at
        from ingest.consumer import Consumer
        from ingest.enrich import with_local_owner_key
        from ingest.metrics import ConsumerMetrics

        settings = with_local_owner_key(settings)  # unset: the local run dir's, with a warning
        # The registry owns its schema; the consumer enriches from it and refuses to
        # start without it, so a fresh database gets it here, as `registry migrate` would.
        try:
            asyncio.run(
                migrate_registry_at(
                    settings.postgres.dsn.get_secret_value(), settings.registry.db_schema
                )
            )
        except RegistryError as exc:
            print(f"{_prog(args)}: {exc}", file=sys.stderr)
            return 1 if exc.retriable else 2
        consumer_report = _serve(
            settings.consumer.metrics_port,
            variable(["consumer", "metrics_port"]),
            lambda registry: Consumer(
                settings,
                ConsumerMetrics(registry),
                stop_after=args.max_messages,
                stop_after_s=args.duration,
            ),
        )
        print(
            f"consumer: {consumer_report.consumed} consumed, {consumer_report.stored} stored, "
            f"{consumer_report.duplicates} duplicates, {consumer_report.dead_lettered} dead letters"
        )
        return 0

    if args.command == "simulate":
        from simulators.cli import simulate

        return simulate(settings, args)

    # --- verify (issue 6) -------------------------------------------------------------
    if args.command == "verify":
        from simulators.verify import run_verify

        return run_verify(settings, args.ledger, args.timeout.total_seconds())
    # --- end of verify ------------------------------------------------------------------

    if args.command in ("registry", "report", "insights"):
        handler: Callable[[argparse.Namespace, Settings], int] = args.handler
        return handler(args, settings)

    # --- dlq -------------------------------------------------------------------------
    if args.command == "dlq":
        from usagepipe.dlq import run_dlq

        return run_dlq(settings, args)
    # --- end of dlq ------------------------------------------------------------------

    if args.command == "demo":
        from usagepipe.demo import run_demo

        return run_demo(settings, args)

    raise AssertionError(args.command)
