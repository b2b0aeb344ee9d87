"""What the registry tells the rest of usagepipe: events on Kafka, keyed by device id.

Event types (the `event_type` field and the `event_type` record header):

- `device.registered`: an owner registered a unit; payload has device_id, model_number,
  owner_id, valid_from.
- `device.transferred`: ownership moved (direct transfer or stated resale); payload has
  device_id, from_owner_id, to_owner_id, valid_from.
- `device.credentials_revoked`: the device's MQTT secret stopped being valid (revoked
  by its owner, released, or its owner erased); payload has device_id and why.
- `owner.erased`: an owner's personal data and links were erased; keyed by the owner
  id (it concerns an owner, not one device); payload has only owner_id, so consumers
  holding copies of the owner link (the usage store) can drop them. It deliberately
  does not list the owner's devices: that would re-create the link being erased.

Every payload carries `event_id` (a UUID), `event_type` and `occurred_at`.

Delivery is at-least-once, through a transactional outbox: the registry writes the
event in the same PostgreSQL transaction as the change, then, after the commit,
publishes pending events in order and marks them published. A crash between the two
leaves the event pending and the next flush sends it, so consumers see every event at
least once and must be idempotent on `event_id`. Publishing before the commit was
rejected: it would announce changes that may then roll back.

Names and contacts never appear in events; owner ids are random UUIDs.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from devices.errors import RegistryUnavailable
from ingest.kafka import make_producer, running
from ingest.settings import KafkaSettings

log = logging.getLogger(__name__)

DEVICE_REGISTERED = "device.registered"
DEVICE_TRANSFERRED = "device.transferred"
CREDENTIALS_REVOKED = "device.credentials_revoked"
OWNER_ERASED = "owner.erased"


class EventPublisher(Protocol):
    """Where registry events go. Kafka in production; tests may record them."""

    async def publish(self, event_type: str, key: str, payload: dict[str, Any]) -> None:
        """Deliver one event durably (return only once it is stored), or raise."""
        ...


def new_event(event_type: str, occurred_at: datetime, data: Mapping[str, Any]) -> dict[str, Any]:
    """An event payload: `data` plus a fresh `event_id`, the type and the time."""
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": occurred_at.isoformat(),
        **data,
    }


class KafkaEventPublisher:
    """Publishes registry events as JSON to one Kafka topic, keyed for per-device order.

    The producer comes from `ingest.kafka.make_producer`, the one place producer safety
    is stated (acks=all; idempotence from settings, off for the local Tansu broker,
    whose duplicates from retries are harmless since consumers deduplicate on
    `event_id`). Each event is sent and awaited alone, so it does not linger.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str,
        client_id: str = "usagepipe-registry",
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Self:
        producer = make_producer(self._settings, client_id=self._client_id, linger_ms=0)
        stack = contextlib.AsyncExitStack()
        try:
            self._producer = await stack.enter_async_context(running(producer))
        except KafkaError as exc:
            raise RegistryUnavailable(f"cannot reach Kafka for registry events: {exc}") from exc
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Flush and close the producer; harmless when already closed."""
        stack, self._stack = self._stack, None
        self._producer = None
        if stack is not None:
            await stack.aclose()

    async def publish(self, event_type: str, key: str, payload: dict[str, Any]) -> None:
        """Send one event and wait for the broker's acknowledgement."""
        if self._producer is None:
            raise RuntimeError("KafkaEventPublisher is not started (use `async with`)")
        try:
            await self._producer.send_and_wait(
                self._topic,
                value=orjson.dumps(payload),
                key=key.encode(),
                headers=[("event_type", event_type.encode())],
            )
        except KafkaError as exc:
            raise RegistryUnavailable(f"could not publish {event_type} for {key}: {exc}") from exc
        log.debug("published %s for %s", event_type, key)
