"""The generic migration runner: once each, in order, concurrently safe, edits refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from ingest.errors import MigrationError
from ingest.migrations import migrate
from tests.conftest import connection, own_schema
from tests.devices.catalog import DSN


@pytest.fixture
async def reg_schema() -> AsyncIterator[str]:
    async with own_schema(DSN, "migtest") as name:
        yield name


@pytest.fixture
async def pg() -> AsyncIterator[asyncpg.Connection]:
    async with connection(DSN) as conn:
        yield conn


@pytest.fixture
async def second_pg() -> AsyncIterator[asyncpg.Connection]:
    async with connection(DSN) as conn:
        yield conn


def write(directory: Path, name: str, sql: str) -> None:
    (directory / name).write_text(sql)


async def test_applies_once_in_order(
    tmp_path: Path, reg_schema: str, pg: asyncpg.Connection, second_pg: asyncpg.Connection
) -> None:
    write(tmp_path, "002_fill.sql", "INSERT INTO things VALUES (1), (2);")
    write(tmp_path, "001_things.sql", "CREATE TABLE things (n int PRIMARY KEY);")
    write(tmp_path, "README.md", "not a migration")

    # Two processes at once: one applies both files, the other finds nothing to do.
    results = await asyncio.gather(
        migrate(pg, schema=reg_schema, component="demo", directory=tmp_path),
        migrate(second_pg, schema=reg_schema, component="demo", directory=tmp_path),
    )
    assert sorted(results) == [[], ["001_things", "002_fill"]]
    assert await pg.fetchval(f"SELECT count(*) FROM {reg_schema}.things") == 2

    write(tmp_path, "003_more.sql", "INSERT INTO things VALUES (3);")
    assert await migrate(pg, schema=reg_schema, component="demo", directory=tmp_path) == [
        "003_more"
    ]
    # Another component's history is its own, in the same table.
    other = tmp_path / "other"
    other.mkdir()
    write(other, "001_other.sql", "CREATE TABLE other_things (n int);")
    assert await migrate(pg, schema=reg_schema, component="other", directory=other) == ["001_other"]
    rows = await pg.fetch(
        f"SELECT component, version, name FROM {reg_schema}.schema_migrations ORDER BY 1, 2"
    )
    assert [tuple(r) for r in rows] == [
        ("demo", 1, "001_things"),
        ("demo", 2, "002_fill"),
        ("demo", 3, "003_more"),
        ("other", 1, "001_other"),
    ]


async def test_failed_migration_applies_nothing(
    tmp_path: Path, reg_schema: str, pg: asyncpg.Connection
) -> None:
    write(tmp_path, "001_ok.sql", "CREATE TABLE fine (n int);")
    write(tmp_path, "002_bad.sql", "CREATE TABLE broken (n nonexistent_type);")
    with pytest.raises(MigrationError) as failed:
        await migrate(pg, schema=reg_schema, component="demo", directory=tmp_path)
    assert str(failed.value) == (
        f'demo migration 002_bad failed in schema {reg_schema}: type "nonexistent_type"'
        " does not exist"
    )
    assert isinstance(failed.value.__cause__, asyncpg.exceptions.UndefinedObjectError)
    assert await pg.fetchval("SELECT to_regclass($1)", f"{reg_schema}.fine") is None


async def test_edited_or_duplicate_migrations_are_refused(
    tmp_path: Path, reg_schema: str, pg: asyncpg.Connection
) -> None:
    write(tmp_path, "001_things.sql", "CREATE TABLE things (n int);")
    await migrate(pg, schema=reg_schema, component="demo", directory=tmp_path)
    write(tmp_path, "001_things.sql", "CREATE TABLE things (n bigint);")
    with pytest.raises(MigrationError, match="001_things was changed after it was applied"):
        await migrate(pg, schema=reg_schema, component="demo", directory=tmp_path)
    write(tmp_path, "001_things.sql", "CREATE TABLE things (n int);")
    write(tmp_path, "001_again.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="number 001 is used twice"):
        await migrate(pg, schema=reg_schema, component="demo", directory=tmp_path)


async def test_schema_name_must_be_an_identifier(tmp_path: Path, pg: asyncpg.Connection) -> None:
    with pytest.raises(ValueError, match="not a plain lower-case SQL identifier"):
        await migrate(pg, schema='x"; DROP TABLE y; --', component="demo", directory=tmp_path)
