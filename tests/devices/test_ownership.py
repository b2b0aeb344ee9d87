"""Ownership over time: transfer, resale, release, revocation, and attribution by time."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from devices.errors import Rejected, RejectReason
from devices.records import Purchase, PurchaseChannel
from devices.registry import Registry
from tests.devices.catalog import T0, new_owner
from tests.devices.fakes import RecordingBroker, RecordingPublisher

SHOP = Purchase(PurchaseChannel.OWN_STORE, store_id="TKY-01")
GIFT = Purchase(PurchaseChannel.GIFT)


async def test_attribution_by_time_across_a_transfer(
    registry: Registry, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    first = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    device = first.device_id
    handover = T0 + timedelta(days=30)

    second = await registry.transfer(device, ada, bob, GIFT, at=handover)

    assert second.owner_id == bob
    assert second.mqtt_secret != first.mqtt_secret
    assert await registry.owner_at(device, T0 - timedelta(microseconds=1)) is None
    assert await registry.owner_at(device, T0) == ada
    assert await registry.owner_at(device, handover - timedelta(microseconds=1)) == ada
    assert await registry.owner_at(device, handover) == bob
    assert await registry.owner_at(device, handover + timedelta(days=400)) == bob
    # The giver's secret stopped working, the receiver's works, the broker agrees.
    assert await registry.verify_device_secret(device, first.mqtt_secret) is False
    assert await registry.verify_device_secret(device, second.mqtt_secret) is True
    assert broker.accounts == {device: second.mqtt_secret}
    assert publisher.types() == ["device.registered", "device.transferred"]
    payload = publisher.events[1][2]
    assert (payload["from_owner_id"], payload["to_owner_id"], payload["how"]) == (
        str(ada),
        str(bob),
        "transfer",
    )
    history = await registry.ownership_history(device)
    assert [(p.owner_id, p.valid_from, p.valid_to, p.ended_reason) for p in history] == [
        (ada, T0, handover, "transferred"),
        (bob, handover, None, None),
    ]
    assert [(p.purchase_channel, p.store_id) for p in history] == [
        (PurchaseChannel.OWN_STORE, "TKY-01"),
        (PurchaseChannel.GIFT, None),
    ]
    # Only the current owner may hand the device on.
    with pytest.raises(Rejected) as caught:
        await registry.transfer(device, ada, bob, GIFT, at=handover + timedelta(days=1))
    assert caught.value.reason is RejectReason.NOT_CURRENT_OWNER


async def test_resale_with_the_code_and_release(
    registry: Registry, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    cy = await registry.create_owner(new_owner("Cy Third"), source="test", at=T0)
    first = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    resold = T0 + timedelta(days=10)

    # Bob bought it second-hand and says so: the code inside proves possession.
    second = await registry.register(
        bob,
        "WM-100",
        "SN0001",
        "CODE-0001-7KQ2-M9DX",
        Purchase(PurchaseChannel.THIRD_PARTY_RETAILER, store_id="RESALE-7"),
        resale=True,
        at=resold,
    )
    assert second.device_id == first.device_id
    assert await registry.owner_at(first.device_id, resold - timedelta(seconds=1)) == ada
    assert await registry.owner_at(first.device_id, resold) == bob
    assert publisher.types() == ["device.registered", "device.transferred"]
    assert publisher.events[1][2]["how"] == "resale"

    # Bob releases it; the secret is revoked and Cy can register it without resale.
    released = resold + timedelta(days=5)
    await registry.release(first.device_id, bob, at=released)
    assert broker.accounts == {}
    assert await registry.verify_device_secret(first.device_id, second.mqtt_secret) is False
    assert await registry.owner_at(first.device_id, released) is None
    third = await registry.register(
        cy, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", GIFT, at=released
    )
    assert await registry.owner_at(first.device_id, released + timedelta(hours=1)) == cy
    assert broker.accounts == {first.device_id: third.mqtt_secret}
    assert publisher.types() == [
        "device.registered",
        "device.transferred",
        "device.credentials_revoked",
        "device.registered",
    ]
    history = await registry.ownership_history(first.device_id)
    assert [(p.owner_id, p.ended_reason) for p in history] == [
        (ada, "resold"),
        (bob, "released"),
        (cy, None),
    ]


async def test_revoke_credentials_is_idempotent(
    registry: Registry, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    with pytest.raises(Rejected) as caught:
        await registry.revoke_credentials(done.device_id, bob, at=T0 + timedelta(hours=1))
    assert caught.value.reason is RejectReason.NOT_CURRENT_OWNER
    with pytest.raises(Rejected) as unknown:
        await registry.revoke_credentials("WM-100-nope", ada, at=T0 + timedelta(hours=1))
    assert unknown.value.reason is RejectReason.UNKNOWN_DEVICE

    assert await registry.revoke_credentials(done.device_id, ada, at=T0 + timedelta(hours=1))
    assert not await registry.revoke_credentials(done.device_id, ada, at=T0 + timedelta(hours=2))
    assert await registry.verify_device_secret(done.device_id, done.mqtt_secret) is False
    assert broker.calls == [
        ("add", done.device_id),
        ("revoke", done.device_id),
        ("revoke", done.device_id),
    ]
    assert publisher.types() == ["device.registered", "device.credentials_revoked"]
    # Ownership is unchanged by a revocation.
    assert await registry.owner_at(done.device_id, T0 + timedelta(days=1)) == ada


async def test_database_refuses_overlapping_periods(
    registry: Registry, pg: asyncpg.Connection
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    schema = registry.settings.db_schema
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await pg.execute(
            f"INSERT INTO {schema}.ownership_periods"
            " (device_key, owner_id, valid_from, valid_to, purchase_channel, ended_reason)"
            f" SELECT device_key, $1, $2, $3, 'gift', 'transferred' FROM {schema}.devices",
            bob,
            T0 - timedelta(days=1),
            T0 + timedelta(days=1),
        )
    # A period that ends before Ada's begins is fine.
    await pg.execute(
        f"INSERT INTO {schema}.ownership_periods"
        " (device_key, owner_id, valid_from, valid_to, purchase_channel, ended_reason)"
        f" SELECT device_key, $1, $2, $3, 'gift', 'transferred' FROM {schema}.devices",
        bob,
        T0 - timedelta(days=2),
        T0,
    )


async def test_reissue_credentials(
    registry: Registry, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    at = T0 + timedelta(days=3)
    assert await registry.revoke_credentials(done.device_id, ada, at=at)
    fresh = await registry.reissue_credentials(done.device_id, ada, at=at)
    again = await registry.reissue_credentials(done.device_id, ada, at=at + timedelta(hours=1))

    assert len({done.mqtt_secret, fresh.mqtt_secret, again.mqtt_secret}) == 3
    assert [
        await registry.verify_device_secret(done.device_id, secret)
        for secret in (done.mqtt_secret, fresh.mqtt_secret, again.mqtt_secret)
    ] == [False, False, True]
    assert broker.accounts == {done.device_id: again.mqtt_secret}
    # Revoked, then reissued (nothing live to revoke), then reissued (old one revoked).
    assert publisher.types() == [
        "device.registered",
        "device.credentials_revoked",
        "device.credentials_revoked",
    ]
    assert [payload["reason"] for _, _, payload in publisher.events[1:]] == [
        "owner_request",
        "reissued",
    ]
    assert await registry.owner_at(done.device_id, at + timedelta(days=1)) == ada
