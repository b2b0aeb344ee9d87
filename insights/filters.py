"""The filters every report takes, parsed and checked once.

A time range `[start, end)` in whole UTC hours (the rollups are hourly: a report read
from them and one read from raw rows must cover the same events), and any number of
product models, categories, regions and firmware versions (none given: all). A bad
value raises `FilterError` naming the field; the API answers 422 with it and the CLI
exits 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from schemas.catalog import models
from schemas.errors import UsagepipeError

CATEGORIES = tuple(sorted({name.split(".", 1)[0] for name, _v, _m in models()}))
# The patterns are published in the insights API's OpenAPI document, whose regexes are
# ECMA-262: ASCII classes only, and each matched against the whole value (`fullmatch`,
# so Python's `$` cannot let a trailing newline through), so both read them alike.
INSTANT_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2}))?$"
)
REGION_PATTERN = r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$"
# Model numbers and firmware versions are the registry's text; anything plain and short
# is accepted (they are bound as parameters, never put into SQL text).
TEXT_PATTERN = r"^[A-Za-z0-9_.+:/-]{1,64}$"
_INSTANT = re.compile(INSTANT_PATTERN)
_NAIVE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?")
_REGION = re.compile(REGION_PATTERN)
_TEXT = re.compile(TEXT_PATTERN)
DEFAULT_SPAN = timedelta(days=28)


class FilterError(UsagepipeError, ValueError):
    """A filter value is not acceptable; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Filters:
    """Which usage rows a report reads. Empty tuples mean "no restriction"."""

    start: datetime
    end: datetime
    model: tuple[str, ...] = ()
    category: tuple[str, ...] = ()
    region: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        *,
        start: str | datetime | None = None,
        end: str | datetime | None = None,
        model: list[str] | tuple[str, ...] = (),
        category: list[str] | tuple[str, ...] = (),
        region: list[str] | tuple[str, ...] = (),
        firmware: list[str] | tuple[str, ...] = (),
        max_days: int = 400,
        now: datetime | None = None,
    ) -> Filters:
        """Filters from user input. `end` defaults to the current hour's end, `start`
        to 28 days before `end`; a date alone means 00:00 UTC of that day."""
        end_t = _instant("end", end) if end is not None else _next_hour(now or datetime.now(UTC))
        if start is not None:
            start_t = _instant("start", start)
        elif end_t - datetime.min.replace(tzinfo=UTC) < DEFAULT_SPAN:
            raise FilterError(
                "end", f"{_iso(end_t)} leaves no room for the default 28 days before it; give start"
            )
        else:
            start_t = end_t - DEFAULT_SPAN
        if start_t >= end_t:
            raise FilterError("start", f"must be before end ({_iso(start_t)} >= {_iso(end_t)})")
        if end_t - start_t > timedelta(days=max_days):
            raise FilterError("end", f"the range may cover at most {max_days} days")
        for name, instant in (("start", start_t), ("end", end_t)):
            if instant != instant.replace(minute=0, second=0, microsecond=0):
                raise FilterError(name, f"must be a whole UTC hour, not {_iso(instant)}")
        for value in category:
            if value not in CATEGORIES:
                raise FilterError(
                    "category", f"unknown {_shown(value)}; one of {', '.join(CATEGORIES)}"
                )
        for value in region:
            if not _REGION.fullmatch(value):
                raise FilterError("region", f"{_shown(value)} is not an ISO 3166-2 code like KR-11")
        for field, values in (("model", model), ("firmware", firmware)):
            for value in values:
                if not _TEXT.fullmatch(value):
                    raise FilterError(
                        field, f"{_shown(value)} is not a {field} (1-64 plain characters)"
                    )
        return cls(
            start_t,
            end_t,
            tuple(dict.fromkeys(model)),
            tuple(dict.fromkeys(category)),
            tuple(dict.fromkeys(region)),
            tuple(dict.fromkeys(firmware)),
        )

    def parameters(self) -> list[Any]:
        """$1..$6 of every report's `base` rows: start, end, then the lists (NULL: all)."""
        return [
            self.start,
            self.end,
            list(self.model) or None,
            list(self.category) or None,
            list(self.region) or None,
            list(self.firmware) or None,
        ]

    def describe(self) -> dict[str, Any]:
        """The filters as JSON-able values (for API answers and export metadata)."""
        return {
            "start": _iso(self.start),
            "end": _iso(self.end),
            "model": list(self.model),
            "category": list(self.category),
            "region": list(self.region),
            "firmware": list(self.firmware),
        }


def _instant(field: str, value: str | datetime) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    else:
        bad = FilterError(field, f"{_shown(value)} is not a date (2026-11-01) or a time with zone")
        if not _INSTANT.fullmatch(value):
            if _NAIVE.fullmatch(value):
                raise FilterError(field, f"{_shown(value)} has no time zone (add Z or +09:00)")
            raise bad
        try:
            if len(value) == 10:
                day = date.fromisoformat(value)
                return datetime(day.year, day.month, day.day, tzinfo=UTC)
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise bad from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise FilterError(field, f"{_shown(value)} has no time zone (add Z or +09:00)")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise FilterError(field, f"{_shown(value)} is out of range (UTC years 1 to 9999)") from None


def _shown(value: str | datetime) -> str:
    """A user's value quoted in a message, cut short: an answer never echoes megabytes."""
    text = repr(value if isinstance(value, str) else _iso(value))
    return text if len(text) <= 42 else f"{text[:40]}...'"


def _next_hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
