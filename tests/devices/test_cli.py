"""`usagepipe registry ...` handlers, called as the main CLI will call them."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devices.cli import register_commands
from devices.settings import RegistrySettings
from ingest.settings import KafkaSettings, PostgresSettings, Settings
from tests.devices.catalog import DSN, KAFKA, UNITS_CSV


async def _drop_schema(name: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


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
def cli_settings() -> Iterator[Settings]:
    """Root settings pointing the registry at a schema and an events topic of its own.

    Synchronous on purpose: the handlers run their own event loop (`asyncio.run`)."""
    name = f"regtest_{uuid.uuid4().hex[:12]}"
    topic = f"registry.events.test-{uuid.uuid4().hex[:10]}"
    asyncio.run(_topic(topic, create=True))
    try:
        yield Settings(
            kafka=KafkaSettings(bootstrap_servers=KAFKA, enable_idempotence=False),
            postgres=PostgresSettings(dsn=DSN),
            registry=RegistrySettings(db_schema=name, events_topic=topic, secret_hash_log2_n=10),
        )
    finally:
        asyncio.run(_drop_schema(name))
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
    assert capsys.readouterr().out.endswith(": applied 001_registry\n")
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
    assert capsys.readouterr().out == "0 owner(s) became dormant\n"
    assert run(cli_settings, "flush-events") == 0
    assert capsys.readouterr().out == "published 0 event(s), 0 still pending\n"

    # Registering needs the MQTT broker's account sync, which does not exist yet.
    argv = ["--owner-id", str(uuid.uuid4()), "--model", "WM-100", "--serial", "SN0001"]
    assert run(cli_settings, "register", *argv, "--code", "CODE-0001", "--channel", "gift") == 2
    assert "not implemented yet" in capsys.readouterr().err
