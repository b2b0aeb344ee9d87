"""The ledger and its reconciliation, on hand-made ledgers (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.ledger import Entry, LedgerWriter, Outcome, digest, read_ledger
from simulators.verify import reconcile


@pytest.fixture(scope="session", autouse=True)
def running_services() -> None:
    """These tests need no server."""


def entries() -> list[Entry]:
    return [
        Entry("wm-1", "b1", 0, digest(b"m0"), Outcome.STORED),
        Entry("wm-1", "b1", 1, digest(b"m1"), Outcome.STORED),
        Entry("wm-1", "b1", 1, digest(b"m1"), Outcome.DUPLICATE, duplicate=True),
        Entry("wm-1", "b1", 2, digest(b"bad"), Outcome.DEAD_LETTER, "invalid_json"),
        Entry("wm-1", "b1", 3, digest(b"theirs"), Outcome.REFUSED_BY_BROKER),
    ]


GOOD_ROWS = {("wm-1", "b1", 0): 1, ("wm-1", "b1", 1): 1}
GOOD_LETTERS = [(digest(b"bad"), "invalid_json"), (digest(b"another run"), "oversize")]


def test_a_ledger_round_trips_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with LedgerWriter(path) as ledger:
        for entry in entries():
            ledger.write(entry)
    assert list(read_ledger(path)) == entries()


def test_a_clean_run_reconciles_exactly() -> None:
    result = reconcile(entries(), GOOD_ROWS, GOOD_LETTERS)
    assert result.discrepancies == []
    assert result.table() == [
        ("stored", 2, 2),
        ("duplicate", 1, 1),
        ("dead_letter", 1, 1),
        ("refused_by_broker", 1, 1),
        ("dead_letter:invalid_json", 1, 1),
    ]


def test_a_deleted_row_is_found() -> None:
    rows = {("wm-1", "b1", 0): 1}
    result = reconcile(entries(), rows, GOOD_LETTERS)
    assert result.discrepancies == ["missing row wm-1/b1/1 (expected stored)"]
    assert (result.expected["stored"], result.found["stored"]) == (2, 1)
    assert (result.expected["duplicate"], result.found["duplicate"]) == (1, 0)


def test_an_added_row_is_found() -> None:
    rows = {**GOOD_ROWS, ("wm-1", "b1", 9): 1}
    result = reconcile(entries(), rows, GOOD_LETTERS)
    assert result.discrepancies == ["unexpected row wm-1/b1/9 (1 rows)"]


def test_dead_letter_problems_are_found() -> None:
    result = reconcile(
        entries(),
        {**GOOD_ROWS, ("wm-1", "b1", 3): 1},
        [(digest(b"bad"), "oversize"), (digest(b"theirs"), "device_id_mismatch")],
    )
    assert result.discrepancies == [
        "row wm-1/b1/3 stored, but the broker should refuse it",
        f"dead letter {digest(b'bad')} has reason 'oversize', expected 'invalid_json'",
        "dead letter for wm-1/b1/3, but the broker should refuse it",
    ]
    assert (result.expected["dead_letter"], result.found["dead_letter"]) == (1, 0)


def test_fault_specs_parse_or_say_what_is_wrong() -> None:
    from simulators.faults import FaultRates, parse_faults

    assert parse_faults("dup=0.01, reorder=0.02") == FaultRates(dup=0.01, reorder=0.02)
    assert parse_faults("") == FaultRates()
    assert parse_faults("all=0.001,dup=0.05").dup == 0.05
    assert parse_faults("all=0.001").old_schema == 0.001
    with pytest.raises(ValueError, match="unknown fault 'dupe'"):
        parse_faults("dupe=0.1")
    with pytest.raises(ValueError, match="rate 'x' is not a number"):
        parse_faults("dup=x")
    with pytest.raises(ValueError, match="rate 2 is not between 0 and 1"):
        parse_faults("dup=2")
    with pytest.raises(ValueError, match="has no rate"):
        parse_faults("dup")
