"""PostgreSQL's errors, translated at one point (`ingest.postgres`)."""

from __future__ import annotations

import asyncpg
import pytest

from ingest.errors import StoreUnavailable
from ingest.postgres import translated
from tests.devices.catalog import DSN


def test_a_refused_connection_reads_as_one_line() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    with (
        pytest.raises(StoreUnavailable) as raised,
        translated(StoreUnavailable, "PostgreSQL unreachable", detail=str),
    ):
        raise refused
    assert str(raised.value) == (
        "PostgreSQL unreachable: [Errno 111] Connect call failed ('127.0.0.1', 1)"
    )
    assert raised.value.__cause__ is refused


def test_a_timeout_is_a_database_error_too() -> None:
    with pytest.raises(StoreUnavailable) as raised, translated(StoreUnavailable, "reading failed"):
        raise TimeoutError
    assert str(raised.value) == "reading failed: TimeoutError()"


async def test_what_the_server_refuses_keeps_its_type_in_the_message() -> None:
    conn = await asyncpg.connect(DSN)
    try:
        with (
            pytest.raises(StoreUnavailable) as raised,
            translated(StoreUnavailable, "reading offsets failed"),
        ):
            await conn.fetch("SELECT * FROM no_such_table_anywhere")
    finally:
        await conn.close()
    assert str(raised.value) == (
        'reading offsets failed: UndefinedTableError(\'relation "no_such_table_anywhere"'
        " does not exist')"
    )


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), translated(StoreUnavailable, "anything failed"):
        raise KeyError("not ours to translate")
