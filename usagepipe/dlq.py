"""`usagepipe dlq`: read the dead letters, and replay what a fix made good.

    usagepipe dlq list [--reason R] [--limit N] [--source kafka]   the newest letters
    usagepipe dlq show POSITION [--source kafka]                   one letter in full
    usagepipe dlq replay [--reason R] [--from-id N] [--to-id N] [--dry-run]
    usagepipe dlq replay --source kafka [--reason R] [--partition P]
                         [--from-offset N] [--to-offset N] [--dry-run]

By default all three read the record, the usage database's dead-letter table
(`ingest.dead_letter_table`, which Kafka's loss does not touch). There a letter's
position is its id (`17`), as `dlq list` prints it, or for `show` the position of the
Kafka record it was made from (`2:17`: partition 2, offset 17 of the raw topic, which
may name several letters). `list` starts with the letters' counts by reason.

With `--source kafka` they read the dead-letter topic instead, through
`DeadLetterReader`, from the beginning (or `--from-offset`) to the end, with no consumer
group; a position is then `partition:offset` in that topic (the topic has several
partitions, so an offset alone may name more than one letter).

Replay produces each selected letter's original bytes, with its original key, to
`kafka.raw_topic` (acks=all), where the consumer takes them like any other record: one
already stored changes nothing (the store keys on device, boot and seq), and one that
is still invalid is dead-lettered again, as a new letter. Each carries the header
`ingest.rate_limit.REPLAY_HEADER` (the letter's reason), which exempts it from the
per-device ceiling: `rate_limited` letters are stored when replayed, however fast the
replay produces them. The selection is read to the
end before anything is produced, so one run never replays the letters it causes.

Letters refused for DEVICE_ID_MISMATCH are never replayed: the bridge refused them
because a device spoke for another, and nothing after the bridge repeats that check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

from aiokafka.errors import KafkaError

from ingest.dead_letter import DeadLetter, DeadLetterReader, StoredLetter
from ingest.dead_letter_table import LetterTable
from ingest.errors import BrokerUnavailable, StoreUnavailable
from ingest.kafka import ensure_topics, make_producer, running
from ingest.rate_limit import REPLAY_HEADER
from ingest.settings import KafkaSettings, PostgresSettings, Settings
from ingest.store import UsageStore
from schemas.errors import Reason
from usagepipe.dlq_format import print_letter, print_table

NEVER_REPLAYED = frozenset({Reason.DEVICE_ID_MISMATCH})
"""Reasons whose letters replay skips: the check that refused them is the bridge's alone."""

_SEND_WINDOW = 1000  # records handed to the producer before waiting for Kafka's acks


@dataclass
class ReplayReport:
    """What one replay did (or, with dry_run, would do)."""

    replayed: Counter[str] = field(default_factory=Counter)
    """Letters whose original was produced to the raw topic, by reason."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Letters selected but never replayed (NEVER_REPLAYED), by reason."""
    unreadable: int = 0
    """Records of the dead-letter topic that are not dead letters."""
    dry_run: bool = False


def parse_position(text: str) -> tuple[int | None, int]:
    """`3:17` -> (3, 17); `17` -> (None, 17): an offset in whichever partition has it."""
    partition, _, offset = text.rpartition(":")
    try:
        parsed = (int(partition) if partition else None, int(offset))
    except ValueError:
        parsed = (None, -1)
    if parsed[1] < 0 or (parsed[0] is not None and parsed[0] < 0):
        raise ValueError(f"not a position: {text!r} (use PARTITION:OFFSET, e.g. 2:17)")
    return parsed


async def list_letters(
    settings: KafkaSettings,
    *,
    reason: Reason | None = None,
    limit: int = 50,
    out: TextIO = sys.stdout,
    idle_s: float = 1.0,
) -> int:
    """Print the newest `limit` letters (0: all), of `reason` if given; returns how many."""
    by_reason: Counter[str] = Counter()
    newest: list[tuple[datetime, int, int, StoredLetter]] = []  # a min-heap on failed_at
    total = 0
    unreadable: list[str] = []
    async with DeadLetterReader(settings, idle_s=idle_s) as reader:
        async for stored in reader:
            total += 1
            if stored.letter is None:
                unreadable.append(stored.position)
                continue
            by_reason[stored.letter.reason.value] += 1
            if reason is not None and stored.letter.reason is not reason:
                continue
            entry = (stored.letter.failed_at, stored.partition, stored.offset, stored)
            if limit and len(newest) >= limit:
                heapq.heappushpop(newest, entry)
            else:
                heapq.heappush(newest, entry)
    shown = [entry[3] for entry in sorted(newest)]
    summary = ", ".join(f"{r} {n}" for r, n in sorted(by_reason.items()))
    records = "record" if total == 1 else "records"
    print(f"{settings.dlq_topic}: {total} {records} ({summary or 'no dead letters'})", file=out)
    if unreadable:
        listed = ", ".join(unreadable[:10]) + (", ..." if len(unreadable) > 10 else "")
        print(f"not dead letters (see `dlq show`): {listed}", file=out)
    matching = by_reason[reason.value] if reason is not None else total - len(unreadable)
    print_table("POSITION", shown, matching, reason, out)
    return len(shown)


async def list_table_letters(
    settings: PostgresSettings,
    *,
    reason: Reason | None = None,
    limit: int = 50,
    out: TextIO = sys.stdout,
) -> int:
    """Print the counts by reason and the newest `limit` letters (0: all) of the
    dead-letter table, of `reason` if given; returns how many letters were printed."""
    async with letter_table(settings) as table:
        counts = await table.counts()
        shown = await table.newest(reason, limit)
    total = sum(counts.values())
    summary = ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
    letters = "letter" if total == 1 else "letters"
    print(f"{table.name}: {total} {letters} ({summary or 'no dead letters'})", file=out)
    matching = counts[reason.value] if reason is not None else total
    print_table("ID", shown, matching, reason, out)
    return len(shown)


@contextlib.asynccontextmanager
async def letter_table(settings: PostgresSettings) -> AsyncIterator[LetterTable]:
    """The usage table's dead-letter table, read through a small pool for the block."""
    async with UsageStore(settings) as store:
        table = LetterTable(store.pool, store.table)
        if not await table.exists():
            raise StoreUnavailable(
                f"usage table {store.table!r} has no dead-letter table ({table.name}) yet;"
                " `usagepipe db migrate` creates it"
            )
        yield table


async def show_letter(
    settings: KafkaSettings,
    position: tuple[int | None, int],
    *,
    out: TextIO = sys.stdout,
    idle_s: float = 1.0,
) -> int:
    """Print the letter at `position` in full; returns the exit status (1: none, 2: which?)."""
    partition, offset = position
    found: list[StoredLetter] = []
    async with DeadLetterReader(
        settings,
        partitions=None if partition is None else [partition],
        start=offset,
        idle_s=idle_s,
    ) as reader:
        async for stored in reader:
            if stored.offset == offset:
                found.append(stored)
                if partition is not None:
                    break
    if not found:
        where = f"{partition}:{offset}" if partition is not None else f"offset {offset}"
        print(f"no record at {where} in {settings.dlq_topic}", file=sys.stderr)
        return 1
    if len(found) > 1:
        positions = ", ".join(stored.position for stored in found)
        print(f"offset {offset} is in several partitions: {positions}; pick one", file=sys.stderr)
        return 2
    print_letter(f"dead letter {found[0].position} in {settings.dlq_topic}", found[0], out)
    return 0


async def show_table_letter(
    settings: PostgresSettings,
    position: tuple[int | None, int],
    *,
    out: TextIO = sys.stdout,
) -> int:
    """Print the table's letter with id `position[1]` (`position[0]` None), or the one
    made from the raw topic's record at `partition:offset`, in full; returns the exit
    status (1: none, 2: several letters have that source)."""
    partition, number = position
    source = None if partition is None else (partition, number)
    async with letter_table(settings) as table:
        found = await table.at(number if source is None else None, source)
    where = f"with id {number}" if source is None else f"from source position {partition}:{number}"
    if not found:
        print(f"no dead letter {where} in {table.name}", file=sys.stderr)
        return 1
    if len(found) > 1:
        ids = ", ".join(stored.position for stored in found)
        print(f"several dead letters {where}: ids {ids}; pick one", file=sys.stderr)
        return 2
    shown = found[0]
    extra = [
        ("model", shown.model or "-"),
        ("stored_at", shown.stored_at.isoformat()),
    ]
    print_letter(f"dead letter {shown.position} in {table.name}", shown, out, extra)
    return 0


async def replay(
    settings: Settings,
    *,
    reason: Reason | None = None,
    partition: int | None = None,
    from_offset: int = 0,
    to_offset: int | None = None,
    dry_run: bool = False,
    idle_s: float = 1.0,
) -> ReplayReport:
    """Produce the selected letters' originals to the raw topic, keyed as they were.

    Selected: of `reason` (any but NEVER_REPLAYED if None), in `partition` (all if None),
    at dead-letter offsets from `from_offset` to `to_offset`, both included. Returns once
    Kafka confirmed every record (acks=all).
    """
    report = ReplayReport(dry_run=dry_run)
    selected: list[DeadLetter] = []
    async with DeadLetterReader(
        settings.kafka,
        partitions=None if partition is None else [partition],
        start=from_offset,
        idle_s=idle_s,
    ) as reader:
        async for stored in reader:
            letter = stored.letter
            if to_offset is not None and stored.offset > to_offset:
                continue
            if letter is None:
                report.unreadable += 1
            elif reason is not None and letter.reason is not reason:
                continue
            elif letter.reason in NEVER_REPLAYED:
                report.skipped[letter.reason.value] += 1
            else:
                selected.append(letter)
    if not dry_run and selected:
        await _produce_originals(settings, selected)
    report.replayed.update(letter.reason.value for letter in selected)
    return report


async def replay_from_table(
    settings: Settings,
    *,
    reason: Reason | None = None,
    from_id: int = 0,
    to_id: int | None = None,
    dry_run: bool = False,
) -> ReplayReport:
    """`replay`, selecting from the dead-letter table: letters of `reason` (any but
    NEVER_REPLAYED if None) with ids from `from_id` to `to_id`, both included."""
    report = ReplayReport(dry_run=dry_run)
    selected: list[DeadLetter] = []
    async with letter_table(settings.postgres) as table:
        stored = await table.select(reason, from_id, to_id)
    for row in stored:
        if row.letter is None:
            report.unreadable += 1
        elif row.letter.reason in NEVER_REPLAYED:
            report.skipped[row.letter.reason.value] += 1
        else:
            selected.append(row.letter)
    if not dry_run and selected:
        await _produce_originals(settings, selected)
    report.replayed.update(letter.reason.value for letter in selected)
    return report


async def _produce_originals(settings: Settings, letters: list[DeadLetter]) -> None:
    raw_topic = settings.kafka.raw_topic
    await ensure_topics(settings.kafka, raw_topic)
    try:
        async with running(make_producer(settings.kafka, client_id="usagepipe-dlq-replay")) as p:
            for start in range(0, len(letters), _SEND_WINDOW):
                window = letters[start : start + _SEND_WINDOW]
                pending = [
                    await p.send(
                        raw_topic,
                        value=letter.original,
                        key=letter.key,
                        # The letter's trace headers too: a replayed message is
                        # followed under its trace id, as it was the first time.
                        headers=[(REPLAY_HEADER, letter.reason.value.encode()), *letter.headers],
                    )
                    for letter in window
                ]
                await asyncio.gather(*pending)
    except KafkaError as exc:
        raise BrokerUnavailable(f"replay to {raw_topic} failed: {exc!r}") from exc


def print_replay(settings: Settings, report: ReplayReport, out: TextIO = sys.stdout) -> None:
    total = sum(report.replayed.values())
    verb = "would replay" if report.dry_run else "replayed"
    letters = "dead letter" if total == 1 else "dead letters"
    print(f"{verb} {total} {letters} to {settings.kafka.raw_topic}", file=out)
    for reason, count in sorted(report.replayed.items()):
        print(f"  {reason:<24} {count}", file=out)
    for reason, count in sorted(report.skipped.items()):
        print(f"  {reason:<24} {count} skipped: never replayed", file=out)
    if report.unreadable:
        print(f"  {report.unreadable} records skipped: not dead letters", file=out)


def run_dlq(settings: Settings, args: argparse.Namespace) -> int:
    """`usagepipe dlq ...`, with the arguments usagepipe/cli.py parsed."""
    reason = Reason(args.reason) if getattr(args, "reason", None) else None
    kafka = args.source == "kafka"
    try:
        if args.action == "list":
            if kafka:
                asyncio.run(list_letters(settings.kafka, reason=reason, limit=args.limit))
            else:
                asyncio.run(list_table_letters(settings.postgres, reason=reason, limit=args.limit))
            return 0
        if args.action == "show":
            try:
                position = parse_position(args.position)
            except ValueError:
                usage = (
                    "PARTITION:OFFSET in the dead-letter topic, e.g. 2:17"
                    if kafka
                    else "a letter's ID, e.g. 17, or its source's PARTITION:OFFSET, e.g. 2:17"
                )
                print(
                    f"usagepipe dlq show: not a position: {args.position!r} (use {usage})",
                    file=sys.stderr,
                )
                return 2
            if kafka:
                return asyncio.run(show_letter(settings.kafka, position))
            return asyncio.run(show_table_letter(settings.postgres, position))
        misplaced = _misplaced_options(args)
        if misplaced:
            print(f"usagepipe dlq replay: {misplaced}", file=sys.stderr)
            return 2
        if kafka:
            report = asyncio.run(
                replay(
                    settings,
                    reason=reason,
                    partition=args.partition,
                    from_offset=args.from_offset or 0,
                    to_offset=args.to_offset,
                    dry_run=args.dry_run,
                )
            )
        else:
            report = asyncio.run(
                replay_from_table(
                    settings,
                    reason=reason,
                    from_id=args.from_id or 0,
                    to_id=args.to_id,
                    dry_run=args.dry_run,
                )
            )
    except (BrokerUnavailable, StoreUnavailable) as exc:
        print(f"usagepipe dlq {args.action}: {exc}", file=sys.stderr)
        return 1
    print_replay(settings, report)
    return 0


def _misplaced_options(args: argparse.Namespace) -> str:
    """What is wrong with replay's options for its source ('' if nothing)."""
    kafka: list[tuple[str, int | None]] = [
        ("--partition", args.partition),
        ("--from-offset", args.from_offset),
        ("--to-offset", args.to_offset),
    ]
    table: list[tuple[str, int | None]] = [("--from-id", args.from_id), ("--to-id", args.to_id)]
    wrong, right = (table, kafka) if args.source == "kafka" else (kafka, table)
    given = [flag for flag, value in wrong if value is not None]
    if not given:
        return ""
    other = "postgres" if args.source == "kafka" else "kafka"
    verb = "is an option" if len(given) == 1 else "are options"
    choose = ", ".join(["--reason", *(flag for flag, _ in right)])
    return (
        f"{', '.join(given)} {verb} of --source {other}; letters of --source {args.source}"
        f" are chosen with {choose}"
    )
