"""The enricher's cache of the registry's device facts, bounded, and evicted by change.

Keyed by device id (an unknown device is cached too) and bounded
(`cache_max_devices`, oldest out first). The enricher uses an entry at most
`cache_ttl_s`, and only while the registry's notifications arrive
(`ingest.registry_changes`, which evicts the devices each change concerns).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from uuid import UUID

from ingest.registry_lookup import DeviceFacts, Install, merged_installs


@dataclass(frozen=True, slots=True)
class Query:
    """A registry query in flight: the cache's change counters when it began."""

    epoch: int
    changes: int


class FactsCache:
    """Device id -> (monotonic time read, facts or None for "not registered"), at most
    `max_devices` of them, oldest out first; indexed by device key and by owner, so
    that a change to either evicts the devices it concerns."""

    def __init__(self, max_devices: int) -> None:
        self._max_devices = max_devices
        self._cache: dict[str, tuple[float, DeviceFacts | None]] = {}
        self._by_key: dict[int, str] = {}
        self._by_owner: dict[UUID, set[str]] = {}
        # Bumped by a change that may concern any device (see `remember_answer`); a
        # device's own change instead records that device's change number.
        self._epoch = 0
        self._changes = 0
        self._changed: dict[str, int] = {}
        self._loading = 0

    def get(self, device_id: str) -> tuple[float, DeviceFacts | None] | None:
        """When `device_id`'s facts were read, and they, if cached."""
        return self._cache.get(device_id)

    @contextlib.contextmanager
    def query(self) -> Iterator[Query]:
        """While a registry query runs: the changes that arrive meanwhile are noted, so
        that `remember_answer` keeps only what they cannot have made stale."""
        query = Query(self._epoch, self._changes)
        self._loading += 1
        try:
            yield query
        finally:
            self._loading -= 1
            if not self._loading:
                self._changed.clear()

    def remember_answer(
        self, query: Query, device_id: str, facts: DeviceFacts | None, now: float
    ) -> None:
        """Remember what `query` answered for `device_id`, unless a change that arrived
        while it ran may describe something the query did not see: only one naming
        this device, when it names one; else for every device."""
        if self._epoch == query.epoch and self._changed.get(device_id, 0) <= query.changes:
            self._remember(device_id, facts, now)

    def add_installs(self, device_id: str, reported: list[Install]) -> None:
        """Firmware installations this process recorded, added to the device's cached
        facts (if any), which keep the time they were read."""
        read_at, facts = self._cache.get(device_id, (0.0, None))
        if facts is None:
            return
        installs = merged_installs(facts.installs, reported)
        if installs is not facts.installs:
            self._cache[device_id] = (read_at, dataclasses.replace(facts, installs=installs))

    # -- changes ----------------------------------------------------------------------

    def device_changed(self, device_id: str) -> None:
        self._changes += 1
        if self._loading:
            self._changed[device_id] = self._changes
        self._forget(device_id)

    def device_key_changed(self, device_key: int) -> None:
        self._epoch += 1
        device_id = self._by_key.get(device_key)
        if device_id is not None:
            self._forget(device_id)

    def owner_changed(self, owner: UUID) -> None:
        self._epoch += 1
        for device_id in list(self._by_owner.get(owner, ())):
            self._forget(device_id)

    def clear(self) -> None:
        """Forget every device: anything may have changed."""
        self._cache.clear()
        self._by_key.clear()
        self._by_owner.clear()
        self._epoch += 1

    # -- bookkeeping ------------------------------------------------------------------

    def _remember(self, device_id: str, facts: DeviceFacts | None, now: float) -> None:
        self._forget(device_id)
        self._cache[device_id] = (now, facts)
        if facts is not None:
            self._by_key[facts.device_key] = device_id
            for owner in facts.owners:
                self._by_owner.setdefault(owner, set()).add(device_id)
        while len(self._cache) > self._max_devices:
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
