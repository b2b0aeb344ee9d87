"""Imports point one way, read from the source with `ast` (nothing is imported here).

    schemas  <-  ingest  <-  devices, insights  <-  simulators  <-  usagepipe

`schemas` is the telemetry contract; `ingest` the data path and its plumbing;
`devices` (the registry) and `insights` (the planners' read side) stand side by side
and use neither each other; `simulators` drive all of them; `usagepipe`, the
composition root, holds the console script and is imported by nothing. An import
inside a function or under `TYPE_CHECKING` counts like any other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each package with the packages it may import (besides itself and third parties).
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "ingest": frozenset({"schemas"}),
    "devices": frozenset({"schemas", "ingest"}),
    "insights": frozenset({"schemas", "ingest"}),
    "simulators": frozenset({"schemas", "ingest", "devices", "insights"}),
    "usagepipe": frozenset({"schemas", "ingest", "devices", "insights", "simulators"}),
}


@dataclass(frozen=True)
class Import:
    path: str
    line: int
    module: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.module}"


def imports_of(package: str, root: Path = ROOT) -> list[Import]:
    """Every absolute import of a first-party package in `package`'s source files."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in ALLOWED:
                    found.append(Import(str(path.relative_to(root)), node.lineno, module))
    return found


def against_direction(package: str, root: Path = ROOT) -> list[str]:
    allowed = ALLOWED[package] | {package}
    return [str(i) for i in imports_of(package, root) if i.module.split(".")[0] not in allowed]


def test_every_package_is_walked() -> None:
    """The rule names every top-level package there is, and each has source to walk."""
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(ALLOWED)
    assert all(imports_of(package) or package == "schemas" for package in ALLOWED)


def test_schemas_import_nothing_of_ours() -> None:
    assert against_direction("schemas") == []


def test_the_data_path_imports_only_the_contract() -> None:
    assert against_direction("ingest") == []


def test_registry_and_read_side_sit_on_the_data_path() -> None:
    assert against_direction("devices") == []
    assert against_direction("insights") == []


def test_simulators_sit_below_the_console_script() -> None:
    assert against_direction("simulators") == []


def test_nothing_imports_the_composition_root() -> None:
    importers = [
        str(i)
        for package in ALLOWED
        if package != "usagepipe"
        for i in imports_of(package)
        if i.module.split(".")[0] == "usagepipe"
    ]
    assert importers == []


def test_the_walk_sees_an_import_against_the_direction(tmp_path: Path) -> None:
    """The walk itself, on a made-up tree: a function-local import, a `from x import y`
    and a plain `import x.y` all count; third-party and same-package imports do not."""
    (tmp_path / "ingest").mkdir()
    (tmp_path / "ingest" / "enrich.py").write_text(
        "import asyncpg\n"
        "from ingest import settings\n"
        "import simulators.fleet\n"
        "def owner():\n"
        "    from devices.registry import Registry\n",
        encoding="utf-8",
    )
    assert against_direction("ingest", tmp_path) == [
        "ingest/enrich.py:3 imports simulators.fleet",
        "ingest/enrich.py:5 imports devices.registry",
    ]
