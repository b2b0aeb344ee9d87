"""The catalogue of where an owner's data can be (`ingest.personal_data`) against the
real databases: every column that links an owner, in every table of the registry's
schema and of the usage tables on each layout, is covered, and every table and column
the catalogue names exists."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime

from ingest.migrations import Connection
from ingest.personal_data import CATALOGUE, holdings
from ingest.rollups import ROLLUPS, materialised_rows
from ingest.settings import Settings
from ingest.store import UsageStore
from tests.conftest import connection
from tests.ingest.test_store import row

LINKING = re.compile(r"owner|subject")
"""Column names that link an owner: `owner_id`, `owner_key`, `to_owner_id`, `subject`."""

LINKING_BY_CONTENT = {
    ("audit_log", "target"),  # an owner id, for the actions on an owner
    ("event_outbox", "payload"),  # an event's owner ids
    ("event_outbox", "event_key"),  # `owner.erased` is keyed by the owner id
    ("registration_limits", "caller_key"),  # `subject:<the owner's sign-in>`
}
"""Columns whose name says nothing, but whose content can name an owner."""


async def columns_of(conn: Connection, schema: str, relations: list[str]) -> set[tuple[str, str]]:
    """(table, column) of `schema`'s base tables (partitioned ones included, their
    partitions not: they are the table) whose name is in `relations`, or all of them
    when `relations` is empty."""
    rows = await conn.fetch(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c"
        " JOIN information_schema.tables t USING (table_schema, table_name)"
        " JOIN pg_class k ON k.relname = c.table_name"
        "  AND k.relnamespace = c.table_schema::regnamespace"
        " WHERE c.table_schema = $1 AND t.table_type = 'BASE TABLE' AND NOT k.relispartition"
        "  AND (cardinality($2::text[]) = 0 OR c.table_name = ANY($2::text[]))",
        schema,
        relations,
    )
    return {(r["table_name"], r["column_name"]) for r in rows}


def linking(columns: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {
        (table, column)
        for table, column in columns
        if LINKING.search(column) or (table, column) in LINKING_BY_CONTENT
    }


def covered(table: str) -> set[tuple[str, str]]:
    """(relation, column) the catalogue covers: the column each table's rows are found
    by and the linking columns they carry; the usage relations those of `table`."""
    return {
        (h.relation.format(table=table), column)
        for h in CATALOGUE
        for column in (h.column, *h.carries)
    }


async def test_every_registry_column_linking_an_owner_is_catalogued(settings: Settings) -> None:
    """The registry's schema as its migrations leave it (the `settings` fixture's)."""
    schema = settings.registry.db_schema
    async with connection(settings.postgres.dsn.get_secret_value()) as conn:
        found = linking(await columns_of(conn, schema, []))
        assert found, "the registry's schema has no owner columns: wrong schema?"
        registry = {h.relation for h in holdings("registry")}
        assert {table for table, _ in found} - registry == set()
        assert found - covered(settings.postgres.table) == set()
        # Each catalogued registry column exists.
        named = {
            (h.relation, column) for h in holdings("registry") for column in (h.column, *h.carries)
        }
        assert named - await columns_of(conn, schema, sorted(registry)) == set()


async def test_every_usage_column_linking_an_owner_is_catalogued(either: UsageStore) -> None:
    """The usage tables on each layout, with rows in partitions (plain PostgreSQL) or
    chunks (TimescaleDB) and the rollups materialised: partitions and chunks are their
    table; on TimescaleDB a rollup's rows are its materialisation hypertable's."""
    store, t = either, either.table
    at = datetime(2026, 2, 1, 8, tzinfo=UTC)
    await store.write([dataclasses.replace(row("d1", 1, at), owner_key="k")])
    await store.refresh_rollups(wait=True)
    async with store.pool.acquire() as conn:
        schema = await conn.fetchval("SELECT current_schema()")
        ours = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = $1::regnamespace"
            " AND (relname = $2 OR starts_with(relname, $2 || '_'))",
            schema,
            t,
        )
        found = linking(await columns_of(conn, schema, [r["relname"] for r in ours]))
        if store.layout.kind == "timescaledb":
            for rollup in ROLLUPS:
                mat_schema, mat = (
                    (await materialised_rows(conn, t, rollup)).replace('"', "").split(".")
                )
                found |= {
                    (f"{t}_{rollup}", column)
                    for _, column in linking(await columns_of(conn, mat_schema, [mat]))
                }
        assert found == {
            (t, "owner_key"),
            (f"{t}_device_daily", "owner_key"),
            (f"{t}_hourly_owners", "owner_key"),
            (f"{t}_dead_letters", "owner_key"),
            (f"{t}_consent_unlinks", "owner_id"),
            (f"{t}_erasures", "owner_id"),
        }
        assert found - covered(t) == set()
        assert {(h.relation.format(table=t), h.column) for h in holdings("usage")} == found


async def test_the_catalogue_is_registry_then_usage_with_unique_names() -> None:
    names = [h.name for h in CATALOGUE]
    assert len(set(names)) == len(names)
    assert [h.store for h in CATALOGUE] == sorted(
        (h.store for h in CATALOGUE), key=["registry", "usage"].index
    )
    assert all(h.order for h in CATALOGUE)
    assert all(h.why_kept for h in CATALOGUE if h.kept is not None)
