"""A bad setting, as one line naming its environment variable and what it allows.

pydantic's `ValidationError` names a setting by its location in the model
(`mqtt.port`) and prints several lines per error; a user set `USAGEPIPE_MQTT__PORT`.
`explain` turns each error back into the variable the user set (the nested name, the
section's JSON form `USAGEPIPE_MQTT={...}`, or a short name from `SHORT_NAMES`), and says
what the field allows, read from its annotation and constraints: a whole number from 0
to 65535, true or false, one of 'dead_letter', 'store', text matching a pattern. A
secret's value is never repeated.

    usagepipe: USAGEPIPE_MQTT__PORT='abc' is not allowed: use a whole number from 0 to 65535
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsError

from ingest.settings import SHORT_NAMES, Settings

_SHOWN_CHARS = 60  # longer values are cut: the line is for naming the setting, not echoing it
_BOOLEANS = "true or false (also 1/0, yes/no, on/off)"
_JSON_SECTION = "a section set whole must be a JSON object of its settings"


def explain(
    exc: ValidationError | SettingsError,
    environ: Mapping[str, str],
    model: type[BaseSettings] = Settings,
) -> list[str]:
    """One line per bad setting in `exc`, raised while `model` read `environ`."""
    if isinstance(exc, SettingsError):
        return [_explain_unparsed(exc, environ, model)]
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        line = _explain_error(error, environ, model)
        if line not in lines:
            lines.append(line)
    return lines


def variable(path: Iterable[str], model: type[BaseSettings] = Settings) -> str:
    """The environment variable of the setting at `path`: ('mqtt', 'port') ->
    `USAGEPIPE_MQTT__PORT`."""
    prefix = model.model_config.get("env_prefix") or ""
    delimiter = model.model_config.get("env_nested_delimiter") or "__"
    return prefix.upper() + delimiter.join(part.upper() for part in path)


def allowed(field: FieldInfo) -> str:
    """What `field` accepts, in words: `a whole number from 0 to 65535`."""
    kind, optional = _unwrap_optional(field.annotation)
    words = _kind_words(kind)
    limits = _limit_words(field.metadata)
    return " ".join(filter(None, [words, limits])) + (" (or unset)" if optional else "")


def _explain_error(
    error: Mapping[str, Any], environ: Mapping[str, str], model: type[BaseSettings]
) -> str:
    path, field, section = _resolve(model, [str(part) for part in error["loc"]])
    kind = error["type"]
    if kind == "extra_forbidden":
        prefix = (model.model_config.get("env_prefix") or "").upper()
        if len(path) == 1 and path[0].upper().startswith(prefix):  # a .env file's own name
            return f"{path[0].upper()} is not a setting (`usagepipe settings` lists them)"
        return f"{variable(path, model)} is not a setting{_suggestion(path, section, model)}"
    checked = kind in ("value_error", "assertion_error")  # a validator's own message
    if field is None:
        if not checked:  # the section given whole, as something else than an object
            name, _ = _variable_set(path, environ, model)
            return f"{name} is not allowed: {_JSON_SECTION}"
        # A section's own check compares several fields: name their variables.
        message = original = _validator_message(error)
        for field_name in sorted(section.model_fields, key=len, reverse=True):
            message = re.sub(
                rf"\b{re.escape(field_name)}\b", variable([*path, field_name], model), message
            )
        return message if message != original else f"{variable(path, model)}__*: {message}"
    name, depth = _variable_set(path, environ, model)
    if name.upper().startswith(variable(path, model) + "__"):  # nested under a plain value
        return f"{name} is not a setting: {variable(path, model)} is {allowed(field)}"
    shown = _shown(error.get("input"), field)
    if depth < len(path):  # set inside a section's JSON: name the key too
        name = f"{name}: {'.'.join(path[depth:])}"
    subject = f"{name}={shown}" if shown is not None else f"{name} (value not shown)"
    if kind == "missing":
        return f"{name} must be set: use {allowed(field)}"
    if checked:
        return f"{subject} is not allowed: {_validator_message(error)}"
    return f"{subject} is not allowed: use {allowed(field)}"


def _explain_unparsed(
    exc: SettingsError, environ: Mapping[str, str], model: type[BaseSettings]
) -> str:
    """pydantic-settings could not decode a value before validation (a section given
    whole, `USAGEPIPE_MQTT=...`, that is not JSON)."""
    found = re.search(r'field "(\w+)"', str(exc))
    if found is None:
        return f"a setting could not be read: {exc}"
    name, _ = _variable_set([found.group(1)], environ, model)
    return f"{name} is not allowed: {_JSON_SECTION}"


def _resolve(
    model: type[BaseModel], loc: list[str]
) -> tuple[list[str], FieldInfo | None, type[BaseModel]]:
    """The setting's path, its field (None when `loc` ends at a section, or names
    nothing) and the innermost section on the path. What follows the field in `loc`
    (a union's branch) is dropped."""
    path: list[str] = []
    section: type[BaseModel] = model
    for part in loc:
        path.append(part)
        info = section.model_fields.get(part)
        if info is None:
            break  # an unknown name (extra_forbidden)
        inner, _ = _unwrap_optional(info.annotation)
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return path, info, section
        section = inner
    return path, None, section


def _variable_set(
    path: list[str], environ: Mapping[str, str], model: type[BaseSettings]
) -> tuple[str, int]:
    """The variable the user set for `path`, as spelt in `environ` (names are not case
    sensitive), and how many parts of `path` it names: the nested name, a short name,
    or a section's JSON variable (`USAGEPIPE_MQTT`, 1)."""
    by_upper = {name.upper(): name for name in environ}
    candidates = [(variable(path, model), len(path))]
    candidates += [(short, len(path)) for short, where in SHORT_NAMES.items() if [*where] == path]
    candidates += [(variable(path[:n], model), n) for n in range(len(path) - 1, 0, -1)]
    for candidate, depth in candidates:
        if candidate in by_upper:
            return by_upper[candidate], depth
    delimiter = model.model_config.get("env_nested_delimiter") or "__"
    deeper = sorted(name for name in by_upper if name.startswith(candidates[0][0] + delimiter))
    return (by_upper[deeper[0]] if deeper else candidates[0][0]), len(path)


def _suggestion(path: list[str], section: type[BaseModel], model: type[BaseSettings]) -> str:
    import difflib  # here: a setting's mistake is rare, and difflib costs every start

    close = difflib.get_close_matches(path[-1], list(section.model_fields), n=1)
    if close:
        return f"; did you mean {variable([*path[:-1], close[0]], model)}?"
    return " (`usagepipe settings` lists them)"


def _shown(value: object, field: FieldInfo) -> str | None:
    """`value` quoted for the message; None for a secret's (never shown) or a non-text."""
    if _is_secret(field.annotation) or not isinstance(value, str):
        return None
    if len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + "..."
    return repr(value)


def _validator_message(error: Mapping[str, Any]) -> str:
    """The text a field or model validator raised, without pydantic's `Value error, `."""
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if cause is not None else str(error["msg"])


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (it, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_secret(annotation: Any) -> bool:
    inner, _ = _unwrap_optional(annotation)
    return isinstance(inner, type) and issubclass(inner, SecretStr)


def _kind_words(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        values = typing.get_args(kind)
        return ("one of " if len(values) > 1 else "") + ", ".join(repr(_plain(v)) for v in values)
    if isinstance(kind, type):
        if issubclass(kind, enum.Enum):
            return "one of " + ", ".join(repr(_plain(member)) for member in kind)
        if issubclass(kind, bool):
            return _BOOLEANS
        if issubclass(kind, int):
            return "a whole number"
        if issubclass(kind, float):
            return "a number"
        if issubclass(kind, SecretStr):
            return "text (a secret)"
        if issubclass(kind, PurePath):
            return "a file system path"
        if issubclass(kind, str):
            return "text"
    return f"a value of type {getattr(kind, '__name__', kind)}"


def _plain(value: object) -> object:
    return value.value if isinstance(value, enum.Enum) else value


def _limit_words(metadata: list[Any]) -> str:
    """The constraints of a field (`Field(ge=0, le=65535)`, a pattern, lengths), in words."""
    bounds: dict[str, Any] = {}
    for item in metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(item, name, None)
            if value is not None:
                bounds[name] = value
    words: list[str] = []
    if "ge" in bounds and "le" in bounds:
        words.append(f"from {_number(bounds.pop('ge'))} to {_number(bounds.pop('le'))}")
    phrases = {
        "ge": "at least {}",
        "gt": "greater than {}",
        "le": "at most {}",
        "lt": "less than {}",
        "min_length": "at least {} characters long",
        "max_length": "at most {} characters long",
        "pattern": "matching {}",
    }
    for name, phrase in phrases.items():
        if name in bounds:
            value = bounds[name]
            words.append(phrase.format(value if name == "pattern" else _number(value)))
    if words and words[0].startswith("at "):
        words[0] = "of " + words[0]
    return " and ".join(words)


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
