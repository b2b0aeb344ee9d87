"""The broker enforces the registry: real Mosquitto (dynamic security), real registry.

Against the shared broker on 1884, each test with its own topic prefix and registry
schema; every account change happens while the broker runs (its pid is checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import SecretStr

from devices.broker import BrokerAccounts
from devices.errors import BrokerAccountError, RegistryUnavailable
from devices.mosquitto import DynsecAccounts
from devices.records import MembershipTier, NewOwner, Purchase, PurchaseChannel
from devices.registry import Registry
from ingest.kafka import ensure_topics
from ingest.mqtt import MqttClient, PublishRefused
from ingest.settings import MqttSettings, Settings
from schemas.envelope import telemetry_topic
from simulators.plan import FleetPlan, plan_device
from simulators.provision import ProvisionedFleet, open_registry, provision
from simulators.units import device_ids
from tests.conftest import free_port
from tests.devices.fakes import RecordingBroker
from tests.pipeline import pipeline, stored_keys, wait_for
from usagepipe.services import MosquittoBroker

PLAN = FleetPlan(devices=2, messages_per_device=3, seed=44)


@pytest.fixture
async def registry(settings: Settings) -> AsyncIterator[Registry]:
    """The test's registry, changing accounts on the shared broker."""
    await ensure_topics(settings.kafka, settings.registry.events_topic)
    async with open_registry(settings) as reg:
        yield reg


@pytest.fixture
async def fleet(registry: Registry) -> ProvisionedFleet:
    return await provision(registry, PLAN)


def broker_pid(settings: Settings) -> int | None:
    return MosquittoBroker(settings.mqtt.port, settings.services.run_dir).running_pid()


def _client(client_id: str, login: tuple[str, str] | None) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    if login is not None:
        client.username_pw_set(*login)
    return client


def connack(mqtt: MqttSettings, client_id: str, login: tuple[str, str] | None) -> str:
    """Connect once; the CONNACK's reason, as paho names it."""
    client = _client(client_id, login)
    answered = threading.Event()
    reasons: list[str] = []

    def on_connect(*args: object) -> None:
        reasons.append(str(args[3]))
        answered.set()

    client.on_connect = on_connect
    client.connect(mqtt.host, mqtt.port)
    client.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reasons[0]


def suback(
    mqtt: MqttSettings, client_id: str, login: tuple[str, str], topics: Sequence[str]
) -> list[str]:
    """Log in and subscribe to `topics`; the SUBACK's reason per topic."""
    client = _client(client_id, login)
    answered = threading.Event()
    reasons: list[str] = []

    def on_subscribe(*args: object) -> None:
        reasons.extend(str(code) for code in args[3])  # type: ignore[attr-defined]
        answered.set()

    client.on_subscribe = on_subscribe
    client.connect(mqtt.host, mqtt.port)
    client.loop_start()
    try:
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in topics])
        assert answered.wait(10), "no SUBACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reasons


async def test_anonymous_and_wrong_secrets_are_refused(
    settings: Settings, fleet: ProvisionedFleet
) -> None:
    device, other = device_ids(PLAN)
    secret = fleet.credentials[device]
    mqtt = settings.mqtt
    assert await asyncio.to_thread(connack, mqtt, "anon-probe", None) == "Not authorized"
    wrong = (device, secret + "x")
    assert await asyncio.to_thread(connack, mqtt, device, wrong) == "Not authorized"
    # Its own secret, but another device's client id (it would take over that session).
    assert await asyncio.to_thread(connack, mqtt, other, (device, secret)) == "Not authorized"
    assert await asyncio.to_thread(connack, mqtt, device, (device, secret)) == "Success"


async def test_registered_device_publishes_its_own_topic_only(
    settings: Settings, fleet: ProvisionedFleet
) -> None:
    """Its own telemetry reaches the store; another device's topic is refused with
    PUBACK "Not authorized" and reaches nobody; it may subscribe to nothing."""
    device, other = device_ids(PLAN)
    login = (device, fleet.credentials[device])
    prefix = settings.mqtt.topic_prefix
    mine = plan_device(PLAN, device, prefix)
    theirs = plan_device(PLAN, other, prefix)
    async with (
        pipeline(settings) as run,
        MqttClient(settings.mqtt, client_id=device, username=login[0], password=login[1]) as dev,
    ):
        with pytest.raises(PublishRefused) as refused:
            await (await dev.publish(theirs[0].topic, theirs[0].payload))
        assert (refused.value.topic, refused.value.reason) == (theirs[0].topic, "Not authorized")
        for msg in mine:
            await (await dev.publish(msg.topic, msg.payload))
        await wait_for(lambda: run.consumer.report.stored == 3, "the device's 3 rows")
        await asyncio.sleep(0.5)  # anything refused that got through would arrive now
    assert sorted(await stored_keys(settings)) == sorted(m.key for m in mine)
    assert run.bridge.report.received == 3

    topics = [
        f"{prefix}devices/#",
        "devices/#",
        "#",
        mine[0].topic,  # not even its own
        f"$share/g/{prefix}devices/+/telemetry",
    ]
    reasons = await asyncio.to_thread(suback, settings.mqtt, device, login, topics)
    assert reasons == ["Not authorized"] * 5


async def test_revocation_disconnects_the_device_and_refuses_it_again(
    settings: Settings,
    registry: Registry,
    fleet: ProvisionedFleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = device_ids(PLAN)[0]
    secret = fleet.credentials[device]
    owner = (await registry.current_owners([device]))[device]
    pid = broker_pid(settings)
    caplog.set_level(logging.WARNING, logger="ingest.mqtt")
    async with MqttClient(settings.mqtt, client_id=device, username=device, password=secret) as dev:
        assert await registry.revoke_credentials(device, owner) is True
        await wait_for(lambda: not dev.connected.is_set(), "the broker to drop the device", 10)
        assert f"{device} lost its connection: Administrative action" in caplog.text
        # Its own reconnection attempts are refused from now on.
        await wait_for(
            lambda: f"MQTT broker refused {device}: Not authorized" in caplog.text,
            "a refused reconnect",
            10,
        )
    login = (device, secret)
    assert await asyncio.to_thread(connack, settings.mqtt, device, login) == "Not authorized"
    assert broker_pid(settings) == pid is not None


async def test_transfer_retires_the_old_secret_and_the_new_one_works(
    settings: Settings, registry: Registry, fleet: ProvisionedFleet
) -> None:
    device = device_ids(PLAN)[0]
    old = fleet.credentials[device]
    seller = (await registry.current_owners([device]))[device]
    buyer = await registry.create_owner(
        NewOwner("Second Owner", "second@example.invalid", None, "JP-27",
                 MembershipTier.SILVER, analytics_consent=True, marketing_consent=False),
        source="test",
    )  # fmt: skip
    pid = broker_pid(settings)
    async with MqttClient(settings.mqtt, client_id=device, username=device, password=old) as dev:
        done = await registry.transfer(
            device, seller, buyer, Purchase(PurchaseChannel.GIFT), at=datetime.now(UTC)
        )
        await wait_for(lambda: not dev.connected.is_set(), "the old secret's session to end", 10)
    assert done.mqtt_secret != old
    mqtt = settings.mqtt
    assert await asyncio.to_thread(connack, mqtt, device, (device, old)) == "Not authorized"
    assert await asyncio.to_thread(connack, mqtt, device, (device, done.mqtt_secret)) == "Success"
    msg = plan_device(PLAN, device, settings.mqtt.topic_prefix)[0]
    async with MqttClient(mqtt, client_id=device, username=device, password=done.mqtt_secret) as d:
        await (await d.publish(msg.topic, msg.payload))  # a PUBACK without failure
    assert broker_pid(settings) == pid is not None
    assert (await registry.current_owners([device]))[device] == buyer


async def test_provisioning_again_reuses_registrations(
    settings: Settings, registry: Registry, fleet: ProvisionedFleet
) -> None:
    """Same fleet, same seed: no new owners or registrations, new secrets that work."""
    owners = await registry.current_owners(device_ids(PLAN))
    again = await provision(registry, PLAN)
    assert (again.registered, again.reissued) == (0, 2)
    assert await registry.current_owners(device_ids(PLAN)) == owners
    for device, secret in again.credentials.items():
        assert secret != fleet.credentials[device]
        login = (device, secret)
        assert await asyncio.to_thread(connack, settings.mqtt, device, login) == "Success"
    assert again.categories == dict(zip(device_ids(PLAN), ["washer", "dryer"], strict=True))


async def test_account_commands_are_idempotent_and_refuse_service_names(
    settings: Settings,
) -> None:
    device = f"{settings.mqtt.topic_prefix.strip('/')}-direct"
    topic = telemetry_topic(device, settings.mqtt.topic_prefix)
    async with DynsecAccounts(settings.mqtt) as accounts:
        await accounts.add_device(device, "first-secret")
        await accounts.add_device(device, "second-secret")  # replaces the secret
        try:
            mqtt = settings.mqtt
            assert await asyncio.to_thread(connack, mqtt, device, (device, "first-secret")) == (
                "Not authorized"
            )
            async with MqttClient(
                mqtt, client_id=device, username=device, password="second-secret"
            ) as dev:
                await (await dev.publish(topic, b"{}"))
        finally:
            await accounts.revoke_device(device)
            await accounts.revoke_device(device)  # already gone: harmless
        for name in ("usagepipe-admin", "usagepipe-bridge", "devices/+"):
            with pytest.raises(ValueError, match="not a device id"):
                await accounts.add_device(name, "x")


@pytest.mark.parametrize("kind", ["fake", "mosquitto"])
async def test_broker_accounts_contract(settings: Settings, kind: str) -> None:
    """`BrokerAccounts` as the registry relies on it, for the fake the registry tests
    use and for the real one: create, replace (the old secret stops working), revoke
    (idempotent), and a revoked device can be given an account again."""
    device = f"{settings.mqtt.topic_prefix.strip('/')}-contract"
    async with contextlib.AsyncExitStack() as stack:
        if kind == "fake":
            fake = RecordingBroker()
            accounts: BrokerAccounts = fake

            async def works(secret: str) -> bool:
                return fake.accounts.get(device) == secret
        else:
            accounts = await stack.enter_async_context(DynsecAccounts(settings.mqtt))

            async def works(secret: str) -> bool:
                login = (device, secret)
                reason = await asyncio.to_thread(connack, settings.mqtt, device, login)
                return reason == "Success"

        await accounts.add_device(device, "s1")
        assert [await works("s1"), await works("s2")] == [True, False]
        await accounts.add_device(device, "s2")
        assert [await works("s1"), await works("s2")] == [False, True]
        await accounts.revoke_device(device)
        await accounts.revoke_device(device)
        assert await works("s2") is False
        await accounts.add_device(device, "s3")
        assert await works("s3") is True
        await accounts.revoke_device(device)


async def test_a_wrong_admin_login_is_a_permanent_error(settings: Settings) -> None:
    wrong = settings.mqtt.model_copy(update={"admin_password": SecretStr("not-the-password")})
    with pytest.raises(BrokerAccountError, match="refused the admin login") as caught:
        async with DynsecAccounts(wrong):
            pass
    assert caught.value.retriable is False
    closed = settings.mqtt.model_copy(update={"port": free_port()})
    with pytest.raises(RegistryUnavailable, match="cannot reach the MQTT broker") as down:
        async with DynsecAccounts(closed):
            pass
    assert down.value.retriable is True


def test_local_logins_are_private_files(base_settings: Settings) -> None:
    directory = base_settings.services.run_dir.resolve() / "mosquitto"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "credentials.json").stat().st_mode) == 0o600
    assert base_settings.mqtt.admin_password is not None
    assert base_settings.mqtt.password is not None
    log = (directory / "mosquitto.log").read_text(errors="replace")
    assert base_settings.mqtt.admin_password.get_secret_value() not in log
    assert base_settings.mqtt.password.get_secret_value() not in log
