"""PostgreSQL schema names the settings and the SQL text may carry, checked without the
database driver: `ingest.settings` validates them at start-up, and importing asyncpg
there would cost every command, the bridge too, a database driver it never uses."""

from __future__ import annotations

import re

# A PostgreSQL schema name we are willing to put between double quotes in SQL text:
# lower-case, no quotes, at most 63 bytes (PostgreSQL's identifier limit).
SCHEMA_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def quote_schema(schema: str) -> str:
    """The schema name as a quoted SQL identifier, after checking it is a plain one.

    Identifiers cannot be bound as query parameters, so this check is what keeps a
    configured name from ever becoming SQL.
    """
    if not SCHEMA_NAME_PATTERN.match(schema):
        raise ValueError(f"schema {schema!r} is not a plain lower-case SQL identifier")
    return f'"{schema}"'
