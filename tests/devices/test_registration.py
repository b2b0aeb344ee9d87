"""Registration: every rejection reason, the lockout, and what a success creates."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from devices.errors import RegistryUnavailable, Rejected, RejectReason
from devices.outbox import prune
from devices.records import Purchase, PurchaseChannel, device_id_for
from devices.registry import Registry
from ingest.settings import RegistrySettings
from schemas.envelope import DEVICE_ID_PATTERN
from tests.devices.catalog import T0, new_owner
from tests.devices.fakes import RecordingBroker, RecordingPublisher

SHOP = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)


async def reject_reason(registry: Registry, *args: object, **kwargs: object) -> RejectReason:
    with pytest.raises(Rejected) as caught:
        await registry.register(*args, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


async def test_success_creates_device_period_and_credentials(
    registry: Registry,
    publisher: RecordingPublisher,
    broker: RecordingBroker,
    pg: asyncpg.Connection,
) -> None:
    owner = await registry.create_owner(new_owner(), source="test", at=T0)
    # Typed from the label: spaces and lower case are forgiven.
    done = await registry.register(owner, " wm-100 ", "sn0001", "CODE-0001", SHOP, at=T0)

    assert done.device_id == device_id_for("WM-100", "SN0001")
    assert re.match(DEVICE_ID_PATTERN, done.device_id)
    assert (done.owner_id, done.model_number, done.serial_number) == (owner, "WM-100", "SN0001")
    assert len(done.mqtt_secret) >= 43
    assert await registry.verify_device_secret(done.device_id, done.mqtt_secret) is True
    assert await registry.verify_device_secret(done.device_id, done.mqtt_secret + "x") is False
    assert broker.accounts == {done.device_id: done.mqtt_secret}
    assert publisher.types() == ["device.registered"]
    _, key, payload = publisher.events[0]
    assert key == done.device_id
    assert payload["owner_id"] == str(owner)
    assert payload["model_number"] == "WM-100"
    assert "mqtt_secret" not in payload and "CODE-0001" not in str(payload)

    stored = await pg.fetch(
        f"SELECT secret_hash FROM {registry.settings.db_schema}.device_credentials"
    )
    assert len(stored) == 1
    assert done.mqtt_secret not in stored[0]["secret_hash"]
    assert stored[0]["secret_hash"].startswith("scrypt$10$")
    codes = await pg.fetch(f"SELECT code_hash FROM {registry.settings.db_schema}.units")
    assert all("CODE" not in row["code_hash"] for row in codes)
    assert await registry.owner_at(done.device_id, T0) == owner
    assert await registry.owner_at(done.device_id, T0 - timedelta(seconds=1)) is None


async def test_each_rejection_reason(registry: Registry, broker: RecordingBroker) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    at = T0

    assert await reject_reason(registry, ada, "WM-100", "SN9999", "X", SHOP, at=at) is (
        RejectReason.UNKNOWN_SERIAL
    )
    assert await reject_reason(registry, ada, "DR-200", "SN0001", "CODE-0001", SHOP, at=at) is (
        RejectReason.MODEL_MISMATCH
    )
    assert await reject_reason(registry, bob, "WM-100", "SN0001", "CODE-0002", SHOP, at=at) is (
        RejectReason.WRONG_CODE
    )
    first = await registry.register(ada, "WM-100", "SN0001", "CODE-0001", SHOP, at=at)
    assert await reject_reason(registry, ada, "WM-100", "SN0001", "CODE-0001", SHOP, at=at) is (
        RejectReason.ALREADY_OWNER
    )
    # Knowing the code is not enough while someone else owns the unit ...
    assert await reject_reason(registry, bob, "WM-100", "SN0001", "CODE-0001", SHOP, at=at) is (
        RejectReason.OWNED_BY_OTHER
    )
    # ... and a wrong code is reported as wrong, without revealing that it is owned.
    assert await reject_reason(registry, bob, "WM-100", "SN0001", "NOPE", SHOP, at=at) is (
        RejectReason.WRONG_CODE
    )
    with pytest.raises(Rejected) as unknown:
        await registry.register(UUID(int=0), "WM-100", "SN0002", "CODE-0002", SHOP, at=at)
    assert unknown.value.reason is RejectReason.UNKNOWN_OWNER
    assert broker.calls == [("add", first.device_id)]


async def test_lockout_per_owner_and_per_serial(registry: Registry, pg: asyncpg.Connection) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    cy = await registry.create_owner(new_owner("Cy Third"), source="test", at=T0)

    # Three wrong guesses by Ada (the limit) lock Ada out, even with the right code.
    for minute in range(3):
        at = T0 + timedelta(minutes=minute)
        assert await reject_reason(registry, ada, "WM-100", "SN0002", "BAD", SHOP, at=at) is (
            RejectReason.WRONG_CODE
        )
    at = T0 + timedelta(minutes=5)
    assert await reject_reason(registry, ada, "DR-200", "SN0003", "CODE-0003", SHOP, at=at) is (
        RejectReason.LOCKED_OUT
    )
    # SN0002 collected three failures too: locked for everyone, Bob included.
    assert await reject_reason(registry, bob, "WM-100", "SN0002", "CODE-0002", SHOP, at=at) is (
        RejectReason.LOCKED_OUT
    )
    # Other owners and other serials are unaffected.
    done = await registry.register(cy, "DR-200", "SN0003", "CODE-0003", SHOP, at=at)
    assert done.serial_number == "SN0003"
    # Once the failures leave the one-hour window, the lockout lifts.
    later = T0 + timedelta(minutes=61)
    await registry.register(bob, "WM-100", "SN0002", "CODE-0002", SHOP, at=later)

    schema = registry.settings.db_schema
    outcomes = await pg.fetch(
        f"SELECT outcome, counts_as_failure FROM {schema}.registration_attempts ORDER BY attempt_id"
    )
    assert [(r["outcome"], r["counts_as_failure"]) for r in outcomes] == [
        ("wrong_code", True),
        ("wrong_code", True),
        ("wrong_code", True),
        ("locked_out", False),
        ("locked_out", False),
        ("registered", False),
        ("registered", False),
    ]
    # Housekeeping deletes attempts older than attempts_retention_days, and only those.
    days = registry.settings.attempts_retention_days
    assert await registry.prune_attempts(T0 + timedelta(days=days, minutes=3)) == 3
    assert await registry.prune_attempts(T0 + timedelta(days=days, minutes=3)) == 0
    left = await pg.fetchval(f"SELECT count(*) FROM {schema}.registration_attempts")
    assert left == 4


def test_attempts_must_outlive_the_lockout_window() -> None:
    with pytest.raises(ValueError, match="attempts_retention_days"):
        RegistrySettings(attempts_retention_days=1, lockout_window_s=86400)


async def test_dormant_owner_cannot_register(registry: Registry) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    assert await registry.mark_dormant(T0 + timedelta(days=365)) == [ada]
    at = T0 + timedelta(days=366)
    assert await reject_reason(registry, ada, "WM-100", "SN0001", "CODE-0001", SHOP, at=at) is (
        RejectReason.OWNER_NOT_ACTIVE
    )


async def test_broker_failure_rolls_registration_back(
    registry: Registry, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    broker.fail = True
    with pytest.raises(RegistryUnavailable, match="broker told to fail"):
        await registry.register(ada, "WM-100", "SN0001", "CODE-0001", SHOP, at=T0)
    assert await registry.owner_at(device_id_for("WM-100", "SN0001"), T0) is None
    assert publisher.events == []
    broker.fail = False
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001", SHOP, at=T0)
    assert broker.accounts == {done.device_id: done.mqtt_secret}
    assert publisher.types() == ["device.registered"]


async def test_events_wait_in_outbox_while_publisher_fails(
    registry: Registry, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    publisher.fail = True
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001", SHOP, at=T0)
    assert await registry.pending_events() == 1
    publisher.fail = False
    assert await registry.flush_events() == 1
    assert await registry.pending_events() == 0
    assert [key for _, key, _ in publisher.events] == [done.device_id]
    assert await registry.flush_events() == 0
    # Published events stay a while for inspection, then are pruned.
    async with registry.transaction() as conn:
        assert await prune(conn, T0) == 0
        assert await prune(conn, datetime.now(UTC) + timedelta(seconds=1)) == 1


async def test_concurrent_registrations_of_one_unit(registry: Registry) -> None:
    """Five owners race for one unit with its code: exactly one wins, at the database."""
    owners = [
        await registry.create_owner(new_owner(f"Racer{i} Owner"), source="test", at=T0)
        for i in range(5)
    ]
    results = await asyncio.gather(
        *(registry.register(o, "WM-100", "SN0001", "CODE-0001", SHOP, at=T0) for o in owners),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, Rejected)]
    assert len(winners) == 1
    assert [r.reason for r in losers] == [RejectReason.OWNED_BY_OTHER] * 4
    assert await registry.owner_at(winners[0].device_id, T0) == winners[0].owner_id


async def test_concurrent_guesses_cannot_race_the_lockout(registry: Registry) -> None:
    """Ten simultaneous wrong guesses at one serial: three count, seven are locked out."""
    owners = [
        await registry.create_owner(new_owner(f"Guess{i} Owner"), source="test", at=T0)
        for i in range(10)
    ]
    results = await asyncio.gather(
        *(
            registry.register(o, "WM-100", "SN0002", f"G{i}", SHOP, at=T0)
            for i, o in enumerate(owners)
        ),
        return_exceptions=True,
    )
    reasons = sorted(r.reason.value for r in results if isinstance(r, Rejected))
    assert reasons == ["locked_out"] * 7 + ["wrong_code"] * 3
