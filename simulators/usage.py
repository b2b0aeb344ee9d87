"""How households really use their appliances: when, how often, and what.

A planner should recognise the fleet's data: laundry on weekday evenings and weekend
mornings, fridge doors at meal times, air conditioning in the Korean summer (heating
in winter), air purifiers working hardest in the spring yellow-dust season, robot
vacuums on a morning schedule. Each device belongs to a `Household` with a region, a
size and habits; `device_events` turns a household, a category and a time window into
the device's events in time order, deterministic for the random generator it is given.

Bodies come from `schemas.examples` (valid by construction, tested against the models);
the usage model chooses which events happen when, and sets the fields that follow the
season or the household (air-conditioner mode and setpoint, outdoor temperature,
fine-dust readings, how a vacuum run was started).

Errors follow use (`USE_ERRORS`): an unbalanced load on some washes, a blocked duct on
some dryings, a robot vacuum stuck now and then, each raised during the use and cleared
when the household (minutes) or a technician (hours to days) fixes it; appliances that
run all day raise theirs per day (`DAY_ERRORS`). A few codes are common, most are rare,
as in field data: about one error per 25 washes, far fewer than uses.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas.examples import example_body

# Districts across Korea's largest cities, weighted roughly by households.
REGIONS: tuple[tuple[str, int], ...] = (
    ("Seoul/Gangnam-gu", 8),
    ("Seoul/Songpa-gu", 8),
    ("Seoul/Mapo-gu", 6),
    ("Seoul/Nowon-gu", 6),
    ("Seoul/Gwanak-gu", 6),
    ("Busan/Haeundae-gu", 5),
    ("Busan/Busanjin-gu", 4),
    ("Incheon/Yeonsu-gu", 4),
    ("Incheon/Bupyeong-gu", 4),
    ("Daegu/Suseong-gu", 4),
    ("Daejeon/Yuseong-gu", 4),
    ("Gwangju/Buk-gu", 3),
    ("Ulsan/Nam-gu", 2),
    ("Gyeonggi/Seongnam-si", 6),
    ("Gyeonggi/Suwon-si", 6),
    ("Gyeonggi/Goyang-si", 5),
    ("Gyeonggi/Yongin-si", 5),
    ("Jeju/Jeju-si", 2),
)

# Seoul's monthly mean temperature (C) and a typical PM2.5 level (ug/m3), Jan..Dec.
_MONTHLY_TEMP_C = (-2.4, 0.4, 5.7, 12.5, 17.8, 22.2, 24.9, 25.7, 21.2, 14.8, 7.2, 0.4)
_MONTHLY_PM25 = (30, 34, 38, 32, 25, 20, 15, 13, 14, 19, 25, 29)


@dataclass(frozen=True)
class Household:
    """Who lives with the appliance, and their habits."""

    region: str
    size: int
    """People in the household, 1..5."""
    works_days: bool
    """Out on weekdays: chores move to evenings and weekends."""
    schedules_vacuum: bool
    """Runs the robot vacuum on a fixed morning schedule rather than by hand."""
    uses_app: float
    """Share of features started from the app rather than the panel."""
    reports_at: float = 23.9
    """Hour of the day the appliance sends its daily energy reading: the maker staggers
    them over the day, so a fleet does not report at once (nor crowd one hour of the
    planners' heat map)."""


def new_household(rng: random.Random) -> Household:
    regions, weights = zip(*REGIONS, strict=True)
    return Household(
        region=rng.choices(regions, weights)[0],
        size=rng.choices((1, 2, 3, 4, 5), (30, 28, 21, 17, 4))[0],
        works_days=rng.random() < 0.7,
        schedules_vacuum=rng.random() < 0.6,
        uses_app=rng.choice((0.05, 0.15, 0.3, 0.5)),
        reports_at=rng.uniform(0, 24),
    )


def outdoor_temp_c(at: datetime, rng: random.Random) -> float:
    """A plausible outdoor temperature: the month's mean, a daily swing, some weather."""
    mean = _MONTHLY_TEMP_C[at.month - 1]
    swing = 4.0 * math.sin((at.hour - 9) / 24 * 2 * math.pi)
    return round(mean + swing + rng.gauss(0, 2.5), 1)


def pm25(at: datetime, rng: random.Random) -> float:
    return round(min(_MONTHLY_PM25[at.month - 1] * rng.lognormvariate(0, 0.5), 900.0), 1)


ErrorSpec = tuple[str, float, str]
"""An error code, its chance (per use or per day), and its severity."""

USE_ERRORS: dict[str, tuple[ErrorSpec, ...]] = {
    "washer": (
        ("UE", 0.025, "warning"),  # unbalanced load
        ("dE", 0.008, "warning"),  # door not closed
        ("OE", 0.005, "fault"),  # drain
        ("IE", 0.003, "fault"),  # water inlet
        ("4C", 0.002, "fault"),
        ("E21", 0.0005, "critical"),
        ("E24", 0.0005, "critical"),
    ),
    "dryer": (
        ("d80", 0.02, "warning"),  # exhaust duct blocked
        ("tE", 0.003, "fault"),
        ("HE", 0.0015, "critical"),
        ("E32", 0.0015, "fault"),
        ("F05", 0.001, "fault"),
    ),
    "robot_vacuum": (
        ("C12", 0.035, "warning"),  # stuck
        ("E7", 0.012, "warning"),  # brush tangled
        ("E2", 0.006, "fault"),  # wheel
        ("ERR5", 0.001, "fault"),
    ),
    "air_conditioner": (
        ("CH05", 0.008, "fault"),  # indoor-outdoor communication
        ("E1", 0.003, "fault"),
        ("E5", 0.002, "fault"),
        ("P4", 0.001, "critical"),
        ("F2", 0.001, "fault"),
    ),
}
"""Errors raised during a use (a wash, a drying, a cleaning run, an air-conditioner run)."""

DAY_ERRORS: dict[str, tuple[ErrorSpec, ...]] = {
    "refrigerator": (
        ("Er-dH", 0.002, "fault"),  # defrost
        ("rF", 0.0015, "fault"),  # fan
        ("22E", 0.0008, "fault"),
        ("33E", 0.0008, "fault"),
        ("FF", 0.0005, "critical"),
    ),
    "air_purifier": (
        ("F1", 0.004, "warning"),  # filter sensor
        ("SE", 0.002, "fault"),  # dust sensor
        ("E1", 0.0008, "fault"),
    ),
}
"""Errors of appliances that run all day, per day."""


def _pick_error(specs: tuple[ErrorSpec, ...], rng: random.Random) -> ErrorSpec | None:
    """At most one error of `specs`, from one draw (so the draws per use are fixed)."""
    draw = rng.random()
    for spec in specs:
        if draw < spec[1]:
            return spec
        draw -= spec[1]
    return None


def _at(day: datetime, hour: float) -> datetime:
    return day + timedelta(hours=min(max(hour, 0.0), 23.99))


def _trigger(household: Household, rng: random.Random) -> str:
    if rng.random() < household.uses_app:
        return "app_remote"
    return "voice" if rng.random() < 0.03 else "panel"


def _laundry_times(household: Household, day: datetime, rng: random.Random) -> list[datetime]:
    weekend = day.weekday() >= 5
    per_week = 1.5 + 1.0 * household.size
    share = 0.26 if weekend else 0.096  # two weekend days carry about half the week
    chance = per_week * share / 4  # up to four loads a day, each with this chance
    count = sum(1 for _ in range(4) if rng.random() < chance)
    times = []
    for _ in range(count):
        if weekend:
            hour = rng.gauss(10.5, 1.5) if rng.random() < 0.6 else rng.gauss(19.5, 1.5)
        elif household.works_days:
            hour = rng.gauss(20.5, 1.2)
        else:
            hour = rng.gauss(11.0, 2.0)
        times.append(_at(day, hour))
    return times


def _fridge_door_times(household: Household, day: datetime, rng: random.Random) -> list[datetime]:
    meals = (7.5, 12.5, 19.0) if not household.works_days or day.weekday() >= 5 else (7.3, 19.2)
    times = []
    for meal in meals:
        for _ in range(rng.randint(1, 2 + household.size)):
            times.append(_at(day, rng.gauss(meal, 0.6)))
    for _ in range(rng.randint(0, household.size * 2)):
        times.append(_at(day, rng.uniform(6, 24)))
    return times


def device_events(
    category: str,
    household: Household,
    rng: random.Random,
    start: datetime,
    end: datetime,
) -> Iterator[tuple[datetime, str, dict[str, Any]]]:
    """The device's events between `start` and `end`, as (event time, schema, body)."""
    events: list[tuple[datetime, str, dict[str, Any]]] = []
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        events.extend(_day(category, household, rng, day))
        day += timedelta(days=1)
    events.sort(key=lambda e: e[0])
    for event in events:
        if start <= event[0] < end:
            yield event


def device_days(
    category: str, household: Household, rng: random.Random, start: datetime, end: datetime
) -> Iterator[tuple[datetime, str, dict[str, Any]]]:
    """`device_events` lazily, a day at a time: the same events from the same `rng`.

    A day's events fall on or after its midnight (some spill into the next day: a dryer
    run after a late wash), so once day `d` is made every pending event before `d + 1`
    is final. A fleet of thousands of devices over weeks keeps only a day of each in
    memory this way.
    """
    pending: list[tuple[datetime, int, str, dict[str, Any]]] = []
    order = 0
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        for at, schema_name, body in _day(category, household, rng, day):
            heapq.heappush(pending, (at, order, schema_name, body))
            order += 1
        day += timedelta(days=1)
        while pending and (pending[0][0] < day or day >= end):
            at, _, schema_name, body = heapq.heappop(pending)
            if start <= at < end:
                yield at, schema_name, body


Event = tuple[datetime, str, dict[str, Any]]
"""An event as the usage model makes it: its time, its schema, its body."""


@dataclass
class _Day:
    """One device's events of one day, as they are drawn from `rng` in turn."""

    category: str
    household: Household
    rng: random.Random
    day: datetime
    events: list[Event] = field(default_factory=list)

    def add(self, at: datetime, schema: str, **overrides: Any) -> None:
        body = example_body(schema, self.rng)
        body.update(overrides)
        self.events.append((at, schema, body))

    def fault(self, at: datetime, specs: tuple[ErrorSpec, ...]) -> None:
        """Maybe an error, raised at `at` and cleared by the household (a warning:
        minutes later) or a technician (hours to two days later)."""
        rng = self.rng
        spec = _pick_error(specs, rng)
        if spec is None:
            return
        code, _, severity = spec
        self.add(at, f"{self.category}.error", code=code, severity=severity, state="raised")
        fixed = rng.uniform(2, 20) if severity == "warning" else rng.uniform(120, 2880)
        self.add(
            at + timedelta(minutes=fixed),
            f"{self.category}.error",
            code=code,
            severity=severity,
            state="cleared",
        )

    def trigger(self) -> str:
        return _trigger(self.household, self.rng)

    @property
    def use_errors(self) -> tuple[ErrorSpec, ...]:
        return USE_ERRORS.get(self.category, ())


def _day(category: str, household: Household, rng: random.Random, day: datetime) -> list[Event]:
    """One device's events of `day`: its category's uses (`_USES`), then what every
    category sends, in that order of draws from `rng`."""
    today = _Day(category, household, rng, day)
    uses = _USES.get(category)
    if uses is not None:
        uses(today)
    # Shared events: a daily energy reading, rare filter news; the errors of
    # appliances that run all day.
    today.add(_at(day, household.reports_at), f"{category}.energy")
    if category != "washer" and rng.random() < 0.03:
        today.add(_at(day, rng.uniform(8, 22)), f"{category}.filter")
    if category in DAY_ERRORS:
        today.fault(_at(day, rng.uniform(0, 24)), DAY_ERRORS[category])
    return today.events


def _laundry(today: _Day) -> None:
    rng = today.rng
    for at in _laundry_times(today.household, today.day, rng):
        if today.category == "washer":
            today.add(at, "washer.cycle", trigger=today.trigger())
            today.fault(at + timedelta(minutes=rng.uniform(5, 60)), today.use_errors)
        elif rng.random() < 0.7:  # not every wash is machine-dried
            dried = at + timedelta(minutes=rng.uniform(60, 120))
            today.add(dried, "dryer.cycle", trigger=today.trigger())
            today.fault(dried + timedelta(minutes=rng.uniform(5, 60)), today.use_errors)


def _refrigerator(today: _Day) -> None:
    rng, day = today.rng, today.day
    for at in _fridge_door_times(today.household, day, rng):
        today.add(at, "refrigerator.door")
    if rng.random() < 0.05:
        today.add(
            _at(day, rng.uniform(8, 22)),
            "refrigerator.setpoint_change",
            trigger=today.trigger(),
        )


def _air_conditioner(today: _Day) -> None:
    rng, day = today.rng, today.day
    temp = _MONTHLY_TEMP_C[day.month - 1]
    if temp >= 20 or temp <= 3:
        cooling = temp >= 20
        runs = 2 if cooling and temp >= 24 else 1
        for _ in range(runs if rng.random() < 0.85 else 0):
            on = _at(day, rng.gauss(19.0 if today.household.works_days else 14.0, 2.0))
            today.add(
                on,
                "air_conditioner.mode_change",
                power="on",
                mode="cool" if cooling else "heat",
                setpoint_c=rng.randint(46, 52) / 2 if cooling else rng.randint(40, 48) / 2,
                trigger=today.trigger(),
            )
            for hour in range(rng.randint(1, 5)):
                at = on + timedelta(hours=hour, minutes=30)
                today.add(at, "air_conditioner.climate", outdoor_c=outdoor_temp_c(at, rng))
            today.add(
                on + timedelta(hours=rng.uniform(1, 6)),
                "air_conditioner.mode_change",
                power="off",
                mode="cool" if cooling else "heat",
                trigger=today.trigger(),
            )
            today.fault(on + timedelta(minutes=rng.uniform(1, 60)), today.use_errors)


def _air_purifier(today: _Day) -> None:
    rng, day = today.rng, today.day
    for hour in range(0, 24, 3):
        at = _at(day, hour + rng.uniform(0, 1))
        today.add(
            at,
            "air_purifier.air_quality",
            pm2_5_ug_m3=(reading := pm25(at, rng)),
            pm10_ug_m3=round(min(reading * rng.uniform(1.1, 1.9), 1000.0), 1),
        )
    if rng.random() < 0.3:
        today.add(
            _at(day, rng.uniform(7, 23)),
            "air_purifier.mode_change",
            trigger=today.trigger(),
        )


def _robot_vacuum(today: _Day) -> None:
    rng, day = today.rng, today.day
    run: datetime | None = None
    if today.household.schedules_vacuum:
        if day.weekday() < 5 or rng.random() < 0.5:
            run = _at(day, 10 + rng.uniform(0, 0.1))
            today.add(run, "robot_vacuum.clean_run", trigger="schedule")
    elif rng.random() < 0.4:
        run = _at(day, rng.gauss(19.5, 2))
        today.add(run, "robot_vacuum.clean_run", trigger=today.trigger())
    if run is not None:
        today.fault(run + timedelta(minutes=rng.uniform(3, 40)), today.use_errors)


_USES: dict[str, Callable[[_Day], None]] = {
    "washer": _laundry,
    "dryer": _laundry,
    "refrigerator": _refrigerator,
    "air_conditioner": _air_conditioner,
    "air_purifier": _air_purifier,
    "robot_vacuum": _robot_vacuum,
}
"""How each category is used in a day (the shared events follow in `_day`)."""
