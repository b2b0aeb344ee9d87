"""Plausible example bodies for every schema, for the fleet simulator, tests and the
benchmark.

Bodies are built as plain dicts straight from the random generator (no model round
trip), so the simulator can afford one per simulated message. The same seeded
`random.Random` always gives the same bodies. Values follow the hardware: a wool wash
is cool and spins slowly, a freezer setpoint is below -14 C, energy matches a realistic
power draw. The tests check every example against its model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, get_args

from schemas.air_conditioner import AcMode, FanSpeed
from schemas.air_purifier import PurifierMode
from schemas.appliance import ErrorReport
from schemas.catalog import current_version, schema
from schemas.dryer import DryerOption, DryerProgram
from schemas.refrigerator import SETPOINT_RANGE_C
from schemas.washer import WasherOption, WasherProgram

Example = Callable[[random.Random], dict[str, Any]]

_TRIGGERS = ("panel", "app_remote", "voice", "schedule")
_TRIGGER_WEIGHTS = (60, 25, 5, 10)
_WASHER_PROGRAMS: tuple[str, ...] = get_args(WasherProgram)
_WASHER_OPTIONS: tuple[str, ...] = get_args(WasherOption)
_DRYER_PROGRAMS: tuple[str, ...] = get_args(DryerProgram)
_DRYER_OPTIONS: tuple[str, ...] = get_args(DryerOption)
_SEVERITIES: tuple[str, ...] = get_args(ErrorReport.model_fields["severity"].annotation)

# Temperatures each washer programme offers; the cold (0) and hot ends are rarer.
_WASH_TEMPERATURES: dict[str, tuple[int, ...]] = {
    "cotton": (0, 20, 30, 40, 60, 90),
    "eco_40_60": (40, 60),
    "synthetics": (0, 20, 30, 40, 60),
    "mixed": (20, 30, 40),
    "delicates": (0, 20, 30),
    "wool": (0, 20, 30),
    "hand_wash": (0, 20, 30),
    "quick_15": (0, 20),
    "quick_30": (20, 30, 40),
    "bedding": (30, 40, 60),
    "sportswear": (20, 30, 40),
    "baby_care": (60, 90),
    "allergy_steam": (60,),
    "rinse_spin": (0,),
    "spin_drain": (0,),
    "drum_clean": (60, 90),
}
_GENTLE_PROGRAMS = frozenset({"delicates", "wool", "hand_wash", "sportswear"})

_FILTERS: dict[str, tuple[str, ...]] = {
    "dryer": ("lint", "heat_exchanger"),
    "refrigerator": ("water", "air"),
    "air_conditioner": ("air", "fine_dust"),
    "air_purifier": ("hepa", "carbon", "pre_filter"),
    "robot_vacuum": ("dust_filter", "main_brush", "side_brush", "mop_pad"),
}
# Typical average draw in W while the appliance reports energy (standby included).
_AVERAGE_POWER_W: dict[str, tuple[int, int]] = {
    "washer": (5, 900),
    "dryer": (5, 1500),
    "refrigerator": (20, 150),
    "air_conditioner": (10, 2500),
    "air_purifier": (2, 60),
    "robot_vacuum": (2, 40),
}
_ERROR_CODES: dict[str, tuple[str, ...]] = {
    "washer": ("E21", "E24", "OE", "IE", "UE", "dE", "4C"),
    "dryer": ("E32", "F05", "d80", "HE", "tE"),
    "refrigerator": ("22E", "33E", "rF", "Er-dH", "FF"),
    "air_conditioner": ("E1", "E5", "CH05", "P4", "F2"),
    "air_purifier": ("E1", "F1", "SE"),
    "robot_vacuum": ("E2", "E7", "C12", "ERR5"),
}


def example_body(schema_name: str, rng: random.Random) -> dict[str, Any]:
    """A valid, plausible current-version body of `schema_name`.

    Raises `InvalidTelemetry(Reason.UNKNOWN_SCHEMA)` for a name not in the catalog.
    """
    declared = schema(schema_name)
    event = schema_name.split(".", 1)[1]
    shared = _SHARED_EXAMPLES.get(event)
    if shared is not None:
        return shared(declared.category, rng)
    return _EXAMPLES[schema_name](rng)


def example_v1_body(schema_name: str, rng: random.Random) -> dict[str, Any]:
    """A valid, plausible version-1 body of `schema_name`.

    For a schema whose only version is 1 this is the same as `example_body`; for
    `washer.cycle` it is the old wire format that the catalog upgrades.
    """
    if current_version(schema_name) == 1:
        return example_body(schema_name, rng)
    return _V1_EXAMPLES[schema_name](rng)


def _trigger(rng: random.Random) -> str:
    return rng.choices(_TRIGGERS, _TRIGGER_WEIGHTS)[0]


def _wash(rng: random.Random) -> dict[str, Any]:
    """The fields both washer.cycle versions share, plus energy in Wh."""
    program = rng.choice(_WASHER_PROGRAMS)
    temperature = rng.choice(_WASH_TEMPERATURES[program])
    spin = rng.choice((400, 600, 800) if program in _GENTLE_PROGRAMS else (800, 1000, 1200, 1400))
    if program.startswith("quick"):
        duration = rng.randint(14, 35) * 60
    else:
        duration = rng.randint(45, 210) * 60
    # Heating the water dominates: roughly 10 Wh per degree above a 15 C supply.
    energy_wh = 80 + 10 * max(0, temperature - 15) + rng.randint(0, 150)
    outcome = rng.choices(("completed", "cancelled", "aborted_error"), (94, 5, 1))[0]
    return {
        "program": program,
        "temperature_c": temperature,
        "spin_rpm": spin,
        "duration_s": duration,
        "energy_wh": energy_wh,
        "water_l": round(rng.uniform(30, 75), 1),
        "options": rng.sample(_WASHER_OPTIONS, rng.choice((0, 0, 1, 2))),
        "outcome": outcome,
    }


def _washer_cycle(rng: random.Random) -> dict[str, Any]:
    body = _wash(rng)
    body["trigger"] = _trigger(rng)
    return body


def _washer_cycle_v1(rng: random.Random) -> dict[str, Any]:
    body = _wash(rng)
    body["energy_kwh"] = body.pop("energy_wh") / 1000
    return body


def _dryer_cycle(rng: random.Random) -> dict[str, Any]:
    program = rng.choice(_DRYER_PROGRAMS)
    timed = program in ("timed_dry", "refresh", "air_dry")
    duration = rng.randint(20, 180) * 60
    return {
        "program": program,
        "dryness": "timed" if timed else rng.choice(("iron_dry", "cupboard_dry", "extra_dry")),
        "heat": "low"
        if program in ("wool", "delicates", "air_dry")
        else rng.choice(("medium", "high")),
        "duration_s": duration,
        "energy_wh": min(6000, duration * rng.randint(600, 1500) // 3600),
        "water_removed_l": round(rng.uniform(0.2, 4.5), 2),
        "options": rng.sample(_DRYER_OPTIONS, rng.choice((0, 1, 1, 2))),
        "outcome": rng.choices(("completed", "cancelled", "aborted_error"), (95, 4, 1))[0],
        "trigger": _trigger(rng),
    }


def _refrigerator_door(rng: random.Random) -> dict[str, Any]:
    open_s = round(rng.expovariate(1 / 12), 1)
    return {
        "door": rng.choices(("fridge", "freezer", "drawer"), (80, 15, 5))[0],
        "open_s": min(open_s, 3600.0),
        "alarm": open_s > 60,
    }


def _refrigerator_setpoint_change(rng: random.Random) -> dict[str, Any]:
    compartment = rng.choices(("fridge", "freezer", "convertible"), (70, 25, 5))[0]
    low, high = SETPOINT_RANGE_C[compartment]
    return {
        "compartment": compartment,
        "previous_c": rng.randint(low, high),
        "setpoint_c": rng.randint(low, high),
        "trigger": _trigger(rng),
    }


def _refrigerator_mode_change(rng: random.Random) -> dict[str, Any]:
    return {
        "mode": rng.choice(("eco", "vacation", "super_cool", "super_freeze", "ice_plus")),
        "enabled": rng.random() < 0.5,
        "trigger": _trigger(rng),
    }


def _air_conditioner_mode_change(rng: random.Random) -> dict[str, Any]:
    mode = rng.choice(get_args(AcMode))
    return {
        "power": "on" if rng.random() < 0.8 else "off",
        "mode": mode,
        "setpoint_c": rng.randint(36, 56) / 2 if mode != "heat" else rng.randint(40, 50) / 2,
        "fan_speed": rng.choice(get_args(FanSpeed)),
        "swing": rng.choice(("off", "off", "vertical", "both")),
        "trigger": _trigger(rng),
    }


def _air_conditioner_climate(rng: random.Random) -> dict[str, Any]:
    return {
        "indoor_c": round(rng.uniform(17, 31), 1),
        "outdoor_c": round(rng.uniform(-10, 40), 1),
        "humidity_pct": round(rng.uniform(25, 80), 1),
    }


def _air_purifier_mode_change(rng: random.Random) -> dict[str, Any]:
    mode = rng.choice(get_args(PurifierMode))
    return {
        "power": "on" if rng.random() < 0.85 else "off",
        "mode": mode,
        "fan_level": 5 if mode == "turbo" else 1 if mode == "sleep" else rng.randint(0, 5),
        "trigger": _trigger(rng),
    }


def _air_purifier_air_quality(rng: random.Random) -> dict[str, Any]:
    pm2_5 = round(min(rng.lognormvariate(2.3, 0.8), 900.0), 1)
    return {
        "pm2_5_ug_m3": pm2_5,
        "pm10_ug_m3": round(min(pm2_5 * rng.uniform(1.1, 1.9), 1000.0), 1),
        "mode": rng.choice(get_args(PurifierMode)),
        "fan_level": rng.randint(0, 5),
    }


def _robot_vacuum_clean_run(rng: random.Random) -> dict[str, Any]:
    duration = rng.randint(10, 150) * 60
    recharges = 1 if duration > 100 * 60 else 0
    start = rng.randint(60, 100)
    end = rng.randint(15, start) if recharges == 0 else rng.randint(15, 100)
    return {
        "mode": rng.choice(("auto", "auto", "room", "zone", "spot", "edge", "vacuum_and_mop")),
        "suction": rng.choice(("quiet", "standard", "standard", "strong", "max")),
        "area_m2": round(duration / 60 * rng.uniform(0.6, 1.2), 1),
        "duration_s": duration,
        "rooms": rng.randint(1, 8),
        "recharges": recharges,
        "battery_start_pct": start,
        "battery_end_pct": end,
        "outcome": rng.choices(
            ("completed", "returned_low_battery", "stuck", "cancelled", "error"),
            (88, 4, 4, 3, 1),
        )[0],
        "trigger": _trigger(rng),
    }


def _error(category: str, rng: random.Random) -> dict[str, Any]:
    return {
        "code": rng.choice(_ERROR_CODES[category]),
        "severity": rng.choice(_SEVERITIES),
        "state": rng.choice(("raised", "cleared")),
    }


def _energy(category: str, rng: random.Random) -> dict[str, Any]:
    interval_s = rng.choice((900, 3600))
    low, high = _AVERAGE_POWER_W[category]
    return {
        "interval_s": interval_s,
        "energy_wh": round(rng.uniform(low, high) * interval_s / 3600, 2),
    }


def _firmware(category: str, rng: random.Random) -> dict[str, Any]:
    major, minor = rng.randint(1, 5), rng.randint(0, 20)
    build = rng.randint(1000, 3000)
    return {
        "from_version": f"{major}.{minor}.{build}",
        "to_version": f"{major}.{minor + 1}.{build + rng.randint(1, 200)}",
        "outcome": rng.choices(("installed", "failed", "rolled_back"), (95, 4, 1))[0],
        "trigger": rng.choice(("schedule", "app_remote")),
    }


def _filter(category: str, rng: random.Random) -> dict[str, Any]:
    event = rng.choices(
        ("reading", "replace_soon", "replaced", "cleaned", "reset"), (70, 10, 8, 7, 5)
    )[0]
    life = {"replaced": 100, "cleaned": 100, "reset": 100}.get(event)
    if life is None:
        life = rng.randint(0, 15) if event == "replace_soon" else rng.randint(0, 100)
    return {"filter": rng.choice(_FILTERS[category]), "event": event, "life_pct": life}


def _runtime(category: str, rng: random.Random) -> dict[str, Any]:
    interval_s = 3600
    return {"interval_s": interval_s, "active_s": rng.randint(0, interval_s)}


_EXAMPLES: dict[str, Example] = {
    "washer.cycle": _washer_cycle,
    "dryer.cycle": _dryer_cycle,
    "refrigerator.door": _refrigerator_door,
    "refrigerator.setpoint_change": _refrigerator_setpoint_change,
    "refrigerator.mode_change": _refrigerator_mode_change,
    "air_conditioner.mode_change": _air_conditioner_mode_change,
    "air_conditioner.climate": _air_conditioner_climate,
    "air_purifier.mode_change": _air_purifier_mode_change,
    "air_purifier.air_quality": _air_purifier_air_quality,
    "robot_vacuum.clean_run": _robot_vacuum_clean_run,
}
_V1_EXAMPLES: dict[str, Example] = {"washer.cycle": _washer_cycle_v1}
# Shared events have one body model for every category, so one example each, which
# the category only flavours (error codes, filter names, power draw).
_SHARED_EXAMPLES: dict[str, Callable[[str, random.Random], dict[str, Any]]] = {
    "error": _error,
    "energy": _energy,
    "firmware": _firmware,
    "filter": _filter,
    "runtime": _runtime,
}
