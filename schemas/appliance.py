"""What every appliance category shares: the body base class, common field types, the
events all categories report (errors, energy, firmware, filters, runtime), and the way a
category declares its schemas and their versions.

A body is the `body` object of an envelope (see `schemas.envelope`). Bodies carry no
timestamps of their own: the envelope's `event_time` says when the event ended, and
durations inside the body say how long it lasted. That keeps a body's fields plain JSON
scalars, which strict validation accepts without any string-to-datetime conversion.

Every model is strict (no "42" for 42, no 1 for true), refuses unknown fields and
non-finite numbers, and bounds every number by what the hardware can physically do, so
a corrupted or hostile value is refused instead of skewing planners' statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

SECONDS_PER_DAY = 86_400

# Above any household appliance's rated input (a heat-pump dryer or a 5 kW split AC draws
# less); an energy reading implying more is a metering fault, not usage.
MAX_AVERAGE_POWER_W = 10_000


class Body(BaseModel):
    """Base class of every telemetry body: strict, immutable, closed, finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


Trigger = Literal["panel", "app_remote", "voice", "schedule"]
"""How a feature was started: on the appliance, from the phone app, by a voice
assistant, or by a schedule the owner set up. Planners use it to size remote features."""

DurationS = Annotated[int, Field(ge=0, le=SECONDS_PER_DAY)]
"""A duration in whole seconds, at most one day."""

IntervalS = Annotated[int, Field(ge=1, le=SECONDS_PER_DAY)]
"""A reporting interval in whole seconds, one second to one day."""

Percent = Annotated[int, Field(ge=0, le=100)]
"""A whole percentage."""

FirmwareVersion = Annotated[
    str, StringConstraints(pattern=r"^[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,6}$", max_length=20)
]
"""A firmware version as `major.minor.build`, e.g. `3.12.1047`."""

ErrorCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,7}$")]
"""A manufacturer error code as the display shows it: `E21`, `4C`, `dE`, `F05-2`."""


class ErrorReport(Body):
    """An error code was raised on the appliance, or cleared again.

    Planners count faults per model and firmware; field service uses the severity.
    """

    code: ErrorCode
    severity: Literal["info", "warning", "fault", "critical"]
    state: Literal["raised", "cleared"]


class EnergyReading(Body):
    """Energy the appliance drew from the mains over the interval that ended at event time."""

    interval_s: IntervalS
    energy_wh: Annotated[float, Field(ge=0, le=MAX_AVERAGE_POWER_W * SECONDS_PER_DAY / 3600)]

    @model_validator(mode="after")
    def _plausible_power(self) -> Self:
        """Refuse readings whose average power no household appliance can draw."""
        average_w = self.energy_wh * 3600 / self.interval_s
        if average_w > MAX_AVERAGE_POWER_W:
            raise ValueError(
                f"energy_wh={self.energy_wh} over interval_s={self.interval_s} means an "
                f"average of {average_w:.0f} W, more than {MAX_AVERAGE_POWER_W} W"
            )
        return self


class FirmwareChange(Body):
    """The appliance tried to move from one firmware version to another."""

    from_version: FirmwareVersion
    to_version: FirmwareVersion
    outcome: Literal["installed", "failed", "rolled_back"]
    trigger: Trigger


class FilterStatus(Body):
    """Base of the per-category filter events: remaining life, and what happened to it.

    Each category subclasses it with a `filter` field naming the filters it has.
    """

    event: Literal["reading", "replace_soon", "replaced", "cleaned", "reset"]
    life_pct: Percent


class RuntimeReport(Body):
    """How long the appliance's main load (compressor, fan) ran during the interval."""

    interval_s: IntervalS
    active_s: DurationS

    @model_validator(mode="after")
    def _within_interval(self) -> Self:
        """A load cannot run longer than the interval it is reported for."""
        if self.active_s > self.interval_s:
            raise ValueError(
                f"active_s={self.active_s} is longer than interval_s={self.interval_s}"
            )
        return self


@dataclass(frozen=True, slots=True)
class EventSchema:
    """One schema name and all its versions, as a category declares it.

    `versions[0]` is version 1 and the last one is current. `upgrades[i]` turns a
    validated body of version i+1 into one of version i+2, so a body of any version can
    be brought to the current one by applying the upgrades that follow it. Old versions
    stay in the catalog for as long as devices in the field may still send them.
    """

    name: str
    versions: tuple[type[Body], ...]
    upgrades: tuple[Callable[[Any], Body], ...] = ()

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError(f"{self.name}: a schema needs at least one version")
        if len(self.upgrades) != len(self.versions) - 1:
            raise ValueError(
                f"{self.name}: {len(self.versions)} versions need "
                f"{len(self.versions) - 1} upgrades, got {len(self.upgrades)}"
            )

    @property
    def category(self) -> str:
        """The appliance category, the name's first part (`washer`)."""
        return self.name.split(".", 1)[0]

    @property
    def current_version(self) -> int:
        """The version bodies are stored as."""
        return len(self.versions)


def shared_schemas(category: str, *names: str) -> tuple[EventSchema, ...]:
    """The shared events `names` (`error`, `energy`, ...) registered under `category`."""
    return tuple(EventSchema(f"{category}.{name}", (_SHARED_BODIES[name],)) for name in names)


_SHARED_BODIES: dict[str, type[Body]] = {
    "error": ErrorReport,
    "energy": EnergyReading,
    "firmware": FirmwareChange,
    "runtime": RuntimeReport,
}
