"""The fleet's ledger: every message it produced and what should become of it.

One JSON line per publish, written as the fleet runs:

    {"device_id": "WM-A100-3f9c...", "boot_id": "5f0c2e9a1b7d", "seq": 42,
     "digest": "9a1c...", "outcome": "stored", "reason": null, "duplicate": false, "fault": null}

`digest` is the BLAKE2b of the exact payload bytes, so a dead letter (which carries the
original bytes) can be matched to its line even when the payload is not JSON. `verify`
reconciles a ledger with the usage table and the dead-letter topic.

Outcomes, decided by the fleet when it plans a message:
- `stored`: a valid message; exactly one row must exist for its key;
- `duplicate`: a byte-for-byte resend of a stored one; it must add no row;
- `dead_letter`: invalid on purpose; one dead letter with `reason` must exist;
- `refused_by_broker`: the broker must refuse it (another device's topic, say); it must
  reach neither the table nor the dead-letter topic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import orjson


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead_letter"
    REFUSED_BY_BROKER = "refused_by_broker"


def digest(payload: bytes) -> str:
    """The ledger's name for a payload: BLAKE2b-128 of its bytes, hex."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """One published message and its expected fate."""

    device_id: str
    boot_id: str
    seq: int
    digest: str
    outcome: Outcome
    reason: str | None = None
    duplicate: bool = False
    fault: str | None = None
    """The fault that made the message what it is (`malformed:nan`, `reorder`, ...)."""
    trace_id: str | None = None
    """The trace id of the traceparent it was sent with (`FleetPlan.trace_share`), to
    find in the consumer's log; the line has the field only when it was traced."""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.device_id, self.boot_id, self.seq)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "seq": self.seq,
            "digest": self.digest,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "duplicate": self.duplicate,
            "fault": self.fault,
        }
        if self.trace_id is not None:
            doc["trace_id"] = self.trace_id
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, line: bytes | str) -> Entry:
        doc: dict[str, Any] = orjson.loads(line)
        return cls(
            device_id=doc["device_id"],
            boot_id=doc["boot_id"],
            seq=int(doc["seq"]),
            digest=doc["digest"],
            outcome=Outcome(doc["outcome"]),
            reason=doc.get("reason"),
            duplicate=bool(doc.get("duplicate", False)),
            fault=doc.get("fault"),
            trace_id=doc.get("trace_id"),
        )


class LedgerWriter:
    """Appends entries to a JSONL file; a context manager that flushes on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self.written = 0

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("wb")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def write(self, entry: Entry) -> None:
        if self._file is None:
            raise RuntimeError(f"ledger {self.path} is not open")
        self._file.write(entry.to_json() + b"\n")
        self.written += 1

    def close(self) -> None:
        """Flush and close. Idempotent."""
        file, self._file = self._file, None
        if file is not None:
            file.close()


def read_ledger(path: Path) -> Iterator[Entry]:
    """The entries of a ledger file, in the order they were written."""
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield Entry.from_json(line)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a ledger entry: {exc}") from exc
