"""Washing machines: one `washer.cycle` per wash programme run, plus the shared events.

`washer.cycle` is the one schema with two versions so far. Version 1 firmware reported
energy in kWh as a float and had no remote start; version 2 reports whole Wh and says
how the cycle was started. Version 1 bodies are upgraded by `upgrade_cycle_v1` and
stored as version 2.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.appliance import Body, EventSchema, Trigger, shared_schemas

WasherProgram = Literal[
    "cotton",
    "eco_40_60",
    "synthetics",
    "mixed",
    "delicates",
    "wool",
    "hand_wash",
    "quick_15",
    "quick_30",
    "bedding",
    "sportswear",
    "baby_care",
    "allergy_steam",
    "rinse_spin",
    "spin_drain",
    "drum_clean",
]

WasherOption = Literal["prewash", "extra_rinse", "steam", "intensive", "time_saver", "anti_crease"]

# 0 means an unheated ("cold") wash; 95 is the hottest programme any washer offers.
WashTemperatureC = Annotated[int, Field(ge=0, le=95)]
# 0 means no final spin (rinse hold); 1800 rpm is the fastest domestic drum.
SpinRpm = Annotated[int, Field(ge=0, le=1800)]
# Eight hours is longer than any programme, including delayed soak and steam options.
CycleDurationS = Annotated[int, Field(ge=0, le=8 * 3600)]
# A 90 C cotton cycle in a large drum uses about 2.5 kWh; 5 kWh leaves a wide margin.
WashEnergyWh = Annotated[int, Field(ge=0, le=5000)]
# Old top-loaders use up to about 150 L per cycle.
WaterL = Annotated[float, Field(ge=0, le=200)]

CycleOutcome = Literal["completed", "cancelled", "aborted_error"]


class WasherCycleV1(Body):
    """A finished (or stopped) wash cycle, as version 1 firmware reports it."""

    program: WasherProgram
    temperature_c: WashTemperatureC
    spin_rpm: SpinRpm
    duration_s: CycleDurationS
    energy_kwh: Annotated[float, Field(ge=0, le=5)]
    water_l: WaterL
    options: list[WasherOption] = Field(max_length=6)
    outcome: CycleOutcome


class WasherCycle(Body):
    """A finished (or stopped) wash cycle: the programme, its options, and what it used.

    Version 2: energy in whole Wh, and `trigger` says how the cycle was started.
    """

    program: WasherProgram
    temperature_c: WashTemperatureC
    spin_rpm: SpinRpm
    duration_s: CycleDurationS
    energy_wh: WashEnergyWh
    water_l: WaterL
    options: list[WasherOption] = Field(max_length=6)
    outcome: CycleOutcome
    trigger: Trigger


def upgrade_cycle_v1(v1: WasherCycleV1) -> WasherCycle:
    """A version 1 cycle as version 2.

    Energy is rounded to the nearest Wh (v1 sent kWh with at most Wh resolution). The
    trigger is "panel": version 1 firmware had neither app, voice nor scheduled start,
    so every v1 cycle was started on the appliance's own panel.
    """
    return WasherCycle(
        program=v1.program,
        temperature_c=v1.temperature_c,
        spin_rpm=v1.spin_rpm,
        duration_s=v1.duration_s,
        energy_wh=round(v1.energy_kwh * 1000),
        water_l=v1.water_l,
        options=list(v1.options),
        outcome=v1.outcome,
        trigger="panel",
    )


SCHEMAS: tuple[EventSchema, ...] = (
    EventSchema("washer.cycle", (WasherCycleV1, WasherCycle), (upgrade_cycle_v1,)),
    *shared_schemas("washer", "error", "energy", "firmware"),
)
