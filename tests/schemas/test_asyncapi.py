"""The AsyncAPI document: checked in, current, and describing what the pipeline does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.asyncapi import (
    CHECKED_IN_PATH,
    REGENERATE_COMMAND,
    asyncapi_document,
    main,
    render,
)
from schemas.catalog import current_version, models
from schemas.errors import Reason


def test_checked_in_document_matches_the_models() -> None:
    assert CHECKED_IN_PATH.read_text(encoding="utf-8") == render(), (
        f"{CHECKED_IN_PATH} is stale; regenerate it with: {REGENERATE_COMMAND}"
    )


def test_render_is_sorted_json_with_two_space_indent() -> None:
    text = render()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_channels_and_operations() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    channels = document["channels"]
    assert {name: channel["address"] for name, channel in channels.items()} == {
        "deviceTelemetry": "devices/{device_id}/telemetry",
        "telemetryRaw": "telemetry.raw",
        "telemetryDeadLetters": "telemetry.dlq",
    }
    publish = document["operations"]["devicePublishesTelemetry"]
    assert publish["action"] == "send"
    assert publish["channel"] == {"$ref": "#/channels/deviceTelemetry"}
    assert publish["bindings"]["mqtt"]["qos"] == 1
    key = document["components"]["messageBindings"]["telemetryKey"]["kafka"]["key"]
    assert key["type"] == "string"


def test_one_message_per_schema_version() -> None:
    document = asyncapi_document()
    expected = {f"{name}.v{version}" for name, version, _ in models()}
    assert set(document["channels"]["telemetryRaw"]["messages"]) == expected
    assert set(document["channels"]["deviceTelemetry"]["messages"]) == expected
    message = document["components"]["messages"]["washer.cycle.v1"]
    envelope_ref, fixed = message["payload"]["allOf"]
    assert envelope_ref == {"$ref": "#/components/schemas/Envelope"}
    assert fixed["properties"] == {
        "schema": {"const": "washer.cycle"},
        "schema_version": {"const": 1},
        "body": {"$ref": "#/components/schemas/WasherCycleV1"},
    }
    assert f"stored upgraded to v{current_version('washer.cycle')}" in message["summary"]
    body = document["components"]["schemas"]["WasherCycle"]
    assert body["properties"]["spin_rpm"] == {
        "maximum": 1800,
        "minimum": 0,
        "title": "Spin Rpm",
        "type": "integer",
    }
    assert body["additionalProperties"] is False


def test_dead_letter_shape() -> None:
    schemas = asyncapi_document()["components"]["schemas"]
    letter = schemas["DeadLetterMessage"]
    assert set(letter["required"]) == {"reason", "message", "source", "original_b64", "failed_at"}
    assert letter["properties"]["failed_at"]["format"] == "date-time"
    assert set(schemas["DeadLetterSource"]["required"]) == {"topic", "partition", "offset"}
    assert schemas["Reason"]["enum"] == [reason.value for reason in Reason]


def test_every_reference_resolves() -> None:
    document = asyncapi_document()

    def resolve(pointer: str) -> object:
        node: object = document
        for part in pointer.removeprefix("#/").split("/"):
            assert isinstance(node, dict), pointer
            node = node[part]
        return node

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)


def test_cli_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "asyncapi.json"
    assert main(["--check", str(target)]) == 1
    assert main(["--write", str(target)]) == 0
    assert main(["--check", str(target)]) == 0
    target.write_text(render().replace("3.0.0", "2.6.0"), encoding="utf-8")
    assert main(["--check", str(target)]) == 1
    assert REGENERATE_COMMAND in capsys.readouterr().err
