"""`usagepipe registry ...` handlers, called as the main CLI will call them."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices.certificates import ensure_local_ca
from devices.cli import register_commands
from devices.records import Owner, device_id_for
from devices.registry import Registry
from ingest.settings import KafkaSettings, PostgresSettings, RegistrySettings, Settings
from schemas.envelope import telemetry_topic
from tests.conftest import drop_registry
from tests.devices.catalog import DSN, KAFKA, UNITS_CSV
from tests.devices.device_keys import csr_for
from tests.devices.fakes import RecordingBroker, RecordingPublisher


async def _topic(name: str, *, create: bool) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        if create:
            await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
        else:
            await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
def cli_settings(base_settings: Settings) -> Iterator[Settings]:
    """Root settings pointing the registry at a schema and an events topic of its own,
    and at the local broker with its admin login (the CLI's own fill-in does the same).

    Synchronous on purpose: the handlers run their own event loop (`asyncio.run`)."""
    name = f"regtest_{uuid.uuid4().hex[:12]}"
    topic = f"registry.events.test-{uuid.uuid4().hex[:10]}"
    asyncio.run(_topic(topic, create=True))
    settings = Settings(
        mqtt=base_settings.mqtt.model_copy(update={"topic_prefix": f"{name}/"}),
        kafka=KafkaSettings(bootstrap_servers=KAFKA, enable_idempotence=False),
        postgres=PostgresSettings(dsn=DSN),
        registry=RegistrySettings(db_schema=name, events_topic=topic, secret_hash_log2_n=10),
    )
    try:
        yield settings
    finally:
        asyncio.run(drop_registry(settings))
        asyncio.run(_topic(topic, create=False))


def run(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="usagepipe")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", *argv])
    status: int = args.handler(args, settings)
    return status


def test_commands(
    cli_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cli_settings, "migrate") == 0
    assert capsys.readouterr().out.endswith(
        ": applied 001_registry, 002_notify, 003_firmware, 004_consumer_interface,"
        " 005_subjects_audit, 006_registration_limits, 007_device_certificates,"
        " 008_purposes_policies, 011_analytics_consent_ends\n"
    )
    assert run(cli_settings, "migrate") == 0
    assert capsys.readouterr().out.endswith(": applied nothing\n")
    args = ("--category", "washer", "--name", "Washer 100", "--launched-on", "2025-03-01")
    assert run(cli_settings, "add-model", "WM-100", *args) == 0
    export = tmp_path / "units.csv"
    export.write_text(UNITS_CSV)
    capsys.readouterr()

    # DR-200 was never added: that row is rejected, the two washers imported.
    assert run(cli_settings, "import-units", str(export)) == 1
    assert capsys.readouterr().out.splitlines() == [
        "inserted 2, already present 0, rejected 1",
        "  line 4: unknown_model ('SN0003'): unknown model_number 'DR-200'",
    ]
    assert run(cli_settings, "import-units", str(tmp_path / "missing.csv")) == 2

    assert run(cli_settings, "dormancy", "--now", "2030-01-01T00:00:00+00:00") == 0
    assert capsys.readouterr().out == (
        "0 owner(s) became dormant\n0 registration attempt(s) older than 90 days deleted\n"
    )
    assert run(cli_settings, "flush-events") == 0
    assert capsys.readouterr().out == "published 0 event(s), 0 still pending\n"

    # Registering changes broker accounts: without the admin login it does not start.
    unit = [
        "--model",
        "WM-100",
        "--serial",
        "SN0001",
        "--code",
        "CODE-0001-7KQ2-M9DX",
        "--channel",
        "gift",
    ]
    no_admin = cli_settings.mqtt.model_copy(update={"admin_username": None})
    stranger = ["--owner-id", str(uuid.uuid4()), *unit]
    assert run(cli_settings.model_copy(update={"mqtt": no_admin}), "register", *stranger) == 2
    assert "the broker's admin login is not configured" in capsys.readouterr().err
    assert run(cli_settings, "register", *stranger) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "unknown_owner"

    owner = _add_owner(cli_settings, capsys)
    assert run(cli_settings, "register", "--owner-id", str(owner), *unit) == 0
    login = json.loads(capsys.readouterr().out)
    device_id = device_id_for("WM-100", "SN0001")
    assert login["device_id"] == login["mqtt_username"] == device_id
    # The printed login works on the broker at once, for the device's own topic (a
    # PUBACK with a success code: accepted, though no bridge listens to this prefix).
    topic = telemetry_topic(device_id, cli_settings.mqtt.topic_prefix)
    password = login["mqtt_password"]
    assert _publish_once(cli_settings, device_id, password, topic) == "No matching subscribers"
    other = telemetry_topic(device_id_for("WM-100", "SN0002"), cli_settings.mqtt.topic_prefix)
    assert _publish_once(cli_settings, device_id, password, other) == "Not authorized"

    # With the device's CSR the certificate is printed too (every model may use a
    # password here: registry.password_models is ["*"]).
    ca_cert, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    ensure_local_ca(ca_cert, ca_key)
    with_ca = cli_settings.model_copy(
        update={
            "registry": cli_settings.registry.model_copy(
                update={"ca_cert_file": ca_cert, "ca_key_file": ca_key}
            )
        }
    )
    csr = tmp_path / "device.csr"
    csr.write_text(csr_for()[1])
    second = [
        "--serial",
        "SN0002",
        "--code",
        "CODE-0002-7KQ2-M9DX",
        "--csr",
        str(tmp_path / "absent.csr"),
    ]
    unit2 = ["--owner-id", str(owner), "--model", "WM-100", "--channel", "gift"]
    assert run(with_ca, "register", *unit2, *second) == 2
    assert capsys.readouterr().err.startswith(
        f"usagepipe registry: cannot read the CSR {tmp_path / 'absent.csr'}: "
    )
    assert run(with_ca, "register", *unit2, *second[:-1], str(csr)) == 0
    login = json.loads(capsys.readouterr().out)
    cert = x509.load_pem_x509_certificate(login["certificate"].encode())
    assert cert.subject.rfc4514_string() == f"CN={device_id_for('WM-100', 'SN0002')}"
    assert login["mqtt_password"] is not None


def _add_owner(settings: Settings, capsys: pytest.CaptureFixture[str]) -> uuid.UUID:
    """`registry add-owner`, as the README's walk-through runs it: the id alone on stdout."""
    argv = ["--name", "Kim Minji", "--email", "minji@example.com", "--region", "KR-11"]
    consents = ["--analytics-consent", "yes", "--marketing-consent", "no"]
    assert run(settings, "add-owner", *argv, *consents) == 0
    return uuid.UUID(capsys.readouterr().out.strip())


def test_add_owner(cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cli_settings, "migrate") == 0
    capsys.readouterr()
    owner_id = _add_owner(cli_settings, capsys)
    owner = asyncio.run(_get_owner(cli_settings, owner_id))
    assert (owner.status, owner.region, owner.membership_tier) == ("active", "KR-11", "standard")
    assert (owner.analytics_consent, owner.marketing_consent) == (True, False)

    # Linked to a sign-in, the account is the one that subject's tokens act on; one per
    # subject.
    linked = ["--name", "Jiho", "--email", "jiho@x.kr", "--region", "KR-26", "--subject", "jiho"]
    consents = ["--analytics-consent", "yes", "--marketing-consent", "no"]
    assert run(cli_settings, "add-owner", *linked, *consents) == 0
    jiho = uuid.UUID(capsys.readouterr().out.strip())
    assert asyncio.run(_owner_of(cli_settings, "jiho")) == jiho
    assert run(cli_settings, "add-owner", *linked, *consents) == 2
    assert capsys.readouterr().err == (
        "usagepipe registry: owner_exists: this sign-in already has an owner account\n"
    )
    assert run(cli_settings, "add-owner", *linked[:-1], "a\tb", *consents) == 2
    assert capsys.readouterr().err == (
        "usagepipe registry add-owner: --subject 'a\\tb': use 1 to 255 printable characters"
        " (the sign-in's `sub`)\n"
    )

    # The API's rules, checked before anything is written: one line naming the option.
    base = ["--name", "Lee", "--analytics-consent", "no", "--marketing-consent", "no"]
    assert run(cli_settings, "add-owner", *base, "--email", "lee", "--region", "KR-26") == 2
    assert capsys.readouterr().err.startswith(
        "usagepipe registry add-owner: --email 'lee': String should "
    )
    assert run(cli_settings, "add-owner", *base, "--email", "lee@x.kr", "--region", "kr-26") == 2
    assert capsys.readouterr().err == (
        "usagepipe registry add-owner: --region 'kr-26': String should match pattern"
        " '^[A-Z]{2}(-[A-Z0-9]{1,3})?$'\n"
    )


async def _owner_of(settings: Settings, subject: str) -> uuid.UUID | None:
    async with Registry(
        settings.registry,
        publisher=RecordingPublisher(),
        broker=RecordingBroker(),
        dsn=settings.postgres.dsn.get_secret_value(),
    ) as registry:
        return await registry.owner_of_subject(subject)


async def _get_owner(settings: Settings, owner_id: uuid.UUID) -> Owner:
    async with Registry(
        settings.registry,
        publisher=RecordingPublisher(),
        broker=RecordingBroker(),
        dsn=settings.postgres.dsn.get_secret_value(),
    ) as registry:
        return await registry.get_owner(owner_id)


def _publish_once(settings: Settings, username: str, password: str, topic: str) -> str:
    """Log in as `username` and publish once at QoS 1; the PUBACK's reason, as text."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=username, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(username, password)
    outcome: list[str] = []
    client.on_publish = lambda _c, _u, _mid, reason, _p: outcome.append(str(reason))
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    try:
        client.publish(topic, b"{}", qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome[0]


def test_policies_and_publish_policy(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The privacy office lists the purposes and versions, and publishes a version."""
    assert run(cli_settings, "migrate") == 0
    capsys.readouterr()
    text = tmp_path / "policy.md"
    text.write_text("Marketing now includes partner offers.\n", encoding="utf-8")
    publish = ["publish-policy", "2031-01", "--text-file", str(text)]
    assert run(cli_settings, *publish, "--effective", "2031-01-01T00:00:00+09:00",
               "--reask", "marketing") == 0  # fmt: skip
    assert capsys.readouterr().out == (
        "policy version 2031-01 takes effect 2031-01-01T00:00:00+09:00; asks again for: marketing\n"
    )
    assert run(cli_settings, "policies") == 0
    assert capsys.readouterr().out == (
        "purposes:\n"
        "  service    contract  Service operation and diagnostics\n"
        "  analytics  consent   Product planning analytics\n"
        "  marketing  consent   Marketing\n"
        "policy versions:\n"
        "  initial      effective 1970-01-01T00:00:00+00:00  current   re-asks nothing\n"
        "  2031-01      effective 2030-12-31T15:00:00+00:00  upcoming  re-asks marketing\n"
    )
    # Refused, with the reason and exit 1: before the latest, or re-asking the contract.
    assert run(cli_settings, *publish[:1], "2030-06", *publish[2:], "--effective",
               "2030-06-01T00:00:00+00:00") == 1  # fmt: skip
    assert capsys.readouterr().err == (
        "usagepipe registry publish-policy: policy version '2030-06': it must take effect"
        " after the latest version '2031-01' (2030-12-31T15:00:00+00:00)\n"
    )
    assert run(cli_settings, *publish[:1], "2032-01", *publish[2:], "--effective",
               "2032-01-01T00:00:00+00:00", "--reask", "service") == 1  # fmt: skip
    assert "'service' (Service operation and diagnostics) runs under the service contract" in (
        capsys.readouterr().err
    )
