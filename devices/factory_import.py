"""Manufactured units arrive from the factory's CSV export; import them idempotently.

The export has a header and the columns `model_number, serial_number, manufactured_on,
registration_code` (others are ignored). Each row is one unit. Importing the same file
twice changes nothing the second time; a file with some bad rows imports the good ones
and reports each bad one with its line number and a specific reason.

Serial and model numbers are compared after trimming and upper-casing, since people
type them from a label. A registration code must be able to hold `MIN_CODE_BITS` (64)
bits, e.g. 13 characters of Crockford's base32 or 16 hex digits, dashes and spaces not
counted (`devices.credentials.code_bits`; the module docstring there says why 64): the
rate limits make guessing such a code hopeless, not a shorter one. A row with a shorter
code is refused (`weak_code`), naming its line; the factory should print codes made
like `devices.credentials.new_registration_code` (80 bits, `K7QX-2M9D-P4HT-8WZ5`).
Registration codes are stored only as salted scrypt hashes;
to tell "already present" from "same serial, different data" the code of a repeated
row is verified against the stored hash.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

import asyncpg

from devices.credentials import MIN_CODE_BITS, code_bits, hash_secret_async, verify_secret_async
from devices.errors import InvalidImportFile, RegistryUnavailable
from ingest.migrations import Connection, advisory_lock_key
from ingest.sql_names import quote_schema

log = logging.getLogger(__name__)

COLUMNS = ("model_number", "serial_number", "manufactured_on", "registration_code")
SERIAL_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,39}$")
MODEL_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,39}$")
_DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BATCH_ROWS = 500
"""Rows hashed and written per round trip: bounds memory and keeps threads busy."""


class ImportRejectReason(StrEnum):
    """Why one row of a factory export was not imported."""

    MALFORMED_ROW = "malformed_row"
    """The row has fewer fields than the header."""
    EMPTY_SERIAL = "empty_serial"
    BAD_SERIAL = "bad_serial"
    """The serial has characters other than A-Z, 0-9 and '-', or is too long."""
    EMPTY_MODEL = "empty_model"
    UNKNOWN_MODEL = "unknown_model"
    """No product model has this number (add the model first)."""
    BAD_DATE = "bad_date"
    """manufactured_on is not a YYYY-MM-DD calendar date."""
    EMPTY_CODE = "empty_code"
    WEAK_CODE = "weak_code"
    """The registration code is too short to hold `MIN_CODE_BITS` bits of entropy."""
    DUPLICATE_IN_FILE = "duplicate_in_file"
    """The serial appears earlier in the same file with different data."""
    CONFLICTING_SERIAL = "conflicting_serial"
    """The serial is already imported with a different model, date or code."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """One row left out, where it is, and why."""

    line: int
    serial_number: str
    reason: ImportRejectReason
    detail: str


@dataclass(slots=True)
class ImportReport:
    """The outcome of one import: counts, and every rejected row in file order."""

    inserted: int = 0
    already_present: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Unit:
    line: int
    model_number: str
    serial_number: str
    manufactured_on: date
    registration_code: str


def _parse_row(line: int, row: dict[str, str | None], models: set[str]) -> _Unit | RejectedRow:
    values = {name: (row.get(name) or "").strip() for name in COLUMNS}
    serial = values["serial_number"].upper()
    model = values["model_number"].upper()
    if any(row.get(name) is None for name in COLUMNS):
        return RejectedRow(line, serial, ImportRejectReason.MALFORMED_ROW, "missing fields")
    if not serial:
        return RejectedRow(line, serial, ImportRejectReason.EMPTY_SERIAL, "serial_number is empty")
    if not SERIAL_PATTERN.match(serial):
        return RejectedRow(
            line, serial, ImportRejectReason.BAD_SERIAL, f"serial_number {serial!r} is malformed"
        )
    if not model:
        return RejectedRow(line, serial, ImportRejectReason.EMPTY_MODEL, "model_number is empty")
    if not MODEL_PATTERN.match(model) or model not in models:
        return RejectedRow(
            line, serial, ImportRejectReason.UNKNOWN_MODEL, f"unknown model_number {model!r}"
        )
    text = values["manufactured_on"]
    try:
        if not _DATE_PATTERN.match(text):
            raise ValueError(text)
        made = date.fromisoformat(text)
    except ValueError:
        return RejectedRow(
            line, serial, ImportRejectReason.BAD_DATE, f"manufactured_on {text!r} is not YYYY-MM-DD"
        )
    code = values["registration_code"]
    if not code:
        return RejectedRow(
            line, serial, ImportRejectReason.EMPTY_CODE, "registration_code is empty"
        )
    bits = code_bits(code)
    if bits < MIN_CODE_BITS:
        return RejectedRow(
            line,
            serial,
            ImportRejectReason.WEAK_CODE,
            f"registration_code holds at most {int(bits)} bits, {MIN_CODE_BITS} needed"
            " (e.g. 16 characters of Crockford base32: 0-9 and A-Z without I, L, O, U)",
        )
    return _Unit(line, model, serial, made, code)


async def import_units(
    conn: Connection,
    lines: Iterable[str],
    *,
    schema: str,
    hash_log2_n: int,
) -> ImportReport:
    """Import the units of one factory export (`lines`, e.g. an open text file).

    Runs in one transaction under a per-schema advisory lock, so concurrent imports of
    overlapping files cannot both insert a serial. Raises `InvalidImportFile` when the
    header lacks a column, `RegistryUnavailable` when PostgreSQL cannot be reached.
    """
    reader = csv.DictReader(lines)
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise InvalidImportFile(f"factory export lacks column(s): {', '.join(missing)}")
    reader.fieldnames = header
    report = ImportReport()
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", advisory_lock_key("import", schema)
            )
            await conn.execute(f"SET LOCAL search_path TO {quote_schema(schema)}")
            models = {
                r["model_number"]
                for r in await conn.fetch("SELECT model_number FROM product_models")
            }
            seen: dict[str, _Unit] = {}
            batch: list[_Unit] = []
            for row in reader:
                # line_num is the physical line the row ended on: the header is line 1.
                parsed = _parse_row(reader.line_num, row, models)
                if isinstance(parsed, RejectedRow):
                    report.rejected.append(parsed)
                    continue
                if not _first_in_file(seen, parsed, report):
                    continue
                batch.append(parsed)
                if len(batch) >= _BATCH_ROWS:
                    await _write_batch(conn, batch, report, hash_log2_n)
                    batch = []
            if batch:
                await _write_batch(conn, batch, report, hash_log2_n)
    except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError) as exc:
        raise RegistryUnavailable(f"factory import failed: {exc}") from exc
    report.rejected.sort(key=lambda rejected: rejected.line)
    log.info(
        "factory import: %d inserted, %d already present, %d rejected",
        report.inserted,
        report.already_present,
        len(report.rejected),
    )
    return report


def _first_in_file(seen: dict[str, _Unit], unit: _Unit, report: ImportReport) -> bool:
    """Whether `unit` is the first of its serial in the file (then `seen` holds it). A
    repeat with the same data counts as already present; with other data, rejected."""
    earlier = seen.get(unit.serial_number)
    if earlier is None:
        seen[unit.serial_number] = unit
        return True
    same = (earlier.model_number, earlier.manufactured_on, earlier.registration_code)
    if same == (unit.model_number, unit.manufactured_on, unit.registration_code):
        report.already_present += 1
    else:
        report.rejected.append(
            RejectedRow(
                unit.line,
                unit.serial_number,
                ImportRejectReason.DUPLICATE_IN_FILE,
                f"serial also on line {earlier.line} with different data",
            )
        )
    return False


async def _write_batch(
    conn: Connection, batch: Sequence[_Unit], report: ImportReport, hash_log2_n: int
) -> None:
    existing = {
        r["serial_number"]: r
        for r in await conn.fetch(
            "SELECT serial_number, model_number, manufactured_on, code_hash"
            " FROM units WHERE serial_number = ANY($1::text[])",
            [unit.serial_number for unit in batch],
        )
    }
    repeated = [unit for unit in batch if unit.serial_number in existing]
    matches = await asyncio.gather(
        *(
            verify_secret_async(unit.registration_code, existing[unit.serial_number]["code_hash"])
            for unit in repeated
        )
    )
    for unit, code_matches in zip(repeated, matches, strict=True):
        stored = existing[unit.serial_number]
        differences = [
            name
            for name, same in (
                ("model_number", stored["model_number"] == unit.model_number),
                ("manufactured_on", stored["manufactured_on"] == unit.manufactured_on),
                ("registration_code", code_matches),
            )
            if not same
        ]
        if differences:
            report.rejected.append(
                RejectedRow(
                    unit.line,
                    unit.serial_number,
                    ImportRejectReason.CONFLICTING_SERIAL,
                    f"already imported with a different {', '.join(differences)}",
                )
            )
        else:
            report.already_present += 1
    new = [unit for unit in batch if unit.serial_number not in existing]
    hashes = await asyncio.gather(
        *(hash_secret_async(unit.registration_code, log2_n=hash_log2_n) for unit in new)
    )
    if new:
        await conn.executemany(
            "INSERT INTO units (serial_number, model_number, manufactured_on, code_hash)"
            " VALUES ($1, $2, $3, $4)",
            [
                (unit.serial_number, unit.model_number, unit.manufactured_on, code_hash)
                for unit, code_hash in zip(new, hashes, strict=True)
            ],
        )
    report.inserted += len(new)
