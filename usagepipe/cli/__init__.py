"""`usagepipe`: the one console script; every service of the pipeline is a subcommand.

    usagepipe services up|status|down     the local servers (Mosquitto, Kafka, PostgreSQL)
    usagepipe kafka init [--check]        the topics, made from the settings (or checked)
    usagepipe settings                    every setting, its variable, default and meaning
    usagepipe asyncapi                    the AsyncAPI contract (schemas/asyncapi.json)
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
    usagepipe auth token --subject S ...  a bearer token from the local dev signer
    usagepipe dlq list|show|replay        the dead letters (their table, or telemetry.dlq)
    usagepipe erasure prove OWNER_ID      nothing of an erased owner left in any table?
    usagepipe owner-keys versions|rotate|retire   owner-key versions stored; a new
                                          secret version; an old version's keys unlinked

Each command's parser sets its handler (`usagepipe.cli.arguments.Handler`); `main`
parses, configures logging, builds the settings, runs the handler and turns what it
raises into one line. The handlers live beside their command's parser:
`usagepipe.cli.operations` (services, settings, asyncapi, dlq), `usagepipe.cli.pipeline`
(db, bridge, consume), `usagepipe.cli.keys` (owner-keys), `usagepipe.cli.fleet`
(simulate, verify, demo), `usagepipe.cli.privacy` (erasure), and, below this
composition root, `devices.cli` (registry) and `insights.cli` (report, insights).

Only this module reads the environment (`Settings()`) and, through
`usagepipe.cli.logs`, configures logging.

A user's mistake is one line on stderr and exit status 2, never a traceback: a bad
option (argparse, without its usage block), a bad setting (`ingest.setting_errors`
names the variable and what it allows), a port another process holds. Output into a
pipe closed early (`usagepipe dlq list | head -3`) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_settings import SettingsError

from ingest.errors import ConfigurationError
from ingest.setting_errors import explain
from ingest.settings import Settings
from schemas.errors import UsagepipeError
from usagepipe.cli.arguments import Commands, Handler, OneLineParser
from usagepipe.cli.logs import configure

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Command:
    """Where a command's parser is made (`module:function`, which may add more than
    this one command) and its line in `usagepipe --help`."""

    adder: str
    help: str

    def add(self, commands: Commands) -> None:
        module, function = self.adder.split(":")
        getattr(importlib.import_module(module), function)(commands)


_OPS, _PIPE, _FLEET = "usagepipe.cli.operations", "usagepipe.cli.pipeline", "usagepipe.cli.fleet"

COMMANDS: dict[str, Command] = {
    "services": Command(f"{_OPS}:add_services", "start, check or stop the local servers"),
    "kafka": Command(f"{_OPS}:add_kafka", "the Kafka topics usagepipe uses"),
    "settings": Command(f"{_OPS}:add_settings", "list every setting: variable, default, meaning"),
    "asyncapi": Command(
        f"{_OPS}:add_asyncapi",
        "print, write or check the AsyncAPI contract (schemas/asyncapi.json)",
    ),
    "db": Command(f"{_PIPE}:add_db", "database schema and retention"),
    "bridge": Command(f"{_PIPE}:add_bridge", "forward MQTT telemetry to Kafka"),
    "consume": Command(f"{_PIPE}:add_consume", "validate telemetry from Kafka and store it"),
    "simulate": Command(f"{_FLEET}:add_simulate", "run a seeded fleet of virtual appliances"),
    "verify": Command(
        f"{_FLEET}:add_verify", "reconcile a fleet's ledger with the usage table and dead letters"
    ),
    "registry": Command("devices.cli:register_commands", "the device registry"),
    "report": Command(
        "insights.cli:register_commands",
        "a planners' report over the usage data (table, CSV, Parquet, JSON, chart)",
    ),
    "insights": Command("insights.cli:register_commands", "the planners' HTTP API and web page"),
    "auth": Command(f"{_OPS}:add_auth", "the local dev signer's bearer tokens"),
    "dlq": Command(
        f"{_OPS}:add_dlq",
        "list, show and replay dead letters (the usage database's record, or telemetry.dlq)",
    ),
    "owner-keys": Command(
        "usagepipe.cli.keys:add_owner_keys",
        "the owners' pseudonymous keys: versions stored, rotation of the secret",
    ),
    "erasure": Command(
        "usagepipe.cli.privacy:add_erasure", "prove that an erased owner's data is gone"
    ),
    "demo": Command(
        f"{_FLEET}:add_demo",
        "run the whole pipeline on a simulated fleet; leaves a planner-ready dataset",
    ),
}
"""Every command, in the order `usagepipe --help` lists them. Only the command being
run has its parser made, and its module imported (as pip loads its commands): the
others are a name and a help line, so `usagepipe bridge` never imports the registry,
the reports or the simulator. `tests/usagepipe/test_cli_start.py` checks this table
against the parsers."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command it names gets its real parser (the
    others, a name and a help line); without, every command's."""
    parser: argparse.ArgumentParser = OneLineParser(
        prog="usagepipe",
        description="Appliance usage telemetry: MQTT -> Kafka -> PostgreSQL.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"{', '.join(LOG_LEVELS)}, in any case (USAGEPIPE_LOG__LEVEL, INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        type=str.lower,
        choices=LOG_FORMATS,
        help="text, or json: one JSON object a line (USAGEPIPE_LOG__FORMAT, text)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = COMMANDS.get(_command_named(argv)) if argv is not None else None
    for name, command in COMMANDS.items():
        if name in commands.choices:
            continue  # added with another command by the same function
        if argv is None or command.adder == getattr(chosen, "adder", None):
            command.add(commands)
        else:
            commands.add_parser(name, help=command.help)
    return parser


def _command_named(argv: Sequence[str]) -> str:
    """The command word in `argv`: the first word that is neither an option nor the
    value of one of the global options before it (`--log-level DEBUG bridge`)."""
    takes_value = {"--log-level", "--log-format"}
    words = iter(argv)
    for word in words:
        if word in takes_value:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


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


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        for line in explain(exc, os.environ):
            print(f"usagepipe: {line}", file=sys.stderr)
        return 2
    configure(args.log_level or settings.log.level, args.log_format or settings.log.format)
    handler: Handler = args.handler
    try:
        return _run(handler, args, settings)
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


def _run(handler: Handler, args: argparse.Namespace, settings: Settings) -> int:
    """`handler` with the local broker's logins in `settings`: unset MQTT logins come
    from <run_dir>/mosquitto/credentials.json, which `services up` writes; production
    sets USAGEPIPE_MQTT__USERNAME/PASSWORD/ADMIN_USERNAME/ADMIN_PASSWORD instead."""
    from usagepipe.services import ServiceError, with_broker_logins

    try:
        settings = with_broker_logins(settings)
    except ServiceError as exc:
        print(f"usagepipe: {exc}", file=sys.stderr)
        return 2
    return handler(args, settings)


def _prog(args: argparse.Namespace) -> str:
    """`usagepipe registry serve`: the command as typed, for the start of a message."""
    words = ["usagepipe", args.command]
    for sub in ("action", "registry_command", "insights_command"):
        if isinstance(getattr(args, sub, None), str):
            words.append(getattr(args, sub))
    if args.command == "report":
        words.append(args.name)
    return " ".join(words)
