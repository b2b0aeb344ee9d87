"""Provisioning a simulated fleet: the factory import and one registration per device.

The broker lets in only registered devices, so before a fleet publishes,
`provision` does what the factory and the appliances' buyers do for real, through
`devices.registry.Registry` (hence the broker account of each device):

1. the six simulated product models (`simulators.fleet.SIM_MODELS`);
2. the factory export of the fleet's units (idempotent);
3. one owner per device (a household), who registers the unit with its code.

It is idempotent: a device already registered (the same fleet name and seed run
before) keeps its owner, who reissues its MQTT secret instead, since secrets are
stored only as hashes and the new run needs one in clear. So re-running
`usagepipe simulate` with the same seed reuses the registrations.

Cost: each registration hashes the unit's code check and the new secret with scrypt,
and makes one broker round trip. `open_registry` gives the simulator its own registry
instance hashing at `simulator.provision_hash_log2_n` (2**10 by default: simulated
units need no protection against offline guessing); registrations run concurrently.
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
from pathlib import Path
from typing import Any

from devices.broker import BrokerAccounts
from devices.events import KafkaEventPublisher
from devices.factory_import import COLUMNS, import_units
from devices.mosquitto import DYNSEC_FILE, DynsecAccounts, device_role, hash_password
from devices.records import MembershipTier, NewOwner, Purchase, PurchaseChannel, Registration
from devices.registry import Registry
from ingest.settings import Settings
from schemas.envelope import telemetry_topic
from simulators.fleet import SIM_MODELS, FleetPlan, FleetUnit, fleet_units
from simulators.traffic import profile

log = logging.getLogger(__name__)

_PURCHASE = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
_MANUFACTURED_ON = "2025-06-01"


class ProvisioningError(Exception):
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
    """Devices registered before, whose owners got a new secret."""
    elapsed_s: float

    def __repr__(self) -> str:  # the dataclass default would print every secret
        return (
            f"ProvisionedFleet({len(self.credentials)} devices, registered {self.registered},"
            f" reissued {self.reissued})"
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

    async def add_device(self, device_id: str, secret: str) -> None:
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
    """Register every device of `plan` (see the module docstring); return their secrets.

    A fleet of `BULK_FROM` devices or more on a `SimRegistry` is provisioned in bulk.
    """
    started = time.monotonic()
    units = fleet_units(plan)
    bulk = isinstance(registry, SimRegistry) and len(units) >= BULK_FROM
    if concurrency is None:
        concurrency = BULK_CONCURRENCY if bulk else 8
    for model in SIM_MODELS.values():
        await registry.add_product_model(model)
    lines = [",".join(COLUMNS) + "\n"] + [
        f"{u.model.model_number},{u.serial_number},{_MANUFACTURED_ON},{u.registration_code}\n"
        for u in units
    ]
    async with registry.transaction() as conn:
        report = await import_units(
            conn,
            lines,
            schema=registry.settings.db_schema,
            hash_log2_n=registry.settings.secret_hash_log2_n,
        )
    if report.rejected:
        first = report.rejected[0]
        raise ProvisioningError(
            f"{len(report.rejected)} simulated unit(s) refused by the factory import; first:"
            f" line {first.line} {first.serial_number}: {first.reason.value} ({first.detail})"
        )
    owners = await registry.current_owners([u.device_id for u in units])
    slots = asyncio.Semaphore(concurrency)

    async def register(index: int, unit: FleetUnit) -> Registration:
        async with slots:
            owner = owners.get(unit.device_id)
            if owner is not None:
                return await registry.reissue_credentials(unit.device_id, owner)
            owner = await registry.create_owner(_household(plan, index, unit), source="simulator")
            return await registry.register(
                owner,
                unit.model.model_number,
                unit.serial_number,
                unit.registration_code,
                _PURCHASE,
            )

    if isinstance(registry, SimRegistry):
        registry.defer_events = bulk
    try:
        async with asyncio.TaskGroup() as tasks:
            done = [
                tasks.create_task(register(i, unit), name=f"provision:{unit.device_id}")
                for i, unit in enumerate(units)
            ]
    finally:
        if bulk:
            assert isinstance(registry, SimRegistry)
            registry.defer_events = False
            await registry.flush_events()
    fleet = ProvisionedFleet(
        credentials={u.device_id: t.result().mqtt_secret for u, t in zip(units, done, strict=True)},
        models={u.device_id: u.model.model_number for u in units},
        categories={u.device_id: u.category for u in units},
        registered=len(units) - len(owners),
        reissued=len(owners),
        elapsed_s=time.monotonic() - started,
    )
    log.info(
        "provisioned %d devices (%d registered, %d reissued) in %.1fs",
        len(units),
        fleet.registered,
        fleet.reissued,
        fleet.elapsed_s,
    )
    return fleet


def _household(plan: FleetPlan, index: int, unit: FleetUnit) -> NewOwner:
    """The simulated household that buys device `index` (no real person's data): the
    same household the usage model gives the device, with its Korean region, and a
    membership tier and consents in realistic shares (`simulators.traffic.profile`)."""
    prof = profile(plan, unit.device_id, unit.category)
    return NewOwner(
        name=f"Simulated household {plan.fleet}-{plan.seed}-{index}",
        email=f"household-{plan.fleet.lower()}-{plan.seed}-{index}@example.invalid",
        phone=None,
        region=prof.region_code,
        membership_tier=MembershipTier(prof.membership_tier),
        analytics_consent=prof.analytics_consent,
        marketing_consent=prof.marketing_consent,
    )
