"""Enrichment on the real servers: every field from the registry, attribution by event
time across a transfer, consent and erasure, unregistered devices, the cache's
invalidation while the consumer runs, a registry that does not answer, and rollups
grouped by the enriched model, firmware and region.

Owners, units and transfers are made with `devices.registry.Registry` directly (events
recorded in memory); telemetry goes to Kafka, or through MQTT and the bridge where the
test is about the whole path.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from devices.factory_import import COLUMNS, import_units
from devices.mosquitto import DynsecAccounts
from devices.records import (
    Category,
    MembershipTier,
    NewOwner,
    ProductModel,
    Purchase,
    PurchaseChannel,
    device_id_for,
)
from devices.registry import Registry
from ingest.consumer import Consumer
from ingest.dead_letter import DeadLetterReader
from ingest.enrich import Enricher
from ingest.errors import ConfigurationError
from ingest.kafka import ensure_topics, make_producer
from ingest.metrics import ConsumerMetrics
from ingest.owner_keys import owner_key, with_local_owner_key
from ingest.registry_lookup import DeviceFacts, Period, merged_installs
from ingest.rollups import direct_rollup_query, usage_rollup
from ingest.settings import EnrichSettings, Settings
from schemas.catalog import current_version
from schemas.errors import Reason
from schemas.examples import example_body
from tests.conftest import TEST_OWNER_KEY
from tests.devices.fakes import RecordingBroker, RecordingPublisher
from tests.pipeline import pipeline, publish_payloads, wait_for

KEY = TEST_OWNER_KEY.encode()
NOW = datetime.now(UTC).replace(microsecond=0)
WASHER = ProductModel("WM-ENR-1", Category.WASHER, "Washer E1", date(2025, 3, 1))
DRYER = ProductModel("DR-ENR-2", Category.DRYER, "Dryer E2", date(2025, 6, 1))


# -- helpers ---------------------------------------------------------------------------


def enriching(settings: Settings, **changes: Any) -> Settings:
    """`settings` with the production policy for unregistered devices, and `changes`."""
    enrich = settings.enrich.model_copy(update={"unregistered": "dead_letter", **changes})
    return settings.model_copy(update={"enrich": enrich})


@dataclass
class Fleet:
    """A registry of the test's own, with the test's units imported."""

    registry: Registry
    codes: dict[str, str]  # serial -> registration code
    models: dict[str, str]  # serial -> model number

    async def owner(
        self,
        name: str,
        *,
        region: str = "JP-13",
        tier: MembershipTier = MembershipTier.GOLD,
        consent: bool = True,
        at: datetime,
    ) -> UUID:
        new = NewOwner(name, f"{name}@example.invalid", None, region, tier, consent, False)
        return await self.registry.create_owner(new, source="test", at=at)

    async def register(
        self, owner: UUID, serial: str, purchase: Purchase, *, at: datetime
    ) -> tuple[str, str]:
        """(device id, MQTT secret) of `serial`, registered to `owner` at `at`."""
        done = await self.registry.register(
            owner, self.models[serial], serial, self.codes[serial], purchase, at=at
        )
        return done.device_id, done.mqtt_secret

    def device_id(self, serial: str) -> str:
        return device_id_for(self.models[serial], serial)


@contextlib.asynccontextmanager
async def fleet(settings: Settings, *, real_broker: bool = False) -> AsyncIterator[Fleet]:
    """Units SN-W1..SN-W4 (washers) and SN-D1..SN-D2 (dryers) in the test's registry.

    `real_broker`: registrations create the devices' accounts on Mosquitto, so they
    can publish over MQTT; otherwise the broker is an in-memory recorder."""
    units = {f"SN-W{i}": WASHER.model_number for i in range(1, 5)}
    units |= {f"SN-D{i}": DRYER.model_number for i in range(1, 3)}
    codes = {serial: f"CODE-{serial}-7KQ2-M9DX" for serial in units}
    reg_settings = settings.registry.model_copy(update={"secret_hash_log2_n": 10})
    async with contextlib.AsyncExitStack() as stack:
        broker: Any = RecordingBroker()
        if real_broker:
            broker = await stack.enter_async_context(DynsecAccounts(settings.mqtt))
        registry = await stack.enter_async_context(
            Registry(
                reg_settings,
                publisher=RecordingPublisher(),
                broker=broker,
                dsn=settings.postgres.dsn.get_secret_value(),
            )
        )
        for model in (WASHER, DRYER):
            await registry.add_product_model(model)
        lines = [",".join(COLUMNS) + "\n"] + [
            f"{model},{serial},2025-06-01,{codes[serial]}\n" for serial, model in units.items()
        ]
        async with registry.transaction() as conn:
            report = await import_units(conn, lines, schema=reg_settings.db_schema, hash_log2_n=10)
        assert not report.rejected
        yield Fleet(registry, codes, units)


def message(
    device_id: str,
    seq: int,
    at: datetime,
    schema: str = "washer.energy",
    body: dict[str, Any] | None = None,
) -> bytes:
    body = example_body(schema, random.Random(seq)) if body is None else body
    return orjson.dumps(
        {
            "device_id": device_id,
            "boot_id": "b00t0000",
            "seq": seq,
            "event_time": at.isoformat(),
            "schema": schema,
            "schema_version": current_version(schema),
            "body": body,
        }
    )


async def produce(settings: Settings, messages: Sequence[tuple[str, bytes]]) -> None:
    """Send (device id, payload) pairs to the raw topic, keyed by device, in order."""
    await ensure_topics(settings.kafka, settings.kafka.raw_topic, settings.kafka.dlq_topic)
    producer = make_producer(settings.kafka, client_id="test-enrich")
    await producer.start()
    try:
        for device_id, payload in messages:
            await producer.send(settings.kafka.raw_topic, payload, key=device_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def consume(settings: Settings, count: int) -> tuple[Consumer, CollectorRegistry]:
    """Run a consumer until it has read `count` records."""
    metrics = CollectorRegistry()
    consumer = Consumer(settings, ConsumerMetrics(metrics), stop_after=count)
    async with asyncio.timeout(60):
        await consumer.run()
    return consumer, metrics


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Consumer, CollectorRegistry]]:
    """A consumer running in the background until the block ends."""
    metrics = CollectorRegistry()
    consumer = Consumer(settings, ConsumerMetrics(metrics))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(consumer.run(), name="test-consumer")
        try:
            yield consumer, metrics
        finally:
            consumer.stop("test over")


async def rows(settings: Settings, where: str = "true") -> dict[tuple[str, int], dict[str, Any]]:
    """The usage rows as dicts, keyed by (device, seq), without Kafka bookkeeping."""
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        found = await conn.fetch(f"SELECT * FROM {settings.postgres.table} WHERE {where}")
    finally:
        await conn.close()
    skip = {"body", "kafka_partition", "kafka_offset", "ingested_at", "boot_id", "schema"}
    skip.add("schema_version")
    return {
        (r["device_id"], r["seq"]): {k: v for k, v in dict(r).items() if k not in skip}
        for r in found
    }


def sample(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    return metrics.get_sample_value(name, labels) or 0.0


def enriched(
    device_id: str,
    event_time: datetime,
    *,
    model: str = WASHER.model_number,
    category: str = "washer",
    firmware: str | None = None,
    channel: str | None = None,
    owner: UUID | None = None,
    consent: bool | None = None,
    region: str | None = None,
    tier: str | None = None,
) -> dict[str, Any]:
    """The enrichment part of a stored row, as the tests expect it."""
    return {
        "device_id": device_id,
        "seq": None,  # filled by `expect`
        "event_time": event_time,
        "model": model,
        "category": category,
        "firmware": firmware,
        "region": region,
        "membership_tier": tier,
        "purchase_channel": channel,
        "analytics_consent": consent,
        "owner_key": None if owner is None else owner_key(KEY, owner),
    }


def expect(seq: int, row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "seq": seq}


# -- unit tests --------------------------------------------------------------------------


def test_owner_key_is_a_keyed_hmac_of_the_owner_id() -> None:
    owner = UUID("7b0c6a52-51d4-4f57-9b61-2c0c8f2f1f3e")
    key = owner_key(KEY, owner)
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == owner_key(KEY, owner)
    assert key != owner_key(b"another-secret-another-secret-xx", owner)
    assert str(owner).replace("-", "") not in key


def test_merged_installs_adds_what_is_new_in_time_order_and_keeps_the_first_of_a_time() -> None:
    t = [NOW - timedelta(hours=h) for h in (9, 7, 5, 3, 1)]
    history = ((t[0], "1.0", "1.1"), (t[2], "1.1", "1.2"))
    assert merged_installs(history, [(t[2], "1.1", "1.2")]) is history  # redelivered
    assert merged_installs((), [(t[1], "1.0", "1.1")]) == ((t[1], "1.0", "1.1"),)
    newer = [(t[4], "1.3", "1.4"), (t[3], "1.2", "1.3")]
    assert merged_installs(history, newer) == (*history, newer[1], newer[0])
    late = [(t[1], "1.1", "1.1a"), (t[1], "1.1", "other"), (t[3], "1.2", "1.3")]
    assert merged_installs(history, late) == (
        history[0],
        (t[1], "1.1", "1.1a"),
        history[1],
        (t[3], "1.2", "1.3"),
    )


def test_period_at_is_half_open() -> None:
    t1, t2 = NOW - timedelta(days=2), NOW - timedelta(days=1)
    seller = Period(t1, t2, "own_store", True, "JP-13", "gold", "k1")
    buyer = Period(t2, None, "gift", True, "JP-27", "silver", "k2")
    facts = DeviceFacts(1, "WM-1", "washer", None, (seller, buyer), frozenset())
    assert facts.period_at(t1 - timedelta(microseconds=1)) is None
    assert facts.period_at(t1) is seller
    assert facts.period_at(t2 - timedelta(microseconds=1)) is seller
    assert facts.period_at(t2) is buyer
    assert facts.period_at(NOW + timedelta(days=999)) is buyer


def test_owner_key_secret_must_be_long() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        EnrichSettings(owner_key_secret=SecretStr("short"))


def test_the_consumer_refuses_to_start_without_an_owner_key_secret(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match="owner_key_secret"):
        Enricher(
            EnrichSettings(),
            registry_schema=settings.registry.db_schema,
            dsn=settings.postgres.dsn.get_secret_value(),
            metrics=ConsumerMetrics(CollectorRegistry()),
        )


async def test_the_consumer_refuses_to_start_without_the_registry_schema(
    settings: Settings,
) -> None:
    """The registry creates its schema (`usagepipe consume` runs its migrations first);
    an enricher pointed at a schema nobody migrated says so in one line."""
    schema = f"{settings.registry.db_schema}_absent"
    enricher = Enricher(
        settings.enrich,
        registry_schema=schema,
        dsn=settings.postgres.dsn.get_secret_value(),
        metrics=ConsumerMetrics(CollectorRegistry()),
    )
    with pytest.raises(ConfigurationError) as refused:
        async with enricher:
            pass
    assert str(refused.value) == (
        f"the registry schema {schema} is not migrated (no {schema}.record_firmware):"
        " run `usagepipe registry migrate` first"
    )
    assert not enricher.listening


def test_local_runs_get_a_generated_private_owner_key_secret(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = settings.model_copy(
        update={
            "enrich": EnrichSettings(),
            "services": settings.services.model_copy(update={"run_dir": tmp_path}),
        }
    )
    first = with_local_owner_key(local).enrich.owner_key_secret
    second = with_local_owner_key(local).enrich.owner_key_secret
    assert first is not None and second is not None
    assert first.get_secret_value() == second.get_secret_value()
    assert len(first.get_secret_value()) >= 32
    path = tmp_path / "enrich" / "owner_key_secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "OWNER_KEY_SECRETS_FILE (or _SECRET) is not set" in caplog.text
    assert first.get_secret_value() not in caplog.text
    # A configured secret is left alone.
    assert with_local_owner_key(settings) is settings


# -- the whole path ------------------------------------------------------------------------


async def test_every_enrichment_field_through_mqtt_bridge_kafka_and_consumer(
    settings: Settings,
) -> None:
    settings = enriching(settings)
    registered_at = NOW - timedelta(hours=3)
    async with fleet(settings, real_broker=True) as f:
        owner = await f.owner(
            "osaka", region="JP-27", tier=MembershipTier.PLATINUM, at=registered_at
        )
        purchase = Purchase(PurchaseChannel.OWN_STORE, store_id="OSAKA-01")
        device, secret = await f.register(owner, "SN-W1", purchase, at=registered_at)
        async with f.registry.transaction() as conn:
            await conn.execute(
                "UPDATE devices SET firmware_version = '3.12.1047' WHERE device_id = $1", device
            )
    times = [registered_at - timedelta(minutes=5), NOW - timedelta(hours=1), NOW]
    payloads = [message(device, seq, at) for seq, at in enumerate(times)]
    topic = f"{settings.mqtt.topic_prefix}devices/{device}/telemetry"

    async with pipeline(settings) as run:
        await publish_payloads(settings, device, topic, payloads, password=secret)
        await wait_for(lambda: run.consumer.report.stored == 3, "3 rows")

    stored = await rows(settings)
    linked = enriched(
        device,
        times[1],
        firmware="3.12.1047",
        channel="own_store",
        owner=owner,
        consent=True,
        region="JP-27",
        tier="platinum",
    )
    assert stored == {
        # Before the registration nobody owned the device: its own facts only.
        (device, 0): expect(0, enriched(device, times[0], firmware="3.12.1047")),
        (device, 1): expect(1, linked),
        (device, 2): expect(2, {**linked, "event_time": times[2]}),
    }
    # Pseudonymous only: neither the owner id nor any contact is in the table.
    text = repr(await rows(settings))
    assert str(owner) not in text and "osaka@" not in text


# -- attribution ---------------------------------------------------------------------------


async def test_transfer_mid_stream_attributes_each_event_by_its_time(
    settings: Settings,
) -> None:
    settings = enriching(settings)
    t0 = NOW - timedelta(days=2)
    transfer_at = NOW - timedelta(hours=2)
    async with fleet(settings) as f:
        seller = await f.owner("seller", region="JP-13", tier=MembershipTier.GOLD, at=t0)
        buyer = await f.owner("buyer", region="JP-01", tier=MembershipTier.SILVER, at=t0)
        online = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
        device, _ = await f.register(seller, "SN-W2", online, at=t0)
        await f.registry.transfer(
            device, seller, buyer, Purchase(PurchaseChannel.GIFT), at=transfer_at
        )
    times = [
        transfer_at - timedelta(hours=1),
        transfer_at - timedelta(microseconds=1),
        transfer_at,  # the transfer's instant is the buyer's
        transfer_at + timedelta(minutes=30),
    ]
    await produce(settings, [(device, message(device, i, at)) for i, at in enumerate(times)])
    await consume(settings, 4)

    def seller_s(seq: int) -> dict[str, Any]:
        return expect(
            seq,
            enriched(
                device,
                times[seq],
                channel="own_online_shop",
                owner=seller,
                consent=True,
                region="JP-13",
                tier="gold",
            ),
        )

    def buyer_s(seq: int) -> dict[str, Any]:
        return expect(
            seq,
            enriched(
                device,
                times[seq],
                channel="gift",
                owner=buyer,
                consent=True,
                region="JP-01",
                tier="silver",
            ),
        )

    assert await rows(settings) == {
        (device, 0): seller_s(0),
        (device, 1): seller_s(1),
        (device, 2): buyer_s(2),
        (device, 3): buyer_s(3),
    }


def firmware_event(device_id: str, seq: int, at: datetime, change: str, outcome: str) -> bytes:
    """A `washer.firmware` event; `change` is "old -> new"."""
    old, new = change.split(" -> ")
    body = {"from_version": old, "to_version": new, "outcome": outcome, "trigger": "app_remote"}
    return message(device_id, seq, at, "washer.firmware", body)


async def test_firmware_is_the_one_the_device_reported_running_at_each_event_time(
    settings: Settings,
) -> None:
    settings = enriching(settings)
    t0 = NOW - timedelta(days=3)
    async with fleet(settings) as f:
        owner = await f.owner("fw", at=t0)
        device, _ = await f.register(owner, "SN-W3", Purchase(PurchaseChannel.GIFT), at=t0)
    at = [NOW - timedelta(hours=h) for h in (50, 40, 30, 20, 10, 5)]
    # Batch 1: usage, an installation 2.0.0 -> 2.1.0 at[1], usage after it in the same
    # batch, a failed update (changes nothing), usage.
    await produce(
        settings,
        [
            (device, message(device, 0, at[0])),
            (device, firmware_event(device, 1, at[1], "2.0.0 -> 2.1.0", "installed")),
            (device, message(device, 2, at[2])),
            (device, firmware_event(device, 3, at[3], "2.1.0 -> 2.2.0", "failed")),
            (device, message(device, 4, at[5])),
        ],
    )
    await consume(settings, 5)
    # Batch 2: a redelivery of the installation, and a late one from before it.
    await produce(
        settings,
        [
            (device, firmware_event(device, 1, at[1], "2.0.0 -> 2.1.0", "installed")),
            (device, firmware_event(device, 9, at[4], "2.1.0 -> 2.1.5", "installed")),
            (device, message(device, 10, at[4] + timedelta(minutes=1))),
        ],
    )
    await consume(settings, 3)
    got = {seq: r["firmware"] for (_, seq), r in (await rows(settings)).items()}
    assert got == {
        0: "2.0.0",  # before the first installation: its from_version
        1: "2.1.0",  # the installation event itself reports the new version
        2: "2.1.0",
        3: "2.1.0",  # the failed update
        4: "2.1.0",  # enriched before the late 2.1.5 installation was known
        9: "2.1.5",
        10: "2.1.5",
    }
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        schema = settings.registry.db_schema
        history = await conn.fetch(
            f"SELECT installed_at, from_version, to_version FROM {schema}.firmware_history"
            " ORDER BY installed_at"
        )
        current = await conn.fetchval(
            f"SELECT firmware_version FROM {schema}.devices WHERE device_id = $1", device
        )
    finally:
        await conn.close()
    assert [tuple(h) for h in history] == [(at[1], "2.0.0", "2.1.0"), (at[4], "2.1.0", "2.1.5")]
    assert current == "2.1.5"


async def test_without_analytics_consent_rows_have_no_owner_link(settings: Settings) -> None:
    """Never consented, and withdrawn: no key, region or tier; the device's facts and
    the purchase channel (a fact of the sale) stay."""
    settings = enriching(settings)
    t0 = NOW - timedelta(days=1)
    async with fleet(settings) as f:
        never = await f.owner("never", consent=False, at=t0)
        withdrew = await f.owner("withdrew", region="JP-27", at=t0)
        shop = Purchase(PurchaseChannel.THIRD_PARTY_RETAILER, store_id="R-9")
        never_device, _ = await f.register(never, "SN-W1", shop, at=t0)
        withdrew_device, _ = await f.register(withdrew, "SN-D1", shop, at=t0)
        await f.registry.set_consent(withdrew, analytics=False, source="test", at=NOW)
    at = NOW - timedelta(hours=1)  # before the withdrawal: consent now is what counts
    await produce(
        settings,
        [
            (never_device, message(never_device, 0, at)),
            (withdrew_device, message(withdrew_device, 0, at, "dryer.energy")),
        ],
    )
    await consume(settings, 2)

    channel = "third_party_retailer"
    assert await rows(settings) == {
        (never_device, 0): expect(0, enriched(never_device, at, channel=channel, consent=False)),
        (withdrew_device, 0): expect(
            0,
            enriched(
                withdrew_device,
                at,
                model=DRYER.model_number,
                category="dryer",
                channel=channel,
                consent=False,
            ),
        ),
    }


# -- erasure ---------------------------------------------------------------------------------


async def test_erased_owners_rows_lose_their_key_while_running_and_after_a_restart(
    settings: Settings,
) -> None:
    """One owner is erased while the consumer runs, another while none runs: both
    owners' stored rows lose key and tier, and their devices' dead letters (which
    carry the owner's key, as the rows do) are deleted; a third owner's rows and
    letter keep theirs."""
    settings = enriching(settings)
    t0 = NOW - timedelta(days=1)
    at = NOW - timedelta(hours=1)
    async with fleet(settings) as f:
        owners = [await f.owner(name, at=t0) for name in ("live", "offline", "kept")]
        shop = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
        devices = [
            (await f.register(o, serial, shop, at=t0))[0]
            for o, serial in zip(owners, ("SN-W1", "SN-W2", "SN-W3"), strict=True)
        ]
        await produce(settings, [(d, message(d, 0, at)) for d in devices])
        await produce(settings, [(d, b'{"not": "a message"}') for d in devices])
        live, offline, kept = owners

        async with running(settings) as (consumer, metrics):
            await wait_for(lambda: consumer.report.stored == 3, "3 rows")
            await wait_for(lambda: consumer.report.dead_lettered == 3, "3 letters")
            assert {r["owner_key"] for r in (await rows(settings)).values()} == {
                owner_key(KEY, o) for o in owners
            }
            letters = await rows_of(
                settings, "SELECT device_id, model, owner_key FROM {table}_dead_letters"
            )
            assert sorted(tuple(r) for r in letters) == sorted(
                (d, WASHER.model_number, owner_key(KEY, o))
                for d, o in zip(devices, owners, strict=True)
            )
            await f.registry.erase_owner(live, at=NOW)
            # Applied on the notification, well within the cache TTL (60 s).
            await wait_until_unlinked(settings, devices[0], timeout_s=10)
            removed = sample(metrics, "usagepipe_consumer_owner_links_removed_total")
            assert removed == 1

        await f.registry.erase_owner(offline, at=NOW)
        # Nothing was listening: the next consumer finds the erasure on start-up.
        async with running(settings) as (consumer, metrics):
            await wait_until_unlinked(settings, devices[1], timeout_s=10)

    stored = await rows(settings)
    for device in devices[:2]:
        assert stored[(device, 0)]["owner_key"] is None
        assert stored[(device, 0)]["membership_tier"] is None
        assert stored[(device, 0)]["model"] == WASHER.model_number
    assert stored[(devices[2], 0)]["owner_key"] == owner_key(KEY, kept)
    letters = await rows_of(settings, "SELECT device_id, owner_key FROM {table}_dead_letters")
    assert [tuple(r) for r in letters] == [(devices[2], owner_key(KEY, kept))]
    erasures = await rows_of(settings, "SELECT owner_id, unlinked FROM {table}_erasures")
    assert sorted((r["owner_id"], r["unlinked"]) for r in erasures) == sorted(
        [(live, 1), (offline, 1)]
    )


async def test_a_withdrawal_made_while_no_consumer_ran_unlinks_at_start_one_way(
    settings: Settings,
) -> None:
    """An owner withdraws analytics consent and grants it again while no consumer runs:
    the next consumer unlinks, at its start, the row stored under the first grant, and
    links the row it stores under the new one; another owner's row keeps its key. Once
    the owner is erased, the record of the end goes with the erasure."""
    settings = enriching(settings)
    t0 = NOW - timedelta(days=1)
    at = NOW - timedelta(hours=1)
    async with fleet(settings) as f:
        ada, kept = [await f.owner(name, at=t0) for name in ("ada", "kept")]
        shop = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
        device, _ = await f.register(ada, "SN-W1", shop, at=t0)
        other, _ = await f.register(kept, "SN-W2", shop, at=t0)
        await produce(settings, [(d, message(d, 0, at)) for d in (device, other)])
        await consume(settings, 2)
        await f.registry.set_consent(ada, analytics=False, source="test")
        await f.registry.decide(
            ada, ["analytics"], granted=True, source="app", policy_version="initial"
        )
        await produce(settings, [(device, message(device, 1, at))])
        _, metrics = await consume(settings, 1)

    stored = await rows(settings)
    assert [stored[(device, seq)]["owner_key"] for seq in range(2)] == [None, owner_key(KEY, ada)]
    assert [stored[(device, seq)]["membership_tier"] for seq in range(2)] == [None, "gold"]
    assert [stored[(device, seq)]["region"] for seq in range(2)] == ["JP-13", "JP-13"]
    assert stored[(other, 0)]["owner_key"] == owner_key(KEY, kept)
    assert sample(metrics, "usagepipe_consumer_consent_links_removed_total") == 1
    ended = await rows_of(settings, "SELECT owner_id, event, unlinked FROM {table}_consent_unlinks")
    assert [(r["owner_id"], r["event"].split()[0], r["unlinked"]) for r in ended] == [
        (ada, "withdrawn", 1)
    ]

    async with fleet(settings) as f:
        await f.registry.erase_owner(ada, at=datetime.now(UTC))
    await produce(settings, [(other, message(other, 1, at))])
    await consume(settings, 1)
    assert await rows_of(settings, "SELECT * FROM {table}_consent_unlinks") == []
    erased = await rows_of(settings, "SELECT owner_id, unlinked FROM {table}_erasures")
    assert [tuple(r) for r in erased] == [(ada, 1)]


async def wait_until_unlinked(settings: Settings, device: str, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            found = await rows(settings, f"device_id = '{device}'")
            if found[(device, 0)]["owner_key"] is None:
                return
            await asyncio.sleep(0.05)


async def rows_of(settings: Settings, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        return list(await conn.fetch(query.format(table=settings.postgres.table)))
    finally:
        await conn.close()


# -- unregistered devices ---------------------------------------------------------------------


async def test_unregistered_device_is_dead_lettered_once_and_stored_once_registered(
    settings: Settings,
) -> None:
    settings = enriching(settings)
    at = NOW - timedelta(minutes=30)
    async with fleet(settings) as f:
        owner = await f.owner("late", at=NOW - timedelta(days=1))
        device = f.device_id("SN-W4")  # imported from the factory, not registered yet
        refused = message(device, 0, at)
        await produce(settings, [(device, refused)])
        async with running(settings) as (consumer, metrics):
            await wait_for(lambda: consumer.report.dead_lettered == 1, "the dead letter")
            await f.register(owner, "SN-W4", Purchase(PurchaseChannel.GIFT), at=at)
            # The registration's notification evicts the cached "not registered".
            await wait_for(
                lambda: (
                    sample(
                        metrics, "usagepipe_consumer_registry_invalidations_total", kind="device"
                    )
                    >= 1
                ),
                "the registration's notification",
                timeout_s=10,
            )
            await produce(settings, [(device, message(device, 1, at + timedelta(seconds=1)))])
            await wait_for(lambda: consumer.report.stored == 1, "the later message", 20)
        unregistered = sample(
            metrics,
            "usagepipe_consumer_dead_letters_total",
            reason="unregistered_device",
            model="unknown",
        )
        assert unregistered == 1
        assert sample(metrics, "usagepipe_consumer_unregistered_total") == 1

    async with DeadLetterReader(settings.kafka) as reader:
        letters = [stored.letter async for stored in reader]
    assert [(x.reason, x.original) for x in letters if x is not None] == [
        (Reason.UNREGISTERED_DEVICE, refused)
    ]
    stored = await rows(settings)
    assert list(stored) == [(device, 1)]
    assert stored[(device, 1)]["owner_key"] == owner_key(KEY, owner)


# -- the cache -------------------------------------------------------------------------------


async def test_changes_made_while_running_apply_to_later_events_without_waiting_for_the_ttl(
    settings: Settings,
) -> None:
    """With a TTL of an hour, only the registry's notifications can make the running
    consumer see a consent withdrawal and a transfer. The withdrawal also unlinks the
    rows stored before it; the seller's rows keep the seller's key."""
    settings = enriching(settings, cache_ttl_s=3600)
    t0 = NOW - timedelta(days=1)
    async with fleet(settings) as f:
        seller = await f.owner("seller", region="JP-13", at=t0)
        buyer = await f.owner("buyer", region="JP-40", tier=MembershipTier.STANDARD, at=t0)
        withdrawing = await f.owner("withdrawing", at=t0)
        online = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
        sold, _ = await f.register(seller, "SN-W1", online, at=t0)
        other, _ = await f.register(withdrawing, "SN-W2", online, at=t0)

        async with running(settings) as (consumer, metrics):

            def invalidations(kind: str) -> float:
                name = "usagepipe_consumer_registry_invalidations_total"
                return sample(metrics, name, kind=kind)

            first = NOW - timedelta(minutes=10)
            await produce(
                settings, [(sold, message(sold, 0, first)), (other, message(other, 0, first))]
            )
            await wait_for(lambda: consumer.report.stored == 2, "2 rows", 20)
            await produce(
                settings, [(sold, message(sold, 1, first)), (other, message(other, 1, first))]
            )
            await wait_for(lambda: consumer.report.stored == 4, "4 rows", 20)
            hits = sample(metrics, "usagepipe_consumer_registry_lookups_total", result="hit")
            assert hits >= 2  # the second events came from the cache

            moved_at = datetime.now(UTC)
            await f.registry.transfer(
                sold, seller, buyer, Purchase(PurchaseChannel.GIFT), at=moved_at
            )
            await f.registry.set_consent(withdrawing, analytics=False, source="test")
            await wait_for(lambda: invalidations("owner") >= 1, "the consent notification", 10)
            await wait_for(lambda: invalidations("device_key") >= 1, "the transfer's", 10)

            later = moved_at + timedelta(seconds=1)
            await produce(
                settings, [(sold, message(sold, 2, later)), (other, message(other, 2, later))]
            )
            await wait_for(lambda: consumer.report.stored == 6, "6 rows", 20)
            await wait_until_unlinked(settings, other, timeout_s=10)

    stored = await rows(settings)
    assert [stored[(sold, seq)]["owner_key"] for seq in range(3)] == [
        owner_key(KEY, seller),
        owner_key(KEY, seller),
        owner_key(KEY, buyer),
    ]
    assert stored[(sold, 2)]["purchase_channel"] == "gift"
    assert stored[(sold, 2)]["region"] == "JP-40"
    assert [stored[(other, seq)]["owner_key"] for seq in range(3)] == [None, None, None]
    assert [stored[(other, seq)]["membership_tier"] for seq in range(3)] == [None, None, None]
    assert [stored[(other, seq)]["region"] for seq in range(3)] == ["JP-13", "JP-13", None]
    assert stored[(other, 2)]["analytics_consent"] is False


async def test_a_registry_that_does_not_answer_holds_the_batch_until_it_does(
    settings: Settings,
) -> None:
    """A lookup past `lookup_timeout_s` fails the batch, which is retried: nothing is
    stored unenriched, and once the registry answers the rows come enriched."""
    settings = enriching(settings, lookup_timeout_s=0.3)
    t0 = NOW - timedelta(days=1)
    async with fleet(settings) as f:
        owner = await f.owner("patient", at=t0)
        device, _ = await f.register(owner, "SN-W1", Purchase(PurchaseChannel.GIFT), at=t0)
    schema = settings.registry.db_schema
    locker = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        async with running(settings) as (consumer, metrics):
            # Wait until the consumer is up (its enricher has read the registry schema).
            await wait_for(lambda: consumer.report.batches == 0 and _started(metrics), "start")
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f'LOCK TABLE "{schema}".devices IN ACCESS EXCLUSIVE MODE')
            await produce(settings, [(device, message(device, 0, NOW - timedelta(minutes=1)))])
            await wait_for(
                lambda: sample(metrics, "usagepipe_consumer_errors_total", kind="registry") >= 2,
                "two failed lookups",
                20,
            )
            assert consumer.report.stored == 0
            await tx.rollback()
            await wait_for(lambda: consumer.report.stored == 1, "the row", 20)
    finally:
        await locker.close()
    [row] = (await rows(settings)).values()
    assert row["owner_key"] == owner_key(KEY, owner)
    assert row["model"] == WASHER.model_number


def _started(metrics: CollectorRegistry) -> bool:
    return (
        metrics.get_sample_value(
            "usagepipe_consumer_registry_invalidations_total", {"kind": "reset"}
        )
        == 1
    )


# -- rollups ---------------------------------------------------------------------------------


async def test_rollups_group_by_enriched_model_firmware_and_region(settings: Settings) -> None:
    settings = enriching(settings)
    t0 = NOW - timedelta(days=3)
    async with fleet(settings) as f:
        plan = [
            ("SN-W1", "JP-13", "1.0.1"),
            ("SN-W2", "JP-13", "1.0.2"),
            ("SN-W3", "JP-27", "1.0.1"),
            ("SN-D1", "JP-27", None),
            ("SN-D2", "JP-13", "2.0.0"),
        ]
        devices = []
        for i, (serial, region, firmware) in enumerate(plan):
            owner = await f.owner(f"o{i}", region=region, consent=i != 4, at=t0)
            device, _ = await f.register(owner, serial, Purchase(PurchaseChannel.GIFT), at=t0)
            async with f.registry.transaction() as conn:
                await conn.execute(
                    "UPDATE devices SET firmware_version = $2 WHERE device_id = $1",
                    device,
                    firmware,
                )
            devices.append((device, "washer" if serial.startswith("SN-W") else "dryer"))
    rng = random.Random(5)
    start = NOW - timedelta(hours=30)
    messages = []
    for device, category in devices:
        for seq in range(12):
            at = start + timedelta(minutes=rng.randrange(0, 30 * 60))
            kind = rng.choice(("energy", "error"))
            messages.append((device, message(device, seq, at, f"{category}.{kind}")))
    await produce(settings, messages)
    await consume(settings, len(messages))

    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    t = settings.postgres.table
    try:
        for granularity in ("hourly", "daily"):
            direct = await conn.fetch(
                direct_rollup_query(t, granularity), start - timedelta(days=2), NOW
            )
            rolled = await usage_rollup(conn, t, granularity, start - timedelta(days=2), NOW)
            assert [tuple(r) for r in direct] == [
                (
                    r.bucket,
                    r.category,
                    r.schema,
                    r.model,
                    r.firmware,
                    r.region,
                    r.events,
                    r.devices,
                    r.energy_wh,
                    r.duration_s,
                )
                for r in rolled
            ]
            groups = {(r.model, r.firmware, r.region) for r in rolled}
            assert groups == {
                (WASHER.model_number, "1.0.1", "JP-13"),
                (WASHER.model_number, "1.0.2", "JP-13"),
                (WASHER.model_number, "1.0.1", "JP-27"),
                (DRYER.model_number, None, "JP-27"),
                (DRYER.model_number, "2.0.0", None),  # no consent: no region
            }
            assert sum(r.events for r in rolled) == len(messages)
    finally:
        await conn.close()


async def test_a_policy_that_asks_again_stops_the_link_until_the_owner_grants_again(
    settings: Settings,
) -> None:
    """Publishing a policy version that re-asks analytics, effective at once, lapses the
    grants made under the earlier one: the running consumer's cache is emptied (with a
    TTL of an hour, only the notification can do it), later events carry no owner
    link, and the row stored under the lapsed grant loses its link too; the owner's new
    grant under the new version links the rows stored after it, not the one before.
    Marketing is not re-asked: it plays no part in attribution."""
    settings = enriching(settings, cache_ttl_s=3600)
    t0 = NOW - timedelta(days=1)
    async with fleet(settings) as f:
        ada = await f.owner("ada", at=t0)
        device, _ = await f.register(ada, "SN-W1", Purchase(PurchaseChannel.OWN_ONLINE_SHOP), at=t0)

        async with running(settings) as (consumer, metrics):

            def invalidations(kind: str) -> float:
                name = "usagepipe_consumer_registry_invalidations_total"
                return sample(metrics, name, kind=kind)

            first = NOW - timedelta(minutes=10)
            await produce(settings, [(device, message(device, 0, first))])
            await wait_for(lambda: consumer.report.stored == 1, "1 row", 20)

            now = datetime.now(UTC)
            await f.registry.publish_policy(
                "2026-12",
                effective_at=now,
                text="Analytics now covers room-level usage.",
                reasks={"analytics"},
                at=now,
            )
            await wait_for(lambda: invalidations("other") >= 1, "the policy notification", 10)
            await produce(settings, [(device, message(device, 1, first))])
            await wait_for(lambda: consumer.report.stored == 2, "2 rows", 20)
            await wait_until_unlinked(settings, device, timeout_s=10)

            await f.registry.decide(
                ada, ["analytics"], granted=True, source="app", policy_version="2026-12"
            )
            await wait_for(lambda: invalidations("owner") >= 1, "the grant's notification", 10)
            await produce(settings, [(device, message(device, 2, first))])
            await wait_for(lambda: consumer.report.stored == 3, "3 rows", 20)

    stored = await rows(settings)
    assert [stored[(device, seq)]["owner_key"] for seq in range(3)] == [
        None,
        None,
        owner_key(KEY, ada),
    ]
    assert [stored[(device, seq)]["analytics_consent"] for seq in range(3)] == [True, False, True]
    assert [stored[(device, seq)]["region"] for seq in range(3)] == ["JP-13", None, "JP-13"]
    ended = await rows_of(settings, "SELECT owner_id, event, unlinked FROM {table}_consent_unlinks")
    assert [tuple(r) for r in ended] == [(ada, "lapsed 2026-12", 1)]
