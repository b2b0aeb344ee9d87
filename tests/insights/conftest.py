"""A migrated usage table and a registry of the test's own, seeded with
`tests.insights.seed`'s population (plain PostgreSQL layout unless asked)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from tests.conftest import require_timescaledb
from tests.insights.seed import Population, build, seed


@dataclass
class Seeded:
    settings: Settings
    store: UsageStore
    population: Population


@pytest.fixture(scope="session")
def population() -> Population:
    return build()


@contextlib.asynccontextmanager
async def seeded_store(
    settings: Settings, population: Population, *, timescaledb: bool = False
) -> AsyncIterator[Seeded]:
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "use_timescaledb": timescaledb})
    async with UsageStore(pg) as store:
        await store.migrate()
        await seed(store, pg.dsn.get_secret_value(), settings.registry.db_schema, population)
        yield Seeded(settings, store, population)


@pytest.fixture
async def seeded(settings: Settings, population: Population) -> AsyncIterator[Seeded]:
    async with seeded_store(settings, population) as s:
        yield s


@pytest.fixture(params=["partitioned", pytest.param("timescaledb", marks=pytest.mark.timescale)])
async def seeded_either(
    settings: Settings, population: Population, request: pytest.FixtureRequest
) -> AsyncIterator[Seeded]:
    """`seeded` on each layout (TimescaleDB's variant skips where the server has none)."""
    timescale = request.param == "timescaledb"
    if timescale:
        await require_timescaledb(settings)
    async with seeded_store(settings, population, timescaledb=timescale) as s:
        assert s.store.layout.kind == request.param
        yield s
