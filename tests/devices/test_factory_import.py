"""The factory CSV import: exact report counts, each rejection reason, idempotency."""

from __future__ import annotations

import asyncpg
import pytest

from devices.errors import InvalidImportFile
from devices.factory_import import ImportRejectReason, ImportReport, RejectedRow, import_units
from devices.records import Purchase, PurchaseChannel
from devices.registry import Registry
from tests.devices.catalog import T0, new_owner

EXPORT = """model_number,serial_number,manufactured_on,registration_code
WM-100,SN0001,2025-04-01,CODE-0001-7KQ2-M9DX
WM-100,SN0010,2025-05-01,K7QX-2M9D-P4HT-0010
wm-100 , sn0011 ,2025-05-02,K7QX-2M9D-P4HT-0011
XX-999,SN0012,2025-05-01,K7QX-2M9D-P4HT-0012
WM-100,,2025-05-01,K7QX-2M9D-P4HT-0013
WM-100,SN 0014,2025-05-01,K7QX-2M9D-P4HT-0014
WM-100,SN0015,2025-13-01,K7QX-2M9D-P4HT-0015
WM-100,SN0016,01/05/2025,K7QX-2M9D-P4HT-0016
WM-100,SN0017,2025-05-01,
WM-100,SN0010,2025-05-01,K7QX-2M9D-P4HT-0010
WM-100,SN0010,2025-05-01,K7QX-2M9D-P4HT-OTHER
WM-100,SN0003,2025-07-01,CODE-0003-7KQ2-M9DX
WM-100,SN0002,2025-04-01,K7QX-2M9D-P4HT-XXXX
,SN0018,2025-05-01,K7QX-2M9D-P4HT-0018
WM-100,SN0019
WM-100,SN0020,2025-05-01,ABCD-1234
"""


async def run(registry: Registry, pg: asyncpg.Connection, text: str) -> ImportReport:
    return await import_units(
        pg, text.splitlines(keepends=True), schema=registry.settings.db_schema, hash_log2_n=10
    )


async def test_report_counts_and_reasons(registry: Registry, pg: asyncpg.Connection) -> None:
    report = await run(registry, pg, EXPORT)

    assert report.inserted == 2
    assert report.already_present == 2
    assert report.rejected == [
        RejectedRow(5, "SN0012", ImportRejectReason.UNKNOWN_MODEL, "unknown model_number 'XX-999'"),
        RejectedRow(6, "", ImportRejectReason.EMPTY_SERIAL, "serial_number is empty"),
        RejectedRow(
            7, "SN 0014", ImportRejectReason.BAD_SERIAL, "serial_number 'SN 0014' is malformed"
        ),
        RejectedRow(
            8,
            "SN0015",
            ImportRejectReason.BAD_DATE,
            "manufactured_on '2025-13-01' is not YYYY-MM-DD",
        ),
        RejectedRow(
            9,
            "SN0016",
            ImportRejectReason.BAD_DATE,
            "manufactured_on '01/05/2025' is not YYYY-MM-DD",
        ),
        RejectedRow(10, "SN0017", ImportRejectReason.EMPTY_CODE, "registration_code is empty"),
        RejectedRow(
            12,
            "SN0010",
            ImportRejectReason.DUPLICATE_IN_FILE,
            "serial also on line 3 with different data",
        ),
        RejectedRow(
            13,
            "SN0003",
            ImportRejectReason.CONFLICTING_SERIAL,
            "already imported with a different model_number",
        ),
        RejectedRow(
            14,
            "SN0002",
            ImportRejectReason.CONFLICTING_SERIAL,
            "already imported with a different registration_code",
        ),
        RejectedRow(15, "SN0018", ImportRejectReason.EMPTY_MODEL, "model_number is empty"),
        RejectedRow(16, "SN0019", ImportRejectReason.MALFORMED_ROW, "missing fields"),
        RejectedRow(
            17,
            "SN0020",
            ImportRejectReason.WEAK_CODE,
            "registration_code holds at most 32 bits, 64 needed"
            " (e.g. 16 characters of Crockford base32: 0-9 and A-Z without I, L, O, U)",
        ),
    ]
    schema = registry.settings.db_schema
    rows = await pg.fetch(f"SELECT serial_number, model_number FROM {schema}.units ORDER BY 1")
    assert [(r["serial_number"], r["model_number"]) for r in rows] == [
        ("SN0001", "WM-100"),
        ("SN0002", "WM-100"),
        ("SN0003", "DR-200"),
        ("SN0010", "WM-100"),
        ("SN0011", "WM-100"),
    ]

    # The same file again inserts nothing; the good rows are now all "already present".
    again = await run(registry, pg, EXPORT)
    assert (again.inserted, again.already_present) == (0, 4)
    assert again.rejected == report.rejected


async def test_imported_code_registers(registry: Registry, pg: asyncpg.Connection) -> None:

    await run(
        registry,
        pg,
        "model_number,serial_number,manufactured_on,registration_code\n"
        "WM-100,SN0011,2025-05-02, K7QX-2M9D-P4HT-0011 \n",
    )
    owner = await registry.create_owner(new_owner(), source="test", at=T0)
    done = await registry.register(
        owner, "WM-100", "SN0011", "K7QX-2M9D-P4HT-0011", Purchase(PurchaseChannel.GIFT), at=T0
    )
    assert done.serial_number == "SN0011"


async def test_missing_column_refuses_the_file(registry: Registry, pg: asyncpg.Connection) -> None:
    with pytest.raises(InvalidImportFile, match="manufactured_on, registration_code"):
        await run(registry, pg, "model_number,serial_number\nWM-100,SN0001\n")
