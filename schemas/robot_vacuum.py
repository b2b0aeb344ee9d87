"""Robot vacuums: one `robot_vacuum.clean_run` per cleaning job, filters and brushes, and
the shared events."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from schemas.appliance import Body, EventSchema, FilterStatus, Percent, Trigger, shared_schemas


class RobotVacuumCleanRun(Body):
    """A finished (or abandoned) cleaning job."""

    mode: Literal["auto", "room", "zone", "spot", "edge", "mop", "vacuum_and_mop"]
    suction: Literal["quiet", "standard", "strong", "max"]
    # Large homes with mid-run recharges stay well under 500 m2 and six hours.
    area_m2: Annotated[float, Field(ge=0, le=500)]
    duration_s: Annotated[int, Field(ge=0, le=6 * 3600)]
    rooms: Annotated[int, Field(ge=0, le=50)]
    recharges: Annotated[int, Field(ge=0, le=10)]
    battery_start_pct: Percent
    battery_end_pct: Percent
    outcome: Literal["completed", "returned_low_battery", "stuck", "cancelled", "error"]
    trigger: Trigger

    @model_validator(mode="after")
    def _battery_drains(self) -> Self:
        """Without a recharge the battery can only go down during a run."""
        if self.recharges == 0 and self.battery_end_pct > self.battery_start_pct:
            raise ValueError(
                f"battery_end_pct={self.battery_end_pct} is above battery_start_pct="
                f"{self.battery_start_pct} although the run had no recharge"
            )
        return self


class RobotVacuumFilter(FilterStatus):
    """The dust bin filter, the main and side brushes, or the mop pad."""

    filter: Literal["dust_filter", "main_brush", "side_brush", "mop_pad"]


SCHEMAS: tuple[EventSchema, ...] = (
    EventSchema("robot_vacuum.clean_run", (RobotVacuumCleanRun,)),
    EventSchema("robot_vacuum.filter", (RobotVacuumFilter,)),
    *shared_schemas("robot_vacuum", "error", "energy", "firmware"),
)
