"""The AsyncAPI 3.0 document of the telemetry contract, generated from the models.

It describes the MQTT channel devices publish to, the Kafka topics the bridge and the
consumer use, and one message per (schema, version) with its JSON Schema. The document
is checked in as `schemas/asyncapi.json` so device teams can read it without running
Python; a test fails when it no longer matches the models.

    python -m schemas.asyncapi                              # print it
    python -m schemas.asyncapi --write schemas/asyncapi.json  # regenerate the file
    python -m schemas.asyncapi --check schemas/asyncapi.json  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas import catalog
from schemas.dead_letter import DeadLetterMessage
from schemas.envelope import DEVICE_ID_PATTERN, Envelope

# The contract's own version: bump the minor for a new schema or version, the major
# when something already published changes meaning.
# 2.0.0: a dead letter's source partition and offset are null when the bridge refused
# the message straight off MQTT.
# 2.1.0: the optional W3C trace context (`traceparent`, `tracestate`): MQTT v5 user
# properties from the device, Kafka record headers after the bridge.
DOCUMENT_VERSION = "2.1.0"

TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$"
"""A W3C traceparent's shape (the bridge also refuses version ff and all-zero ids)."""
_TRACE_TRAIT = {"$ref": "#/components/messageTraits/traceContext"}
CHECKED_IN_PATH = Path(__file__).with_name("asyncapi.json")
REGENERATE_COMMAND = "usagepipe asyncapi --write schemas/asyncapi.json"

_SCHEMA_REF = "#/components/schemas/{model}"


def asyncapi_document() -> dict[str, Any]:
    """The whole AsyncAPI 3.0 document as JSON-ready data."""
    component_schemas: dict[str, Any] = {}
    _add_schema(component_schemas, Envelope)
    _add_schema(component_schemas, DeadLetterMessage)

    messages: dict[str, Any] = {}
    for name, version, body_model in catalog.models():
        _add_schema(component_schemas, body_model)
        messages[_message_id(name, version)] = _telemetry_message(name, version, body_model)
    messages["deadLetter"] = {
        "name": "deadLetter",
        "title": "Dead letter",
        "summary": "A refused telemetry message, why it was refused, and where it came from.",
        "contentType": "application/json",
        "payload": {"$ref": _SCHEMA_REF.format(model=DeadLetterMessage.__name__)},
        "traits": [_TRACE_TRAIT],
    }

    telemetry_refs = {
        message_id: {"$ref": f"#/components/messages/{message_id}"}
        for message_id in messages
        if message_id != "deadLetter"
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "usagepipe appliance telemetry",
            "version": DOCUMENT_VERSION,
            "description": (
                "Registered home appliances publish usage telemetry over MQTT; a bridge "
                "forwards each payload unchanged to Kafka; consumers validate it and "
                "store it. Every payload is one JSON envelope whose `schema` and "
                "`schema_version` select the body's model. Older versions are accepted "
                "and stored upgraded to the current version."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "mqtt": {
                "host": "localhost:1883",
                "protocol": "mqtt",
                "description": "The MQTT broker devices connect to.",
            },
            "kafka": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": "The Kafka-protocol broker between the bridge and consumers.",
            },
        },
        "channels": {
            "deviceTelemetry": {
                "address": "devices/{device_id}/telemetry",
                "title": "Device telemetry (MQTT)",
                "description": (
                    "Each device publishes its telemetry here, QoS 1, not retained. The "
                    "`device_id` in the topic must equal the envelope's `device_id`."
                ),
                "parameters": {
                    "device_id": {
                        "description": (
                            f"The registered device's id, matching {DEVICE_ID_PATTERN}."
                        ),
                    },
                },
                "servers": [{"$ref": "#/servers/mqtt"}],
                "messages": telemetry_refs,
            },
            "telemetryRaw": {
                "address": "telemetry.raw",
                "title": "Raw telemetry (Kafka)",
                "description": (
                    "The bridge writes every MQTT payload here byte for byte, not yet "
                    "validated, keyed by the device id from the MQTT topic so one device's "
                    "messages stay in order on one partition."
                ),
                "servers": [{"$ref": "#/servers/kafka"}],
                "messages": telemetry_refs,
                "bindings": {"kafka": {"topic": "telemetry.raw", "bindingVersion": "0.5.0"}},
            },
            "telemetryDeadLetters": {
                "address": "telemetry.dlq",
                "title": "Dead letters (Kafka)",
                "description": (
                    "Messages the bridge or the consumer refused, each with one reason code, "
                    "keyed like the original message; the original bytes are kept (base64) "
                    "for replay. The source is the Kafka record the consumer read, or the "
                    "MQTT topic (partition and offset null) for what the bridge refused: "
                    "oversize payloads and payloads naming another device."
                ),
                "servers": [{"$ref": "#/servers/kafka"}],
                "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
                "bindings": {"kafka": {"topic": "telemetry.dlq", "bindingVersion": "0.5.0"}},
            },
        },
        "operations": {
            "devicePublishesTelemetry": {
                "action": "send",
                "title": "A device publishes telemetry",
                "channel": {"$ref": "#/channels/deviceTelemetry"},
                "bindings": {"mqtt": {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}},
            },
            "bridgeReceivesTelemetry": {
                "action": "receive",
                "title": "The bridge subscribes to every device's telemetry",
                "description": "Acknowledged (PUBACK) only after Kafka confirms the write.",
                "channel": {"$ref": "#/channels/deviceTelemetry"},
                "bindings": {"mqtt": {"qos": 1, "bindingVersion": "0.2.0"}},
            },
            "bridgeForwardsTelemetry": {
                "action": "send",
                "title": "The bridge forwards each payload to telemetry.raw",
                "channel": {"$ref": "#/channels/telemetryRaw"},
            },
            "consumerReadsTelemetry": {
                "action": "receive",
                "title": "Consumers validate and store telemetry",
                "description": (
                    "Offsets are committed only after the database transaction commits."
                ),
                "channel": {"$ref": "#/channels/telemetryRaw"},
            },
            "bridgeDeadLetters": {
                "action": "send",
                "title": "The bridge dead-letters what it can refuse without parsing deeply",
                "description": (
                    "Oversize payloads and a payload device_id that differs from the "
                    "topic's; the MQTT message is acknowledged once the dead letter is in Kafka."
                ),
                "channel": {"$ref": "#/channels/telemetryDeadLetters"},
            },
            "consumerDeadLetters": {
                "action": "send",
                "title": "Consumers dead-letter refused messages",
                "channel": {"$ref": "#/channels/telemetryDeadLetters"},
            },
        },
        "components": {
            "schemas": dict(sorted(component_schemas.items())),
            "messages": messages,
            "messageTraits": {"traceContext": _trace_context()},
            "messageBindings": {
                "telemetryKey": {
                    "kafka": {
                        "key": {"type": "string", "pattern": DEVICE_ID_PATTERN},
                        "bindingVersion": "0.5.0",
                    }
                }
            },
        },
    }


def render() -> str:
    """The document as the checked-in file holds it: sorted keys, 2-space indent."""
    return json.dumps(asyncapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print, write or check the document; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m schemas.asyncapi", description="The telemetry AsyncAPI document."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", type=Path, metavar="PATH", help="exit 1 if PATH is stale")
    action.add_argument("--write", type=Path, metavar="PATH", help="write the document")
    args = parser.parse_args(argv)
    document = render()
    if args.write is not None:
        args.write.write_text(document, encoding="utf-8")
        return 0
    if args.check is not None:
        path: Path = args.check
        if not path.exists() or path.read_text(encoding="utf-8") != document:
            print(f"{path} does not match the models; run: {REGENERATE_COMMAND}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(document)
    return 0


def _trace_context() -> dict[str, Any]:
    """The optional trace context a message may carry: MQTT v5 user properties as the
    device sends them, Kafka record headers from the bridge on."""
    return {
        "headers": {
            "type": "object",
            "description": (
                "Optional W3C Trace Context (https://www.w3.org/TR/trace-context/): MQTT v5 "
                "user properties on the device's PUBLISH, Kafka record headers on the "
                "topics. The bridge carries a device's trace id on with its own span id as "
                "the new parent, starts a sampled trace for a share of the messages that "
                "have none, and replaces a malformed one with a new trace (counted; the "
                "message is never refused for it). Consumers log the trace id with the "
                "stored row's key; dead letters keep it."
            ),
            "properties": {
                "traceparent": {
                    "type": "string",
                    "pattern": TRACEPARENT_PATTERN,
                    "examples": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
                    "description": (
                        "version-trace id-parent id-flags, lowercase hex; flags 01: sampled."
                    ),
                },
                "tracestate": {
                    "type": "string",
                    "maxLength": 512,
                    "description": "Vendor trace state, carried as it came.",
                },
            },
        }
    }


def _message_id(schema_name: str, version: int) -> str:
    return f"{schema_name}.v{version}"


def _telemetry_message(schema_name: str, version: int, body_model: type[BaseModel]) -> Any:
    """One envelope message whose `schema`, `schema_version` and body are fixed."""
    current = catalog.current_version(schema_name)
    summary = (body_model.__doc__ or schema_name).strip().splitlines()[0]
    if version < current:
        summary += f" (older version: stored upgraded to v{current})"
    return {
        "name": _message_id(schema_name, version),
        "title": f"{schema_name} v{version}",
        "summary": summary,
        "contentType": "application/json",
        "bindings": {"$ref": "#/components/messageBindings/telemetryKey"},
        "traits": [_TRACE_TRAIT],
        "payload": {
            "allOf": [
                {"$ref": _SCHEMA_REF.format(model=Envelope.__name__)},
                {
                    "type": "object",
                    "properties": {
                        "schema": {"const": schema_name},
                        "schema_version": {"const": version},
                        "body": {"$ref": _SCHEMA_REF.format(model=body_model.__name__)},
                    },
                },
            ]
        },
    }


def _add_schema(component_schemas: dict[str, Any], model: type[BaseModel]) -> None:
    """Add `model`'s JSON Schema, and the models it refers to, under components."""
    generated = model.model_json_schema(by_alias=True, ref_template=_SCHEMA_REF)
    nested = generated.pop("$defs", {})
    for name, definition in [(model.__name__, generated), *nested.items()]:
        known = component_schemas.setdefault(name, definition)
        if known != definition:
            raise RuntimeError(f"two different models are both named {name}")


if __name__ == "__main__":
    raise SystemExit(main())
