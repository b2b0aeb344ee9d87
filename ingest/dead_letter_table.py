"""The dead letters' record in PostgreSQL: `<table>_dead_letters`, beside the usage table.

The dead-letter topic (`ingest.dead_letter`) is a stream for whoever wants to watch
refusals; this table is the record. Losing Kafka (a memory-only broker restarted, the
topic deleted) loses nothing the table holds, and `usagepipe dlq` reads it by default.

Who writes what, and in which order:

- The consumer's letters (records it refused: invalid, over the rate, unregistered,
  refused by PostgreSQL) go into the table in the batch's own transaction
  (`UsageStore.write(..., letters=...)`), with the rows and the offsets: a batch's
  letters are committed exactly when its rows are, and a redelivered batch (the
  transaction never committed, or a replay from stored offsets) writes nothing twice.
  Only then is the Kafka copy sent, with a bounded wait
  (`Consumer._copy_to_topic`): PostgreSQL first, because it is the record; a Kafka
  that is down or slow costs the topic its copy of those letters (counted in
  `usagepipe_consumer_errors_total{kind="dead_letter"}`, logged), never the record
  and never a stalled batch. A consumer killed between the commit and the send also
  leaves the topic without them; the table has them.
- The bridge's letters (MQTT messages refused before Kafka: too large, naming another
  device) exist first only on the dead-letter topic: the bridge has no database, and
  acknowledges the message to MQTT once Kafka confirmed the letter. `BridgeLetters`,
  a task of every consumer process, reads the topic in its own consumer group
  (`<consumer.group_id>.bridge-letters`) and stores the letters of kind `mqtt` (the
  consumer's own are in the table already), then commits its Kafka offsets. A letter
  Kafka lost before that task stored it (a memory-only broker restarted within that
  moment: a few hundredths of a second while a consumer runs, `bench/bridge_letters.py`;
  or while no consumer ran) is lost: the README says so.

Each letter has a `letter_key`, a SHA-256 of what names it: for a Kafka-sourced letter
its source topic, partition, offset and reason and its original bytes (the bytes too,
so a record at a reused offset of a re-created topic is not taken for an old one); for
a bridge letter its MQTT topic, reason, failure time (to the microsecond, set once by
the bridge) and original bytes. Inserting is `ON CONFLICT (letter_key) DO NOTHING`.
A replayed letter that is refused again is a new record (a new offset of the raw
topic), so a new letter, as on the topic.

A letter of a traced message keeps its `traceparent` (migration 009; `ingest.trace`),
so it can be followed from the table too, and `usagepipe dlq replay` carries it on.

Letters expire with the usage table's retention (`postgres.retention_days`, by
`failed_at`: `UsageTables.drop_expired`, so `usagepipe db retention`, and the
consumer beside its rollup refreshes, at most every `postgres.rollup_day_refresh_s`:
an indexed DELETE). Erasure (`ingest.erasure`) deletes the letters that carry the
erased owner's key: a letter gets the key the registry gives its device at its
failure time, exactly as a row gets it for its event time (so only where the owner
consented to the link; a letter of an unlinked owner's device, like that device's
rows, names no one). A bridge letter read again from the topic after its owner's
erasure deleted it (its offsets' commit had failed) comes back without the key: the
registry no longer links that device to anyone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from ingest.backoff import Backoff
from ingest.dead_letter import DeadLetter, letter_device
from ingest.errors import RegistryLookupFailed, StoreUnavailable
from ingest.kafka import make_consumer, running
from ingest.migrations import Connection
from ingest.postgres import translated
from ingest.settings import KafkaSettings
from ingest.trace import TRACEPARENT, header_value
from schemas.dead_letter import DeadLetterMessage, DeadLetterSource
from schemas.errors import Reason

log = logging.getLogger(__name__)

LETTER_COLUMNS = (
    "letter_key",
    "reason",
    "message",
    "device_id",
    "original",
    "source_kind",
    "source_topic",
    "source_partition",
    "source_offset",
    "failed_at",
    "model",
    "owner_key",
    "traceparent",
)


@dataclass(frozen=True, slots=True)
class LetterRow:
    """A dead letter as the table stores it: the letter, and what the registry said
    about its device when it failed (its model; its owner's key, where linked)."""

    letter: DeadLetter
    model: str | None = None
    owner_key: str | None = None

    def record(self) -> tuple[object, ...]:
        """The row in `LETTER_COLUMNS` order."""
        letter = self.letter
        device = letter_device(letter)
        return (
            letter_key(letter),
            letter.reason.value,
            _text(letter.message),
            None if device is None else _text(device),
            letter.original,
            letter.kind,
            _text(letter.topic),
            letter.partition,
            letter.offset,
            letter.failed_at,
            self.model,
            self.owner_key,
            _traceparent(letter),
        )


def letter_key(letter: DeadLetter) -> bytes:
    """What names `letter` for good (see the module docstring), as a SHA-256 digest."""
    names: tuple[str, ...]
    if letter.kind == "kafka":
        names = ("kafka", letter.topic, str(letter.partition), str(letter.offset))
    else:
        names = ("mqtt", letter.topic, letter.failed_at.isoformat())
    digest = hashlib.sha256("\x1f".join((*names, letter.reason.value, "")).encode())
    digest.update(letter.original)
    return digest.digest()


def _traceparent(letter: DeadLetter) -> str | None:
    """The letter's `traceparent` header as text (migration 009), if it was traced."""
    raw = header_value(letter.headers) if letter.headers else None
    return None if raw is None else _text(raw.decode("ascii", "replace"))


def _text(text: str) -> str:
    """`text` as PostgreSQL's text can hold it: no NUL, no lone surrogate (a letter's
    message may quote the bytes it refused)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def insert_sql(table: str) -> str:
    cols = ", ".join(LETTER_COLUMNS)
    return f"""
        INSERT INTO {table}_dead_letters ({cols})
        SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::bytea[],
            $6::text[], $7::text[], $8::integer[], $9::bigint[], $10::timestamptz[],
            $11::text[], $12::text[], $13::text[])
        ON CONFLICT (letter_key) DO NOTHING
    """


async def insert_letters(conn: Connection, table: str, letters: Sequence[LetterRow]) -> int:
    """Insert `letters` in the caller's transaction; returns how many were new."""
    if not letters:
        return 0
    columns = list(zip(*(row.record() for row in letters), strict=True))
    status = await conn.execute(insert_sql(table), *(list(c) for c in columns))
    return int(status.split()[-1])


async def expire_letters(conn: Connection, table: str, cutoff: datetime) -> int:
    """Delete the letters that failed before `cutoff`; returns how many."""
    status = await conn.execute(f"DELETE FROM {table}_dead_letters WHERE failed_at < $1", cutoff)
    return int(status.split()[-1])


async def erase_letters(conn: Connection, table: str, owner_keys: Sequence[str]) -> int:
    """Delete the letters linked to the owner with any of `owner_keys` (the owner's keys
    under each version, `ingest.owner_keys.keys_for`); returns how many."""
    status = await conn.execute(
        f"DELETE FROM {table}_dead_letters WHERE owner_key = ANY($1::text[])", list(owner_keys)
    )
    return int(status.split()[-1])


async def unlink_letters(
    conn: Connection, table: str, owner_key: str, failed_before: datetime | None
) -> int:
    """Remove `owner_key` from the letters linked to it that failed before
    `failed_before` (all: None); the letters stay, for replay. Returns how many."""
    status = await conn.execute(
        f"UPDATE {table}_dead_letters SET owner_key = NULL"
        " WHERE owner_key = $1 AND ($2::timestamptz IS NULL OR failed_at < $2)",
        owner_key,
        failed_before,
    )
    return int(status.split()[-1])


# -- reading -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableLetter:
    """One row of the dead-letter table: its id, and the letter it holds.

    `letter` is None (and `problem` says why) for a row this version cannot read (a
    reason a newer version added)."""

    letter_id: int
    letter: DeadLetter | None
    model: str | None
    stored_at: datetime
    problem: str = ""

    @property
    def position(self) -> str:
        """The letter's id, as `usagepipe dlq show` takes it."""
        return str(self.letter_id)


_SELECT = (
    "SELECT letter_id, reason, message, device_id, original, source_topic,"
    " source_partition, source_offset, failed_at, model, stored_at, traceparent"
    " FROM {t}_dead_letters"
)


def _table_letter(row: asyncpg.Record) -> TableLetter:
    try:
        doc = DeadLetterMessage(
            reason=Reason(row["reason"]),
            message=row["message"],
            source=DeadLetterSource(
                topic=row["source_topic"],
                partition=row["source_partition"],
                offset=row["source_offset"],
            ),
            original_b64=base64.b64encode(row["original"]).decode("ascii"),
            failed_at=row["failed_at"],
        )
    except (ValueError, ValidationError) as exc:
        return TableLetter(row["letter_id"], None, row["model"], row["stored_at"], str(exc))
    key = None if row["device_id"] is None else row["device_id"].encode()
    traced = row["traceparent"]
    headers = () if traced is None else ((TRACEPARENT, traced.encode()),)
    letter = DeadLetter(doc, key, headers)
    return TableLetter(row["letter_id"], letter, row["model"], row["stored_at"])


class LetterTable:
    """Reads `<table>_dead_letters` for `usagepipe dlq`, through `pool`."""

    def __init__(self, pool: asyncpg.Pool, table: str) -> None:
        self._pool = pool
        self.table = table
        self.name = f"{table}_dead_letters"

    async def exists(self) -> bool:
        with translated(StoreUnavailable, f"reading {self.name} failed"):
            found = await self._pool.fetchval("SELECT to_regclass($1)", self.name)
        return found is not None

    async def counts(self) -> Counter[str]:
        """How many letters the table holds, by reason."""
        with translated(StoreUnavailable, f"reading {self.name} failed"):
            rows = await self._pool.fetch(
                f"SELECT reason, count(*) AS n FROM {self.name} GROUP BY reason"
            )
        return Counter({r["reason"]: r["n"] for r in rows})

    async def newest(self, reason: Reason | None, limit: int) -> list[TableLetter]:
        """The newest `limit` letters (0: all), of `reason` if given, oldest first."""
        with translated(StoreUnavailable, f"reading {self.name} failed"):
            rows = await self._pool.fetch(
                _SELECT.format(t=self.table) + " WHERE ($1::text IS NULL OR reason = $1)"
                " ORDER BY failed_at DESC, letter_id DESC LIMIT $2::bigint",
                None if reason is None else reason.value,
                limit or None,
            )
        return [_table_letter(r) for r in reversed(rows)]

    async def at(self, letter_id: int | None, source: tuple[int, int] | None) -> list[TableLetter]:
        """The letter with `letter_id`, or those refused at source `(partition, offset)`."""
        with translated(StoreUnavailable, f"reading {self.name} failed"):
            if source is None:
                rows = await self._pool.fetch(
                    _SELECT.format(t=self.table) + " WHERE letter_id = $1", letter_id
                )
            else:
                rows = await self._pool.fetch(
                    _SELECT.format(t=self.table)
                    + " WHERE source_partition = $1 AND source_offset = $2 ORDER BY letter_id",
                    *source,
                )
        return [_table_letter(r) for r in rows]

    async def select(
        self, reason: Reason | None, from_id: int, to_id: int | None
    ) -> list[TableLetter]:
        """The letters of `reason` (any if None) with ids from `from_id` to `to_id`."""
        with translated(StoreUnavailable, f"reading {self.name} failed"):
            rows = await self._pool.fetch(
                _SELECT.format(t=self.table)
                + " WHERE ($1::text IS NULL OR reason = $1) AND letter_id >= $2"
                " AND ($3::bigint IS NULL OR letter_id <= $3) ORDER BY letter_id",
                None if reason is None else reason.value,
                from_id,
                to_id,
            )
        return [_table_letter(r) for r in rows]


# -- the bridge's letters ----------------------------------------------------------------

Describe = Callable[[list[DeadLetter]], Awaitable[list[LetterRow]]]
"""Turns letters into table rows with the registry's facts (`Enricher.describe_letters`)."""

Store = Callable[[list[LetterRow]], Awaitable[int]]
"""Stores letter rows in their own transaction (`UsageStore.write_letters`)."""


class BridgeLetters:
    """Copies the bridge's letters from the dead-letter topic into the table.

    `run()` loops until cancelled: a batch of the topic, its `mqtt` letters described
    and stored (retried while PostgreSQL or the registry is away), then its offsets
    committed to Kafka. A Kafka failure is logged and retried with backoff; it never
    ends the consumer this runs beside. At-least-once, and idempotent by letter key.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group_id: str,
        client_id: str,
        describe: Describe,
        store: Store,
        on_error: Callable[[], object] = lambda: None,
    ) -> None:
        self._settings = settings
        self._group_id = group_id
        self._client_id = client_id
        self._describe = describe
        self._store = store
        self._on_error = on_error
        self._reading = False  # since the last Kafka failure: a fetch came back
        self.stored = 0
        """Bridge letters stored that the table did not have yet."""

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            self._reading = False
            try:
                await self._follow()
            except KafkaError as exc:
                if self._reading:  # it had worked: a new outage starts short
                    backoff = Backoff()
                self._on_error()
                log.warning(
                    "reading the bridge's letters from %s failed (%r); again in %.1fs",
                    self._settings.dlq_topic,
                    exc,
                    backoff.delay_s,
                )
                await backoff.wait()

    async def _follow(self) -> None:
        consumer = make_consumer(
            self._settings,
            self._settings.dlq_topic,
            group_id=self._group_id,
            client_id=self._client_id,
            max_records=1000,
        )
        async with running(consumer):
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                self._reading = True
                letters = [
                    letter
                    for records in batch.values()
                    for record in records
                    if (letter := _bridge_letter(record)) is not None
                ]
                if letters:
                    self.stored += await self._stored(letters)
                if batch:
                    await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit what was read; a failed commit only means reading it again."""
        try:
            async with asyncio.timeout(self._settings.request_timeout_ms / 1000):
                await consumer.commit()
        except (KafkaError, TimeoutError) as exc:
            self._on_error()
            log.warning("committing the bridge letters' offsets failed (%r)", exc)

    async def _stored(self, letters: list[DeadLetter]) -> int:
        backoff = Backoff()
        while True:
            try:
                return await self._store(await self._describe(letters))
            except (StoreUnavailable, RegistryLookupFailed) as exc:
                self._on_error()
                log.warning("storing %d bridge letters failed (%s); retrying", len(letters), exc)
                await backoff.wait()


def _bridge_letter(record: ConsumerRecord) -> DeadLetter | None:
    """The bridge's letter in `record`; None for the consumer's (stored already) and for
    a record that is not a letter."""
    try:
        letter = DeadLetter.from_json(record.value or b"", record.key, record.headers)
    except ValidationError:
        return None
    return letter if letter.kind == "mqtt" else None
