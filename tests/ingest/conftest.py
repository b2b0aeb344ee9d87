"""Fixtures of the ingest tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from tests.conftest import require_timescaledb


@pytest.fixture(params=["partitioned", pytest.param("timescaledb", marks=pytest.mark.timescale)])
async def either(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[UsageStore]:
    """A migrated store on each layout: the same tests hold on both (TimescaleDB's
    variant skips where the server has no TimescaleDB)."""
    timescale = request.param == "timescaledb"
    if timescale:
        await require_timescaledb(settings)
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "use_timescaledb": timescale})
    async with UsageStore(pg) as s:
        await s.migrate()
        assert s.layout.kind == request.param
        yield s
