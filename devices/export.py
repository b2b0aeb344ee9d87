"""An owner's own export: everything the registry and the usage tables hold about them
(GDPR Art. 15 and 20; the same right under Korea's privacy act), as JSON or as a zip of
CSV files, from the live data.

The tables are those of `ingest.personal_data.CATALOGUE`, each with the owner's rows as
the table holds them (every column, but those `Holding.omit` names: another person's
data), read in one read-only REPEATABLE READ transaction, so the export is one
consistent snapshot of both stores (they share one database; the registry's tables
are schema-qualified, the usage tables resolve in the connection's default schema, as
the store's own do). The usage rows are found by every key the owner may be stored
under (`ingest.owner_keys.keys_for`, through `UsageLink.keys`).

Size: streamed, never held whole. Each table is read through a server-side cursor
`BATCH_ROWS` rows at a time and encoded as it comes, so an owner with years of usage
costs the process one batch of memory, and the first bytes leave before the last row
is read. The price of streaming: the answer's status (200) is sent before the data, so
a database failure half-way ends the body early (an unterminated JSON document, a zip
without its directory), never a complete-looking partial export.

- JSON: `{"format": "usagepipe-owner-export", "version": 1, "owner_id", "exported_at",
  "tables": {"owners": [{column: value, ...}], ...}, "counts": {"owners": 1, ...}}`.
  Times are ISO 8601 with their offset, `jsonb` columns (a usage row's body) are
  embedded as JSON, bytes (a dead letter's original message) are lower-case hex.
- CSV: a zip of `<table>.csv` per table, each with a header row (also for a table
  without rows), values as in JSON (`jsonb` as its JSON text, empty for null), and
  `manifest.csv` last: table, file, rows, what the table holds.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

import orjson

from ingest.migrations import Connection
from ingest.personal_data import Holding, Owner, holdings, locate, predicate
from ingest.sql_names import quote_schema

Format = Literal["json", "csv"]

BATCH_ROWS = 1000
"""Rows read and encoded at a time: the export's memory, whatever the owner's history."""

FORMAT_NAME = "usagepipe-owner-export"
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class UsageLink:
    """How the registry reaches the owner's usage: the usage table (`postgres.table`,
    same database) and the keys an owner's rows may carry (`keys_for`)."""

    table: str
    keys: Callable[[UUID], list[str]]


async def usage_tables_exist(conn: Connection, usage: UsageLink) -> bool:
    """Whether `usage.table` has been migrated in `conn`'s database: an export without
    them would show an owner no usage, which would be false, so callers refuse."""
    return await conn.fetchval("SELECT to_regclass($1)", f"{usage.table}_layout") is not None


Snapshot = Callable[[], AbstractAsyncContextManager[Connection]]
"""Opens a connection in a read-only REPEATABLE READ transaction
(`devices.registry.Registry.snapshot`)."""


@dataclass(slots=True)
class _Table:
    holding: Holding
    columns: list[str]
    types: list[str]
    """Each column's PostgreSQL type name (`jsonb`, `timestamptz`, ...)."""
    batches: AsyncIterator[list[tuple[Any, ...]]]
    rows: int = 0


async def _tables(
    conn: Connection, owner_id: UUID, *, registry_schema: str, usage: UsageLink
) -> AsyncIterator[_Table]:
    """Each table of the catalogue with the owner's rows, in catalogue order; a table's
    batches must be read before the next table is asked for (one cursor at a time)."""
    schema = quote_schema(registry_schema)
    subject = await conn.fetchval(
        f"SELECT subject FROM {schema}.owners WHERE owner_id = $1", owner_id
    )
    owner = Owner(owner_id, usage.keys(owner_id), subject)
    for holding in holdings():
        where = await locate(
            conn, holding, registry_schema=registry_schema, usage_table=usage.table
        )
        if not where.exists:
            yield _Table(holding, [], [], _no_batches())
            continue
        # No way left to find the owner here (no subject, no key): the columns, no row.
        condition, args = predicate(where, registry_schema, owner) or ("false", [])
        stmt = await conn.prepare(
            f"SELECT * FROM {where.relation} WHERE {condition} ORDER BY {holding.order}"
        )
        attributes = [a for a in stmt.get_attributes() if a.name not in holding.omit]
        keep = [i for i, a in enumerate(stmt.get_attributes()) if a.name not in holding.omit]
        yield _Table(
            holding,
            [a.name for a in attributes],
            [a.type.name for a in attributes],
            _batches(stmt, args, keep),
        )


async def _no_batches() -> AsyncIterator[list[tuple[Any, ...]]]:
    return
    yield


async def _batches(
    stmt: Any, args: list[Any], keep: list[int]
) -> AsyncIterator[list[tuple[Any, ...]]]:
    cursor = await stmt.cursor(*args)
    while rows := await cursor.fetch(BATCH_ROWS):
        yield [tuple(row[i] for i in keep) for row in rows]


def _default(value: object) -> object:
    """orjson's fallback: bytes as hex, numerics exactly as text, asyncpg's UUIDs (a
    subclass orjson does not take) as text."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot export a {type(value).__name__}")


def _cell(value: object) -> object:
    """A CSV cell of a column whose type the writer would not write as JSON does (csv
    writes None as empty, text and numbers as `str`)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


_AS_IS = {"text", "varchar", "int2", "int4", "int8", "numeric", "float8", "uuid", "json", "jsonb"}
"""Types whose values the csv module writes as the JSON export does (None as empty)."""


def _csv_rows(types: list[str], batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """`batch` with the cells of the columns csv would not write as JSON does converted
    (`_cell`); the others are left as they are, the cheap case of a usage row."""
    convert = [i for i, name in enumerate(types) if name not in _AS_IS]
    if not convert:
        return batch
    out = []
    for row in batch:
        cells = list(row)
        for i in convert:
            cells[i] = _cell(cells[i])
        out.append(tuple(cells))
    return out


async def export_owner(
    snapshot: Snapshot,
    owner_id: UUID,
    fmt: Format,
    *,
    registry_schema: str,
    usage: UsageLink,
    now: datetime,
) -> AsyncIterator[bytes]:
    """The owner's export in `fmt`, chunk by chunk, from one snapshot."""
    async with snapshot() as conn:
        tables = _tables(conn, owner_id, registry_schema=registry_schema, usage=usage)
        encode = _json if fmt == "json" else _csv_zip
        async for chunk in encode(tables, owner_id, now):
            yield chunk


async def _json(
    tables: AsyncIterator[_Table], owner_id: UUID, now: datetime
) -> AsyncIterator[bytes]:
    head = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "owner_id": owner_id,
        "exported_at": now,
    }
    yield orjson.dumps(head)[:-1] + b',"tables":{'
    counts: dict[str, int] = {}
    first = True
    async for table in tables:
        out = bytearray(b"" if first else b",")
        out += orjson.dumps(table.holding.name) + b":["
        jsonbs = [name in ("json", "jsonb") for name in table.types]
        first = False
        async for batch in table.batches:
            for row in batch:
                record = {
                    name: orjson.Fragment(value) if jsonb and value is not None else value
                    for name, jsonb, value in zip(table.columns, jsonbs, row, strict=True)
                }
                if table.rows:
                    out += b","
                out += orjson.dumps(record, default=_default)
                table.rows += 1
            yield bytes(out)
            out.clear()
        out += b"]"
        yield bytes(out)
        counts[table.holding.name] = table.rows
    yield b'},"counts":' + orjson.dumps(counts) + b"}\n"


class _Sink:
    """A write-only file for `zipfile`: what is written is taken out in chunks (no
    `tell`, so zipfile writes a streamable archive, with data descriptors)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


async def _csv_zip(
    tables: AsyncIterator[_Table], owner_id: UUID, now: datetime
) -> AsyncIterator[bytes]:
    sink = _Sink()
    stamp = now.utctimetuple()[:6]
    manifest: list[list[str]] = [["table", "file", "rows", "about"]]
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.comment = (
            f"{FORMAT_NAME} {FORMAT_VERSION}: owner {owner_id}, {now.isoformat()}".encode()
        )

        def entry(name: str) -> zipfile.ZipInfo:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            return info

        async for table in tables:
            name = f"{table.holding.name}.csv"
            with archive.open(entry(name), "w", force_zip64=True) as member:
                text = io.StringIO()
                writer = csv.writer(text, lineterminator="\n")
                writer.writerow(table.columns)
                async for batch in table.batches:
                    writer.writerows(_csv_rows(table.types, batch))
                    table.rows += len(batch)
                    member.write(text.getvalue().encode())
                    text.seek(0)
                    text.truncate()
                    yield sink.take()
                member.write(text.getvalue().encode())
            yield sink.take()
            manifest.append([table.holding.name, name, str(table.rows), table.holding.about])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(manifest)
        archive.writestr(entry("manifest.csv"), text.getvalue())
    yield sink.take()


def file_name(owner_id: UUID, fmt: Format) -> str:
    """The export's file name, for `Content-Disposition` and the CLI's default."""
    return f"usagepipe-owner-{owner_id}.{'json' if fmt == 'json' else 'zip'}"


def media_type(fmt: Format) -> str:
    return "application/json" if fmt == "json" else "application/zip"
