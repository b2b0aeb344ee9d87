"""Air conditioners (split and portable): state changes, indoor/outdoor climate readings,
compressor runtime, the air filter, and the shared events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.appliance import Body, EventSchema, FilterStatus, Trigger, shared_schemas

AcMode = Literal["cool", "heat", "dry", "fan", "auto"]
FanSpeed = Literal["auto", "quiet", "low", "medium", "high", "turbo"]


class AirConditionerModeChange(Body):
    """The unit's state after the owner (or a schedule) changed it.

    The full state is sent, not only what changed, so one event is enough to know how
    the unit is running.
    """

    power: Literal["on", "off"]
    mode: AcMode
    # Remote controls offer 16-32 C in half-degree steps.
    setpoint_c: Annotated[float, Field(ge=16, le=32, multiple_of=0.5)]
    fan_speed: FanSpeed
    swing: Literal["off", "vertical", "horizontal", "both"]
    trigger: Trigger


class AirConditionerClimate(Body):
    """Temperatures and humidity the unit measured at event time."""

    indoor_c: Annotated[float, Field(ge=-20, le=50)]
    outdoor_c: Annotated[float, Field(ge=-40, le=60)]
    humidity_pct: Annotated[float, Field(ge=0, le=100)]


class AirConditionerFilter(FilterStatus):
    """The indoor unit's washable air filter or an add-on fine-dust filter."""

    filter: Literal["air", "fine_dust"]


SCHEMAS: tuple[EventSchema, ...] = (
    EventSchema("air_conditioner.mode_change", (AirConditionerModeChange,)),
    EventSchema("air_conditioner.climate", (AirConditionerClimate,)),
    EventSchema("air_conditioner.filter", (AirConditionerFilter,)),
    *shared_schemas("air_conditioner", "runtime", "error", "energy", "firmware"),
)
