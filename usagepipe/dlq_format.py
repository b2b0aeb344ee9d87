"""How `usagepipe dlq` prints letters: the listing's table and one letter in full,
with whatever a device sent made safe for a terminal."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Protocol, TextIO

from ingest.bridge import device_id_from_payload
from ingest.dead_letter import DeadLetter
from schemas.errors import Reason

_MESSAGE_WIDTH = 72


class Listed(Protocol):
    """A letter as `dlq` prints it: a topic's record or a row of the table."""

    @property
    def position(self) -> str: ...
    @property
    def letter(self) -> DeadLetter | None: ...
    @property
    def problem(self) -> str: ...


def print_table(
    first: str, shown: Sequence[Listed], matching: int, reason: Reason | None, out: TextIO
) -> None:
    if not shown:
        return
    which = f" of reason {reason.value}" if reason is not None else ""
    print(f"the newest {len(shown)} of {matching}{which}, oldest first:", file=out)
    rows = [(first, "REASON", "SOURCE", "DEVICE", "FAILED_AT", "MESSAGE")]
    rows += [_row(stored) for stored in shown]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)]
        print("  ".join([*cells, row[5]]), file=out)


def _row(stored: Listed) -> tuple[str, str, str, str, str, str]:
    letter = stored.letter
    if letter is None:
        return (stored.position, "?", "-", "-", "-", safe_text(stored.problem)[:_MESSAGE_WIDTH])
    message = safe_text(letter.message)
    if len(message) > _MESSAGE_WIDTH:
        message = message[: _MESSAGE_WIDTH - 3] + "..."
    return (
        stored.position,
        letter.reason.value,
        safe_text(_source(letter)),
        safe_text(device_id_from_payload(letter.original) or "-"),
        letter.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
        message,
    )


def _source(letter: DeadLetter) -> str:
    if letter.kind == "mqtt":
        return f"mqtt {letter.topic}"
    return f"kafka {letter.topic} {letter.partition}:{letter.offset}"


def print_letter(
    title: str, stored: Listed, out: TextIO, extra: Sequence[tuple[str, str]] = ()
) -> None:
    print(title, file=out)
    letter = stored.letter
    if letter is None:
        print(f"  {safe_text(stored.problem)}", file=out)
        return
    original = letter.original
    key = "-" if letter.key is None else safe_text(letter.key.decode("utf-8", "replace"))
    fields = [
        ("reason", letter.reason.value),
        ("message", letter.message),
        ("source", _source(letter)),
        ("key", key),
        ("device_id", device_id_from_payload(original) or "- (not readable from the payload)"),
        ("failed_at", letter.failed_at.isoformat()),
        *([("trace_id", letter.trace_id)] if letter.trace_id else []),
        *extra,
    ]
    for name, value in fields:
        print(f"  {name:<10} {safe_text(value)}", file=out)
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError as exc:
        print(
            f"  original   {len(original)} bytes, not UTF-8 ({exc.reason} at byte "
            f"{exc.start}), as hex:",
            file=out,
        )
        out.write(hex_dump(original))
        return
    print(f"  original   {len(original)} bytes, UTF-8 text:", file=out)
    print(safe_text(text, keep="\n\t"), file=out)


def safe_text(text: str, keep: str = "") -> str:
    """`text` with control and format characters (terminal escapes, bidi overrides)
    written as `\\xNN` / `\\uNNNN`, except those in `keep`."""
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch in keep or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
        else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )


def hex_dump(data: bytes, width: int = 16) -> str:
    """`offset  hex bytes  |ascii|` lines, as `hexdump -C` prints them."""
    lines = []
    for start in range(0, len(data), width):
        chunk = data[start : start + width]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{start:08x}  {hexes:<{width * 3 - 1}}  |{ascii_}|\n")
    return "".join(lines)
