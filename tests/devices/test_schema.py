"""The registry's schema is the registry's: its tables, the change notifications the
consumer's cache listens to and the firmware history, all in its own migrations."""

from __future__ import annotations

import shutil
from importlib.resources import as_file, files
from pathlib import Path

import asyncpg

from devices.schema import migrate_registry
from ingest.migrations import migrate

RECORDED = [
    ("registry", 1, "001_registry"),
    ("registry", 2, "002_notify"),
    ("registry", 3, "003_firmware"),
    ("registry", 4, "004_consumer_interface"),
    ("registry", 5, "005_subjects_audit"),
    ("registry", 6, "006_registration_limits"),
    ("registry", 7, "007_device_certificates"),
    ("registry", 8, "008_purposes_policies"),
    ("registry", 11, "011_analytics_consent_ends"),
]
TRIGGERS = [
    ("devices", "enrichment_notify"),
    ("firmware_history", "firmware_history_current"),
    ("owners", "enrichment_notify"),
    ("ownership_periods", "enrichment_notify"),
    ("policy_reasks", "policy_notify"),
    ("product_models", "enrichment_notify"),
]


async def recorded(pg: asyncpg.Connection, schema: str) -> list[tuple[str, int, str]]:
    rows = await pg.fetch(
        f"SELECT component, version, name FROM {schema}.schema_migrations ORDER BY 1, 2"
    )
    return [(r["component"], r["version"], r["name"]) for r in rows]


async def triggers(pg: asyncpg.Connection, schema: str) -> list[tuple[str, str]]:
    rows = await pg.fetch(
        "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND NOT t.tgisinternal ORDER BY 1, 2",
        schema,
    )
    return [(r["relname"], r["tgname"]) for r in rows]


async def test_a_fresh_schema_gets_everything(reg_schema: str, pg: asyncpg.Connection) -> None:
    assert await migrate_registry(pg, reg_schema) == [name for _, _, name in RECORDED]
    assert await recorded(pg, reg_schema) == RECORDED
    assert await triggers(pg, reg_schema) == TRIGGERS
    assert await migrate_registry(pg, reg_schema) == []


async def test_a_schema_the_consumer_completed_applies_nothing_again(
    reg_schema: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Before the registry owned them, the consumer applied the notification triggers
    and the firmware history as component `enrich.notify`, numbered 001 and 002. The
    registry takes those records over (the files moved unchanged, so their checksums
    hold) instead of applying the files a second time."""
    with as_file(files("devices") / "sql") as sql:
        registry, consumer = tmp_path / "registry", tmp_path / "consumer"
        registry.mkdir()
        consumer.mkdir()
        shutil.copy(sql / "001_registry.sql", registry / "001_registry.sql")
        shutil.copy(sql / "002_notify.sql", consumer / "001_notify.sql")
        shutil.copy(sql / "003_firmware.sql", consumer / "002_firmware.sql")
    await migrate(pg, schema=reg_schema, component="registry", directory=registry)
    await migrate(pg, schema=reg_schema, component="enrich.notify", directory=consumer)

    assert await migrate_registry(pg, reg_schema) == [
        "004_consumer_interface",
        "005_subjects_audit",
        "006_registration_limits",
        "007_device_certificates",
        "008_purposes_policies",
        "011_analytics_consent_ends",
    ]
    assert await recorded(pg, reg_schema) == RECORDED
    assert await triggers(pg, reg_schema) == TRIGGERS


async def test_a_schema_the_consumer_never_saw_gets_the_rest(
    reg_schema: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A registry created before the move by `usagepipe registry migrate` alone."""
    with as_file(files("devices") / "sql" / "001_registry.sql") as first:
        shutil.copy(first, tmp_path / "001_registry.sql")
    await migrate(pg, schema=reg_schema, component="registry", directory=tmp_path)

    assert await migrate_registry(pg, reg_schema) == [
        "002_notify",
        "003_firmware",
        "004_consumer_interface",
        "005_subjects_audit",
        "006_registration_limits",
        "007_device_certificates",
        "008_purposes_policies",
        "011_analytics_consent_ends",
    ]
    assert await recorded(pg, reg_schema) == RECORDED
