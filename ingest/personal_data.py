"""Where an owner's data can be: the one catalogue of every table that can hold it.

Two stores share one PostgreSQL database (`postgres.dsn`):

- the registry, in its schema (`registry.db_schema`), whose rows name the owner by id
  (or by what only the owner's row leads to: their devices, their sign-in subject);
- the usage tables (`postgres.table` and the tables its migrations make, in the
  connection's default schema, on either layout), whose rows carry the owner's
  pseudonymous key instead (`ingest.owner_keys.keys_for`, every key the owner may be
  stored under).

`CATALOGUE` lists every table of either store with a column that links an owner, and
how a row is found from the owner. Two readers use it, so what the owner is shown and
what erasure is proven against cannot drift apart: the owner's export
(`devices.export`, `GET /owners/{owner_id}/export`) and the erasure proof
(`ingest.erasure_proof`, `usagepipe erasure prove`). tests/ingest/test_personal_data.py
reads the real databases' catalogs and fails on a column that links an owner in a table
this catalogue does not cover.

The registry's tables are named here, not in `devices`, because the proof belongs to
the data path's erasure (`ingest.erasure`) and `ingest` may not import `devices`; the
consumer reads the registry by name already (`ingest.registry_lookup`). Nothing here
writes a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from ingest.migrations import Connection
from ingest.rollups import Rollup, materialised_rows
from ingest.sql_names import quote_schema

Store = Literal["registry", "usage"]

Link = Literal["owner_id", "owner_key", "owner_text", "outbox", "owned_device", "subject"]
"""How a table's rows are found from an owner:

- `owner_id`: the column holds the owner id;
- `owner_key`: the column holds one of the owner's keys (`keys_for`);
- `owner_text`: the column holds the owner id as text (among other ids);
- `outbox`: a registry event naming the owner (its key, or an owner id in its payload);
- `owned_device`: a device in one of the owner's ownership periods;
- `subject`: the registration allowance of the owner's sign-in subject, found while
  the owner row holds the subject (erasure clears it).
"""


@dataclass(frozen=True, slots=True)
class Holding:
    """One table that can hold an owner's data, and how their rows are found."""

    name: str
    """The table's name in an export and in the proof's report (a usage table's name
    without the configured prefix: `usage_rows`, `device_daily`, ...)."""
    store: Store
    relation: str
    """The table: the registry's own name, or for the usage store a template of
    `postgres.table` (`{table}_dead_letters`)."""
    link: Link
    column: str
    """The column `link` finds rows by."""
    about: str
    """What the table holds, for the export's manifest and the README."""
    carries: tuple[str, ...] = ()
    """Other columns of the same rows that link an owner (found with the row)."""
    kept: str | None = None
    """SQL condition on the rows that stay after an erasure by design (an erased
    owner's bare row, the record of the erasure itself); None: nothing may stay."""
    why_kept: str = ""
    omit: tuple[str, ...] = ()
    """Columns the export leaves out: another person's data (an operator's identity)."""
    order: str = ""
    """The export's ORDER BY."""
    rollup: Rollup | None = None
    """A rollup: on TimescaleDB its rows are those of the continuous aggregate's
    materialisation hypertable (`ingest.rollups.materialised_rows`)."""


CATALOGUE: tuple[Holding, ...] = (
    # -- the registry (devices/sql) ---------------------------------------------------
    Holding(
        "owners",
        "registry",
        "owners",
        "owner_id",
        "owner_id",
        "the owner's account: status, region, membership tier, consents, sign-in subject",
        carries=("subject",),
        kept="status = 'erased'",
        why_kept="an erased owner keeps only its random id, status and erasure time, so a"
        " late request for the id is answered `erased`",
        order="owner_id",
    ),
    Holding(
        "owner_contacts",
        "registry",
        "owner_contacts",
        "owner_id",
        "owner_id",
        "name, email and phone",
        order="owner_id",
    ),
    Holding(
        "consent_events",
        "registry",
        "consent_events",
        "owner_id",
        "owner_id",
        "every consent given or withdrawn: purpose, granted, the policy version, when, from where",
        order="changed_at, consent_event_id",
    ),
    Holding(
        "ownership_periods",
        "registry",
        "ownership_periods",
        "owner_id",
        "owner_id",
        "which device the owner had when, bought through which channel",
        order="valid_from, period_id",
    ),
    Holding(
        "devices",
        "registry",
        "devices",
        "owned_device",
        "device_key",
        "the devices of the owner's ownership periods: id, serial, model, firmware",
        order="registered_at, device_key",
    ),
    Holding(
        "registration_attempts",
        "registry",
        "registration_attempts",
        "owner_id",
        "owner_id",
        "the owner's registration attempts (kept for reviewing abuse)",
        order="attempted_at, attempt_id",
    ),
    Holding(
        "registration_limits",
        "registry",
        "registration_limits",
        "subject",
        "caller_key",
        "the failed-registration allowance of the owner's sign-in",
        order="caller_key",
    ),
    Holding(
        "audit_log",
        "registry",
        "audit_log",
        "owner_text",
        "target",
        "what support did to the owner's account: action, reason, when",
        kept="action = 'erase_owner'",
        why_kept="the record that support erased the owner on request (the target is then"
        " only a random id)",
        omit=("actor",),
        order="at, audit_id",
    ),
    Holding(
        "event_outbox",
        "registry",
        "event_outbox",
        "outbox",
        "payload",
        "registry events naming the owner, until published and expired",
        carries=("event_key",),
        kept="event_type = 'owner.erased'",
        why_kept="the `owner.erased` event, which tells other systems to drop their copies;"
        " it names only the random id",
        order="event_seq",
    ),
    # -- the usage tables (ingest/sql/<layout>) --------------------------------------
    Holding(
        "usage_rows",
        "usage",
        "{table}",
        "owner_key",
        "owner_key",
        "every usage event stored with the owner's key, as the device sent it",
        order="event_time, device_id, boot_id, seq",
    ),
    Holding(
        "device_daily",
        "usage",
        "{table}_device_daily",
        "owner_key",
        "owner_key",
        "the per-device daily rollup the planners' reports read, rows with the owner's key",
        order="bucket, device_id, boot_id, schema",
        rollup="device_daily",
    ),
    Holding(
        "hourly_owners",
        "usage",
        "{table}_hourly_owners",
        "owner_key",
        "owner_key",
        "the heat map's rollup of events per UTC hour and owner, rows with the owner's key",
        order="bucket, category, model, firmware, region",
        rollup="hourly_owners",
    ),
    Holding(
        "dead_letters",
        "usage",
        "{table}_dead_letters",
        "owner_key",
        "owner_key",
        "messages of the owner's devices the pipeline refused, with the owner's key",
        order="letter_id",
    ),
    Holding(
        "consent_unlinks",
        "usage",
        "{table}_consent_unlinks",
        "owner_id",
        "owner_id",
        "each end of the owner's analytics consent (withdrawal, lapse) applied to the"
        " stored rows: when, how many rows lost the key, verified",
        order="ended_at, event",
    ),
    Holding(
        "erasures",
        "usage",
        "{table}_erasures",
        "owner_id",
        "owner_id",
        "the record that the owner's erasure was applied to the usage tables",
        kept="true",
        why_kept="the record that the erasure was applied (verified once a later pass found"
        " nothing); a random id that names nobody any more",
        order="owner_id",
    ),
)
"""Every table that can hold an owner's data, registry first. The usage tables
`{table}_hourly` and `{table}_daily` (no device, no key), `_ids`, `_offsets`,
`_layout`, `_rollup_invalidations` and a pre-migration `_unversioned` hold nothing
that links an owner."""


def holdings(store: Store | None = None) -> tuple[Holding, ...]:
    """The catalogue, or the part of it in `store`."""
    return tuple(h for h in CATALOGUE if store is None or h.store == store)


@dataclass(frozen=True, slots=True)
class Owner:
    """What the owner's rows are found by: the id, every key, the sign-in subject."""

    owner_id: UUID
    keys: Sequence[str]
    subject: str | None = None


@dataclass(frozen=True, slots=True)
class Where:
    """Where `holding`'s rows are, for one database: the relation (schema-qualified
    for the registry) and whether it exists."""

    holding: Holding
    relation: str
    exists: bool


async def locate(
    conn: Connection, holding: Holding, *, registry_schema: str, usage_table: str
) -> Where:
    """`holding`'s relation in the database `conn` is connected to."""
    if holding.store == "registry":
        relation = f"{quote_schema(registry_schema)}.{holding.relation}"
    else:
        relation = holding.relation.format(table=usage_table)
    if await conn.fetchval("SELECT to_regclass($1)", relation) is None:
        return Where(holding, relation, exists=False)
    if holding.rollup is not None:
        # The rows stored, on either layout (on TimescaleDB the aggregate's view
        # reads the raw rows for what is not materialised: those are `usage_rows`).
        relation = await materialised_rows(conn, usage_table, holding.rollup)
    return Where(holding, relation, exists=True)


def _subject_key(subject: str) -> str:
    # As `devices.limits.Caller.keys` names a subject's bucket.
    return f"subject:{subject[:200]}"


def predicate(where: Where, registry_schema: str, owner: Owner) -> tuple[str, list[Any]] | None:
    """The WHERE condition (with `$1`) finding `owner`'s rows in `where`, and its
    argument; None when nothing can be found (no subject any more, no key)."""
    h = where.holding
    match h.link:
        case "owner_id":
            return f"{h.column} = $1", [owner.owner_id]
        case "owner_key":
            if not owner.keys:
                return None
            return f"{h.column} = ANY($1::text[])", [list(owner.keys)]
        case "owner_text":
            return f"{h.column} = $1", [str(owner.owner_id)]
        case "outbox":
            named = " OR ".join(
                f"payload->>'{field}' = $1"
                for field in ("owner_id", "from_owner_id", "to_owner_id")
            )
            return f"({named} OR event_key = $1)", [str(owner.owner_id)]
        case "owned_device":
            periods = f"{quote_schema(registry_schema)}.ownership_periods"
            return (
                f"{h.column} IN (SELECT device_key FROM {periods} WHERE owner_id = $1)",
                [owner.owner_id],
            )
        case "subject":
            if owner.subject is None:
                return None
            return f"{h.column} = $1", [_subject_key(owner.subject)]
