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
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError

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


def make_reader(settings: KafkaSettings, *, client_id: str) -> AIOKafkaConsumer:
    """A consumer of no group, for partitions assigned by hand (it commits nothing)."""
    _check(settings)
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        group_id=None,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        request_timeout_ms=settings.request_timeout_ms,
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


@dataclass(frozen=True, slots=True)
class TopicRepairs:
    """What one `ensure_topics` changed, and what it could not."""

    created: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)
    """Topics with fewer partitions than configured, given the rest (CreatePartitions)."""
    missing: list[str] = field(default_factory=list)
    """Topics not there and not created (not in `may_create`)."""
    short: dict[str, int] = field(default_factory=dict)
    """Topics with fewer partitions than configured (how many they have) that the broker
    cannot give more (it lacks CreatePartitions: the local Tansu)."""


def topic_configs(settings: KafkaSettings, topic: str) -> dict[str, str]:
    """The topic-level configs usagepipe creates `topic` with: its retention (the raw
    topic's, the dead-letter topic's, or `events_retention_h` for any other) and the
    cleanup policy."""
    hours = {
        settings.raw_topic: settings.raw_retention_h,
        settings.dlq_topic: settings.dlq_retention_h,
    }.get(topic, settings.events_retention_h)
    return {
        "retention.ms": str(round(hours * 3_600_000)),
        "cleanup.policy": settings.cleanup_policy,
    }


@contextlib.asynccontextmanager
async def admin_client(settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client for the block; any Kafka error in it is `BrokerUnavailable`."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=settings.request_timeout_ms,
    )
    try:
        await admin.start()
        yield admin
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"Kafka at {settings.bootstrap_servers} could not list/create topics: {exc!r}"
        ) from exc
    finally:
        await admin.close()


async def create_topics(
    admin: AIOKafkaAdminClient, settings: KafkaSettings, topics: Collection[str]
) -> dict[str, tuple[int, str | None]]:
    """Create `topics` with the configured partitions, replication and `topic_configs`;
    each topic's error code and message (0: created). aiokafka returns a topic's error
    instead of raising it; 36 is one another process created meanwhile."""
    response = await admin.create_topics(
        [
            NewTopic(
                t,
                settings.partitions,
                settings.replication_factor,
                topic_configs=topic_configs(settings, t),
            )
            for t in topics
        ]
    )
    errors = {t: (code, message) for t, code, message, *_ in response.topic_errors}
    return {t: errors.get(t, (0, None)) for t in topics}


async def ensure_topics(
    settings: KafkaSettings, *topics: str, may_create: Collection[str] | None = None
) -> TopicRepairs:
    """Create `topics` with the configured partitions where they do not exist yet (of
    those in `may_create`, if given), and add partitions to those that have fewer.

    Topics are listed, never asked for by name: on a broker that auto-creates topics
    (Tansu) a request naming a missing one creates it with the broker's defaults. The
    `TopicKeeper` creates a missing topic only where the broker refused a producer for
    it (see there): Tansu took records for topics it had lost in a restart, and a
    CreateTopics then dropped them (seen: 180 acknowledged, none readable).
    """
    repairs = TopicRepairs()
    async with admin_client(settings) as admin:
        existing = set(await admin.list_topics())
        absent = [t for t in topics if t not in existing]
        missing = [t for t in absent if may_create is None or t in may_create]
        repairs.missing.extend(t for t in absent if t not in missing)
        if missing:
            errors = await create_topics(admin, settings, missing)
            repairs.created.extend(t for t in missing if errors[t][0] == 0)
            if repairs.created:
                log.info("created topics %s", ", ".join(repairs.created))
        present = [t for t in topics if t in existing]
        for described_topic in await admin.describe_topics(present) if present else []:
            topic, count = described_topic["topic"], len(described_topic["partitions"])
            if described_topic["error_code"] or count >= settings.partitions:
                continue
            try:
                await admin.create_partitions({topic: NewPartitions(settings.partitions)})
            except IncompatibleBrokerVersion:
                repairs.short[topic] = count
                continue
            repairs.grown.append(topic)
            log.warning(
                "topic %s had %d partitions, fewer than kafka.partitions: now %d",
                topic,
                count,
                settings.partitions,
            )
    return repairs


# While Kafka does not answer, how often the keeper tries again (one connection a try).
_OUTAGE_CHECK_S = 0.2


class TopicKeeper:
    """Keeps the topics a bridge or consumer uses at `kafka.partitions` while it runs.

    `run()` checks every `kafka.topic_check_s`, and every 0.2 s after a check or a
    client (`nudge()`) met a broker that does not answer. A topic with fewer partitions
    than configured gets the rest. A missing topic is created only once a producer was
    refused for it as unknown (a broker with auto-creation off, as
    deploy/kafka/server.properties has it, accepts nothing for it meanwhile): a broker
    that auto-creates topics takes records for one it lost in a restart, and creating
    it then drops them. The local Tansu does, and lists the topics it auto-created as
    missing: `bench/kafka_restart.py` lost 33, 691 and 799 acknowledged records of
    15,000 when the checks created them, 0 in three runs when they did not.
    So after a Tansu restart the topics come back from the clients' own requests with
    its 4 partitions; it lacks CreatePartitions, so they stay so (reported as `short`
    where a check sees it). Each repair is logged and handed
    to `on_repair(action, topics)`
    (action: created, grown, short).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *topics: str,
        on_repair: Callable[[str, int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._on_repair = on_repair
        self._due = asyncio.Event()
        self._short: dict[str, int] = {}
        self._missing: set[str] = set()
        self._refused = False
        """A producer was refused for an unknown topic since the last creation."""
        self.checks = 0
        self.unreachable: str | None = None
        """Why the last check found Kafka not answering; None once one succeeds
        (`readiness()` of the bridge and the consumer reads it)."""

    def nudge(self, *, unknown_topic: bool = False) -> None:
        """A client lost the broker: check now, and often until it answers. With
        `unknown_topic`, the broker refused a record for a topic it does not have: the
        topics found missing may then be created."""
        self._refused = self._refused or unknown_topic
        self._due.set()

    async def run(self) -> None:
        outage = False
        while True:
            wait_s = _OUTAGE_CHECK_S if outage else self._settings.topic_check_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._due.wait()
            if self._due.is_set():
                self._due.clear()
                outage = True
            try:
                await self.check()
            except BrokerUnavailable as exc:
                if not outage:
                    log.warning("topic check failed (%s); trying every %gs", exc, _OUTAGE_CHECK_S)
                outage = True
                self.unreachable = f"unreachable: {exc}"
                continue
            outage = False
            self.unreachable = None

    async def check(self) -> TopicRepairs:
        """One check; `BrokerUnavailable` if Kafka does not answer."""
        due = set(self._missing) if self._refused else set()
        repairs = await ensure_topics(self._settings, *self._topics, may_create=due)
        self._missing = set(repairs.missing)
        if repairs.created:
            self._refused = False
        self.checks += 1
        if repairs.created:
            log.warning("topics %s were missing: created again", ", ".join(repairs.created))
        newly_short = [t for t, n in repairs.short.items() if self._short.get(t) != n]
        for topic in newly_short:
            count = repairs.short[topic]
            log.warning(
                "topic %s has %d partitions, fewer than kafka.partitions (%d), and the "
                "broker cannot add partitions (no CreatePartitions); records keep flowing "
                "on its %d. To get %d back, stop the producers, let the consumers drain "
                "it, delete the topic and start again",
                topic,
                count,
                self._settings.partitions,
                count,
                self._settings.partitions,
            )
        self._short = dict(repairs.short)
        if self._on_repair is not None:
            for action, n in (
                ("created", len(repairs.created)),
                ("grown", len(repairs.grown)),
                ("short", len(newly_short)),
            ):
                if n:
                    self._on_repair(action, n)
        return repairs
