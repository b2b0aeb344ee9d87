"""Tumble dryers: one `dryer.cycle` per drying programme run, lint filter care, and the
shared events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.appliance import Body, EventSchema, FilterStatus, Trigger, shared_schemas

DryerProgram = Literal[
    "cotton",
    "synthetics",
    "mixed",
    "delicates",
    "wool",
    "bedding",
    "towels",
    "shirts",
    "sportswear",
    "quick_dry",
    "timed_dry",
    "refresh",
    "air_dry",
]

DryerOption = Literal["anti_crease", "steam", "eco", "extra_dry", "low_heat", "delay_start"]


class DryerCycle(Body):
    """A finished (or stopped) drying cycle: programme, target dryness, what it used."""

    program: DryerProgram
    dryness: Literal["iron_dry", "cupboard_dry", "extra_dry", "timed"]
    heat: Literal["low", "medium", "high"]
    # Timed programmes and anti-crease tumbling stay under five hours.
    duration_s: Annotated[int, Field(ge=0, le=5 * 3600)]
    # A vented dryer on a full cotton load uses about 4.5 kWh.
    energy_wh: Annotated[int, Field(ge=0, le=6000)]
    # Water condensed out of the load; a 10 kg load holds at most about 6 L after spinning.
    water_removed_l: Annotated[float, Field(ge=0, le=10)]
    options: list[DryerOption] = Field(max_length=6)
    outcome: Literal["completed", "cancelled", "aborted_error"]
    trigger: Trigger


class DryerFilter(FilterStatus):
    """The lint filter or the heat pump's heat-exchanger filter."""

    filter: Literal["lint", "heat_exchanger"]


SCHEMAS: tuple[EventSchema, ...] = (
    EventSchema("dryer.cycle", (DryerCycle,)),
    EventSchema("dryer.filter", (DryerFilter,)),
    *shared_schemas("dryer", "error", "energy", "firmware"),
)
