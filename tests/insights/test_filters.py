"""`Filters.parse` at the edges of the calendar, and the CLI's one line for them.

`end=0001-01-01` used to raise OverflowError (a 500 from the API, a traceback from
`usagepipe report`); every instant outside what Python can hold in UTC is now a
`FilterError` naming the field.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from insights.filters import FilterError, Filters

NOT_A_DATE = " is not a date (2026-11-01) or a time with zone"
NO_ZONE = " (add Z or +09:00)"
FULLWIDTH = "\uff12\uff10\uff12\uff16-11-01"


@pytest.mark.parametrize(
    ("given", "field", "message"),
    [
        (
            {"end": "0001-01-01"},
            "end",
            "0001-01-01T00:00:00Z leaves no room for the default 28 days before it; give start",
        ),
        (
            {"end": "0001-01-01T00:00:00+14:00"},
            "end",
            "'0001-01-01T00:00:00+14:00' is out of range (UTC years 1 to 9999)",
        ),
        (
            {"start": "9999-12-31T23:00:00-14:00"},
            "start",
            "'9999-12-31T23:00:00-14:00' is out of range (UTC years 1 to 9999)",
        ),
        ({"start": "2026-11-01T09:00"}, "start", "'2026-11-01T09:00' has no time zone" + NO_ZONE),
        ({"start": " 2026-11-01"}, "start", "' 2026-11-01'" + NOT_A_DATE),
        ({"start": "2026-02-30"}, "start", "'2026-02-30'" + NOT_A_DATE),
        ({"start": FULLWIDTH}, "start", repr(FULLWIDTH) + NOT_A_DATE),  # not \d: it takes these
        ({"model": ["WM-100\n"]}, "model", "'WM-100\\n' is not a model (1-64 plain characters)"),
        ({"region": ["KR-11\n"]}, "region", "'KR-11\\n' is not an ISO 3166-2 code like KR-11"),
        (
            {"start": "9" * 5000},
            "start",
            "'999999999999999999999999999999999999999...'" + NOT_A_DATE,
        ),
    ],
)
def test_bad_instants_and_values_name_their_field(
    given: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(FilterError) as raised:
        Filters.parse(**given)  # type: ignore[arg-type]
    assert (raised.value.field, raised.value.message) == (field, message)


def test_the_first_and_last_hours_of_the_calendar_are_fine() -> None:
    first = Filters.parse(end="0001-01-29")
    assert (first.start, first.end) == (
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1, 1, 29, tzinfo=UTC),
    )
    last = Filters.parse(start="9999-12-01", end="9999-12-31T23:00:00Z")
    assert last.end == datetime(9999, 12, 31, 23, tzinfo=UTC)
    shifted = Filters.parse(start="2026-11-01 09:00:00.000+09:00", end="2026-11-02T00:00Z")
    assert shifted.start == datetime(2026, 11, 1, tzinfo=UTC)


def test_the_cli_says_it_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "usagepipe", "report", "programs", "--end", "0001-01-01"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "usagepipe report programs: end: 0001-01-01T00:00:00Z leaves no room for the default "
        "28 days before it; give start"
    ]
