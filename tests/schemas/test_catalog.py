"""The catalog: names, versions, upgrades, and the examples the simulator sends."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from schemas import InvalidTelemetry, Reason
from schemas.catalog import (
    SCHEMA_NAMES,
    categories,
    current_version,
    model,
    models,
    validate_body,
)
from schemas.examples import example_body, example_v1_body
from schemas.washer import WasherCycle, WasherCycleV1, upgrade_cycle_v1

V1_CYCLE: dict[str, Any] = {
    "program": "eco_40_60",
    "temperature_c": 40,
    "spin_rpm": 1400,
    "duration_s": 12600,
    "energy_kwh": 0.718,
    "water_l": 52.0,
    "options": ["extra_rinse"],
    "outcome": "completed",
}


def test_categories() -> None:
    assert categories() == (
        "washer",
        "dryer",
        "refrigerator",
        "air_conditioner",
        "air_purifier",
        "robot_vacuum",
    )


def test_schema_names() -> None:
    assert SCHEMA_NAMES == (
        "washer.cycle",
        "washer.error",
        "washer.energy",
        "washer.firmware",
        "dryer.cycle",
        "dryer.filter",
        "dryer.error",
        "dryer.energy",
        "dryer.firmware",
        "refrigerator.door",
        "refrigerator.setpoint_change",
        "refrigerator.mode_change",
        "refrigerator.filter",
        "refrigerator.runtime",
        "refrigerator.error",
        "refrigerator.energy",
        "refrigerator.firmware",
        "air_conditioner.mode_change",
        "air_conditioner.climate",
        "air_conditioner.filter",
        "air_conditioner.runtime",
        "air_conditioner.error",
        "air_conditioner.energy",
        "air_conditioner.firmware",
        "air_purifier.mode_change",
        "air_purifier.air_quality",
        "air_purifier.filter",
        "air_purifier.runtime",
        "air_purifier.error",
        "air_purifier.energy",
        "air_purifier.firmware",
        "robot_vacuum.clean_run",
        "robot_vacuum.filter",
        "robot_vacuum.error",
        "robot_vacuum.energy",
        "robot_vacuum.firmware",
    )


def test_versions() -> None:
    assert {name: current_version(name) for name in SCHEMA_NAMES if current_version(name) > 1} == {
        "washer.cycle": 2
    }
    assert model("washer.cycle", 1) is WasherCycleV1
    assert model("washer.cycle", 2) is WasherCycle
    assert len(models()) == len(SCHEMA_NAMES) + 1


def test_every_model_is_strict_closed_and_finite() -> None:
    for name, version, body_model in models():
        config = body_model.model_config
        assert (config.get("frozen"), config.get("extra"), config.get("strict")) == (
            True,
            "forbid",
            True,
        ), (name, version)
        assert config.get("allow_inf_nan") is False, (name, version)


@pytest.mark.parametrize(("schema_name", "version", "body_model"), models())
def test_no_field_accepts_a_non_finite_number(
    schema_name: str, version: int, body_model: type[BaseModel]
) -> None:
    """parse_telemetry relies on this: a body its model accepts holds only finite numbers."""
    rng = random.Random(schema_name)
    body = example_v1_body(schema_name, rng) if version == 1 else example_body(schema_name, rng)
    body_model.model_validate(body)
    for field in body:
        for value in (math.nan, math.inf, -math.inf, [math.nan]):
            with pytest.raises(ValidationError):
                body_model.model_validate({**body, field: value})


def test_v1_upgrade_gives_the_exact_v2_body() -> None:
    assert validate_body("washer.cycle", 1, V1_CYCLE) == (
        2,
        {
            "program": "eco_40_60",
            "temperature_c": 40,
            "spin_rpm": 1400,
            "duration_s": 12600,
            "energy_wh": 718,
            "water_l": 52.0,
            "options": ["extra_rinse"],
            "outcome": "completed",
            "trigger": "panel",
        },
    )


def test_v1_upgrade_rounds_energy_to_the_nearest_wh() -> None:
    v1 = WasherCycleV1.model_validate({**V1_CYCLE, "energy_kwh": 1.2345})
    assert upgrade_cycle_v1(v1).energy_wh == 1234
    v1 = WasherCycleV1.model_validate({**V1_CYCLE, "energy_kwh": 0.0006})
    assert upgrade_cycle_v1(v1).energy_wh == 1


def test_v1_body_is_validated_as_v1() -> None:
    with pytest.raises(InvalidTelemetry) as caught:
        validate_body("washer.cycle", 1, {**V1_CYCLE, "energy_kwh": 7.5})
    assert caught.value.reason is Reason.SCHEMA_VIOLATION
    assert caught.value.message == (
        "body.energy_kwh: Input should be less than or equal to 5 (got 7.5)"
    )


def test_current_body_is_returned_normalised() -> None:
    # A whole number is a valid float: stored as the float the model holds.
    body = {"indoor_c": 21, "outdoor_c": -3.5, "humidity_pct": 40}
    assert validate_body("air_conditioner.climate", 1, body) == (
        1,
        {"indoor_c": 21.0, "outdoor_c": -3.5, "humidity_pct": 40.0},
    )


@pytest.mark.parametrize(
    ("schema_name", "version", "reason"),
    [
        ("washer.spin", 1, Reason.UNKNOWN_SCHEMA),
        ("toaster.toast", 1, Reason.UNKNOWN_SCHEMA),
        ("washer.cycle", 0, Reason.UNKNOWN_SCHEMA_VERSION),
        ("washer.cycle", 3, Reason.UNKNOWN_SCHEMA_VERSION),
        ("dryer.cycle", 2, Reason.UNKNOWN_SCHEMA_VERSION),
    ],
)
def test_unknown(schema_name: str, version: int, reason: Reason) -> None:
    with pytest.raises(InvalidTelemetry) as caught:
        validate_body(schema_name, version, {})
    assert caught.value.reason is reason


@pytest.mark.parametrize(
    ("schema_name", "body", "message"),
    [
        (
            "refrigerator.setpoint_change",
            {"compartment": "freezer", "previous_c": -18, "setpoint_c": 4, "trigger": "panel"},
            "body: Value error, setpoint_c=4 is outside the freezer range -24..-14 C",
        ),
        (
            "refrigerator.runtime",
            {"interval_s": 3600, "active_s": 3601},
            "body: Value error, active_s=3601 is longer than interval_s=3600",
        ),
        (
            "air_conditioner.mode_change",
            {
                "power": "on",
                "mode": "cool",
                "setpoint_c": 22.3,
                "fan_speed": "auto",
                "swing": "off",
                "trigger": "voice",
            },
            "body.setpoint_c: Input should be a multiple of 0.5 (got 22.3)",
        ),
        (
            "washer.error",
            {"code": "E 21", "severity": "fault", "state": "raised"},
            "body.code: String should match pattern '^[A-Za-z0-9][A-Za-z0-9-]{0,7}$' (got 'E 21')",
        ),
    ],
)
def test_plausibility_checks(schema_name: str, body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTelemetry) as caught:
        validate_body(schema_name, 1, body)
    assert caught.value.reason is Reason.SCHEMA_VIOLATION
    assert caught.value.message == message


def test_many_errors_are_summarised() -> None:
    with pytest.raises(InvalidTelemetry) as caught:
        validate_body("robot_vacuum.clean_run", 1, {})
    assert caught.value.message == (
        "body.mode: Field required; body.suction: Field required; body.area_m2: Field "
        "required; body.duration_s: Field required; body.rooms: Field required; and 5 more"
    )


@pytest.mark.parametrize("schema_name", SCHEMA_NAMES)
def test_examples_are_valid_and_survive_validation_unchanged(schema_name: str) -> None:
    rng = random.Random(schema_name)
    version = current_version(schema_name)
    for _ in range(300):
        body = example_body(schema_name, rng)
        assert validate_body(schema_name, version, body) == (version, body)


@pytest.mark.parametrize("schema_name", SCHEMA_NAMES)
def test_v1_examples_are_valid(schema_name: str) -> None:
    rng = random.Random(schema_name)
    for _ in range(300):
        body = example_v1_body(schema_name, rng)
        model(schema_name, 1).model_validate(body)


def test_v1_example_is_the_old_wire_format() -> None:
    body = example_v1_body("washer.cycle", random.Random(1))
    assert "energy_kwh" in body
    assert "trigger" not in body
    version, upgraded = validate_body("washer.cycle", 1, body)
    assert version == 2
    assert upgraded["trigger"] == "panel"
    assert upgraded["energy_wh"] == round(body["energy_kwh"] * 1000)


def test_examples_are_deterministic() -> None:
    first = [example_body(name, random.Random(5)) for name in SCHEMA_NAMES]
    second = [example_body(name, random.Random(5)) for name in SCHEMA_NAMES]
    assert first == second


def test_examples_vary() -> None:
    rng = random.Random(5)
    cycles = [example_body("washer.cycle", rng) for _ in range(200)]
    assert len({cycle["program"] for cycle in cycles}) > 10
    assert {cycle["trigger"] for cycle in cycles} == {"panel", "app_remote", "voice", "schedule"}
    assert all(math.isfinite(cycle["water_l"]) for cycle in cycles)


def test_example_of_unknown_schema() -> None:
    with pytest.raises(InvalidTelemetry) as caught:
        example_body("toaster.toast", random.Random(1))
    assert caught.value.reason is Reason.UNKNOWN_SCHEMA
