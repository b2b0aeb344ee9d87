"""Refrigerators: door openings, setpoint and mode changes, compressor runtime, the water
filter, and the shared events."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from schemas.appliance import Body, EventSchema, FilterStatus, Trigger, shared_schemas

Door = Literal["fridge", "fridge_left", "fridge_right", "freezer", "drawer", "door_in_door"]
Compartment = Literal["fridge", "freezer", "convertible"]

# The setpoint range each compartment's controls offer, in whole degrees Celsius.
SETPOINT_RANGE_C: dict[str, tuple[int, int]] = {
    "fridge": (0, 8),
    "freezer": (-24, -14),
    "convertible": (-22, 8),
}


class RefrigeratorDoor(Body):
    """A door was opened and closed again (reported when it closes)."""

    door: Door
    # An hour is far past the door-open alarm; longer means a faulty door switch.
    open_s: Annotated[float, Field(ge=0, le=3600)]
    # Whether the door-open alarm sounded.
    alarm: bool


class RefrigeratorSetpointChange(Body):
    """The owner changed a compartment's target temperature."""

    compartment: Compartment
    previous_c: Annotated[int, Field(ge=-24, le=8)]
    setpoint_c: Annotated[int, Field(ge=-24, le=8)]
    trigger: Trigger

    @model_validator(mode="after")
    def _within_compartment_range(self) -> Self:
        """Each compartment offers its own range; a freezer at +5 C is a bad report."""
        low, high = SETPOINT_RANGE_C[self.compartment]
        for field in ("previous_c", "setpoint_c"):
            value = getattr(self, field)
            if not low <= value <= high:
                raise ValueError(
                    f"{field}={value} is outside the {self.compartment} range {low}..{high} C"
                )
        return self


class RefrigeratorModeChange(Body):
    """A special mode was switched on or off."""

    mode: Literal["eco", "vacation", "super_cool", "super_freeze", "sabbath", "ice_plus"]
    enabled: bool
    trigger: Trigger


class RefrigeratorFilter(FilterStatus):
    """The water filter (dispenser and ice maker) or the odour/air filter."""

    filter: Literal["water", "air"]


SCHEMAS: tuple[EventSchema, ...] = (
    EventSchema("refrigerator.door", (RefrigeratorDoor,)),
    EventSchema("refrigerator.setpoint_change", (RefrigeratorSetpointChange,)),
    EventSchema("refrigerator.mode_change", (RefrigeratorModeChange,)),
    EventSchema("refrigerator.filter", (RefrigeratorFilter,)),
    *shared_schemas("refrigerator", "runtime", "error", "energy", "firmware"),
)
