"""The proof of an erasure: every table that can hold an owner's data, checked for
anything still linked to an erased owner (`usagepipe erasure prove OWNER_ID`).

The tables are those of `ingest.personal_data.CATALOGUE`, on the usage table's layout
(on TimescaleDB the device-daily rollup's materialisation hypertable, the raw rows
through the hypertable, compressed chunks included): in the registry, rows naming the
owner id; in the usage tables, rows carrying any of the owner's keys
(`ingest.owner_keys.keys_for`), the dead letters among them. Each table is counted in
one read-only snapshot and reported with the rows linked to the owner, the rows that
stay by design (the erased owner's bare row, the `owner.erased` event, the audit entry
and the usage side's record of the erasure: random ids that name nobody) and the rows
left. The erasure is proven when the registry says the owner is erased and no table
has a row left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from ingest.errors import ConfigurationError, StoreUnavailable
from ingest.migrations import Connection
from ingest.personal_data import Holding, Owner, Where, holdings, locate, predicate
from ingest.postgres import translated
from ingest.sql_names import quote_schema


@dataclass(frozen=True, slots=True)
class Checked:
    """One table as the proof found it."""

    holding: Holding
    relation: str
    exists: bool
    linked: int = 0
    """Rows linked to the owner."""
    kept: int = 0
    """Of those, rows that stay by design (`Holding.kept`)."""
    searchable: bool = True
    """False where the owner can no longer be looked for (their sign-in subject,
    which erasure removes)."""

    @property
    def left(self) -> int:
        return self.linked - self.kept

    @property
    def shown(self) -> str:
        """The relation as the report names it (identifiers unquoted)."""
        return self.relation.replace('"', "")


@dataclass(frozen=True, slots=True)
class Proof:
    """What `prove_erasure` found for one owner."""

    owner_id: UUID
    status: str | None
    """The registry's status of the owner (`erased`), None: no such owner."""
    layout: str | None
    """The usage table's layout, None: no usage table checked."""
    keys: int
    """How many keys were looked for."""
    checked: tuple[Checked, ...]

    @property
    def left(self) -> int:
        return sum(c.left for c in self.checked)

    @property
    def proven(self) -> bool:
        """The owner is erased and nothing linked to them is left."""
        return self.status == "erased" and self.left == 0

    def lines(self) -> list[str]:
        """The report, as `usagepipe erasure prove` prints it."""
        width = max(len(c.shown) for c in self.checked)
        out = [
            f"owner {self.owner_id}: {self.status or 'unknown to the registry'};"
            f" usage layout {self.layout or 'none'}; {self.keys} owner key(s) looked for",
            f"  {'table':<{width}}  {'linked':>7}  {'kept':>5}  {'left':>5}",
        ]
        for c in self.checked:
            if not c.exists:
                counts = f"{'-':>7}  {'-':>5}  {'-':>5}  (no such table)"
            elif not c.searchable:
                counts = (
                    f"{'-':>7}  {'-':>5}  {'-':>5}  (found by the sign-in subject, and the"
                    " owner row has none: erasure removes it)"
                )
            else:
                counts = f"{c.linked:>7}  {c.kept:>5}  {c.left:>5}"
                if c.kept:
                    counts += f"  kept: {c.holding.why_kept}"
            out.append(f"  {c.shown:<{width}}  {counts}")
        if self.proven:
            out.append(f"erasure proven: {len(self.checked)} tables checked, nothing left")
        elif self.status != "erased":
            out.append(
                f"not erased: the owner is {self.status or 'unknown'}; {self.left} row(s)"
                " linked to them"
            )
        else:
            tables = [c.shown for c in self.checked if c.left]
            out.append(f"NOT PROVEN: {self.left} row(s) still linked, in {', '.join(tables)}")
        return out


async def prove_erasure(
    conn: Connection,
    owner_id: UUID,
    *,
    keys: Sequence[str],
    registry_schema: str,
    usage_table: str | None,
) -> Proof:
    """Count what every table of the catalogue still holds of `owner_id`, whose usage
    rows may carry any of `keys`; the usage tables of `usage_table` (None: the
    registry's tables only). One read-only transaction: a consistent snapshot."""
    with translated(StoreUnavailable, "checking the erasure failed"):
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            schema = quote_schema(registry_schema)
            if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.owners") is None:
                raise ConfigurationError(
                    f"the registry schema {registry_schema!r} has no owners table: is"
                    " USAGEPIPE_REGISTRY__DB_SCHEMA right, and is the registry migrated?"
                )
            row = await conn.fetchrow(
                f"SELECT status, subject FROM {schema}.owners WHERE owner_id = $1", owner_id
            )
            owner = Owner(owner_id, keys, None if row is None else row["subject"])
            layout = None
            if usage_table is not None and await conn.fetchval(
                "SELECT to_regclass($1)", f"{usage_table}_layout"
            ):
                layout = await conn.fetchval(f"SELECT kind FROM {usage_table}_layout")
            checked = []
            for holding in holdings():
                if holding.store == "usage" and usage_table is None:
                    continue
                where = await locate(
                    conn, holding, registry_schema=registry_schema, usage_table=usage_table or ""
                )
                checked.append(await _count(conn, where, registry_schema, owner))
    return Proof(
        owner_id,
        None if row is None else row["status"],
        layout,
        len(keys),
        tuple(checked),
    )


async def _count(conn: Connection, where: Where, registry_schema: str, owner: Owner) -> Checked:
    h = where.holding
    if not where.exists:
        return Checked(h, where.relation, exists=False)
    found = predicate(where, registry_schema, owner)
    if found is None:
        return Checked(h, where.relation, exists=True, searchable=h.link != "subject")
    condition, args = found
    kept = h.kept or "false"
    counts = await conn.fetchrow(
        f"SELECT count(*) AS linked, count(*) FILTER (WHERE {kept}) AS kept"
        f" FROM {where.relation} WHERE {condition}",
        *args,
    )
    assert counts is not None
    return Checked(h, where.relation, True, int(counts["linked"]), int(counts["kept"]))
