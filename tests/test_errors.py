"""One error tree: every exception class usagepipe defines derives from
`schemas.errors.UsagepipeError`, and the tree in that module's docstring names it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import schemas.errors
from schemas.errors import UsagepipeError

PACKAGES = ("schemas", "ingest", "devices", "insights", "simulators", "usagepipe")


def defined_errors() -> dict[str, type[BaseException]]:
    """Every exception class defined (not imported) in a module of our packages."""
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        modules = [package] + [
            m.name
            for m in pkgutil.walk_packages(root.__path__, f"{package}.")
            if not m.name.endswith("__main__")
        ]
        for name in modules:
            module = importlib.import_module(name)
            for value in vars(module).values():
                if (
                    isinstance(value, type)
                    and issubclass(value, BaseException)
                    and value.__module__ == name
                ):
                    found[f"{name}.{value.__qualname__}"] = value
    return found


ERRORS = defined_errors()


def test_the_tree_has_every_package_s_errors() -> None:
    modules = {name.split(".")[0] for name in ERRORS}
    assert modules == set(PACKAGES)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_each_error_is_a_usagepipe_error_drawn_in_the_tree(name: str) -> None:
    error = ERRORS[name]
    assert issubclass(error, UsagepipeError)
    drawn = f"    {error.__name__} " if error is UsagepipeError else f"+-- {error.__name__} "
    assert drawn in (schemas.errors.__doc__ or "")


def test_retriable_says_whether_trying_again_can_help() -> None:
    retriable = sorted(
        name
        for name, error in ERRORS.items()
        if issubclass(error, UsagepipeError) and error.retriable
    )
    assert retriable == [
        "devices.errors.RegistryUnavailable",
        "ingest.auth.KeysUnavailable",
        "ingest.errors.BrokerUnavailable",
        "ingest.errors.RegistryLookupFailed",
        "ingest.errors.StoreUnavailable",
        "ingest.mqtt_wire.FramingError",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "schemas.errors.InvalidTelemetry",
        "insights.filters.FilterError",
        "insights.charts.ChartError",
        "simulators.history.HistoryError",
    ],
)
def test_the_errors_callers_catch_as_value_errors_still_are(name: str) -> None:
    assert issubclass(ERRORS[name], ValueError)
