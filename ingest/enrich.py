"""Enrichment: the device registry's facts on each validated row, before the store.

For a batch of rows, `Enricher.enrich` resolves per (device_id, event_time):

    model, category     the device's product model (registry `devices`, `product_models`)
    firmware            the firmware the device ran at event_time: the latest
                        installation it reported at or before then (its own
                        `<category>.firmware` events, outcome "installed", recorded by
                        `record_firmware` through the registry's function of that name
                        in its `firmware_history`), else
                        the first installation's from_version, else the registry's
                        `devices.firmware_version` (NULL until something sets it).
                        A row keeps what was known when it was stored: an
                        installation reported late does not rewrite earlier rows.
    purchase_channel    of the ownership period covering event_time
    analytics_consent   whether that period's owner may be attributed *now* (None: no
                        owner then): the registry's one rule, its view `analytics_owners`
                        (consenting, not erased owners), which the lookup joins
    region, membership_tier, owner_key
                        only when that owner may be attributed; else None.
                        owner_key = HMAC-SHA256(enrich.owner_key_secret, owner id), hex,
                        first 32 digits. The key is never stored, nor logged.

Consent is read as of processing, not as of event time: consent is to what is done
with the data now, so a withdrawal stops linking at once, late events from before it
included; the consent audit trail (which erasure deletes) is not needed per event.

A device the registry does not know is returned in `Enriched.unregistered`; the
consumer dead-letters it (`unregistered_device`) or, with `enrich.unregistered=store`,
stores it unenriched.

Queries and cache. Per batch, for the distinct devices not in the cache, one query for
the device, its model and its whole (short) ownership history with each period's owner,
and one for its firmware history.
Resolving by event time is then done in Python. The cache is keyed by device id (an
unknown device is cached too) and bounded (`cache_max_devices`, oldest out first).

Invalidation, and its bound. Triggers on the registry's tables (devices/sql/002_notify,
the registry's migrations) `NOTIFY usagepipe_registry` when a change commits; a
dedicated connection LISTENs and evicts the devices concerned. A change is therefore
applied to every batch enriched after the notification arrives (milliseconds after the
commit); the batch already in hand is written as it was enriched. Backstops: an entry
is used at most `cache_ttl_s` (60 s); while the listening connection is down the cache
is not used at all (every batch asks the registry), and it is emptied when it is back.

Erasure. An `erased` notification, and a check at start-up and every `cache_ttl_s` for
erased owners `<table>_erasures` does not list yet, make `apply_erasures` remove those
owners' keys from stored rows (`ingest.erasure.unlink_owners`). The consumer calls it after
each batch commit, so rows of a batch enriched before the erasure lose their key too.

A lookup is bounded by `lookup_timeout_s`; a failure raises `RegistryLookupFailed`,
and the consumer retries the batch with backoff: nothing is stored unenriched.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import asyncpg
from pydantic import SecretStr

from ingest import erasure
from ingest.errors import ConfigurationError, RegistryLookupFailed
from ingest.metrics import ConsumerMetrics
from ingest.migrations import quote_schema
from ingest.postgres import DB_ERRORS, translated
from ingest.rows import UsageRow
from ingest.settings import EnrichSettings, Settings
from ingest.store import UsageStore

log = logging.getLogger(__name__)

CHANNEL = "usagepipe_registry"
"""The NOTIFY channel of the registry's triggers (devices/sql/002_notify.sql)."""
NEWEST_REGISTRY_OBJECT = "record_firmware"
"""The last object of the registry's migrations that enrichment uses: where it exists,
so do the tables, triggers and views before it (devices/sql/004_consumer_interface)."""
OWNER_KEY_HEX_DIGITS = 32
"""128 bits of the HMAC: collisions are out of reach for any fleet."""
_LISTEN_RETRY_S = (1.0, 30.0)  # first and longest wait between reconnect attempts


def owner_key(secret: bytes, owner_id: UUID) -> str:
    """The owner's pseudonymous key: HMAC-SHA256 of the canonical UUID text."""
    digest = hmac.new(secret, str(owner_id).encode(), hashlib.sha256).hexdigest()
    return digest[:OWNER_KEY_HEX_DIGITS]


@dataclass(frozen=True, slots=True)
class Period:
    """One ownership period, with what enrichment may take from its owner (now)."""

    valid_from: datetime
    valid_to: datetime | None
    purchase_channel: str
    linked: bool
    """The owner is in the registry's `analytics_owners` (consents, not erased) now."""
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
        """The firmware the device ran at `t` (see the module docstring)."""
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


@dataclass(frozen=True, slots=True)
class Enriched:
    """A batch after enrichment: rows to store, and rows of unknown devices."""

    rows: list[UsageRow]
    unregistered: list[UsageRow]


class Enricher:
    """Registry lookups for the consumer, cached and invalidated by NOTIFY.

    An async context manager: entering opens a small pool and the listening
    connection. The registry's schema (its tables, notification triggers and firmware
    history) is the registry's to create (`devices.schema.migrate_registry`, run by
    `usagepipe consume` and `usagepipe registry migrate`); without it, entering refuses
    with a `ConfigurationError` saying so.
    """

    def __init__(
        self,
        settings: EnrichSettings,
        *,
        registry_schema: str,
        dsn: str,
        metrics: ConsumerMetrics,
    ) -> None:
        if settings.owner_key_secret is None:
            raise ConfigurationError(
                "enrich.owner_key_secret is not set (USAGEPIPE_ENRICH__OWNER_KEY_SECRET); "
                "the consumer will not store owner keys without it"
            )
        self._settings = settings
        self._secret = settings.owner_key_secret.get_secret_value().encode()
        self._schema = registry_schema
        self._quoted = quote_schema(registry_schema)
        self._newest = f"{self._quoted}.{NEWEST_REGISTRY_OBJECT}"
        self._dsn = dsn
        self._metrics = metrics
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listen_at = 0.0
        self._listen_wait = _LISTEN_RETRY_S[0]
        # device id -> (monotonic time read, facts or None for "not registered")
        self._cache: dict[str, tuple[float, DeviceFacts | None]] = {}
        self._by_key: dict[int, str] = {}
        self._by_owner: dict[UUID, set[str]] = {}
        # Bumped by a notification that may concern any device (see `_lookup`); a
        # `device` notification instead records that device's own change number.
        self._epoch = 0
        self._changes = 0
        self._changed: dict[str, int] = {}
        self._loading = 0
        self._own_pids: set[int] = set()  # this process's registry connections
        self._erased: set[UUID] = set()
        self._reconcile_at = 0.0
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

    async def __aenter__(self) -> Self:
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
        await self._listen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the listener and the pool. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.remove_termination_listener(self._on_lost)
            with contextlib.suppress(*DB_ERRORS):
                await listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def listening(self) -> bool:
        """Whether change notifications arrive (else the cache is bypassed)."""
        return self._listener is not None and not self._listener.is_closed()

    # -- enrichment -----------------------------------------------------------------

    async def enrich(self, rows: list[UsageRow]) -> Enriched:
        """`rows` with the registry's facts (see the module docstring)."""
        if not rows:
            return Enriched([], [])
        facts = await self._lookup({r.device_id for r in rows})
        out: list[UsageRow] = []
        unknown: list[UsageRow] = []
        for r in rows:
            f = facts[r.device_id]
            if f is None:
                unknown.append(r)
                continue
            p = f.period_at(r.event_time)
            # The constructor, not dataclasses.replace(): half the cost per row.
            out.append(
                UsageRow(
                    r.device_id,
                    r.boot_id,
                    r.seq,
                    r.event_time,
                    r.schema,
                    r.schema_version,
                    r.body,
                    r.kafka_partition,
                    r.kafka_offset,
                    model=f.model,
                    firmware=f.firmware_at(r.event_time),
                    category=f.category,
                    # No period: nobody owned the device then (before registration, a gap).
                    region=None if p is None else p.region,
                    membership_tier=None if p is None else p.membership_tier,
                    purchase_channel=None if p is None else p.purchase_channel,
                    analytics_consent=None if p is None else p.linked,
                    owner_key=None if p is None else p.owner_key,
                )
            )
        if unknown:
            self._metrics.unregistered.inc(len(unknown))
        return Enriched(out, unknown)

    async def _lookup(self, device_ids: set[str]) -> dict[str, DeviceFacts | None]:
        """Each device's facts, from the cache where fresh, else in one query."""
        if not self.listening and time.monotonic() >= self._listen_at:
            await self._listen()
        use_cache = self.listening
        now = time.monotonic()
        ttl = self._settings.cache_ttl_s
        found: dict[str, DeviceFacts | None] = {}
        missing: list[str] = []
        for device_id in device_ids:
            cached = self._cache.get(device_id) if use_cache else None
            if cached is not None and now - cached[0] < ttl:
                found[device_id] = cached[1]
            else:
                missing.append(device_id)
        self._metrics.registry_lookups.labels("hit").inc(len(found))
        if not missing:
            return found
        self._metrics.registry_lookups.labels("miss").inc(len(missing))
        epoch, changes = self._epoch, self._changes
        self._loading += 1
        try:
            loaded = await self._load(missing)
        finally:
            self._loading -= 1
        # A notification that arrived while the query ran may describe a change the
        # query did not see: use the answer for this batch, but do not keep it. Only
        # for the device it names, when it names one; else for every device.
        keep = use_cache and self.listening and self._epoch == epoch
        changed = self._changed
        for device_id in missing:
            facts = loaded.get(device_id)
            found[device_id] = facts
            if keep and changed.get(device_id, 0) <= changes:
                self._remember(device_id, facts, now)
        if not self._loading:
            changed.clear()
        return found

    async def _load(self, device_ids: list[str]) -> dict[str, DeviceFacts]:
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

    async def record_firmware(self, rows: list[UsageRow]) -> int:
        """Record the firmware installations `rows` report; returns how many were new.

        Call before `enrich` on the same batch: the installations are added to the
        cached facts of their devices as well, so the batch's later events already
        carry the new version, and the notifications this process's own writes cause
        are not taken as news (they would only empty the cache of devices it has just
        brought up to date). A redelivered event, or one of an unregistered device,
        records nothing.
        """
        found: list[tuple[str, datetime, str, str]] = []
        by_device: dict[str, list[Install]] = {}
        for r in rows:
            if not r.schema.endswith(".firmware"):
                continue
            body = r.body
            if body.get("outcome") == "installed":
                install = (r.event_time, body["from_version"], body["to_version"])
                found.append((r.device_id, *install))
                by_device.setdefault(r.device_id, []).append(install)
        if not found:
            return 0
        if self._pool is None:
            raise RegistryLookupFailed("the enricher is not open")
        with translated(
            RegistryLookupFailed, f"recording {len(found)} firmware installations failed"
        ):
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                async with self._pool.acquire() as conn:
                    self._own_pids.add(conn.get_server_pid())
                    added = await conn.fetch(self._record_installs, *zip(*found, strict=True))
        # Merged into the cached facts once per device: a device's history can be long,
        # and a batch may carry many of its installations.
        for device_id, reported in by_device.items():
            read_at, facts = self._cache.get(device_id, (0.0, None))
            if facts is None:
                continue
            installs = merged_installs(facts.installs, reported)
            if installs is not facts.installs:
                self._cache[device_id] = (read_at, dataclasses.replace(facts, installs=installs))
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
                    owner_key(self._secret, owner) if linked and owner is not None else None,
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

    # -- the cache --------------------------------------------------------------------

    def _remember(self, device_id: str, facts: DeviceFacts | None, now: float) -> None:
        self._forget(device_id)
        self._cache[device_id] = (now, facts)
        if facts is not None:
            self._by_key[facts.device_key] = device_id
            for owner in facts.owners:
                self._by_owner.setdefault(owner, set()).add(device_id)
        while len(self._cache) > self._settings.cache_max_devices:
            self._forget(next(iter(self._cache)))

    def _forget(self, device_id: str) -> None:
        entry = self._cache.pop(device_id, None)
        if entry is None or entry[1] is None:
            return
        facts = entry[1]
        self._by_key.pop(facts.device_key, None)
        for owner in facts.owners:
            devices = self._by_owner.get(owner)
            if devices is not None:
                devices.discard(device_id)
                if not devices:
                    del self._by_owner[owner]

    def _clear(self) -> None:
        self._cache.clear()
        self._by_key.clear()
        self._by_owner.clear()
        self._epoch += 1

    # -- notifications --------------------------------------------------------------

    async def _listen(self) -> None:
        """(Re)open the listening connection; on failure, retry later with backoff."""
        try:
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                conn = await asyncpg.connect(self._dsn)
                await conn.add_listener(CHANNEL, self._on_notification)
        except DB_ERRORS as exc:
            self._listen_at = time.monotonic() + self._listen_wait
            log.warning(
                "cannot listen for registry changes (%r); registry cache off, retry in %.0fs",
                exc,
                self._listen_wait,
            )
            self._listen_wait = min(self._listen_wait * 2, _LISTEN_RETRY_S[1])
            return
        conn.add_termination_listener(self._on_lost)
        self._listener = conn
        self._listen_wait = _LISTEN_RETRY_S[0]
        self._clear()  # changes made while nobody listened were missed
        self._reconcile_at = 0.0  # and so may erasures have been
        self._metrics.registry_invalidations.labels("reset").inc()

    def _on_lost(self, conn: Any) -> None:
        log.warning("the registry notification connection was lost; registry cache off")
        self._listener = None
        self._listen_at = 0.0
        self._clear()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        schema, _, rest = str(payload).partition(" ")
        if schema != self._schema:
            return  # another registry schema on the same database
        kind, _, subject = rest.partition(" ")
        if kind == "device" and pid in self._own_pids:
            return  # a firmware installation `record_firmware` put in the cache itself
        self._metrics.registry_invalidations.labels(kind if kind in _KINDS else "other").inc()
        if kind == "device":
            self._changes += 1
            if self._loading:
                self._changed[subject] = self._changes
            self._forget(subject)
            return
        self._epoch += 1
        if kind == "device_key":
            device_id = self._by_key.get(int(subject))
            if device_id is not None:
                self._forget(device_id)
        elif kind in ("owner", "erased"):
            owner = UUID(subject)
            for device_id in list(self._by_owner.get(owner, ())):
                self._forget(device_id)
            if kind == "erased":
                self._erased.add(owner)
        else:  # a product model, or anything newer than this code: start afresh
            self._clear()

    # -- erasure --------------------------------------------------------------------

    async def apply_erasures(self, store: UsageStore) -> int:
        """Remove erased owners' keys from stored rows; returns the rows changed.

        Owners come from `erased` notifications and, at start-up, after a reconnect
        and every `cache_ttl_s`, from the registry's erased owners that
        `<table>_erasures` does not list. Call it after a batch has committed.
        """
        owners = set(self._erased)
        if time.monotonic() >= self._reconcile_at:
            owners.update(await erasure.erasures_pending(store, self._schema))
            self._reconcile_at = time.monotonic() + self._settings.cache_ttl_s
        if not owners:
            return 0
        ordered = sorted(owners)
        changed = await erasure.unlink_owners(
            store, [(o, owner_key(self._secret, o)) for o in ordered]
        )
        self._erased.difference_update(owners)
        self._metrics.owner_links_removed.inc(changed)
        log.info("removed the owner key of %d erased owner(s) from %d rows", len(ordered), changed)
        return changed


_KINDS = frozenset({"device", "device_key", "owner", "erased", "model"})


def with_local_owner_key(settings: Settings) -> Settings:
    """`settings` with `enrich.owner_key_secret` from `<run_dir>/enrich/owner_key_secret`
    when unset (generated there on first use, mode 0600), and a loud warning.

    For local runs only, like the local broker's logins: production sets
    USAGEPIPE_ENRICH__OWNER_KEY_SECRET from its secret store. Used by the CLI.
    """
    if settings.enrich.owner_key_secret is not None:
        return settings
    directory = settings.services.run_dir.resolve() / "enrich"
    path = directory / "owner_key_secret"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    secret = path.read_text().strip()
    log.warning(
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET is not set: owner keys use the local development "
        "key in %s. Never run production like this: set the variable, and keep it",
        path,
    )
    enrich = settings.enrich.model_copy(update={"owner_key_secret": SecretStr(secret)})
    return settings.model_copy(update={"enrich": enrich})
