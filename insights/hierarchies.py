"""Each report's hierarchy: how its small segments roll up, and how a merged row's
numbers are computed from its members (`insights.generalise`).

Levels, finest first; after the last, all that remain merge into one "other" row:

    programs      firmware (same model, schema and program) -> model (all models of the
                  schema's category) -> program or mode (same schema)
    heatmap       hour -> part of the day (night 0-5, morning 6-11, afternoon 12-17,
                  evening 18-23) -> weekdays (Mon-Fri) or weekend, same part of the day
    regions       (straight to "other regions")
    cycles        cycles per device-week -> range (0, 1-3, 4-7, 8-13, 14+) -> any count
                  of the category
    errors        firmware (same model and code) -> model (same category and code) ->
                  code (same category)
    adoption      week -> month (of the week's Monday)
    cohorts       category (same cohort) -> cohort (same category)
    completeness  model -> category (same day) -> all models of the day -> the week
                  (Monday to Sunday)

Each `merge` mirrors its report's SQL in `insights.reports`: sums of additive
measures, sizes of unions of sets for distinct counts, ratios recomputed with `ratio`
at the same scale and places. Every report's tests compare merged rows with a direct
SQL computation of the merged group over the raw rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, timedelta

from insights.generalise import (
    Generalisation,
    Label,
    Level,
    Parent,
    Scalar,
    Segment,
    ratio,
    total,
    union,
)

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
PARTS_OF_DAY = ((0, 5, "night"), (6, 11, "morning"), (12, 17, "afternoon"), (18, 23, "evening"))
CYCLE_RANGES = ((0, 0), (1, 3), (4, 7), (8, 13), (14, None))
"""Cycles per device-week: the ranges small counts are merged into (14 and more)."""


def _text(value: Scalar) -> str:
    return "unknown" if value is None else str(value)


def _category(s: Segment) -> str:
    """The segment's category: its schema's prefix, or the `_category` its SQL gave."""
    schema = s.key.get("schema")
    if isinstance(schema, str):
        return schema.split(".", 1)[0]
    return _text(s.parts.get("_category"))


def _models(s: Segment) -> Label:
    return Label(f"all {_category(s).replace('_', ' ')} models")


_VERSIONS = Label("all versions")

# -- programs: model, firmware, schema, feature ---------------------------------------


def _programs_firmware(s: Segment) -> Parent:
    return (s.key["model"], s.key["schema"], s.key["feature"]), {"firmware": _VERSIONS}


def _programs_model(s: Segment) -> Parent:
    return (s.key["schema"], s.key["feature"]), {"model": _models(s), "firmware": _VERSIONS}


def _programs_feature(s: Segment) -> Parent:
    schema = str(s.key["schema"])
    kind = "programs" if schema.endswith(".cycle") else "modes"
    labels = {"model": _models(s), "firmware": _VERSIONS, "feature": Label(f"all {kind}")}
    return (schema,), labels


def _programs_merge(members: Sequence[Segment]) -> dict[str, Scalar]:
    return {"events": total(members, "events"), "devices": len(union(members, "_devices"))}


PROGRAMS = Generalisation(
    (
        Level("firmware versions", _programs_firmware),
        Level("models", _programs_model),
        Level("programs or modes", _programs_feature),
    ),
    _programs_merge,
    {"model": "models", "firmware": "versions", "schema": "event types", "feature": "features"},
)

# -- heatmap: day_of_week, hour ---------------------------------------------------------


def _part_of_day(hour: Scalar) -> tuple[str, Label]:
    h = int(hour or 0)
    for lo, hi, name in PARTS_OF_DAY:
        if lo <= h <= hi:
            return name, Label(f"{lo}-{hi} ({name})", context=name)
    raise ValueError(f"hour {hour!r} is not 0-23")


def _heatmap_part(s: Segment) -> Parent:
    name, hours = _part_of_day(s.key["hour"])
    return (s.key["day_of_week"], name), {"hour": hours}


def _heatmap_daytype(s: Segment) -> Parent:
    name, hours = _part_of_day(s.key["hour"])
    weekend = int(s.key["day_of_week"] or 0) >= 6
    days = (
        Label("Sat-Sun (weekend)", "weekend")
        if weekend
        else Label("Mon-Fri (weekdays)", "weekdays")
    )
    return (weekend, name), {"day_of_week": days, "hour": hours}


def _weekday(value: Scalar) -> str:
    return WEEKDAYS[int(value or 1) - 1]


HEATMAP = Generalisation(
    (
        Level("hours", _heatmap_part),
        Level("hours of the week", _heatmap_daytype, mixed="hours of the week"),
    ),
    lambda members: {"events": total(members, "events")},
    {"day_of_week": "days", "hour": "hours"},
    {"day_of_week": _weekday},
)

# -- regions: region --------------------------------------------------------------------


def _regions_merge(members: Sequence[Segment]) -> dict[str, Scalar]:
    events, devices = total(members, "events"), len(union(members, "_devices"))
    return {
        "events": events,
        "cycles": total(members, "cycles"),
        "devices": devices,
        "events_per_device": ratio(events, devices, 2),
    }


REGIONS = Generalisation((), _regions_merge, {"region": "regions"})

# -- cycles: category, cycles -----------------------------------------------------------


def _cycles_range(s: Segment) -> Parent:
    n = int(s.key["cycles"] or 0)
    for lo, hi in CYCLE_RANGES:
        if n >= lo and (hi is None or n <= hi):
            label = f"{lo}+" if hi is None else f"{lo}-{hi}" if hi != lo else str(lo)
            return (s.key["category"], lo), {"cycles": Label(label)}
    raise ValueError(f"cycles {n} below 0")


def _cycles_category(s: Segment) -> Parent:
    return (s.key["category"],), {"cycles": Label("all counts")}


CYCLES = Generalisation(
    (Level("cycle counts", _cycles_range), Level("cycle counts", _cycles_category)),
    lambda members: {"device_weeks": total(members, "device_weeks")},
    {"category": "categories", "cycles": "counts"},
)

# -- errors: model, firmware, code ------------------------------------------------------


def _errors_firmware(s: Segment) -> Parent:
    return (s.key["model"], s.key["code"]), {"firmware": _VERSIONS}


def _errors_model(s: Segment) -> Parent:
    return (_category(s), s.key["code"]), {"model": _models(s), "firmware": _VERSIONS}


def _errors_code(s: Segment) -> Parent:
    codes = Label(f"all {_category(s).replace('_', ' ')} codes")
    return (_category(s),), {"model": _models(s), "firmware": _VERSIONS, "code": codes}


def _errors_merge(members: Sequence[Segment]) -> dict[str, Scalar]:
    """Errors per device-day of the members' models and firmware together. A device-day
    is in one (model, firmware) unless the device changed firmware that day: the SQL
    gives each pair's device-days found in that pair alone (`_only_days`) and lists the
    others (`_shared_days`), so the union counts each device-day once."""
    alone: dict[tuple[Scalar, Scalar], int] = {}
    for m in members:
        alone[m.key["model"], m.key["firmware"]] = int(m.parts.get("_only_days") or 0)
    device_days = sum(alone.values()) + len(union(members, "_shared_days"))
    errors = total(members, "errors")
    return {
        "errors": errors,
        "devices": len(union(members, "_devices")),
        "device_days": device_days,
        "per_1000_device_days": ratio(errors, device_days, 3, scale=1000),
    }


ERRORS = Generalisation(
    (
        Level("firmware versions", _errors_firmware),
        Level("models", _errors_model),
        Level("error codes", _errors_code),
    ),
    _errors_merge,
    {"model": "models", "firmware": "versions", "code": "codes"},
)

# -- adoption: week ---------------------------------------------------------------------


def _adoption_month(s: Segment) -> Parent:
    month = str(s.key["week"])[:7]
    return (month,), {"week": Label(f"weeks of {month}")}


def _adoption_merge(members: Sequence[Segment]) -> dict[str, Scalar]:
    active = len(union(members, "_devices"))
    remote, schedule = len(union(members, "_remote")), len(union(members, "_schedule"))
    return {
        "active_devices": active,
        "remote_start_devices": remote,
        "schedule_devices": schedule,
        "remote_start_share": ratio(remote, active, 4),
        "schedule_share": ratio(schedule, active, 4),
    }


ADOPTION = Generalisation((Level("weeks", _adoption_month),), _adoption_merge, {"week": "weeks"})

# -- cohorts: cohort, category ----------------------------------------------------------


def _cohorts_merge(members: Sequence[Segment]) -> dict[str, Scalar]:
    device_days, cycles = len(union(members, "_device_days")), total(members, "cycles")
    return {
        "devices": len(union(members, "_devices")),
        "device_days": device_days,
        "cycles": cycles,
        "cycles_per_device_week": ratio(cycles, device_days, 3, scale=7),
        "app_share": ratio(total(members, "_app_uses"), total(members, "_uses"), 4),
    }


COHORTS = Generalisation(
    (
        Level("categories", lambda s: ((s.key["cohort"],), {"category": Label("all categories")})),
        Level("cohorts", lambda s: ((s.key["category"],), {"cohort": Label("all cohorts")})),
    ),
    _cohorts_merge,
    {"cohort": "cohorts", "category": "categories"},
)

# -- completeness: day, model -----------------------------------------------------------


def _week_of(day: Scalar) -> str:
    d = date.fromisoformat(str(day))
    return (d - timedelta(days=d.weekday())).isoformat()


def _completeness_week(s: Segment) -> Parent:
    monday = _week_of(s.key["day"])
    week = Label(f"week of {monday}", context=f"week of {monday}")
    return (monday,), {"day": week, "model": Label("all models")}


def _completeness_merge(members: Sequence[Segment]) -> dict[str, Scalar]:
    received, missing = total(members, "received"), total(members, "missing")
    return {
        "device_days": total(members, "device_days"),
        "received": received,
        "missing": missing,
        "complete_device_days": total(members, "complete_device_days"),
        "completeness": ratio(received, received + missing, 4),
    }


COMPLETENESS = Generalisation(
    (
        Level("models", lambda s: ((s.key["day"], _category(s)), {"model": _models(s)})),
        Level("models", lambda s: ((s.key["day"],), {"model": Label("all models")})),
        Level("days", _completeness_week),
    ),
    _completeness_merge,
    {"day": "days", "model": "models"},
)

HIERARCHIES: Mapping[str, Generalisation] = {
    "programs": PROGRAMS,
    "heatmap": HEATMAP,
    "regions": REGIONS,
    "cycles": CYCLES,
    "errors": ERRORS,
    "adoption": ADOPTION,
    "cohorts": COHORTS,
    "completeness": COMPLETENESS,
}
