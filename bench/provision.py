"""How fast a simulated fleet is provisioned: factory import, owners, registrations
(each one scrypt-hashed and pushed to Mosquitto's dynamic-security plugin).

Runs against the local servers (`usagepipe services up`), in a registry schema and
topic prefix of its own that it drops afterwards (and deletes the broker accounts it
made). For each scrypt cost it provisions a fresh fleet, then provisions it again (the
idempotent path: every device's secret reissued). This is a benchmark, not a test: it
prints figures and asserts nothing.

    python bench/provision.py [--devices 200] [--log2-n 10 14] [--concurrency 8] [--no-broker]

`--no-broker` registers against `CollectedAccounts` (everything but the broker call),
which separates the registry's cost from Mosquitto's dynamic-security plugin's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time

import asyncpg

from ingest.kafka import ensure_topics
from ingest.settings import Settings
from simulators.plan import FleetPlan
from simulators.provision import CollectedAccounts, open_registry, provision
from simulators.units import device_ids
from usagepipe.services import with_broker_logins


async def one(
    base: Settings, devices: int, log2_n: int, concurrency: int | None, broker: bool
) -> None:
    name = f"bench_{secrets.token_hex(4)}"
    settings = base.model_copy(
        update={
            "registry": base.registry.model_copy(
                update={"db_schema": name, "events_topic": f"{name}.registry"}
            ),
            "simulator": base.simulator.model_copy(update={"provision_hash_log2_n": log2_n}),
            "mqtt": base.mqtt.model_copy(update={"topic_prefix": f"{name}/"}),
        }
    )
    plan = FleetPlan(devices=devices, messages_per_device=1, fleet=name.replace("_", ""))
    await ensure_topics(settings.kafka, settings.registry.events_topic)
    try:
        accounts = None if broker else CollectedAccounts()
        async with open_registry(settings, broker=accounts) as registry:
            for label in ("first run", "second run"):
                started = time.perf_counter()
                fleet = await provision(registry, plan, concurrency=concurrency)
                elapsed = time.perf_counter() - started
                print(
                    f"scrypt 2^{log2_n:<2}  {label:<10}  {devices} devices in {elapsed:6.2f}s"
                    f" = {devices / elapsed:7.1f} devices/s  (registered {fleet.registered},"
                    f" reissued {fleet.reissued}, handed over {fleet.transferred})",
                    flush=True,
                )
    finally:
        from devices.mosquitto import DynsecAccounts

        ids = device_ids(plan) if broker else []
        async with DynsecAccounts(settings.mqtt) as made:
            for i in range(0, len(ids), 100):  # one command message per 100: the broker's limit
                await made.revoke_devices(ids[i : i + 100])
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--log2-n", type=int, nargs="+", default=[10, 14])
    parser.add_argument("--concurrency", type=int, default=None, help="(8; bulk: 48)")
    parser.add_argument("--no-broker", action="store_true", help="collect accounts instead")
    args = parser.parse_args()
    settings = with_broker_logins(Settings())
    print(f"{os.cpu_count()} CPUs; concurrency {args.concurrency}")
    for log2_n in args.log2_n:
        await one(settings, args.devices, log2_n, args.concurrency, not args.no_broker)


if __name__ == "__main__":
    asyncio.run(main())
