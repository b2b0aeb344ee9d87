"""`usagepipe verify LEDGER`: did the pipeline keep every message it should have?

Reconciles a fleet's ledger with what the pipeline holds: rows in the usage table (for
the ledger's boots only, so other runs do not count) and dead letters on the
dead-letter topic (matched by the digest of their original bytes). Prints expected vs
found per outcome and every discrepancy; any discrepancy is a failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from simulators.ledger import Entry, Outcome

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
    stored: set[Key] = set()
    duplicates: Counter[Key] = Counter()
    dead: dict[str, str] = {}
    refused: dict[str, Key] = {}
    for entry in entries:
        result.expected[entry.outcome.value] += 1
        if entry.outcome is Outcome.DEAD_LETTER:
            result.expected[f"dead_letter:{entry.reason}"] += 1
            dead[entry.digest] = entry.reason or ""
        elif entry.outcome is Outcome.STORED:
            stored.add(entry.key)
        elif entry.outcome is Outcome.DUPLICATE:
            duplicates[entry.key] += 1
        else:
            refused[entry.digest] = entry.key

    for key in sorted(stored):
        count = rows.get(key, 0)
        if count == 0:
            result.discrepancies.append(f"missing row {_name(key)} (expected stored)")
        elif count > 1:
            result.discrepancies.append(f"{count} rows for {_name(key)} (expected one)")
    result.found[Outcome.STORED.value] = sum(1 for key in stored if rows.get(key, 0) >= 1)
    for key, count in sorted(rows.items()):
        if key in refused.values():
            result.discrepancies.append(f"row {_name(key)} stored, but the broker should refuse it")
        elif key not in stored:
            result.discrepancies.append(f"unexpected row {_name(key)} ({count} rows)")
    # A duplicate was dropped as it should be when its key holds exactly one row.
    result.found[Outcome.DUPLICATE.value] = sum(
        n for key, n in duplicates.items() if rows.get(key, 0) == 1
    )

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
    result.found[Outcome.REFUSED_BY_BROKER.value] = sum(
        1 for d, key in refused.items() if key not in rows and seen[d] == 0
    )
    return result


def _name(key: Key) -> str:
    return f"{key[0]}/{key[1]}/{key[2]}"
