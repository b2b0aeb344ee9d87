"""Fixtures for the registry tests: a fresh PostgreSQL schema per test, real servers.

The event publisher and broker accounts are in-memory recorders implementing the same
Protocols as the real adapters (`tests.devices.fakes`); `test_events.py` publishes to
the real Kafka-protocol broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from devices.factory_import import import_units
from devices.registry import Registry
from ingest.settings import RegistrySettings
from tests.conftest import connection, own_schema
from tests.devices.catalog import DRYER, DSN, UNITS_CSV, WASHER
from tests.devices.fakes import RecordingBroker, RecordingPublisher


@pytest.fixture
async def reg_schema() -> AsyncIterator[str]:
    async with own_schema(DSN, "regtest") as name:
        yield name


@pytest.fixture
def reg_settings(reg_schema: str) -> RegistrySettings:
    # Cheap hashes (2**10) keep tests fast; a subject may fail three times an hour
    # (one more every 20 minutes), an address five times.
    return RegistrySettings(
        db_schema=reg_schema,
        secret_hash_log2_n=10,
        registration_failures_per_subject=3,
        registration_failures_per_address=5,
        registration_window_s=3600,
        dormancy_days=365,
    )


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def broker() -> RecordingBroker:
    return RecordingBroker()


@pytest.fixture
async def pg() -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for looking at tables directly."""
    async with connection(DSN) as conn:
        yield conn


@pytest.fixture
async def registry(
    reg_settings: RegistrySettings,
    publisher: RecordingPublisher,
    broker: RecordingBroker,
    pg: asyncpg.Connection,
) -> AsyncIterator[Registry]:
    """An open registry with two product models and three units (SN0001-SN0003)."""
    async with Registry(reg_settings, publisher=publisher, broker=broker, dsn=DSN) as reg:
        await reg.add_product_model(WASHER)
        await reg.add_product_model(DRYER)
        await import_units(
            pg, UNITS_CSV.splitlines(keepends=True), schema=reg_settings.db_schema, hash_log2_n=10
        )
        yield reg
