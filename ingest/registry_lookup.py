"""The registry's queries for enrichment, and the device facts they return.

Per batch, for the distinct devices not in the cache (`ingest.facts_cache`), one query
for the device, its model and its whole (short) ownership history with each period's
owner, joined by name with the registry's view `analytics_owners` (its one rule of who
may be attributed), and one for its firmware history. Resolving by event time is then
done in Python (`DeviceFacts.period_at`, `DeviceFacts.firmware_at`). Firmware
installations are written by the registry's own function `record_firmware`.

Each query is bounded by `lookup_timeout_s`; a failure raises `RegistryLookupFailed`,
and the consumer retries the batch with backoff.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self
from uuid import UUID

import asyncpg

from ingest.errors import ConfigurationError, RegistryLookupFailed
from ingest.owner_keys import OwnerKeySecrets
from ingest.postgres import DB_ERRORS, translated
from ingest.settings import EnrichSettings
from ingest.sql_names import quote_schema

NEWEST_REGISTRY_OBJECT = "record_firmware"
"""The last object of the registry's migrations that enrichment uses: where it exists,
so do the tables, triggers and views before it (devices/sql/004_consumer_interface)."""


@dataclass(frozen=True, slots=True)
class Period:
    """One ownership period, with what enrichment may take from its owner (now)."""

    valid_from: datetime
    valid_to: datetime | None
    purchase_channel: str
    linked: bool
    """The owner is in the registry's `analytics_owners` now (not erased, analytics
    consent in force)."""
    region: str | None
    membership_tier: str | None
    owner_key: str | None


Install = tuple[datetime, str, str]
"""A firmware installation: when, from which version, to which."""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the registry says about one device, as of when it was read."""

    device_key: int
    model: str
    category: str
    firmware: str | None
    periods: tuple[Period, ...]
    owners: frozenset[UUID]
    installs: tuple[Install, ...] = ()
    """Oldest first."""

    def firmware_at(self, t: datetime) -> str | None:
        """The firmware the device ran at `t` (see `ingest.enrich`)."""
        if not self.installs:
            return self.firmware
        # The last installation at or before t (installs are sorted by time).
        i = bisect.bisect_right(self.installs, t, key=_installed_at)
        return self.installs[i - 1][2] if i else self.installs[0][1]

    def period_at(self, t: datetime) -> Period | None:
        """The period covering `t` ([valid_from, valid_to)), if any."""
        for p in self.periods:
            if p.valid_from <= t and (p.valid_to is None or t < p.valid_to):
                return p
        return None


def merged_installs(installs: tuple[Install, ...], reported: list[Install]) -> tuple[Install, ...]:
    """`installs` (sorted by time) with the `reported` ones it lacks, still sorted; the
    same tuple if it lacks none. Of two reports of one time the first counts, as the
    firmware history's key keeps it. Costs a binary search per report, and a copy of
    the history only when something is added."""
    fresh: dict[datetime, Install] = {}
    for install in reported:
        i = bisect.bisect_left(installs, install[0], key=_installed_at)
        if i == len(installs) or installs[i][0] != install[0]:
            fresh.setdefault(install[0], install)
    if not fresh:
        return installs
    later = sorted(fresh.values())
    if not installs or later[0][0] > installs[-1][0]:  # the usual case: all newer
        return installs + tuple(later)
    return tuple(sorted((*installs, *later)))


def _installed_at(install: Install) -> datetime:
    return install[0]


class RegistryLookup:
    """The registry's queries for enrichment, over a small pool of their own.

    `open()` opens the pool and checks that the registry's schema is migrated; `close()`
    closes it (idempotent). Also an async context manager doing both.
    """

    def __init__(
        self,
        settings: EnrichSettings,
        *,
        registry_schema: str,
        dsn: str,
        secrets: OwnerKeySecrets,
    ) -> None:
        self._settings = settings
        self._secrets = secrets
        self._schema = registry_schema
        self._quoted = quote_schema(registry_schema)
        self._newest = f"{self._quoted}.{NEWEST_REGISTRY_OBJECT}"
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self.own_pids: set[int] = set()
        """The server pids of this pool's connections that recorded firmware: the
        notifications their writes cause are this process's own."""
        self._query = f"""
            SELECT d.device_key, d.device_id, d.model_number, m.category, d.firmware_version,
                   p.valid_from, p.valid_to, p.purchase_channel, p.owner_id,
                   a.owner_id IS NOT NULL AS attributable, a.region, a.membership_tier
            FROM {self._quoted}.devices d
            JOIN {self._quoted}.product_models m ON m.model_number = d.model_number
            LEFT JOIN {self._quoted}.ownership_periods p ON p.device_key = d.device_key
            LEFT JOIN {self._quoted}.analytics_owners a ON a.owner_id = p.owner_id
            WHERE d.device_id = ANY($1::text[])
            ORDER BY d.device_id, p.valid_from
        """
        self._installs_query = f"""
            SELECT d.device_id, f.installed_at, f.from_version, f.to_version
            FROM {self._quoted}.firmware_history f
            JOIN {self._quoted}.devices d ON d.device_key = f.device_key
            WHERE d.device_id = ANY($1::text[])
            ORDER BY d.device_id, f.installed_at
        """
        # The registry's own function writes its firmware history (devices/sql/004).
        self._record_installs = (
            f"SELECT * FROM {self._quoted}.record_firmware("
            "$1::text[], $2::timestamptz[], $3::text[], $4::text[])"
        )

    async def open(self) -> None:
        """Open the pool; refuse a registry schema that is not migrated."""
        try:
            # Asynchronous commit for this pool's writes (the firmware installations,
            # and migrations): the batch's store transaction commits synchronously on
            # the same server after them, and WAL is flushed in order, so once its
            # offsets are durable so are they; a crash before that replays the batch,
            # which records them again (ON CONFLICT DO NOTHING). Under load this saves
            # the batch a second wait for a WAL flush, and shortens the time a commit
            # that notifies holds PostgreSQL's database-wide NOTIFY lock.
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=2,
                server_settings={"synchronous_commit": "off"},
            )
            missing = await self._pool.fetchval("SELECT to_regproc($1) IS NULL", self._newest)
        except DB_ERRORS as exc:
            await self.close()
            raise RegistryLookupFailed(f"cannot open the registry for enrichment: {exc}") from exc
        if missing:
            await self.close()
            raise ConfigurationError(
                f"the registry schema {self._schema} is not migrated"
                f" (no {self._schema}.{NEWEST_REGISTRY_OBJECT}):"
                " run `usagepipe registry migrate` first"
            )

    async def close(self) -> None:
        """Close the pool. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def load(self, device_ids: list[str]) -> dict[str, DeviceFacts]:
        """The facts of those of `device_ids` the registry knows, in two queries."""
        if self._pool is None:
            raise RegistryLookupFailed("the enricher is not open")
        with translated(
            RegistryLookupFailed, f"registry lookup of {len(device_ids)} devices failed"
        ):
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                async with self._pool.acquire() as conn:
                    records = await conn.fetch(self._query, device_ids)
                    installs = await conn.fetch(self._installs_query, device_ids)
        grouped: dict[str, list[asyncpg.Record]] = {}
        for rec in records:
            grouped.setdefault(rec["device_id"], []).append(rec)
        history: dict[str, list[Install]] = {}
        for rec in installs:
            history.setdefault(rec["device_id"], []).append(
                (rec["installed_at"], rec["from_version"], rec["to_version"])
            )
        return {
            device_id: self._facts(recs, tuple(history.get(device_id, ())))
            for device_id, recs in grouped.items()
        }

    async def record_firmware(self, found: list[tuple[str, datetime, str, str]]) -> int:
        """Record installations (device id, when, from, to) through the registry's
        function; returns how many were new."""
        if self._pool is None:
            raise RegistryLookupFailed("the enricher is not open")
        with translated(
            RegistryLookupFailed, f"recording {len(found)} firmware installations failed"
        ):
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                async with self._pool.acquire() as conn:
                    self.own_pids.add(conn.get_server_pid())
                    added = await conn.fetch(self._record_installs, *zip(*found, strict=True))
        return len(added)

    def _facts(self, records: list[asyncpg.Record], installs: tuple[Install, ...]) -> DeviceFacts:
        first = records[0]
        periods: list[Period] = []
        owners: set[UUID] = set()
        for rec in records:
            if rec["valid_from"] is None:
                continue  # LEFT JOIN: a device with no period yet
            owner: UUID | None = rec["owner_id"]
            # Who may be attributed is the registry's rule, its view analytics_owners.
            linked: bool = rec["attributable"]
            if owner is not None:
                owners.add(owner)
            periods.append(
                Period(
                    rec["valid_from"],
                    rec["valid_to"],
                    rec["purchase_channel"],
                    linked,
                    rec["region"] if linked else None,
                    rec["membership_tier"] if linked else None,
                    self._secrets.key(owner) if linked and owner is not None else None,
                )
            )
        return DeviceFacts(
            first["device_key"],
            first["model_number"],
            first["category"],
            first["firmware_version"],
            tuple(periods),
            frozenset(owners),
            installs,
        )
