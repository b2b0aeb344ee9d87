"""The one place that configures Kafka clients.

aiokafka's defaults are wrong for this job (acks=1, auto-commit on, offset reset
`latest`), so every client usagepipe makes is built here with each of those stated:

- producers: acks=all, idempotence from settings (off only for brokers without
  InitProducerId, such as the local Tansu), bounded linger and batch size;
- consumers: auto-commit off (offsets are committed after the database commits), offset
  reset `earliest` (a new group reads everything; `latest` would skip what arrived
  before it joined), read_committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.errors import BrokerUnavailable, ConfigurationError
from ingest.settings import KafkaSettings

log = logging.getLogger(__name__)

_Client = TypeVar("_Client", AIOKafkaProducer, AIOKafkaConsumer)

# Stated once: the consumer settings usagepipe never runs without.
CONSUMER_SAFETY: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "isolation_level": "read_committed",
}


def _check(settings: KafkaSettings) -> None:
    if settings.acks != "all":  # the settings type already forbids it; keep the guard
        raise ConfigurationError(f"kafka.acks must be 'all', not {settings.acks!r}")


def make_producer(
    settings: KafkaSettings, *, client_id: str, linger_ms: int | None = None
) -> AIOKafkaProducer:
    """A producer that confirms a send only once every in-sync replica has it.

    `linger_ms` overrides the setting for a producer that sends one record at a time
    and waits for it (a batch that never fills would only add the linger to each send).
    """
    _check(settings)
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=settings.linger_ms if linger_ms is None else linger_ms,
        max_batch_size=settings.max_batch_bytes,
        request_timeout_ms=settings.request_timeout_ms,
    )


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str, client_id: str, max_records: int
) -> AIOKafkaConsumer:
    """A group consumer that never commits by itself and starts new groups at `earliest`."""
    _check(settings)
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        max_poll_records=max_records,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        request_timeout_ms=max(settings.request_timeout_ms, settings.session_timeout_ms + 5000),
        **CONSUMER_SAFETY,
    )


@contextlib.asynccontextmanager
async def running(client: _Client) -> AsyncIterator[_Client]:
    """`client` started for the block, and always stopped after it.

    aiokafka's own `async with` stops only a client whose `start()` returned; one that
    failed half way (bootstrap done, the coordinator not) keeps its connections. Here
    `stop()` runs either way (it is idempotent), after one turn of the loop: a group-less
    consumer's coordinator starts a task in `start()`, and stopping before that task
    first ran raises CancelledError out of `stop()`.
    """
    try:
        await client.start()
        yield client
    finally:
        await asyncio.sleep(0)
        await client.stop()


async def ensure_topics(settings: KafkaSettings, *topics: str) -> None:
    """Create `topics` with the configured partitions where they do not exist yet."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=settings.request_timeout_ms,
    )
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(t, settings.partitions, settings.replication_factor) for t in missing]
                )
                log.info("created topics %s", ", ".join(missing))
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"Kafka at {settings.bootstrap_servers} could not list/create topics: {exc!r}"
        ) from exc
    finally:
        await admin.close()
