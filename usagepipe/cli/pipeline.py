"""The data path's commands: `db`, `bridge` and `consume`.

    usagepipe db migrate|refresh|retention   create/upgrade the usage tables; materialise
                                             the rollups (plain PostgreSQL); drop expired data
    usagepipe db migrate --update-policies   also change TimescaleDB policies to the settings
    usagepipe bridge                         MQTT -> Kafka
    usagepipe bridge --forget-session ID     drop a retired bridge id's session on the broker
    usagepipe consume                        Kafka -> PostgreSQL

`bridge` and `consume` run until stopped (SIGTERM, SIGINT) or until their stop options
say, with `/metrics`, `/health` and `/ready` on their own port (`_serve`,
`ingest.readiness`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry

from ingest.backoff import wait_to_start
from ingest.readiness import Heartbeat, serve_probes
from ingest.setting_errors import variable
from ingest.settings import Settings
from usagepipe.cli.arguments import Commands, add_stop_options, command

log = logging.getLogger("ingest.consumer")

_Report_co = TypeVar("_Report_co", covariant=True)
_Report = TypeVar("_Report")


def add_db(commands: Commands) -> None:
    db = command(commands, "db", _db, help="database schema and retention")
    db.add_argument(
        "action",
        choices=["migrate", "refresh", "retention"],
        help="migrate: create/upgrade the usage tables; refresh: materialise the rollups'"
        " noted buckets now (on TimescaleDB those that have ended; consumers do it every"
        " postgres.rollup_refresh_s); retention: drop expired raw data",
    )
    db.add_argument(
        "--update-policies",
        action="store_true",
        help="migrate only: change the TimescaleDB compression and retention policies that"
        " differ from the settings, in place (job ids and schedules kept); without it they"
        " are kept and a warning says so",
    )


def add_bridge(commands: Commands) -> None:
    bridge = command(commands, "bridge", _bridge, help="forward MQTT telemetry to Kafka")
    add_stop_options(bridge, "acknowledged messages")
    bridge.add_argument(
        "--forget-session",
        metavar="CLIENT_ID",
        help="instead of bridging: drop this client id's persistent session on the broker,"
        " and every message queued for it (a retired bridge id); prints whether it had one."
        " A client connected with that id is disconnected",
    )
    bridge.add_argument(
        "--force",
        action="store_true",
        help="with --forget-session: allow dropping the configured bridge's own client id"
        " (USAGEPIPE_BRIDGE__CLIENT_ID), losing what the broker queued for it",
    )


def add_consume(commands: Commands) -> None:
    consume = command(
        commands, "consume", _consume, help="validate telemetry from Kafka and store it"
    )
    add_stop_options(consume, "Kafka records")


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.store import UsageStore
    from schemas.errors import UsagepipeError

    if args.update_policies and args.action != "migrate":
        print(f"usagepipe db {args.action}: --update-policies goes with migrate", file=sys.stderr)
        return 2

    async def db_action() -> str:
        async with UsageStore(settings.postgres) as store:
            # Only `db migrate --update-policies` may change an existing policy.
            report = await store.migrate(update_policies=args.update_policies)
            layout = report.layout
            if args.action == "migrate":
                applied = ", ".join(report.applied) or "none pending"
                lines = [
                    f"usage table {store.table!r} is up to date ({applied}); layout: "
                    f"{layout.kind}, partitions of "
                    f"{layout.partition_interval.total_seconds() / 3600:g} h",
                    *(policy.describe() for policy in report.policies),
                ]
                return "\n".join(lines)
            if args.action == "refresh":
                done = await store.refresh_rollups(wait=True)
                if done is None:  # only without wait=True
                    return f"another process is refreshing {store.table!r}"
                # TimescaleDB never materialises an open bucket: its notes stay.
                settled = " that have ended" if layout.kind == "timescaledb" else ""
                return (
                    f"rollups of {store.table!r} refreshed: {done.hours} hours and"
                    f" {done.days} days{settled} recomputed, {done.skipped} hours before the"
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


def _bridge(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.bridge import Bridge
    from ingest.metrics import BridgeMetrics

    if args.forget_session is not None or args.force:
        return _forget_session(args, settings)
    report = _serve(
        settings.bridge.metrics_host,
        settings.bridge.metrics_port,
        "bridge",
        lambda registry: Bridge(
            settings,
            BridgeMetrics(registry),
            stop_after=args.max_messages,
            stop_after_s=args.duration,
        ),
    )
    print(f"bridge: {report.received} received, {report.acked} acknowledged")
    return 0


def _forget_session(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.mqtt_session import forget_session

    prog = "usagepipe bridge"
    client_id: str | None = args.forget_session
    if client_id is None:
        print(f"{prog}: --force goes with --forget-session CLIENT_ID", file=sys.stderr)
        return 2
    if args.max_messages is not None or args.duration is not None:
        print(f"{prog}: --forget-session does not bridge; drop --max-messages and --duration",
              file=sys.stderr)  # fmt: skip
        return 2
    if not client_id or len(client_id.encode()) > 65535:
        print(f"{prog}: --forget-session: not an MQTT client id: {client_id!r}", file=sys.stderr)
        return 2
    own = variable(["bridge", "client_id"])
    if client_id == settings.bridge.client_id and not args.force:
        print(f"{prog}: {client_id!r} is this bridge's own client id ({own}); dropping its"
              " session loses everything queued for it: add --force to do it anyway",
              file=sys.stderr)  # fmt: skip
        return 2
    where = f"{settings.mqtt.host}:{settings.mqtt.port}"
    if forget_session(settings.mqtt, client_id):
        print(f"session of {client_id!r} on {where} dropped, with everything queued for it")
    else:
        print(f"{client_id!r} had no session on {where}; nothing dropped")
    return 0


def _consume(args: argparse.Namespace, settings: Settings) -> int:
    from devices.errors import RegistryError, RegistryUnavailable
    from devices.schema import migrate_registry_at
    from ingest.consumer import Consumer
    from ingest.metrics import ConsumerMetrics
    from ingest.owner_keys import load_secrets, with_local_owner_key

    settings = with_local_owner_key(settings)  # unset: the local run dir's, with a warning
    load_secrets(settings.enrich)  # a secrets file missing or malformed: one line, before all
    # The registry owns its schema; the consumer enriches from it and refuses to start
    # without it, so a fresh database gets it here, as `registry migrate` would; a
    # PostgreSQL not up yet is waited for, as the consumer itself waits.
    migrate = wait_to_start(
        lambda: migrate_registry_at(
            settings.postgres.dsn.get_secret_value(), settings.registry.db_schema
        ),
        who="consumer",
        log=log,
        retry_on=(RegistryUnavailable,),
        wait_s=settings.consumer.start_wait_s,
    )
    try:
        asyncio.run(migrate)
    except RegistryError as exc:
        print(f"usagepipe consume: {exc}", file=sys.stderr)
        return 1 if exc.retriable else 2
    report = _serve(
        settings.consumer.metrics_host,
        settings.consumer.metrics_port,
        "consumer",
        lambda registry: Consumer(
            settings,
            ConsumerMetrics(registry),
            stop_after=args.max_messages,
            stop_after_s=args.duration,
        ),
    )
    print(
        f"consumer: {report.consumed} consumed, {report.stored} stored, "
        f"{report.duplicates} duplicates, {report.dead_lettered} dead letters"
    )
    return 0


class Service(Protocol[_Report_co]):
    """A long-running stage: runs until it stops itself or is told to stop."""

    def stop(self, why: str = ...) -> None: ...

    def readiness(self) -> dict[str, str]: ...

    async def run(self) -> _Report_co: ...


def _serve(
    host: str, port: int, section: str, make: Callable[[CollectorRegistry], Service[_Report]]
) -> _Report:
    """Run the service `make` builds until it ends, with `/metrics`, `/health` and
    `/ready` on `host`:`port` (`section`'s metrics_host and metrics_port); SIGTERM/SIGINT
    stop it cleanly."""
    registry = CollectorRegistry()
    heartbeat = Heartbeat()

    async def main() -> _Report:
        service = make(registry)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop, f"signal {sig.name}")
        with serve_probes(
            registry,
            heartbeat,
            service.readiness,
            host=host,
            port=port,
            setting=variable([section, "metrics_port"]),
            host_setting=variable([section, "metrics_host"]),
        ):
            try:
                async with asyncio.TaskGroup() as tasks:
                    beating = tasks.create_task(heartbeat.run(), name="heartbeat")
                    report = await service.run()
                    beating.cancel()
            except BaseExceptionGroup as group:
                # The heartbeat never fails: the error is the service's, raised as the
                # CLI reports it (one line), not as a group around it.
                if len(group.exceptions) != 1:
                    raise
                raise group.exceptions[0] from None
            return report

    return asyncio.run(main())
