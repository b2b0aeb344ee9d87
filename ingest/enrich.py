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
                        (not erased, product-planning consent in force: given, and
                        not lapsed by a newer policy version), which the lookup joins
    region, membership_tier, owner_key
                        only when that owner may be attributed; else None.
                        owner_key = HMAC-SHA256(the current version's secret, owner
                        id), hex, first 32 digits, with the version (`ingest.owner_keys`).
                        The secret is never stored, nor logged.

Consent is read as of processing, not as of event time: consent is to what is done
with the data now, so a withdrawal stops linking at once, late events from before it
included; the consent audit trail (which erasure deletes) is not needed per event.

A device the registry does not know is returned in `Enriched.unregistered`; the
consumer dead-letters it (`unregistered_device`) or, with `enrich.unregistered=store`,
stores it unenriched.

Its collaborators, one module each:

    registry_lookup.py   the registry's queries, and the device facts they return
    facts_cache.py       those facts cached per device, bounded
    registry_changes.py  the LISTEN connection whose notifications evict the cache
    owner_keys.py        the owners' pseudonymous keys

Freshness: a change in the registry applies to every batch enriched after its
notification arrives, milliseconds after the commit; the batch already in hand is
written as it was enriched (the bound and its backstops: `ingest.registry_changes`).

Erasure. An `erased` notification, and a check at start-up and every `cache_ttl_s` for
erased owners `<table>_erasures` does not list yet, make `apply_erasures` remove those
owners' keys from stored rows (`ingest.erasure.unlink_owners`). The consumer calls it after
each batch commit, so rows of a batch enriched before the erasure lose their key too.
The same call unlinks the rows stored under an analytics consent that has ended since
(withdrawn, or lapsed by a re-asking policy version: `ingest.withdrawal`), looked for
on an owner or policy notification and on the same schedule.

A lookup is bounded by `lookup_timeout_s`; a failure raises `RegistryLookupFailed`,
and the consumer retries the batch with backoff: nothing is stored unenriched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self
from uuid import UUID

from ingest import erasure, withdrawal
from ingest.dead_letter import DeadLetter, letter_device
from ingest.dead_letter_table import LetterRow
from ingest.facts_cache import FactsCache
from ingest.metrics import ConsumerMetrics
from ingest.owner_keys import keys_for, load_secrets
from ingest.registry_changes import ChangeListener
from ingest.registry_lookup import DeviceFacts, Install, RegistryLookup
from ingest.rows import UsageRow
from ingest.settings import EnrichSettings
from ingest.store import UsageStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Enriched:
    """A batch after enrichment: rows to store, and rows of unknown devices."""

    rows: list[UsageRow]
    unregistered: list[UsageRow]


def with_facts(r: UsageRow, f: DeviceFacts) -> UsageRow:
    """Row `r` with the registry's facts `f` about its device at its event time."""
    p = f.period_at(r.event_time)
    # The constructor, not dataclasses.replace(): half the cost per row; positional,
    # in the fields' order (model, firmware, region, category, tier, channel, consent,
    # owner key), cheaper again than by keyword.
    if p is None:  # nobody owned the device then (before registration, a gap)
        return UsageRow(
            r.device_id, r.boot_id, r.seq, r.event_time, r.schema, r.schema_version, r.body,
            r.kafka_partition, r.kafka_offset, f.model, f.firmware_at(r.event_time), None,
            f.category, None, None, None, None, r.source, r.body_json,
        )  # fmt: skip
    return UsageRow(
        r.device_id, r.boot_id, r.seq, r.event_time, r.schema, r.schema_version, r.body,
        r.kafka_partition, r.kafka_offset, f.model, f.firmware_at(r.event_time), p.region,
        f.category, p.membership_tier, p.purchase_channel, p.linked, p.owner_key, r.source,
        r.body_json,
    )  # fmt: skip


class Enricher:
    """Registry lookups for the consumer, cached and invalidated by NOTIFY.

    An async context manager: entering opens a small pool and the listening
    connection. The registry's schema (its tables, notification triggers and firmware
    history) is the registry's to create (`devices.schema.migrate_registry`, run by
    `usagepipe consume` and `usagepipe registry migrate`); without it, entering refuses
    with a `ConfigurationError` saying so. The owner-key secrets are read when it is
    made (`ingest.owner_keys.load_secrets`): none configured, or a secrets file missing
    or malformed, is a `ConfigurationError` naming the setting, file or line.
    """

    def __init__(
        self,
        settings: EnrichSettings,
        *,
        registry_schema: str,
        dsn: str,
        metrics: ConsumerMetrics,
    ) -> None:
        self._settings = settings
        # Every version's secret, not only the current one's: erasure looks owners up
        # under each (`ingest.owner_keys.keys_for`).
        self._secrets = load_secrets(settings)
        self._schema = registry_schema
        self._metrics = metrics
        self._registry = RegistryLookup(
            settings, registry_schema=registry_schema, dsn=dsn, secrets=self._secrets
        )
        self._cache = FactsCache(settings.cache_max_devices)
        self._changes = ChangeListener(
            dsn=dsn,
            registry_schema=registry_schema,
            timeout_s=settings.lookup_timeout_s,
            cache=self._cache,
            metrics=metrics,
            own_pids=self._registry.own_pids,
        )
        self._reconcile_at = 0.0
        self._swept = False  # ended consents: the first look reads the whole history

    async def __aenter__(self) -> Self:
        await self._registry.open()
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
        await self._changes.close()
        await self._registry.close()

    @property
    def listening(self) -> bool:
        """Whether change notifications arrive (else the cache is bypassed)."""
        return self._changes.listening

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
            out.append(with_facts(r, f))
        if unknown:
            self._metrics.unregistered.inc(len(unknown))
        return Enriched(out, unknown)

    async def describe_letters(self, letters: list[DeadLetter]) -> list[LetterRow]:
        """`letters` as the dead-letter table stores them: with their device's model
        and, where the device had a linked owner when the letter failed, that owner's
        key (so that erasure finds the letter, `ingest.erasure`); a letter's device is
        its Kafka key. From the cache where fresh, as for `enrich`."""
        if not letters:
            return []
        devices = {d for letter in letters if (d := letter_device(letter)) is not None}
        facts = await self._lookup(devices) if devices else {}
        described: list[LetterRow] = []
        for letter in letters:
            device = letter_device(letter)
            f = None if device is None else facts.get(device)
            if f is None:
                described.append(LetterRow(letter))
                continue
            p = f.period_at(letter.failed_at)
            described.append(LetterRow(letter, f.model, None if p is None else p.owner_key))
        return described

    async def _lookup(self, device_ids: set[str]) -> dict[str, DeviceFacts | None]:
        """Each device's facts, from the cache where fresh, else in one query."""
        if not self.listening and time.monotonic() >= self._changes.retry_at:
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
        with self._cache.query() as query:
            started = time.perf_counter()
            loaded = await self._registry.load(missing)
            self._metrics.registry_lookup_seconds.observe(time.perf_counter() - started)
            # A notification that arrived while the query ran may describe a change
            # the query did not see: use the answer for this batch, but do not keep it
            # (the cache decides, per device).
            keep = use_cache and self.listening
            for device_id in missing:
                facts = loaded.get(device_id)
                found[device_id] = facts
                if keep:
                    self._cache.remember_answer(query, device_id, facts, now)
        return found

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
        added = await self._registry.record_firmware(found)
        # Merged into the cached facts once per device: a device's history can be long,
        # and a batch may carry many of its installations.
        for device_id, reported in by_device.items():
            self._cache.add_installs(device_id, reported)
        return added

    async def _listen(self) -> None:
        if await self._changes.listen():
            self._reconcile_at = 0.0  # erasures may have been missed too

    # -- erasure --------------------------------------------------------------------

    def owner_keys(self, owner: UUID) -> tuple[str, ...]:
        """Every key `owner`'s rows may be stored under (erasure and ended consents
        unlink each)."""
        return tuple(keys_for(self._secrets, owner))

    async def apply_erasures(self, store: UsageStore) -> int:
        """Remove erased owners' keys from stored rows, and the keys of owners whose
        analytics consent ended from the rows stored under it; returns the rows changed.

        Owners come from `erased` notifications and, at start-up, after a reconnect
        and every `cache_ttl_s`, from the registry's erased owners that
        `<table>_erasures` does not list. Ended consents (`ingest.withdrawal`) are
        looked for on an owner or policy notification and on the same schedule. Call
        it after a batch has committed.
        """
        owners: set[UUID] = set(self._changes.erased)
        reconcile = time.monotonic() >= self._reconcile_at
        if reconcile:
            owners.update(await erasure.erasures_pending(store, self._schema))
            self._reconcile_at = time.monotonic() + self._settings.cache_ttl_s
        changed = 0
        if owners:
            ordered = sorted(owners)
            changed = await erasure.unlink_owners(store, [(o, self.owner_keys(o)) for o in ordered])
            await withdrawal.forget(store, ordered)
            self._changes.erased.difference_update(owners)
            self._metrics.owner_links_removed.inc(changed)
            log.info(
                "removed the owner key of %d erased owner(s) from %d rows", len(ordered), changed
            )
        changed += await self._apply_ended_consents(store, everyone=reconcile)
        if reconcile:
            # What is left after this pass: for the erasures-pending alert.
            pending, oldest = await erasure.erasure_backlog(store, self._schema)
            self._metrics.erasures_pending.set(pending)
            self._metrics.erasure_oldest_pending.set(0 if oldest is None else oldest.timestamp())
        return changed

    async def _apply_ended_consents(self, store: UsageStore, *, everyone: bool) -> int:
        """Unlink what was stored under ended consents: of every owner on the
        schedule or after a policy notification, else of the owners notifications
        named since the last call (none: nothing to ask)."""
        changes = self._changes
        everyone = everyone or changes.policies_changed
        named = set(changes.owners_changed)
        if not everyone and not named:
            return 0
        changes.policies_changed = False
        try:
            ends = await withdrawal.ends_pending(
                store,
                self._schema,
                None if everyone else named,
                whole_history=everyone and not self._swept,
            )
            changed = await withdrawal.unlink_ended(
                store, [(end, self.owner_keys(end.owner_id)) for end in ends]
            )
        except BaseException:
            changes.policies_changed |= everyone  # asked again on the next call
            raise
        changes.owners_changed.difference_update(named)
        self._swept = self._swept or everyone
        if not ends:
            return 0
        self._metrics.consent_links_removed.inc(changed)
        log.info(
            "removed the owner key from %d rows stored under %d ended analytics consent(s)",
            changed,
            len(ends),
        )
        return changed
