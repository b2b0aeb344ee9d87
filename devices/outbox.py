"""The registry's transactional outbox: events written with the change, sent after it.

`enqueue()` runs inside the registry's transaction and stores the event next to the
change it describes; `flush()` publishes pending events in the order they were written
and marks each as published. Flushes of one schema take turns on an advisory lock, so
two processes never interleave events (per-device order is kept) and an event is
published twice only when a crash or a publish error strikes between sending and
marking: at-least-once, with `event_id` for consumers to deduplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from devices.events import EventPublisher, new_event
from ingest.migrations import Connection, advisory_lock_key

log = logging.getLogger(__name__)


async def enqueue(
    conn: Connection,
    event_type: str,
    key: str,
    occurred_at: datetime,
    data: Mapping[str, Any],
) -> str:
    """Write one event to the outbox (in the caller's transaction); return its id."""
    payload = new_event(event_type, occurred_at, data)
    await conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_key, payload, created_at)"
        " VALUES ($1::uuid, $2, $3, $4::jsonb, $5)",
        payload["event_id"],
        event_type,
        key,
        orjson.dumps(payload).decode(),
        occurred_at,
    )
    return str(payload["event_id"])


async def flush_batch(
    conn: Connection, publisher: EventPublisher, *, schema: str, limit: int
) -> tuple[int, bool, Exception | None]:
    """Publish up to `limit` pending events; return (sent, more may be pending, error).

    Must run inside a transaction with `search_path` set to the registry's schema. A
    failed publish stops the batch and is returned, not raised, so that the caller's
    transaction commits the marks of the events already sent.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", advisory_lock_key("outbox", schema))
    rows = await conn.fetch(
        "SELECT event_seq, event_type, event_key, payload FROM event_outbox"
        " WHERE published_at IS NULL ORDER BY event_seq LIMIT $1",
        limit,
    )
    sent = 0
    for row in rows:
        payload: dict[str, Any] = orjson.loads(row["payload"])
        try:
            await publisher.publish(row["event_type"], row["event_key"], payload)
        except Exception as exc:  # any publisher failure: keep the event pending
            log.warning("publishing %s failed, it stays pending: %s", row["event_type"], exc)
            return sent, True, exc
        await conn.execute(
            "UPDATE event_outbox SET published_at = clock_timestamp() WHERE event_seq = $1",
            row["event_seq"],
        )
        sent += 1
    return sent, len(rows) == limit, None


async def prune(conn: Connection, published_before: datetime) -> int:
    """Delete events published before the cutoff; return how many.

    Published events are Kafka's to keep from then on; the outbox is a queue, not an
    archive, and pruning it also keeps owner ids from piling up in it.
    """
    result = await conn.execute(
        "DELETE FROM event_outbox WHERE published_at < $1", published_before
    )
    return int(result.split()[-1])


async def flush(
    transaction: Callable[[], AbstractAsyncContextManager[Connection]],
    publisher: EventPublisher,
    *,
    schema: str,
    limit: int,
    retention: timedelta,
) -> int:
    """Publish every pending event, a batch of `limit` per `transaction()`, then prune
    those published longer than `retention` ago; return how many were sent.

    A publishing failure is logged and the events stay pending (the changes they
    describe are committed and stand); the next flush sends them.
    """
    total = 0
    while True:
        async with transaction() as conn:
            sent, more, error = await flush_batch(conn, publisher, schema=schema, limit=limit)
        total += sent
        if error is not None:
            return total
        if not more:
            break
    async with transaction() as conn:
        await prune(conn, datetime.now(UTC) - retention)
    return total


async def pending(conn: Connection) -> int:
    """How many events wait to be published."""
    count: int = await conn.fetchval("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")
    return count
