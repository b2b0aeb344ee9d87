"""Provisioning a simulated fleet: the factory import, its owners and their registrations.

The broker lets in only registered devices, and enrichment attributes each event to
the ownership period covering its time, so before a fleet publishes `provision` does
what the factory and the appliances' buyers did, back when they did it, through
`devices.registry.Registry` (hence the broker account of each device), as each unit's
history says (`simulators.history`):

1. the six simulated product models (`simulators.units.SIM_MODELS`);
2. the factory export of the fleet's units, each with its manufacture date;
3. per unit, the household that bought it creates its account and registers the unit
   with its code, at the time it was set up (before the played span), with the
   purchase's channel, store and date;
4. for the units that change hands inside the span, the buyer's account and the
   transfer at that instant (`Registry.transfer`): the registry then attributes the
   events before it to the seller and those after it to the buyer;
5. each current owner's recent activity (`Registry.record_activity`), so the owners
   are not made dormant by `usagepipe registry dormancy`.

It is idempotent: a device already registered (the same fleet name and seed run
before) keeps its owner and history, and its current owner (the buyer, after a
handover) reissues its MQTT secret instead, since secrets are stored only as hashes
and the new run needs one in clear. A handover recorded inside the new run's span
stands (a re-run minutes later changes no owners); one the span has moved past (a
re-run days later) is made again, inside the new span. So re-running `usagepipe
simulate` with the same seed reuses the registrations. Units already registered are
not imported again; a unit imported before but never registered keeps the
manufacture date it was imported with.

Cost: each registration hashes the unit's code check and the new secret with scrypt,
and makes one broker round trip. `open_registry` gives the simulator its own registry
instance hashing at `simulator.provision_hash_log2_n` (2**10 by default: simulated
units need no protection against offline guessing); units are provisioned
concurrently, each in its own transactions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from devices.broker import BrokerAccounts
from devices.errors import Rejected, RejectReason
from devices.events import KafkaEventPublisher
from devices.factory_import import COLUMNS, ImportRejectReason, import_units
from devices.mosquitto import DYNSEC_FILE, DynsecAccounts, device_role, hash_password
from devices.records import NewOwner, Registration
from devices.registry import Registry
from ingest.settings import Settings
from schemas.envelope import telemetry_topic
from schemas.errors import UsagepipeError
from simulators.history import UnitHistory, unit_history
from simulators.plan import FleetPlan
from simulators.units import SIM_MODELS, fleet_units

log = logging.getLogger(__name__)

SOURCE = "simulator"
"""The `source` of the simulated owners' accounts and consents."""


class ProvisioningError(UsagepipeError):
    """The fleet's units could not be imported (a bug in the simulator's unit data)."""


@dataclass(frozen=True)
class ProvisionedFleet:
    """A registered fleet: each device's MQTT secret (shown once), model and category."""

    credentials: dict[str, str]
    models: dict[str, str]
    categories: dict[str, str]
    registered: int
    """Devices registered by this call."""
    reissued: int
    """Devices registered before, whose current owners got a new secret (or handed
    them over: see `transferred`)."""
    transferred: int
    """Devices this call handed over to a buyer (`simulators.history`)."""
    elapsed_s: float

    def __repr__(self) -> str:  # the dataclass default would print every secret
        return (
            f"ProvisionedFleet({len(self.credentials)} devices, registered {self.registered},"
            f" reissued {self.reissued}, transferred {self.transferred})"
        )


BULK_FROM = 200
"""Fleets this large are provisioned in bulk: outbox events flushed once at the end,
more registrations at once (each still its own transaction and broker account)."""
BULK_CONCURRENCY = 48


class SimRegistry(Registry):
    """The registry the simulator provisions with.

    A real registration flushes the registry's event outbox right after it commits, and
    flushes are serialised by an advisory lock, each event waiting for Kafka: about 50
    registrations a second however many run at once. With `defer_events` set, events
    stay in the outbox (committed with their registration, as always) and `provision`
    flushes them once, in batches, at the end.
    """

    defer_events = False

    async def _flush_after_change(self) -> None:
        if not self.defer_events:
            await super()._flush_after_change()


class CollectedAccounts:
    """Broker accounts collected instead of sent: the bulk path for a broker not running.

    Mosquitto's dynamic-security plugin rewrites its whole JSON file after every
    command, so creating N accounts over its control topic costs O(N^2) bytes written
    (about 20 devices/s once a few thousand exist). For a fleet of thousands on a
    broker of its own (`bench/fleet.py`), the registry registers against this
    collector and `write_broker_accounts` adds every account to the plugin's file
    before the broker starts.
    """

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}

    async def add_device(self, device_id: str, secret: str | None) -> None:
        if secret is None:  # a model outside `registry.password_models`
            raise ValueError(f"simulated device {device_id} needs a password login")
        self.secrets[device_id] = secret

    async def revoke_device(self, device_id: str) -> None:
        self.secrets.pop(device_id, None)

    async def revoke_devices(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            self.secrets.pop(device_id, None)


def write_broker_accounts(directory: Path, secrets: Mapping[str, str], topic_prefix: str) -> None:
    """Add each device's client and role to a stopped broker's dynamic-security file
    (`directory` is the broker's, as `services.MosquittoBroker.dir`), the same accounts
    `DynsecAccounts.add_device` makes; existing accounts of those devices are replaced."""
    path = directory / DYNSEC_FILE
    config: dict[str, Any] = json.loads(path.read_text())
    roles = {device_role(d) for d in secrets}
    config["roles"] = [r for r in config.get("roles", []) if r.get("rolename") not in roles]
    config["clients"] = [c for c in config.get("clients", []) if c.get("username") not in secrets]
    for device_id, secret in secrets.items():
        topic = telemetry_topic(device_id, topic_prefix)
        config["roles"].append(
            {
                "rolename": device_role(device_id),
                "acls": [{"acltype": "publishClientSend", "topic": topic, "allow": True}],
            }
        )
        config["clients"].append(
            {
                "username": device_id,
                "clientid": device_id,
                **hash_password(secret),
                "roles": [{"rolename": device_role(device_id)}],
            }
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    tmp.chmod(0o600)
    os.replace(tmp, path)


@asynccontextmanager
async def open_registry(
    settings: Settings, *, broker: BrokerAccounts | None = None
) -> AsyncIterator[SimRegistry]:
    """The simulator's own registry instance: the configured database schema, events
    topic and broker, hashing at the simulator's cost (`simulator.provision_hash_log2_n`),
    with connections enough for bulk provisioning."""
    registry_settings = settings.registry.model_copy(
        update={
            "secret_hash_log2_n": settings.simulator.provision_hash_log2_n,
            "pool_size": max(settings.registry.pool_size, 16),
        }
    )
    async with AsyncExitStack() as stack:
        if broker is None:
            broker = await stack.enter_async_context(DynsecAccounts(settings.mqtt))
        publisher = await stack.enter_async_context(
            KafkaEventPublisher(
                settings.kafka,
                topic=settings.registry.events_topic,
                client_id="usagepipe-simulator",
            )
        )
        yield await stack.enter_async_context(
            SimRegistry(
                registry_settings,
                publisher=publisher,
                broker=broker,
                dsn=settings.postgres.dsn.get_secret_value(),
            )
        )


async def provision(
    registry: Registry, plan: FleetPlan, *, concurrency: int | None = None
) -> ProvisionedFleet:
    """Register every device of `plan` as its history says (see the module docstring);
    return their secrets.

    A fleet of `BULK_FROM` devices or more on a `SimRegistry` is provisioned in bulk.
    Raises `simulators.history.HistoryError` when the plan starts before its units can
    have been bought, `ProvisioningError` when the factory import refuses a unit.
    """
    started = time.monotonic()
    units = fleet_units(plan)
    histories = [unit_history(plan, i, unit) for i, unit in enumerate(units)]
    bulk = isinstance(registry, SimRegistry) and len(units) >= BULK_FROM
    if concurrency is None:
        concurrency = BULK_CONCURRENCY if bulk else 8
    for model in SIM_MODELS.values():
        await registry.add_product_model(model)
    owners = await registry.current_owners([u.device_id for u in units])
    await _import(registry, [h for h in histories if h.unit.device_id not in owners])
    done = await _bring_up_all(registry, histories, owners, concurrency=concurrency, bulk=bulk)
    fleet = ProvisionedFleet(
        credentials={u.device_id: r.mqtt_secret for u, (r, _) in zip(units, done, strict=True)},
        models={u.device_id: u.model.model_number for u in units},
        categories={u.device_id: u.category for u in units},
        registered=len(units) - len(owners),
        reissued=len(owners),
        transferred=sum(handed_over for _, handed_over in done),
        elapsed_s=time.monotonic() - started,
    )
    log.info(
        "provisioned %d devices (%d registered, %d reissued, %d handed over) in %.1fs",
        len(units),
        fleet.registered,
        fleet.reissued,
        fleet.transferred,
        fleet.elapsed_s,
    )
    return fleet


async def _bring_up_all(
    registry: Registry,
    histories: list[UnitHistory],
    owners: Mapping[str, UUID],
    *,
    concurrency: int,
    bulk: bool,
) -> list[tuple[Registration, bool]]:
    """`_bring_up` every unit, `concurrency` at a time, in the order of `histories`; in
    bulk, with the registry's events deferred and flushed once at the end."""
    slots = asyncio.Semaphore(concurrency)

    async def bring_up(history: UnitHistory) -> tuple[Registration, bool]:
        async with slots:
            return await _bring_up(registry, history, owners.get(history.unit.device_id))

    if isinstance(registry, SimRegistry):
        registry.defer_events = bulk
    try:
        async with asyncio.TaskGroup() as tasks:
            done = [
                tasks.create_task(bring_up(h), name=f"provision:{h.unit.device_id}")
                for h in histories
            ]
    finally:
        if bulk:
            assert isinstance(registry, SimRegistry)
            registry.defer_events = False
            await registry.flush_events()
    return [task.result() for task in done]


async def _bring_up(
    registry: Registry, history: UnitHistory, owner: UUID | None
) -> tuple[Registration, bool]:
    """One unit as its history says: registered by its household unless `owner`
    already owns it, handed over to its buyer if that is still to be recorded, its
    secret reissued if neither gave it a new one, and its current owner's recent
    activity noted. Returns the registration and whether the unit was handed over."""
    unit = history.unit
    registration: Registration | None = None
    if owner is None:
        owner = await registry.create_owner(history.owner, source=SOURCE, at=history.registered_at)
        registration = await registry.register(
            owner,
            unit.model.model_number,
            unit.serial_number,
            unit.registration_code,
            history.purchase,
            at=history.registered_at,
        )
    handed_over = await _hands_over(registry, history, fresh=registration is not None)
    if handed_over:
        assert history.handover is not None and history.buyer is not None
        assert history.handover_purchase is not None
        at = history.handover.at
        await _touch(registry, owner, at, history.owner)  # the seller's last use
        buyer = await registry.create_owner(history.buyer, source=SOURCE, at=at)
        registration = await registry.transfer(
            unit.device_id, owner, buyer, history.handover_purchase, at=at
        )
        owner = buyer
    if registration is None:
        registration = await registry.reissue_credentials(unit.device_id, owner)
    await _touch(registry, owner, history.last_active, history.current_owner)
    return registration, handed_over


async def _import(registry: Registry, histories: list[UnitHistory]) -> None:
    """The factory export of the units not registered yet. A unit imported before with
    another manufacture date (an earlier run on another day, which never registered
    it) keeps its date: its code, which registration checks, is the same."""
    if not histories:
        return
    lines = [",".join(COLUMNS) + "\n"] + [
        f"{h.unit.model.model_number},{h.unit.serial_number},{h.manufactured_on},"
        f"{h.unit.registration_code}\n"
        for h in histories
    ]
    async with registry.transaction() as conn:
        report = await import_units(
            conn,
            lines,
            schema=registry.settings.db_schema,
            hash_log2_n=registry.settings.secret_hash_log2_n,
        )
    refused = [
        r
        for r in report.rejected
        if not (
            r.reason is ImportRejectReason.CONFLICTING_SERIAL
            and r.detail.endswith("a different manufactured_on")
        )
    ]
    if refused:
        first = refused[0]
        raise ProvisioningError(
            f"{len(refused)} simulated unit(s) refused by the factory import; first:"
            f" line {first.line} {first.serial_number}: {first.reason.value} ({first.detail})"
        )


async def _hands_over(registry: Registry, history: UnitHistory, *, fresh: bool) -> bool:
    """Whether the unit's handover is still to be recorded: always for a unit this call
    registered; for one registered before, when its current owner's period began
    before the span (a run of the same seed whose span has moved past the handover an
    earlier run recorded). A handover recorded inside the span stands: a re-run minutes
    later changes no owners."""
    if history.handover is None:
        return False
    if fresh:
        return True
    periods = await registry.ownership_history(history.unit.device_id)
    return bool(periods) and periods[-1].valid_from < history.span_start


async def _touch(registry: Registry, owner_id: UUID, at: datetime, who: NewOwner) -> None:
    """Note the owner's activity at `at`; a dormant owner (a re-run long after) signs in
    again and consents afresh, as the household's profile says."""
    try:
        await registry.record_activity(owner_id, at=at)
    except Rejected as exc:
        if exc.reason is not RejectReason.OWNER_NOT_ACTIVE:
            raise
        await registry.reactivate(
            owner_id,
            reauthenticated=True,
            analytics_consent=who.analytics_consent,
            marketing_consent=who.marketing_consent,
            source=SOURCE,
            at=at,
        )
