"""W3C traceparent parsing and making (`ingest.trace`), and the consumer's bounded log
of traced messages; no servers needed."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from aiokafka import ConsumerRecord

from ingest.consumer import _log_stored
from ingest.rows import UsageRow
from ingest.trace import TRACEPARENT, TraceParent, child_header, sampled_header, start_header

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_read_and_its_child_keeps_the_trace() -> None:
    parent = TraceParent.parse(VALID.encode())
    assert parent == TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
    child = parent.child()
    assert (child.trace_id, child.flags) == (parent.trace_id, 1)
    assert child.parent_id != parent.parent_id
    assert TraceParent.parse(child.header()) == child


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # 00 is 55 long
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",  # no dash after
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    ],
)
def test_a_malformed_traceparent_is_refused(value: str) -> None:
    assert TraceParent.parse(value.encode()) is None
    assert child_header(value.encode()) is None


def test_the_bridges_headers_keep_the_trace_and_flags_with_a_new_parent() -> None:
    child = child_header(VALID.encode())
    assert child is not None
    parsed, device = TraceParent.parse(child), TraceParent.parse(VALID.encode())
    assert parsed is not None and device is not None
    assert (parsed.trace_id, parsed.flags) == (device.trace_id, device.flags)
    assert parsed.parent_id != device.parent_id
    later = child_header(b"cc" + VALID.encode()[2:] + b"-more")
    assert later is not None and later.startswith(b"00-") and len(later) == 55
    unsampled = VALID[:-2] + "00"
    assert (sampled_header(VALID.encode()), sampled_header(unsampled.encode())) == (True, False)
    started = TraceParent.parse(start_header())
    assert started is not None and started.sampled


def test_a_later_version_is_read_by_its_first_fields() -> None:
    later = TraceParent.parse(b"01" + VALID.encode()[2:] + b"-what-comes-later")
    assert later is not None
    assert later.header().decode() == VALID  # carried on as version 00


def test_a_started_trace_is_new_and_sampled() -> None:
    first, second = TraceParent.start(), TraceParent.start()
    assert first.sampled and first.trace_id != second.trace_id
    assert TraceParent.parse(first.header()) == first
    assert not TraceParent.start(sampled=False).sampled


def _row(seq: int, traceparent: str | None) -> UsageRow:
    headers = [] if traceparent is None else [(TRACEPARENT, traceparent.encode())]
    record = ConsumerRecord("raw", 0, seq, 0, 0, b"wm-1", b"{}", None, 4, 2, headers)
    now = datetime.now(UTC)
    return UsageRow("wm-1", "b1", seq, now, "s", 1, {}, 0, seq, source=record)


def test_sampled_traces_log_at_info_bounded_per_batch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ingest.consumer")
    unsampled = VALID[:-2] + "00"
    rows = [_row(0, None), _row(1, VALID), _row(2, VALID), _row(3, unsampled), _row(4, VALID)]
    _log_stored(rows, [], info_max=2)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    where = "device_id=wm-1 boot_id=b1"
    assert lines == [
        ("INFO", f"stored trace_id={VALID[3:35]} {where} seq=1 partition=0 offset=1"),
        ("INFO", f"stored trace_id={VALID[3:35]} {where} seq=2 partition=0 offset=2"),
        ("INFO", "1 more sampled traces in this batch logged at DEBUG only"
                 " (consumer.trace_log_max=2)"),
    ]  # fmt: skip
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="ingest.consumer")
    _log_stored(rows, [], info_max=0)
    assert [(r.levelname, r.__dict__["seq"]) for r in caplog.records[:-1]] == [
        ("DEBUG", 1),
        ("DEBUG", 2),
        ("DEBUG", 3),
        ("DEBUG", 4),
    ]
