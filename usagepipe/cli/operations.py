"""The commands around the pipeline: `services`, `kafka`, `settings`, `asyncapi`, `auth`,
`dlq`.

    usagepipe services up|status|down     the local servers (Mosquitto, Kafka, PostgreSQL)
    usagepipe kafka init [--check]        the topics, made from the settings (or checked)
    usagepipe settings [--markdown]       every setting, its variable, default and meaning
    usagepipe asyncapi [--check|--write]  the AsyncAPI contract (schemas/asyncapi.json)
    usagepipe auth token --subject S [--scope planner|operator]   a dev signer's token
    usagepipe auth token --dashboard      the planners' dashboard address, signed in
    usagepipe dlq list|show|replay        the dead letters (the database's record, or the topic)

Each handler imports the module that does the work (`usagepipe.services`,
`ingest.topics`, `schemas.asyncapi`, `usagepipe.dlq`) when its command runs, not when
the parser is built.
"""

from __future__ import annotations

import argparse
import sys

from ingest.settings import Settings
from schemas.errors import Reason
from usagepipe.cli.arguments import Commands, command, count, duration


def add_services(commands: Commands) -> None:
    services = command(
        commands, "services", _services, help="start, check or stop the local servers"
    )
    services.add_argument("action", choices=["up", "status", "down"])


def add_kafka(commands: Commands) -> None:
    kafka = command(commands, "kafka", _kafka, help="the Kafka topics usagepipe uses")
    actions = kafka.add_subparsers(dest="action", required=True)
    init = actions.add_parser(
        "init",
        help="create the missing topics from the settings; compare the existing ones",
    )
    init.add_argument(
        "--check", action="store_true", help="create nothing: report missing topics too"
    )


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


def add_auth(commands: Commands) -> None:
    auth = command(commands, "auth", _auth, help="the local dev signer's bearer tokens")
    actions = auth.add_subparsers(dest="action", required=True)
    token = actions.add_parser(
        "token",
        help="print a token for the APIs, signed by the local dev signer (no auth.issuer)",
    )
    token.add_argument(
        "--subject", help="the token's `sub`: who signs in (with --dashboard: planner)"
    )
    token.add_argument(
        "--scope",
        action="append",
        choices=["planner", "operator"],
        default=[],
        help="planner: the insights API; operator: the registry's /operator routes (repeat"
        " for both; none: an owner's token)",
    )
    token.add_argument(
        "--auth-time",
        default="now",
        help="when the person signed in (`auth_time`): now (default), an ISO time, or none",
    )
    token.add_argument(
        "--ttl", type=duration, default=12 * 3600.0, help="valid this long (12h; 30m, 90s)"
    )
    token.add_argument(
        "--dashboard",
        action="store_true",
        help="print the dashboard's address (`usagepipe insights serve`) with a planner's"
        " token in its #token= fragment, to open in a browser (implies --scope planner)",
    )


def add_dlq(commands: Commands) -> None:
    dlq = command(
        commands,
        "dlq",
        _dlq,
        help="list, show and replay dead letters (the usage database's record, or telemetry.dlq)",
    )
    actions = dlq.add_subparsers(dest="action", required=True)
    reasons = [reason.value for reason in Reason]
    reason_help = f"only letters of this reason: {', '.join(reasons)}"

    def source(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--source",
            choices=["postgres", "kafka"],
            default="postgres",
            help="read the dead-letter table in the usage database (postgres, the default:"
            " the record) or the dead-letter topic (kafka)",
        )

    listing = actions.add_parser(
        "list", help="the counts by reason and the newest dead letters, as a table"
    )
    listing.add_argument("--reason", choices=reasons, metavar="REASON", help=reason_help)
    listing.add_argument(
        "--limit", type=count, default=50, help="show the newest N letters (50; 0: all)"
    )
    source(listing)

    show = actions.add_parser("show", help="one dead letter in full, original bytes too")
    show.add_argument(
        "position",
        help="the letter's ID as `dlq list` prints it, or PARTITION:OFFSET of the raw"
        " topic's record it was made from; with --source kafka, PARTITION:OFFSET in the"
        " dead-letter topic",
    )
    source(show)

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
        "--from-id", type=count, default=None, metavar="N", help="first letter id, included"
    )
    replay.add_argument(
        "--to-id", type=count, default=None, metavar="N", help="last letter id, included"
    )
    replay.add_argument(
        "--partition",
        type=count,
        default=None,
        metavar="P",
        help="--source kafka: only this dead-letter partition",
    )
    replay.add_argument(
        "--from-offset",
        type=count,
        default=None,
        metavar="N",
        help="--source kafka: first dead-letter offset, included, in every partition read (0)",
    )
    replay.add_argument(
        "--to-offset",
        type=count,
        default=None,
        metavar="N",
        help="--source kafka: last dead-letter offset, included, in every partition read",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; produce nothing"
    )
    source(replay)


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


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from ingest.topics import init_topics

    states = asyncio.run(init_topics(settings, create=not args.check))
    for s in states:
        spec = s.spec
        wanted = (
            f"{spec.partitions} partitions, replication {spec.replication_factor},"
            f" {', '.join(f'{k}={v}' for k, v in spec.configs.items())}"
        )
        if s.created:
            print(f"{spec.name}: created ({wanted})")
        elif s.ok:
            print(f"{spec.name}: as the settings say ({wanted})")
        else:
            print(f"{spec.name}: differs: {'; '.join(s.mismatches)}")
    differ = [s.spec.name for s in states if not s.ok]
    if differ:
        print(
            f"usagepipe kafka init: {len(differ)} topic(s) differ from the settings:"
            f" {', '.join(differ)}; nothing existing was changed",
            file=sys.stderr,
        )
        return 1
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.settings import describe, markdown_table

    if args.markdown:
        print(markdown_table(), end="")
        return 0
    for var, default, doc in describe():
        print(f"{var}={default}\n    {doc}")
    return 0


def _auth(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime, timedelta

    from ingest.auth import DevSigner, dev_key_path

    if settings.auth.issuer is not None:
        print(
            f"usagepipe auth token: auth.issuer is set ({settings.auth.issuer}): tokens come"
            " from that sign-in; the dev signer is for local runs only",
            file=sys.stderr,
        )
        return 2
    if not settings.auth.dev_signer:
        print("usagepipe auth token: auth.dev_signer is off", file=sys.stderr)
        return 2
    if args.auth_time == "none":
        auth_time = None
    elif args.auth_time == "now":
        auth_time = datetime.now(UTC)
    else:
        try:
            auth_time = datetime.fromisoformat(args.auth_time)
        except ValueError:
            auth_time = None
        if auth_time is None or auth_time.tzinfo is None:
            print(
                f"usagepipe auth token: --auth-time {args.auth_time!r}: use now, none or an"
                " ISO time with zone (2026-12-01T09:00:00+00:00)",
                file=sys.stderr,
            )
            return 2
    subject = args.subject or ("planner" if args.dashboard else None)
    if subject is None:
        print("usagepipe auth token: give --subject (who signs in)", file=sys.stderr)
        return 2
    scopes = ["planner", *args.scope] if args.dashboard else args.scope
    names = {"planner": settings.auth.planner_scope, "operator": settings.auth.operator_scope}
    signer = DevSigner(dev_key_path(settings.auth, settings.services.run_dir))
    token = signer.token(
        subject,
        audience=settings.auth.audience,
        scopes=[names[s] for s in dict.fromkeys(scopes)],
        scope_claim=settings.auth.scope_claim,
        auth_time=auth_time,
        ttl=timedelta(seconds=args.ttl),
    )
    if args.dashboard:
        insights = settings.insights
        print(f"http://{insights.http_host}:{insights.http_port}/#token={token}")
    else:
        print(token)
    return 0


def _asyncapi(args: argparse.Namespace, settings: Settings) -> int:
    from schemas import asyncapi

    flags = ["--check", args.check] if args.check else ["--write", args.write] if args.write else []
    return asyncapi.main(flags)


def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    from usagepipe.dlq import run_dlq

    return run_dlq(settings, args)
