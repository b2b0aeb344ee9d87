"""TimescaleDB installed but not preloaded (issue 17 item 7): `CREATE EXTENSION` would
fail FATAL and close the connection under the migration, so the layout is chosen from
`pg_available_extensions` and `shared_preload_libraries` first, and the table falls back
to native partitions with a warning saying how to enable TimescaleDB.

The decision is tested everywhere; the real server only where
`USAGEPIPE_TEST_TIMESCALEDB_NOT_PRELOADED_DSN` names one (its extension files installed,
`shared_preload_libraries` without it): the test makes a database of its own there.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from ingest.settings import PostgresSettings
from ingest.store import UsageStore
from ingest.tables import timescaledb_choice
from usagepipe.cli import main

NOT_PRELOADED = os.environ.get("USAGEPIPE_TEST_TIMESCALEDB_NOT_PRELOADED_DSN")

HOW = (
    " To use it, add timescaledb to shared_preload_libraries in postgresql.conf, restart"
    " PostgreSQL, and migrate a new table (a table keeps the layout it was created with)"
)


def test_the_layout_follows_what_the_server_has_installed_and_preloaded() -> None:
    assert timescaledb_choice(None, "") == (
        "partitioned",
        "TimescaleDB is not installed on this server; using native partitions",
    )
    assert timescaledb_choice("2.28.3", "pg_stat_statements") == (
        "partitioned",
        "TimescaleDB 2.28.3 is installed but not preloaded (shared_preload_libraries ="
        " 'pg_stat_statements'); using native partitions." + HOW,
    )
    assert timescaledb_choice("2.28.3", "")[0] == "partitioned"
    for preload in (
        "timescaledb",
        "pg_stat_statements, timescaledb",
        '"$libdir/timescaledb"',
        "$libdir/timescaledb.so",
    ):
        assert timescaledb_choice("2.28.3", preload) == (
            "timescaledb",
            "TimescaleDB 2.28.3 is preloaded",
        ), preload
    assert timescaledb_choice("2.28.3", "timescaledb_toolkit")[0] == "partitioned"


@pytest.fixture
async def own_database() -> AsyncIterator[str]:
    """A database of the test's own on the not-preloaded server; dropped after."""
    if NOT_PRELOADED is None:
        pytest.skip("USAGEPIPE_TEST_TIMESCALEDB_NOT_PRELOADED_DSN is not set")
    name = f"t_fallback_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(NOT_PRELOADED)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield urlunsplit(urlsplit(NOT_PRELOADED)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_a_server_with_timescaledb_installed_but_not_preloaded_gets_partitions(
    own_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.tables")
    settings = PostgresSettings(dsn=SecretStr(own_database), table="usage_fallback")
    async with UsageStore(settings) as store:
        report = await store.migrate()
        assert report.layout.kind == "partitioned"
        # The connection the migration used is still good: the store writes.
        assert [tuple(r) for r in await store.fetch("SELECT count(*) FROM {table}")] == [(0,)]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("TimescaleDB ")
    assert warning.getMessage().endswith(
        " is installed but not preloaded (shared_preload_libraries = ''); using native"
        " partitions." + HOW
    )


def test_db_migrate_on_such_a_server_exits_0_with_the_partitioned_layout(
    own_database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USAGEPIPE_POSTGRES__DSN", own_database)
    monkeypatch.setenv("USAGEPIPE_POSTGRES__TABLE", "usage_cli")
    assert main(["db", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "layout: partitioned, partitions of 24 h" in out
