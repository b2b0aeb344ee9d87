"""`usagepipe verify LEDGER`: did the pipeline keep every message it should have?

Reconciles a fleet's ledger with what the pipeline holds: rows in the usage table (for
the ledger's boots only, so other runs do not count) and dead letters in the
dead-letter table (matched by the digest of their original bytes). Prints expected vs
found per outcome and every discrepancy; any discrepancy is a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.table import Table

from ingest.settings import Settings
from schemas.errors import UsagepipeError
from simulators.ledger import Entry, Outcome, digest, read_ledger

Key = tuple[str, str, int]


@dataclass
class Reconciliation:
    """Expected and found counts per outcome, and each discrepancy in words."""

    expected: Counter[str] = field(default_factory=Counter)
    found: Counter[str] = field(default_factory=Counter)
    discrepancies: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def table(self) -> list[tuple[str, int, int]]:
        names = [o.value for o in Outcome]
        names += sorted(k for k in self.expected.keys() | self.found.keys() if k not in names)
        return [(n, self.expected[n], self.found[n]) for n in names]

    @property
    def waiting(self) -> bool:
        """Something expected is not there yet: the pipeline may still be catching up."""
        return any(
            d.startswith("missing row") or d.endswith(") missing") for d in self.discrepancies
        )


def reconcile(
    entries: Iterable[Entry],
    rows: Mapping[Key, int],
    letters: Iterable[tuple[str, str]],
) -> Reconciliation:
    """Compare a ledger with the stored rows and the dead letters.

    `rows` maps each stored key of the ledger's boots to its number of rows; `letters`
    are (digest of the original bytes, reason) of dead letters.
    """
    result = Reconciliation()
    ledger = _expect(entries, result.expected)
    _check_rows(result, ledger, rows)
    seen = _check_letters(result, ledger, letters)
    # A refused message is found refused when it left neither a row nor a dead letter.
    result.found[Outcome.REFUSED_BY_BROKER.value] = sum(
        1 for d, key in ledger.refused.items() if key not in rows and seen[d] == 0
    )
    return result


@dataclass
class _Ledger:
    """What the ledger expects, by outcome: the keys stored, each key's duplicates, the
    reason of each dead letter and the key of each refused message (by digest)."""

    stored: set[Key] = field(default_factory=set)
    duplicates: Counter[Key] = field(default_factory=Counter)
    dead: dict[str, str] = field(default_factory=dict)
    refused: dict[str, Key] = field(default_factory=dict)


def _expect(entries: Iterable[Entry], expected: Counter[str]) -> _Ledger:
    """The ledger's entries by outcome, counting each outcome (and dead letter reason)
    in `expected`."""
    ledger = _Ledger()
    for entry in entries:
        expected[entry.outcome.value] += 1
        if entry.outcome is Outcome.DEAD_LETTER:
            expected[f"dead_letter:{entry.reason}"] += 1
            ledger.dead[entry.digest] = entry.reason or ""
        elif entry.outcome is Outcome.STORED:
            ledger.stored.add(entry.key)
        elif entry.outcome is Outcome.DUPLICATE:
            ledger.duplicates[entry.key] += 1
        else:
            ledger.refused[entry.digest] = entry.key
    return ledger


def _check_rows(result: Reconciliation, ledger: _Ledger, rows: Mapping[Key, int]) -> None:
    """Each stored key has exactly one row, and no other key has any: the stored and
    duplicate messages found, and a discrepancy for each key that differs."""
    stored = ledger.stored
    for key in sorted(stored):
        count = rows.get(key, 0)
        if count == 0:
            result.discrepancies.append(f"missing row {_name(key)} (expected stored)")
        elif count > 1:
            result.discrepancies.append(f"{count} rows for {_name(key)} (expected one)")
    result.found[Outcome.STORED.value] = sum(1 for key in stored if rows.get(key, 0) >= 1)
    for key, count in sorted(rows.items()):
        if key in ledger.refused.values():
            result.discrepancies.append(f"row {_name(key)} stored, but the broker should refuse it")
        elif key not in stored:
            result.discrepancies.append(f"unexpected row {_name(key)} ({count} rows)")
    # A duplicate was dropped as it should be when its key holds exactly one row.
    result.found[Outcome.DUPLICATE.value] = sum(
        n for key, n in ledger.duplicates.items() if rows.get(key, 0) == 1
    )


def _check_letters(
    result: Reconciliation, ledger: _Ledger, letters: Iterable[tuple[str, str]]
) -> Counter[str]:
    """Each expected dead letter is there, once or more, with its reason, and no
    refused message left one: the dead letters found, and a discrepancy for each that
    differs. Returns how many letters of each of the ledger's digests were seen."""
    dead, refused = ledger.dead, ledger.refused
    seen: Counter[str] = Counter()
    for letter_digest, reason in letters:
        if letter_digest in refused:
            result.discrepancies.append(
                f"dead letter for {_name(refused[letter_digest])}, but the broker should refuse it"
            )
            continue
        if letter_digest not in dead:
            continue  # another run's, or not ours to judge
        seen[letter_digest] += 1
        expected_reason = dead[letter_digest]
        if reason != expected_reason:
            result.discrepancies.append(
                f"dead letter {letter_digest} has reason {reason!r}, expected {expected_reason!r}"
            )
            continue
        if seen[letter_digest] == 1:
            result.found[Outcome.DEAD_LETTER.value] += 1
            result.found[f"dead_letter:{reason}"] += 1
    for letter_digest, reason in sorted(dead.items()):
        if seen[letter_digest] == 0:
            result.discrepancies.append(f"dead letter {letter_digest} ({reason}) missing")
    return seen


def _name(key: Key) -> str:
    return f"{key[0]}/{key[1]}/{key[2]}"


async def stored_rows(settings: Settings, entries: list[Entry]) -> dict[Key, int]:
    """Rows of the usage table for the ledger's boots: key -> number of rows."""
    # A boot id with a NUL character (a poison the consumer refuses) can be no row's,
    # and PostgreSQL cannot take it as a parameter.
    boots = {(e.device_id, e.boot_id) for e in entries if "\x00" not in e.boot_id}
    devices = sorted({d for d, _ in boots})
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        if await conn.fetchval("SELECT to_regclass($1)", settings.postgres.table) is None:
            return {}
        records = await conn.fetch(
            f"SELECT device_id, boot_id, seq, count(*) AS n FROM {settings.postgres.table}"
            " WHERE device_id = ANY($1::text[]) AND boot_id = ANY($2::text[])"
            " GROUP BY device_id, boot_id, seq",
            devices,
            sorted({b for _, b in boots}),
        )
    finally:
        await conn.close()
    return {
        (r["device_id"], r["boot_id"], r["seq"]): r["n"]
        for r in records
        if (r["device_id"], r["boot_id"]) in boots
    }


async def dead_letters(settings: Settings) -> list[tuple[str, str]]:
    """(digest of the original bytes, reason) of every letter in the dead-letter table
    (`ingest.dead_letter_table`: the record, which a Kafka loss does not touch)."""
    table = f"{settings.postgres.table}_dead_letters"
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return []  # no consumer ever ran against this table: no letters yet
        records = await conn.fetch(f"SELECT original, reason FROM {table}")
    finally:
        await conn.close()
    return [(digest(bytes(r["original"])), r["reason"]) for r in records]


async def verify(
    settings: Settings, ledger: Path, timeout_s: float, *, poll_s: float = 1.0
) -> Reconciliation:
    """Reconcile `ledger` with the pipeline, polling until nothing expected is missing
    (the consumer may still be writing) or `timeout_s` passed; the last result stands."""
    entries = list(read_ledger(ledger))
    deadline = time.monotonic() + timeout_s
    while True:
        rows, letters = await asyncio.gather(stored_rows(settings, entries), dead_letters(settings))
        result = reconcile(entries, rows, letters)
        if not result.waiting or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(poll_s)


def run_verify(settings: Settings, ledger: str, timeout_s: float) -> int:
    """`usagepipe verify LEDGER`: print expected vs found, every discrepancy; 1 if any."""
    console = Console()
    path = Path(ledger)
    if not path.is_file():
        console.print(f"[red]usagepipe verify: no ledger at {path}")
        return 2
    started = time.monotonic()
    try:
        result = asyncio.run(verify(settings, path, timeout_s))
    except (UsagepipeError, asyncpg.PostgresError, OSError, ValueError) as exc:
        console.print(f"[red]usagepipe verify: {exc}")
        return 2
    table = Table(title=f"{path}: expected vs found")
    table.add_column("outcome")
    table.add_column("expected", justify="right")
    table.add_column("found", justify="right")
    table.add_column("")
    for name, expected, found in result.table():
        mark = "[green]ok" if expected == found else "[red]differs"
        table.add_row(name, f"{expected:,}", f"{found:,}", mark)
    console.print(table)
    for line in result.discrepancies:
        console.print(f"[red]{line}", highlight=False)
    elapsed = time.monotonic() - started
    if result.ok:
        console.print(
            f"OK: every message of the ledger met its expected fate (checked in {elapsed:.1f}s)"
        )
        return 0
    console.print(
        f"[red]FAILED: {len(result.discrepancies):,} discrepancies (after {elapsed:.1f}s)"
    )
    return 1
