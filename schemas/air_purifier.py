"""Air purifiers: state changes, air quality readings, fan runtime, filters, and the
shared events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.appliance import Body, EventSchema, FilterStatus, Trigger, shared_schemas

PurifierMode = Literal["auto", "manual", "sleep", "turbo", "eco"]
# Purifier fans have at most five steps; 0 means the fan is stopped (standby in auto).
FanLevel = Annotated[int, Field(ge=0, le=5)]
# Optical PM sensors saturate at 1000 ug/m3.
ParticlesUgM3 = Annotated[float, Field(ge=0, le=1000)]


class AirPurifierModeChange(Body):
    """The purifier's state after the owner (or a schedule) changed it."""

    power: Literal["on", "off"]
    mode: PurifierMode
    fan_level: FanLevel
    trigger: Trigger


class AirPurifierAirQuality(Body):
    """Particle readings at event time, with the mode and fan level they were taken in."""

    pm2_5_ug_m3: ParticlesUgM3
    pm10_ug_m3: ParticlesUgM3
    mode: PurifierMode
    fan_level: FanLevel


class AirPurifierFilter(FilterStatus):
    """The HEPA, activated carbon or washable pre-filter."""

    filter: Literal["hepa", "carbon", "pre_filter"]


SCHEMAS: tuple[EventSchema, ...] = (
    EventSchema("air_purifier.mode_change", (AirPurifierModeChange,)),
    EventSchema("air_purifier.air_quality", (AirPurifierAirQuality,)),
    EventSchema("air_purifier.filter", (AirPurifierFilter,)),
    *shared_schemas("air_purifier", "runtime", "error", "energy", "firmware"),
)
