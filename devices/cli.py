"""`usagepipe registry ...`: the registry's commands, wired into the main CLI.

    usagepipe registry migrate                   create/upgrade the registry schema
    usagepipe registry add-owner --name N --email E --region KR-11 \
        --analytics-consent yes --marketing-consent no    create an owner, print its id
    usagepipe registry add-model WM-100 --category washer --name N --launched-on 2025-03-01
    usagepipe registry import-units units.csv    import a factory export, print the report
    usagepipe registry register --owner-id ... --model ... --serial ... --code ... --channel ...
    usagepipe registry dormancy [--now ISO]      mark owners idle past the dormancy period
                                                 dormant; delete old registration attempts
    usagepipe registry flush-events              publish events left pending in the outbox
    usagepipe registry policies                  the purposes, their legal basis, and
                                                 every privacy-policy version
    usagepipe registry publish-policy 2026-09 --effective 2026-09-01T00:00:00+09:00 \
        --text-file policy.md [--reask marketing]  publish a policy version (the privacy
                                                 office); --reask: consent purposes whose
                                                 text changed materially (asked again)
    usagepipe registry export-owner ID [--format json|csv] [--out FILE]
                                                 everything held about an owner (as the
                                                 owner's GET /owners/{id}/export)
    usagepipe registry serve [--host H] [--port P]   the HTTP API

Each handler takes the parsed arguments and the root `ingest.settings.Settings` (built
from the environment by the main CLI) and returns the exit status: 0 done, 1 done with
rejected input (import rows, a refused registration), 2 cannot run.

`register` and `serve` change MQTT broker accounts through `devices.mosquitto`
(Mosquitto's dynamic-security plugin), logged in with `mqtt.admin_username` and
`mqtt.admin_password`; without them they stop with exit status 2 rather than hand out
secrets the broker would not enforce. `_open_broker` is the one place that opens it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from devices.broker import BrokerAccounts
from devices.errors import RegistryError, Rejected
from devices.events import KafkaEventPublisher
from devices.factory_import import import_units
from devices.records import (
    Category,
    MembershipTier,
    ProductModel,
    Purchase,
    PurchaseChannel,
    normalize_code,
)
from devices.registry import Registry, aware
from devices.schema import migrate_registry
from ingest.ports import port_number
from ingest.postgres import DB_ERRORS

if TYPE_CHECKING:
    from ingest.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, "Settings"], int]


class BrokerSyncMissing(RegistryError):
    """A command that must never change MQTT broker accounts tried to (a bug)."""


class _NoBrokerChanges:
    """For commands that never change device accounts (dormancy, events, models).

    Any call means a bug, and fails loudly rather than skipping silently.
    """

    async def add_device(self, device_id: str, secret: str | None) -> None:
        raise BrokerSyncMissing(f"this command must not add broker account {device_id}")

    async def revoke_device(self, device_id: str) -> None:
        raise BrokerSyncMissing(f"this command must not revoke broker account {device_id}")


def _open_broker(settings: Settings) -> AbstractAsyncContextManager[BrokerAccounts]:
    """The MQTT broker's account sync: Mosquitto's dynamic-security plugin, logged in
    as `mqtt.admin_username` (a missing login stops the command with exit status 2)."""
    from devices.mosquitto import DynsecAccounts

    return DynsecAccounts(settings.mqtt)


@asynccontextmanager
async def _open_registry(
    settings: Settings, broker: BrokerAccounts | None = None
) -> AsyncIterator[Registry]:
    """Kafka publisher and registry from the root settings, closed in reverse order."""
    async with AsyncExitStack() as stack:
        publisher = await stack.enter_async_context(
            KafkaEventPublisher(settings.kafka, topic=settings.registry.events_topic)
        )
        registry = await stack.enter_async_context(
            Registry(
                settings.registry,
                publisher=publisher,
                broker=broker if broker is not None else _NoBrokerChanges(),
                dsn=settings.postgres.dsn.get_secret_value(),
            )
        )
        yield registry


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        raise  # stdout closed early (`| head`): the main CLI ends quietly
    except (RegistryError, *DB_ERRORS) as exc:
        print(f"usagepipe registry: {exc}", file=sys.stderr)
        return 2


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            applied = await migrate_registry(conn, settings.registry.db_schema)
        finally:
            await conn.close()
        print(f"schema {settings.registry.db_schema}: applied {', '.join(applied) or 'nothing'}")
        return 0

    return _run(run())


def _add_owner(args: argparse.Namespace, settings: Settings) -> int:
    """Create an owner, as the maker's site does with `POST /owners`; print the owner id
    alone, so a shell can keep it: `OWNER=$(usagepipe registry add-owner ...)`."""
    from pydantic import ValidationError

    from devices.api import CreateOwnerIn

    fields = {
        "name": args.name,
        "email": args.email,
        "phone": args.phone,
        "region": args.region,
        "membership_tier": args.tier,
        "analytics_consent": args.analytics_consent == "yes",
        "marketing_consent": args.marketing_consent == "yes",
        "source": "cli",
    }
    try:
        body = CreateOwnerIn.model_validate(fields)  # the API's rules, checked here first
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        option = "--tier" if error["loc"][0] == "membership_tier" else f"--{error['loc'][0]}"
        option = option.replace("_", "-")
        print(
            f"usagepipe registry add-owner: {option} {error['input']!r}: {error['msg']}",
            file=sys.stderr,
        )
        return 2
    subject = args.subject
    if subject is not None and not (0 < len(subject) <= 255 and subject.isprintable()):
        print(
            f"usagepipe registry add-owner: --subject {subject!r}: use 1 to 255 printable"
            " characters (the sign-in's `sub`)",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        async with _open_registry(settings) as registry:
            owner_id = await registry.create_owner(
                body.new_owner(), source=body.source, subject=subject
            )
        print(owner_id)
        return 0

    return _run(run())


def _add_model(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        async with _open_registry(settings) as registry:
            model = ProductModel(args.model_number, args.category, args.name, args.launched_on)
            await registry.add_product_model(model)
        print(
            f"product model {normalize_code(model.model_number)} saved: {model.category.value},"
            f" {model.name!r}, launched {model.launched_on}"
        )
        return 0

    return _run(run())


def _import_units(args: argparse.Namespace, settings: Settings) -> int:
    try:
        text = Path(args.csv).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"usagepipe registry: cannot read {args.csv}: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(
            f"usagepipe registry: {args.csv} is not UTF-8 text (byte {exc.start}:"
            f" {exc.reason}); export the CSV as UTF-8",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            await migrate_registry(conn, settings.registry.db_schema)
            report = await import_units(
                conn,
                text.splitlines(keepends=True),
                schema=settings.registry.db_schema,
                hash_log2_n=settings.registry.secret_hash_log2_n,
            )
        finally:
            await conn.close()
        print(
            f"inserted {report.inserted}, already present {report.already_present},"
            f" rejected {len(report.rejected)}"
        )
        for row in report.rejected:
            print(f"  line {row.line}: {row.reason.value} ({row.serial_number!r}): {row.detail}")
        return 1 if report.rejected else 0

    return _run(run())


def _register(args: argparse.Namespace, settings: Settings) -> int:
    try:
        csr = args.csr.read_text(encoding="ascii") if args.csr is not None else None
    except (OSError, UnicodeDecodeError) as exc:
        print(f"usagepipe registry: cannot read the CSR {args.csr}: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with AsyncExitStack() as stack:
            broker = await stack.enter_async_context(_open_broker(settings))
            registry = await stack.enter_async_context(_open_registry(settings, broker))
            try:
                done = await registry.register(
                    args.owner_id,
                    args.model,
                    args.serial,
                    args.code,
                    Purchase(args.channel, args.store_id, args.purchased_on),
                    resale=args.resale,
                    csr=csr,
                )
            except Rejected as exc:
                print(json.dumps({"reason": exc.reason.value, "detail": exc.message}))
                return 1
        print(
            json.dumps(
                {
                    "device_id": done.device_id,
                    "mqtt_username": done.device_id,
                    "mqtt_password": done.mqtt_secret if done.password_login else None,
                    "certificate": done.certificate,
                }
            )
        )
        return 0

    return _run(run())


def _dormancy(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        async with _open_registry(settings) as registry:
            dormant = await registry.mark_dormant(aware(args.now))
            pruned = await registry.prune_attempts(aware(args.now))
        print(f"{len(dormant)} owner(s) became dormant")
        days = settings.registry.attempts_retention_days
        print(f"{pruned} registration attempt(s) older than {days} days deleted")
        return 0

    return _run(run())


def _policies(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        async with _open_registry(settings) as registry:
            catalogue = await registry.purposes()
            versions = await registry.policy_versions()
            current = await registry.current_policy()
        print("purposes:")
        for p in catalogue:
            print(f"  {p.purpose:<10} {p.legal_basis.value:<9} {p.title}")
        print("policy versions:")
        for v in versions:
            state = (
                "current" if v.version == current.version
                else "upcoming" if v.effective_at > current.effective_at else "replaced"
            )  # fmt: skip
            reasks = ", ".join(sorted(v.reasks)) or "nothing"
            print(
                f"  {v.version:<12} effective {v.effective_at.isoformat()}  {state:<8}"
                f"  re-asks {reasks}"
            )
        return 0

    return _run(run())


def _publish_policy(args: argparse.Namespace, settings: Settings) -> int:
    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"usagepipe registry: cannot read {args.text_file}: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with _open_registry(settings) as registry:
            try:
                published = await registry.publish_policy(
                    args.version, effective_at=args.effective, text=text, reasks=set(args.reask)
                )
            except Rejected as exc:
                print(f"usagepipe registry publish-policy: {exc.message}", file=sys.stderr)
                return 1
        reasks = ", ".join(sorted(published.reasks)) or "nothing (every consent stands)"
        print(
            f"policy version {published.version} takes effect"
            f" {published.effective_at.isoformat()}; asks again for: {reasks}"
        )
        return 0

    return _run(run())


def _flush_events(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        async with _open_registry(settings) as registry:
            sent = await registry.flush_events()
            pending = await registry.pending_events()
        print(f"published {sent} event(s), {pending} still pending")
        return 0 if pending == 0 else 1

    return _run(run())


def _export_owner(args: argparse.Namespace, settings: Settings) -> int:
    """The owner's export, for the privacy office answering a request that did not come
    through the owner's own sign-in: the same document `GET /owners/{id}/export`
    streams, into `--out` (default `usagepipe-owner-<id>.json|zip` here; `-`: stdout)."""
    from devices.export import UsageLink, export_owner, file_name, usage_tables_exist
    from ingest.owner_keys import keys_for, load_secrets, with_local_owner_key
    from ingest.sql_names import quote_schema

    settings = with_local_owner_key(settings)
    owner_id: UUID = args.owner_id
    out = Path(args.out or file_name(owner_id, args.format))
    schema = settings.registry.db_schema
    secrets = load_secrets(settings.enrich)  # a bad secrets file: one line, before serving
    usage = UsageLink(settings.postgres.table, lambda o: keys_for(secrets, o))

    async def run() -> int:
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            owners = f"{quote_schema(schema)}.owners"
            known = await conn.fetchval("SELECT to_regclass($1)", owners) is not None
            if known:
                known = await conn.fetchval(
                    f"SELECT EXISTS (SELECT 1 FROM {owners} WHERE owner_id = $1)", owner_id
                )
            if not known:
                print(
                    f"usagepipe registry export-owner: no owner {owner_id} in the registry"
                    f" schema {schema!r}",
                    file=sys.stderr,
                )
                return 2
            if not await usage_tables_exist(conn, usage):
                print(
                    f"usagepipe registry export-owner: no usage table {usage.table!r} in this"
                    " database: is USAGEPIPE_POSTGRES__TABLE right? (`usagepipe db migrate`"
                    " creates it)",
                    file=sys.stderr,
                )
                return 2

            @asynccontextmanager
            async def snapshot() -> AsyncIterator[asyncpg.Connection]:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    yield conn

            chunks = export_owner(
                snapshot,
                owner_id,
                args.format,
                registry_schema=schema,
                usage=usage,
                now=datetime.now(UTC),
            )
            size = 0
            if args.out == "-":
                async for chunk in chunks:
                    sys.stdout.buffer.write(chunk)
                return 0
            # Written beside, then renamed: a failure half-way leaves no export that
            # looks whole.
            partial = out.with_name(out.name + ".part")
            try:
                with partial.open("wb") as sink:
                    async for chunk in chunks:
                        sink.write(chunk)
                        size += len(chunk)
                partial.replace(out)
            finally:
                partial.unlink(missing_ok=True)
        finally:
            await conn.close()
        print(f"wrote {out} ({size} bytes, {args.format})")
        return 0

    return _run(run())


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from devices.api import create_app
    from devices.export import UsageLink
    from ingest.auth import build_verifier
    from ingest.owner_keys import keys_for, load_secrets, with_local_owner_key
    from ingest.ports import listen
    from ingest.setting_errors import variable

    host = args.host or settings.registry.http_host
    port = args.port if args.port is not None else settings.registry.http_port
    # Bound before anything opens, so a port in use is one line naming what moves it
    # (`PortUnavailable`, reported by the main CLI), not uvicorn's log and exit.
    sock = listen(
        host,
        port,
        "--port" if args.port is not None else variable(["registry", "http_port"]),
        "--host" if args.host else variable(["registry", "http_host"]),
    )

    verifier, signer = build_verifier(settings.auth, settings.services.run_dir)
    # Owners' exports find their usage rows by key (`keys_for`), in the usage tables of
    # the same database (`postgres.dsn`, `postgres.table`).
    settings = with_local_owner_key(settings)
    secrets = load_secrets(settings.enrich)  # a bad secrets file: one line, before serving
    usage = UsageLink(settings.postgres.table, lambda o: keys_for(secrets, o))

    async def run() -> int:
        # The broker and the registry are opened here rather than in the app's lifespan,
        # so a database or broker that does not answer is one line (`_run`), not the
        # traceback uvicorn logs for a failed startup.
        async with AsyncExitStack() as stack:
            broker = await stack.enter_async_context(_open_broker(settings))
            registry = await stack.enter_async_context(_open_registry(settings, broker))
            config = uvicorn.Config(
                create_app(
                    lambda: nullcontext(registry),
                    verifier=verifier,
                    docs=settings.auth.docs_enabled,
                    metrics_registry=CollectorRegistry(),
                    usage=usage,
                ),
                host=host,
                port=port,
                log_config=None,
            )
            log.info(
                "registry API on http://%s:%d (OpenAPI: /openapi.json)",
                host,
                sock.getsockname()[1],
            )
            print(sign_in_hint(settings, signer is not None), flush=True)
            await uvicorn.Server(config).serve(sockets=[sock])
        return 0

    with sock:
        return _run(run())


def sign_in_hint(settings: Settings, dev_signer: bool) -> str:
    """How a caller gets in, as `registry serve` prints it."""
    if not dev_signer:
        return (
            f"sign in: Authorization: Bearer <token from {settings.auth.issuer}>"
            f" (audience {settings.auth.audience}; operators: scope {settings.auth.operator_scope})"
        )
    return (
        "sign in: Authorization: Bearer <token>; local tokens from the dev signer:\n"
        "  usagepipe auth token --subject SUBJECT                  an owner\n"
        "  usagepipe auth token --subject SUBJECT --scope operator  support (/operator/...)"
    )


def _one_of(kind: type[StrEnum]) -> Callable[[str], Any]:
    """An argparse type for `kind` whose error lists the values (argparse's own says
    `invalid Category value`, and the one-line error shows no usage block)."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            values = ", ".join(member.value for member in kind)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {values}") from None

    parse.__name__ = kind.__name__
    return parse


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use 2025-03-01)") from None


def _instant(text: str) -> datetime:
    """An ISO time with its zone: the registry refuses naive times (their meaning
    depends on the host's clock setting)."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None or at.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"not a time with zone: {text!r} (use 2030-01-01T00:00:00+00:00)"
        )
    return at


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `registry` and its subcommands; each sets `handler(args, settings) -> int`."""
    registry = subparsers.add_parser("registry", help="the device registry")
    commands = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        parser.set_defaults(handler=handler)
        return parser

    command("migrate", _migrate, "create or upgrade the registry's tables")

    p = command("add-owner", _add_owner, "create an owner account (as POST /owners); prints its id")
    p.add_argument("--name", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--phone")
    p.add_argument("--region", required=True, help="ISO 3166-2 code, e.g. KR-11 (Seoul)")
    tiers = list(MembershipTier)
    p.add_argument("--tier", type=_one_of(MembershipTier), choices=tiers, default="standard")
    for purpose in ("analytics", "marketing"):
        p.add_argument(
            f"--{purpose}-consent",
            choices=["yes", "no"],
            required=True,
            help=f"the owner's {purpose} consent, stated explicitly",
        )
    p.add_argument(
        "--subject",
        help="link the account to this sign-in subject (the tokens' `sub`), so the owner"
        " acts on it through the API; one account per subject",
    )

    p = command("add-model", _add_model, "add or update a product model")
    p.add_argument("model_number")
    p.add_argument("--category", type=_one_of(Category), choices=list(Category), required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--launched-on", type=_day, required=True, metavar="YYYY-MM-DD")

    p = command("import-units", _import_units, "import a factory CSV export of units")
    p.add_argument("csv", help="model_number,serial_number,manufactured_on,registration_code")

    p = command("register", _register, "register a unit to an owner (prints the MQTT login)")
    p.add_argument("--owner-id", type=UUID, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--serial", required=True)
    p.add_argument("--code", required=True, help="the registration code printed inside")
    channels = list(PurchaseChannel)
    p.add_argument("--channel", type=_one_of(PurchaseChannel), choices=channels, required=True)
    p.add_argument("--store-id")
    p.add_argument("--purchased-on", type=_day, metavar="YYYY-MM-DD")
    p.add_argument("--resale", action="store_true", help="bought second-hand, not released")
    p.add_argument(
        "--csr", type=Path, metavar="FILE", help="the device's PEM CSR: print its TLS certificate"
    )

    p = command(
        "dormancy",
        _dormancy,
        "mark owners idle past the dormancy period dormant; delete old registration attempts",
    )
    p.add_argument("--now", type=_instant, help="ISO time with zone (default now)")

    command("flush-events", _flush_events, "publish registry events left pending")

    command("policies", _policies, "list the purposes and the privacy-policy versions")
    p = command("publish-policy", _publish_policy, "publish a privacy-policy version")
    p.add_argument("version", help="its name, e.g. 2026-09 (letters, digits, '.', '_', '-')")
    p.add_argument(
        "--effective", type=_instant, required=True, help="when it takes effect (ISO, with zone)"
    )
    p.add_argument("--text-file", required=True, help="the policy's text (UTF-8)")
    p.add_argument(
        "--reask",
        action="append",
        default=[],
        metavar="PURPOSE",
        help="a consent purpose whose text changed materially: consent given under an"
        " earlier version lapses when this one takes effect (repeat for several)",
    )

    p = command(
        "export-owner",
        _export_owner,
        "everything held about an owner, as JSON or a zip of CSVs (as GET /owners/{id}/export)",
    )
    p.add_argument("owner_id", type=UUID, metavar="OWNER_ID")
    p.add_argument("--format", choices=["json", "csv"], default="json")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="where to write it (default usagepipe-owner-<id>.json or .zip here; - for stdout)",
    )

    p = command("serve", _serve, "run the registry's HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=port_number)
