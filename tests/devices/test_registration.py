"""Registration: what a success creates, the one answer to every failed proof, the
rate limits per caller (jamming and guessing), and no hashing for failed attempts."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from devices.errors import RegistryUnavailable, Rejected, RejectReason, TooManyAttempts
from devices.limits import Caller
from devices.outbox import prune
from devices.records import Purchase, PurchaseChannel, device_id_for
from devices.registry import Registry
from ingest.settings import RegistrySettings
from schemas.envelope import DEVICE_ID_PATTERN
from tests.devices.catalog import T0, new_owner
from tests.devices.fakes import RecordingBroker, RecordingPublisher

SHOP = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)


async def test_success_creates_device_period_and_credentials(
    registry: Registry,
    publisher: RecordingPublisher,
    broker: RecordingBroker,
    pg: asyncpg.Connection,
) -> None:
    owner = await registry.create_owner(new_owner(), source="test", at=T0)
    # Typed from the label: spaces and lower case are forgiven.
    done = await registry.register(owner, " wm-100 ", "sn0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)

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
    assert "mqtt_secret" not in payload and "CODE-0001-7KQ2-M9DX" not in str(payload)

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


C1, C2, C3 = "CODE-0001-7KQ2-M9DX", "CODE-0002-7KQ2-M9DX", "CODE-0003-7KQ2-M9DX"
"""The codes of SN0001 (WM-100), SN0002 (WM-100) and SN0003 (DR-200)."""

HOME, JAMMER = "198.51.100.7", "203.0.113.66"


async def refusal(registry: Registry, *args: object, **kwargs: object) -> Rejected:
    with pytest.raises(Rejected) as caught:
        await registry.register(*args, **kwargs)  # type: ignore[arg-type]
    return caught.value


async def attempts(pg: asyncpg.Connection, registry: Registry) -> list[tuple[str, str, bool]]:
    rows = await pg.fetch(
        "SELECT serial_number, outcome, counts_as_failure"
        f" FROM {registry.settings.db_schema}.registration_attempts ORDER BY attempt_id"
    )
    return [(r["serial_number"], r["outcome"], r["counts_as_failure"]) for r in rows]


async def credentials(pg: asyncpg.Connection, registry: Registry) -> int:
    count: int = await pg.fetchval(
        f"SELECT count(*) FROM {registry.settings.db_schema}.device_credentials"
    )
    return count


async def test_every_failed_proof_gets_the_same_answer(
    registry: Registry, broker: RecordingBroker, pg: asyncpg.Connection
) -> None:
    """Unknown serial, a serial of another model, a wrong code (for a free unit and for
    an owned one): one reason, one message; what was wrong is recorded, not told."""
    owners = [
        await registry.create_owner(new_owner(f"Try{i} Owner"), source="test", at=T0)
        for i in range(4)
    ]
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    await registry.register(ada, "WM-100", "SN0002", C2, SHOP, at=T0)
    tries = [
        ("WM-100", "SN9999", C1),  # no such serial
        ("DR-200", "SN0001", C1),  # SN0001 is a WM-100, with the right code
        ("WM-100", "SN0001", C2),  # another unit's code
        ("WM-100", "SN0002", "NOPE"),  # a wrong code for Ada's unit
    ]
    refused = [
        await refusal(registry, owner, model, serial, code, SHOP, at=T0, caller=Caller(str(owner)))
        for owner, (model, serial, code) in zip(owners, tries, strict=True)
    ]
    assert {(r.reason, r.message, str(r)) for r in refused} == {
        (
            RejectReason.REGISTRATION_REFUSED,
            "model, serial or code do not match",
            "registration_refused: model, serial or code do not match",
        )
    }
    assert await attempts(pg, registry) == [
        ("SN0002", "registered", False),
        ("SN9999", "unknown_serial", True),
        ("SN0001", "model_mismatch", True),
        ("SN0001", "wrong_code", True),
        ("SN0002", "wrong_code", True),
    ]
    # Each proof was checked once (one scrypt verification each, the unknown serial's
    # against a dummy hash); a new secret was made for Ada's registration only.
    assert (registry.counts.proofs, registry.counts.secrets_hashed) == (5, 1)
    assert await credentials(pg, registry) == 1
    assert len(broker.calls) == 1


async def test_refusals_after_the_proof(registry: Registry, broker: RecordingBroker) -> None:
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    bob = await registry.create_owner(new_owner("Bob Other"), source="test", at=T0)
    first = await registry.register(ada, "WM-100", "SN0001", C1, SHOP, at=T0)
    assert (await refusal(registry, ada, "WM-100", "SN0001", C1, SHOP, at=T0)).reason is (
        RejectReason.ALREADY_OWNER
    )
    # Knowing the code is not enough while someone else owns the unit.
    assert (await refusal(registry, bob, "WM-100", "SN0001", C1, SHOP, at=T0)).reason is (
        RejectReason.OWNED_BY_OTHER
    )
    unknown = await refusal(registry, UUID(int=0), "WM-100", "SN0002", C2, SHOP, at=T0)
    assert unknown.reason is RejectReason.UNKNOWN_OWNER
    assert broker.calls == [("add", first.device_id)]
    # Proven attempts cost the caller nothing: Bob still has his three failures.
    for minute in range(3):
        at = T0 + timedelta(minutes=minute)
        assert (await refusal(registry, bob, "WM-100", "SN0002", "BAD", SHOP, at=at)).reason is (
            RejectReason.REGISTRATION_REFUSED
        )


async def test_jammers_cannot_lock_the_owner_out(
    registry: Registry, pg: asyncpg.Connection
) -> None:
    """Twenty wrong codes for SN0002 from eight throwaway owners on one address, and
    from that address with other subjects: the unit's buyer, on her own address, then
    registers it with the right code at once."""
    jammers = [
        await registry.create_owner(new_owner(f"Jam{i} Owner"), source="test", at=T0)
        for i in range(8)
    ]
    reasons = []
    for i in range(20):
        jammer = jammers[i % len(jammers)]
        caller = Caller(str(jammer), JAMMER if i % 2 else f"192.0.2.{i}")
        failed = await refusal(
            registry, jammer, "WM-100", "SN0002", f"JAM-{i}", SHOP, at=T0, caller=caller
        )
        reasons.append(failed.reason.value)
    assert reasons.count("registration_refused") > 0 and "too_many_attempts" in reasons
    ada = await registry.create_owner(new_owner("Ada Owner"), source="test", at=T0)
    done = await registry.register(
        ada, "WM-100", "SN0002", C2, SHOP, at=T0, caller=Caller(str(ada), HOME)
    )
    assert (done.owner_id, done.serial_number) == (ada, "SN0002")
    assert await attempts(pg, registry) == [
        *[("SN0002", "wrong_code", True)] * reasons.count("registration_refused"),
        ("SN0002", "registered", False),
    ]


async def test_a_guesser_is_slowed_per_subject(registry: Registry, pg: asyncpg.Connection) -> None:
    """Three failures use up a subject's hour; the fourth attempt is refused before any
    check, even with the right code, until a token has refilled (3600 s / 3)."""
    eve = await registry.create_owner(new_owner("Eve Guesser"), source="test", at=T0)
    for _ in range(3):
        assert (await refusal(registry, eve, "WM-100", "SN0002", "GUESS", SHOP, at=T0)).reason is (
            RejectReason.REGISTRATION_REFUSED
        )
    limited = await refusal(registry, eve, "WM-100", "SN0002", C2, SHOP, at=T0)
    assert isinstance(limited, TooManyAttempts)
    assert (limited.reason, limited.retry_after_s) == (RejectReason.TOO_MANY_ATTEMPTS, 1200)
    # A new address changes nothing: the subject's bucket is empty.
    on_the_road = Caller(str(eve), "192.0.2.200")
    late = await refusal(
        registry,
        eve,
        "WM-100",
        "SN0002",
        C2,
        SHOP,
        at=T0 + timedelta(seconds=600),
        caller=on_the_road,
    )
    assert isinstance(late, TooManyAttempts) and late.retry_after_s == 600
    assert (registry.counts.proofs, registry.counts.limited) == (3, 2)
    assert registry.counts.secrets_hashed == 0
    assert await credentials(pg, registry) == 0
    # Twenty minutes after the first failure one token is back: the right code works.
    done = await registry.register(eve, "WM-100", "SN0002", C2, SHOP, at=T0 + timedelta(minutes=20))
    assert done.serial_number == "SN0002"
    assert registry.counts.secrets_hashed == 1
    assert [outcome for _, outcome, _ in await attempts(pg, registry)] == [
        "wrong_code",
        "wrong_code",
        "wrong_code",
        "registered",
    ]


async def test_an_address_is_limited_across_subjects(registry: Registry) -> None:
    """Five failures from one address (the test's address budget), by five owners:
    a sixth owner there is limited, one elsewhere is not; an IPv6 caller counts by its
    /56, and IPv4-mapped IPv6 as the IPv4 address."""
    owners = [
        await registry.create_owner(new_owner(f"Net{i} Owner"), source="test", at=T0)
        for i in range(8)
    ]
    addresses = ["2001:db8:1:200::1", "2001:db8:1:2ff::9", "2001:db8:1:201::5"] * 2
    for owner, address in zip(owners[:5], addresses, strict=False):
        failed = await refusal(
            registry,
            owner,
            "WM-100",
            "SN0002",
            "BAD",
            SHOP,
            at=T0,
            caller=Caller(str(owner), address),
        )
        assert failed.reason is RejectReason.REGISTRATION_REFUSED
    sixth = Caller(str(owners[5]), "2001:db8:1:2aa::1")
    limited = await refusal(registry, owners[5], "WM-100", "SN0002", C2, SHOP, at=T0, caller=sixth)
    assert isinstance(limited, TooManyAttempts) and limited.retry_after_s == 720
    elsewhere = Caller(str(owners[6]), "2001:db8:1:300::1")
    done = await registry.register(owners[6], "WM-100", "SN0002", C2, SHOP, at=T0, caller=elsewhere)
    assert done.owner_id == owners[6]
    assert Caller("x", "::ffff:203.0.113.66").keys(registry._limits)[0][0] == (
        "address:203.0.113.66"
    )
    assert [key for key, _ in sixth.keys(registry._limits)] == [
        "address:2001:db8:1:200::/56",
        f"subject:{owners[5]}",
    ]


async def test_concurrent_guesses_cannot_overspend(registry: Registry) -> None:
    """Ten simultaneous wrong guesses by one caller: three are checked, seven limited."""
    eve = await registry.create_owner(new_owner("Eve Guesser"), source="test", at=T0)
    results = await asyncio.gather(
        *(registry.register(eve, "WM-100", "SN0002", f"G{i}", SHOP, at=T0) for i in range(10)),
        return_exceptions=True,
    )
    reasons = sorted(r.reason.value for r in results if isinstance(r, Rejected))
    assert reasons == ["registration_refused"] * 3 + ["too_many_attempts"] * 7
    assert registry.counts.proofs == 3


async def test_housekeeping_prunes_attempts_and_full_buckets(
    registry: Registry, pg: asyncpg.Connection
) -> None:
    eve = await registry.create_owner(new_owner("Eve Guesser"), source="test", at=T0)
    await refusal(
        registry, eve, "WM-100", "SN0002", "BAD", SHOP, at=T0, caller=Caller(str(eve), HOME)
    )
    schema = registry.settings.db_schema
    buckets = f"SELECT caller_key FROM {schema}.registration_limits ORDER BY 1"
    assert [r["caller_key"] for r in await pg.fetch(buckets)] == [
        f"address:{HOME}",
        f"subject:{eve}",
    ]
    # Within the window the buckets stay (they are not full yet) ...
    assert await registry.prune_attempts(T0 + timedelta(minutes=59)) == 0
    assert len(await pg.fetch(buckets)) == 2
    # ... after it they are full again and go; attempts stay attempts_retention_days.
    assert await registry.prune_attempts(T0 + timedelta(minutes=61)) == 0
    assert await pg.fetch(buckets) == []
    days = registry.settings.attempts_retention_days
    assert await registry.prune_attempts(T0 + timedelta(days=days, minutes=1)) == 1


def test_limits_must_keep_guessing_hopeless() -> None:
    with pytest.raises(ValueError, match="4800 failures per address per day"):
        RegistrySettings(registration_failures_per_address=200, registration_window_s=3600)
    assert RegistrySettings(registration_failures_per_address=100).registration_window_s == 3600


async def test_dormant_owner_cannot_register(registry: Registry) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    assert await registry.mark_dormant(T0 + timedelta(days=365)) == [ada]
    at = T0 + timedelta(days=366)
    assert (await refusal(registry, ada, "WM-100", "SN0001", C1, SHOP, at=at)).reason is (
        RejectReason.OWNER_NOT_ACTIVE
    )


async def test_broker_failure_rolls_registration_back(
    registry: Registry, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    broker.fail = True
    with pytest.raises(RegistryUnavailable, match="broker told to fail"):
        await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    assert await registry.owner_at(device_id_for("WM-100", "SN0001"), T0) is None
    assert publisher.events == []
    broker.fail = False
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    assert broker.accounts == {done.device_id: done.mqtt_secret}
    assert publisher.types() == ["device.registered"]


async def test_events_wait_in_outbox_while_publisher_fails(
    registry: Registry, publisher: RecordingPublisher
) -> None:
    ada = await registry.create_owner(new_owner(), source="test", at=T0)
    publisher.fail = True
    done = await registry.register(ada, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
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
        *(
            registry.register(o, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
            for o in owners
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, Rejected)]
    assert len(winners) == 1
    assert [r.reason for r in losers] == [RejectReason.OWNED_BY_OTHER] * 4
    assert await registry.owner_at(winners[0].device_id, T0) == winners[0].owner_id
