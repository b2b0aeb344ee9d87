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
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from devices.events import KafkaEventPublisher
from devices.factory_import import COLUMNS, import_units
from devices.mosquitto import DynsecAccounts
from devices.records import MembershipTier, NewOwner, Purchase, PurchaseChannel, Registration
from devices.registry import Registry
from ingest.settings import Settings
from simulators.fleet import SIM_MODELS, FleetPlan, FleetUnit, fleet_units

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


@asynccontextmanager
async def open_registry(settings: Settings) -> AsyncIterator[Registry]:
    """The simulator's own registry instance: the configured database schema, events
    topic and broker, hashing at the simulator's cost (`simulator.provision_hash_log2_n`)."""
    registry_settings = settings.registry.model_copy(
        update={"secret_hash_log2_n": settings.simulator.provision_hash_log2_n}
    )
    async with AsyncExitStack() as stack:
        broker = await stack.enter_async_context(DynsecAccounts(settings.mqtt))
        publisher = await stack.enter_async_context(
            KafkaEventPublisher(
                bootstrap_servers=settings.kafka.bootstrap_servers,
                topic=settings.registry.events_topic,
                acks=settings.kafka.acks,
                enable_idempotence=settings.kafka.enable_idempotence,
                request_timeout_ms=settings.kafka.request_timeout_ms,
                client_id="usagepipe-simulator",
            )
        )
        yield await stack.enter_async_context(
            Registry(
                registry_settings,
                publisher=publisher,
                broker=broker,
                dsn=settings.postgres.dsn.get_secret_value(),
            )
        )


async def provision(
    registry: Registry, plan: FleetPlan, *, concurrency: int = 8
) -> ProvisionedFleet:
    """Register every device of `plan` (see the module docstring); return their secrets."""
    started = time.monotonic()
    units = fleet_units(plan)
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
            owner = await registry.create_owner(_household(plan, index), source="simulator")
            return await registry.register(
                owner,
                unit.model.model_number,
                unit.serial_number,
                unit.registration_code,
                _PURCHASE,
            )

    async with asyncio.TaskGroup() as tasks:
        done = [
            tasks.create_task(register(i, unit), name=f"provision:{unit.device_id}")
            for i, unit in enumerate(units)
        ]
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


def _household(plan: FleetPlan, index: int) -> NewOwner:
    """The simulated household that buys device `index` (no real person's data)."""
    tiers = list(MembershipTier)
    return NewOwner(
        name=f"Simulated household {plan.fleet}-{plan.seed}-{index}",
        email=f"household-{plan.fleet.lower()}-{plan.seed}-{index}@example.invalid",
        phone=None,
        region="JP-13",
        membership_tier=tiers[index % len(tiers)],
        analytics_consent=True,
        marketing_consent=False,
    )
