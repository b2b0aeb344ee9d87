"""The catalog of telemetry bodies: every `(schema name, version) -> model`, the current
version of each schema, and the upgrades between versions.

`validate_body` is the one entry point the pipeline uses: it checks a body against the
model of the version the envelope names and brings it to the current version, so the
store only ever holds current-version bodies. Categories declare their schemas in their
own modules (`schemas.washer`, ...); this module only collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union, cast

from pydantic import Field, TypeAdapter, ValidationError

from schemas import (
    air_conditioner,
    air_purifier,
    dryer,
    refrigerator,
    robot_vacuum,
    washer,
)
from schemas.appliance import Body, EventSchema
from schemas.envelope import Envelope, typed_envelope
from schemas.errors import InvalidTelemetry, Reason

# A dead letter's message is read by a person; a handful of errors says what is wrong
# without burying it, and a body can fail every field at once.
MAX_ERRORS_IN_MESSAGE = 5
MAX_VALUE_REPR = 80

_CATEGORY_MODULES = (washer, dryer, refrigerator, air_conditioner, air_purifier, robot_vacuum)

_SCHEMAS: dict[str, EventSchema] = {}
for _module in _CATEGORY_MODULES:
    for _schema in _module.SCHEMAS:
        if _schema.name in _SCHEMAS:
            raise RuntimeError(f"schema {_schema.name} is declared twice")
        _SCHEMAS[_schema.name] = _schema

SCHEMA_NAMES: tuple[str, ...] = tuple(_SCHEMAS)
"""Every schema name, grouped by category in catalog order."""

_CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(s.category for s in _SCHEMAS.values()))


# (name, version) -> (model, the upgrades from that version on, current version).
_BY_VERSION: dict[tuple[str, int], tuple[type[Body], tuple[Callable[[Any], Body], ...], int]] = {
    (declared.name, index + 1): (
        body_model,
        declared.upgrades[index:],
        declared.current_version,
    )
    for declared in _SCHEMAS.values()
    for index, body_model in enumerate(declared.versions)
}


_ANY_CURRENT: Any = Annotated[
    cast(Any, Union)[
        tuple(typed_envelope(s.name, s.current_version, s.versions[-1]) for s in _SCHEMAS.values())
    ],
    Field(discriminator="schema_name"),
]
_CURRENT_ENVELOPES: TypeAdapter[Envelope] = TypeAdapter(_ANY_CURRENT)


def current_envelopes() -> TypeAdapter[Envelope]:
    """One validator for a whole message of any schema at its current version: the
    envelope and its body checked in one pass over the JSON, the body model picked by
    the `schema` field (a discriminated union of `schemas.envelope.typed_envelope`s).
    What it refuses, or an older version it does not know, `validate_body` and the
    rule-by-rule checks of `schemas.parse` explain; what it accepts they accept too."""
    return _CURRENT_ENVELOPES


def categories() -> tuple[str, ...]:
    """The appliance categories (`washer`, `dryer`, ...), in catalog order."""
    return _CATEGORIES


def schema(schema_name: str) -> EventSchema:
    """The declaration of `schema_name`, with all its versions.

    Raises `InvalidTelemetry(Reason.UNKNOWN_SCHEMA)` if there is no such schema.
    """
    try:
        return _SCHEMAS[schema_name]
    except KeyError:
        raise InvalidTelemetry(
            Reason.UNKNOWN_SCHEMA, f"schema: {schema_name!r} is not in the catalog"
        ) from None


def current_version(schema_name: str) -> int:
    """The version bodies of `schema_name` are stored as."""
    return schema(schema_name).current_version


def model(schema_name: str, version: int) -> type[Body]:
    """The body model of one version of a schema.

    Raises `InvalidTelemetry` with `UNKNOWN_SCHEMA` or `UNKNOWN_SCHEMA_VERSION`.
    """
    entry = _BY_VERSION.get((schema_name, version))
    if entry is None:
        raise _unknown(schema_name, version)
    return entry[0]


def _unknown(schema_name: str, version: int) -> InvalidTelemetry:
    """Why `(schema_name, version)` is not in the catalog.

    Returns the UNKNOWN_SCHEMA_VERSION error; raises UNKNOWN_SCHEMA straight away when
    not even the name is known.
    """
    declared = schema(schema_name)
    known = ", ".join(str(v) for v in range(1, declared.current_version + 1))
    return InvalidTelemetry(
        Reason.UNKNOWN_SCHEMA_VERSION,
        f"schema_version: {schema_name} has version(s) {known}, not {version}",
    )


def models() -> tuple[tuple[str, int, type[Body]], ...]:
    """Every `(schema name, version, model)` in the catalog, oldest version first."""
    return tuple(
        (declared.name, index + 1, body_model)
        for declared in _SCHEMAS.values()
        for index, body_model in enumerate(declared.versions)
    )


def validate_body(
    schema_name: str, version: int, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Validate `body` as `version` of `schema_name` and upgrade it to the current version.

    Returns `(current version, body)` where the body is the validated, upgraded model
    as a JSON-ready dict. Raises `InvalidTelemetry` with `UNKNOWN_SCHEMA`,
    `UNKNOWN_SCHEMA_VERSION`, or `SCHEMA_VIOLATION` (the message names each failing
    field as `body.<path>`).
    """
    entry = _BY_VERSION.get((schema_name, version))
    if entry is None:
        raise _unknown(schema_name, version)
    body_model, upgrades, current = entry
    try:
        validated = body_model.model_validate(body)
    except ValidationError as exc:
        raise InvalidTelemetry(
            Reason.SCHEMA_VIOLATION, violation_message(exc, root="body")
        ) from None
    try:
        for upgrade in upgrades:
            validated = upgrade(validated)
    except ValidationError as exc:
        # An upgrade builds the next version's model, which validates again; an old body
        # that is valid but cannot be expressed in the current version lands here.
        raise InvalidTelemetry(
            Reason.SCHEMA_VIOLATION,
            f"{schema_name} v{version} body cannot be upgraded to v{current}: "
            f"{violation_message(exc, root='body')}",
        ) from None
    return current, validated.model_dump(mode="json")


def violation_message(exc: ValidationError, *, root: str = "") -> str:
    """Pydantic's errors as one line a person can act on: `path: what (got value)`.

    `root` prefixes every path (`body` gives `body.spin_rpm`); errors about the object
    as a whole are reported under `root` itself (or `envelope` without a root).
    """
    parts = []
    errors = exc.errors(include_url=False)
    for error in errors[:MAX_ERRORS_IN_MESSAGE]:
        location = _path(root, error["loc"])
        text = f"{location}: {error['msg']}"
        # Missing fields have no value, and whole-object errors would echo the object.
        if error["type"] != "missing" and error["loc"]:
            text += f" (got {_short_repr(error['input'])})"
        parts.append(text)
    if len(errors) > MAX_ERRORS_IN_MESSAGE:
        parts.append(f"and {len(errors) - MAX_ERRORS_IN_MESSAGE} more")
    return "; ".join(parts)


def _path(root: str, loc: tuple[int | str, ...]) -> str:
    """`body`, ("options", 1) -> `body.options[1]`."""
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path or "envelope"


def _short_repr(value: object) -> str:
    text = repr(value)
    if len(text) > MAX_VALUE_REPR:
        return text[: MAX_VALUE_REPR - 3] + "..."
    return text
