"""The commands around the pipeline: `services`, `settings`, `asyncapi` and `dlq`.

    usagepipe services up|status|down     the local servers (Mosquitto, Kafka, PostgreSQL)
    usagepipe settings [--markdown]       every setting, its variable, default and meaning
    usagepipe asyncapi [--check|--write]  the AsyncAPI contract (schemas/asyncapi.json)
    usagepipe dlq list|show|replay        the dead-letter topic

Each handler imports the module that does the work (`usagepipe.services`,
`schemas.asyncapi`, `usagepipe.dlq`) when its command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import sys

from ingest.settings import Settings
from schemas.errors import Reason
from usagepipe.cli.arguments import Commands, command, count


def add_services(commands: Commands) -> None:
    services = command(
        commands, "services", _services, help="start, check or stop the local servers"
    )
    services.add_argument("action", choices=["up", "status", "down"])


def add_settings(commands: Commands) -> None:
    settings = command(
        commands, "settings", _settings, help="list every setting: variable, default, meaning"
    )
    settings.add_argument(
        "--markdown", action="store_true", help="as the Markdown table the README carries"
    )


def add_asyncapi(commands: Commands) -> None:
    contract = command(
        commands,
        "asyncapi",
        _asyncapi,
        help="print, write or check the AsyncAPI contract (schemas/asyncapi.json)",
    )
    target = contract.add_mutually_exclusive_group()
    target.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the models")
    target.add_argument("--write", metavar="PATH", help="write the document to PATH")


def add_dlq(commands: Commands) -> None:
    dlq = command(commands, "dlq", _dlq, help="list, show and replay dead letters (telemetry.dlq)")
    actions = dlq.add_subparsers(dest="action", required=True)
    reasons = [reason.value for reason in Reason]
    reason_help = f"only letters of this reason: {', '.join(reasons)}"

    listing = actions.add_parser("list", help="the newest dead letters, as a table")
    listing.add_argument("--reason", choices=reasons, metavar="REASON", help=reason_help)
    listing.add_argument(
        "--limit", type=count, default=50, help="show the newest N letters (50; 0: all)"
    )

    show = actions.add_parser("show", help="one dead letter in full, original bytes too")
    show.add_argument(
        "position",
        help="PARTITION:OFFSET in the dead-letter topic, as `dlq list` prints it",
    )

    replay = actions.add_parser(
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
    replay.add_argument("--reason", choices=reasons, metavar="REASON", help=reason_help)
    replay.add_argument(
        "--partition",
        type=count,
        default=None,
        metavar="P",
        help="only this dead-letter partition",
    )
    replay.add_argument(
        "--from-offset",
        type=count,
        default=0,
        metavar="N",
        help="first dead-letter offset, included, in every partition read (0)",
    )
    replay.add_argument(
        "--to-offset",
        type=count,
        default=None,
        metavar="N",
        help="last dead-letter offset, included, in every partition read",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; produce nothing"
    )


def _services(args: argparse.Namespace, settings: Settings) -> int:
    from usagepipe import services

    action = {"up": services.up, "status": services.status, "down": services.down}
    try:
        states = action[args.action](settings)
    except services.ServiceError as exc:
        print(f"usagepipe services {args.action}: {exc}", file=sys.stderr)
        return 1
    print(services.format_table(states))
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.settings import describe, markdown_table

    if args.markdown:
        print(markdown_table(), end="")
        return 0
    for var, default, doc in describe():
        print(f"{var}={default}\n    {doc}")
    return 0


def _asyncapi(args: argparse.Namespace, settings: Settings) -> int:
    from schemas import asyncapi

    flags = ["--check", args.check] if args.check else ["--write", args.write] if args.write else []
    return asyncapi.main(flags)


def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    from usagepipe.dlq import run_dlq

    return run_dlq(settings, args)
