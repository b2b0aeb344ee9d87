"""The registry's change notifications: a LISTEN connection that evicts the facts cache.

Invalidation, and its bound. Triggers on the registry's tables (devices/sql/002_notify,
the registry's migrations) `NOTIFY usagepipe_registry` when a change commits; a
dedicated connection LISTENs and evicts the devices concerned. A change is therefore
applied to every batch enriched after the notification arrives (milliseconds after the
commit); the batch already in hand is written as it was enriched. Backstops: an entry
is used at most `cache_ttl_s` (60 s); while the listening connection is down the cache
is not used at all (every batch asks the registry), and it is emptied when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Set
from typing import Any
from uuid import UUID

import asyncpg

from ingest.facts_cache import FactsCache
from ingest.metrics import ConsumerMetrics
from ingest.postgres import DB_ERRORS

log = logging.getLogger(__name__)

CHANNEL = "usagepipe_registry"
"""The NOTIFY channel of the registry's triggers (devices/sql/002_notify.sql)."""
_LISTEN_RETRY_S = (1.0, 30.0)  # first and longest wait between reconnect attempts
_KINDS = frozenset({"device", "device_key", "owner", "erased", "model"})


class ChangeListener:
    """LISTENs on `CHANNEL` for the changes of one registry schema and evicts the
    devices they concern from `cache`; notes the owners erased.

    `listen()` (re)opens the connection, `close()` closes it (idempotent). While it is
    down, `listening` is false and the cache must not be used.
    """

    def __init__(
        self,
        *,
        dsn: str,
        registry_schema: str,
        timeout_s: float,
        cache: FactsCache,
        metrics: ConsumerMetrics,
        own_pids: Set[int],
    ) -> None:
        self._dsn = dsn
        self._schema = registry_schema
        self._timeout_s = timeout_s
        self._cache = cache
        self._metrics = metrics
        self._own_pids = own_pids
        self._listener: asyncpg.Connection | None = None
        self.retry_at = 0.0
        """When `listen()` may be tried again after a failure (monotonic time)."""
        self._listen_wait = _LISTEN_RETRY_S[0]
        self.erased: set[UUID] = set()
        """Owners named by `erased` notifications, for the enricher to apply."""
        self.owners_changed: set[UUID] = set()
        """Owners named by `owner` notifications: a consent of theirs may have ended
        (`ingest.withdrawal`), for the enricher to look."""
        self.policies_changed = False
        """Whether a notification that empties the cache (a policy version published,
        devices/sql/008; a product model; a kind newer than this code) arrived: any
        consent may have ended."""

    @property
    def listening(self) -> bool:
        """Whether change notifications arrive (else the cache is bypassed)."""
        return self._listener is not None and not self._listener.is_closed()

    async def listen(self) -> bool:
        """(Re)open the listening connection; on failure, retry later with backoff.

        Returns whether it listens now; if so, the cache has been emptied, as changes
        made while nobody listened were missed."""
        try:
            async with asyncio.timeout(self._timeout_s):
                conn = await asyncpg.connect(self._dsn)
                await conn.add_listener(CHANNEL, self._on_notification)
        except DB_ERRORS as exc:
            self.retry_at = time.monotonic() + self._listen_wait
            log.warning(
                "cannot listen for registry changes (%r); registry cache off, retry in %.0fs",
                exc,
                self._listen_wait,
            )
            self._listen_wait = min(self._listen_wait * 2, _LISTEN_RETRY_S[1])
            return False
        conn.add_termination_listener(self._on_lost)
        self._listener = conn
        self._listen_wait = _LISTEN_RETRY_S[0]
        self._cache.clear()  # changes made while nobody listened were missed
        self._metrics.registry_invalidations.labels("reset").inc()
        return True

    async def close(self) -> None:
        """Close the listening connection. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.remove_termination_listener(self._on_lost)
            with contextlib.suppress(*DB_ERRORS):
                await listener.close()

    def _on_lost(self, conn: Any) -> None:
        log.warning("the registry notification connection was lost; registry cache off")
        self._listener = None
        self.retry_at = 0.0
        self._cache.clear()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        schema, _, rest = str(payload).partition(" ")
        if schema != self._schema:
            return  # another registry schema on the same database
        kind, _, subject = rest.partition(" ")
        if kind == "device" and pid in self._own_pids:
            return  # a firmware installation `record_firmware` put in the cache itself
        self._metrics.registry_invalidations.labels(kind if kind in _KINDS else "other").inc()
        if kind == "device":
            self._cache.device_changed(subject)
        elif kind == "device_key":
            self._cache.device_key_changed(int(subject))
        elif kind in ("owner", "erased"):
            owner = UUID(subject)
            self._cache.owner_changed(owner)
            if kind == "erased":
                self.erased.add(owner)
            else:
                self.owners_changed.add(owner)
        else:  # a product model, a policy, or anything newer than this code: start afresh
            self._cache.clear()
            self.policies_changed = True
