"""`usagepipe erasure prove OWNER_ID`: the privacy office's proof that an erased owner's
data is gone from every table that could hold it (`ingest.erasure_proof`).

It prints each table checked (on the usage table's layout) with the rows linked to the
owner, those kept by design and those left. Exit status: 0 the owner is erased and
nothing linked to them is left; 1 something is left, or the owner is not erased (what
was found is printed), or PostgreSQL does not answer; 2 a mistake: an id the registry
never had, a registry schema or usage table that does not exist.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from uuid import UUID

import asyncpg

from ingest.erasure_proof import prove_erasure
from ingest.errors import ConfigurationError, StoreUnavailable
from ingest.owner_keys import keys_for, load_secrets, with_local_owner_key
from ingest.postgres import translated
from ingest.settings import Settings
from usagepipe.cli.arguments import Commands, command


def add_erasure(commands: Commands) -> None:
    erasure = command(
        commands, "erasure", _erasure, help="prove that an erased owner's data is gone"
    )
    actions = erasure.add_subparsers(dest="action", required=True)
    prove = actions.add_parser(
        "prove",
        help="check every table and rollup that can hold an owner's data for anything still"
        " linked to OWNER_ID; exit 0 only if the owner is erased and nothing is left",
    )
    prove.add_argument("owner_id", type=_owner_id, metavar="OWNER_ID")


def _owner_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an owner id (a UUID): {text!r}") from None


def _erasure(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_prove(args.owner_id, with_local_owner_key(settings)))


async def _prove(owner_id: UUID, settings: Settings) -> int:
    table, schema = settings.postgres.table, settings.registry.db_schema
    with translated(StoreUnavailable, "PostgreSQL unreachable", detail=str):
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        if await conn.fetchval("SELECT to_regclass($1)", f"{table}_layout") is None:
            raise ConfigurationError(
                f"no usage table {table!r} in this database: is USAGEPIPE_POSTGRES__TABLE"
                " right? (`usagepipe db migrate` creates it)"
            )
        proof = await prove_erasure(
            conn,
            owner_id,
            keys=keys_for(load_secrets(settings.enrich), owner_id),
            registry_schema=schema,
            usage_table=table,
        )
    finally:
        await conn.close()
    for line in proof.lines():
        print(line)
    if proof.status is None:
        print(
            f"usagepipe erasure prove: no owner {owner_id} in the registry schema {schema!r}"
            " (an erased owner keeps its row: check the id)",
            file=sys.stderr,
        )
        return 2
    return 0 if proof.proven else 1
