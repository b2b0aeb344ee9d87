"""The console script makes only the parser of the command it runs, and a service
imports only what its path uses: what `usagepipe bridge` costs to start (README,
Capacity, "Start-up"; `bench/startup.py` prints the figures)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from usagepipe.cli import COMMANDS, _command_named, build_parser


def _commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def test_the_table_lists_every_command_with_its_parsers_help() -> None:
    full = _commands(build_parser())
    assert list(full.choices) == list(COMMANDS)
    assert {a.dest: a.help for a in full._choices_actions} == {
        name: command.help for name, command in COMMANDS.items()
    }


def test_help_is_the_same_with_no_command_made() -> None:
    assert build_parser([]).format_help() == build_parser().format_help()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_command_run_gets_its_real_parser(name: str) -> None:
    lazy, full = _commands(build_parser([name])), _commands(build_parser())
    assert lazy.choices[name].format_help() == full.choices[name].format_help()
    others = [n for n in COMMANDS if COMMANDS[n].adder != COMMANDS[name].adder]
    assert all(lazy.choices[n].get_default("handler") is None for n in others)


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["bridge"], "bridge"),
        (["--log-level", "debug", "bridge", "--duration", "5"], "bridge"),
        (["--log-format=json", "db", "migrate"], "db"),
        (["--help"], ""),
        ([], ""),
        (["brigde"], "brigde"),
    ],
)
def test_the_command_word(argv: list[str], word: str) -> None:
    assert _command_named(argv) == word


def test_a_mistyped_command_is_still_one_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "usagepipe", "brigde"], capture_output=True, text=True, check=False
    )
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.startswith("usagepipe: argument command: invalid choice: 'brigde'")


NOT_ON_THE_BRIDGES_PATH = (
    "asyncpg",
    "cryptography",
    "devices.registry",
    "devices.certificates",
    "insights",
    "simulators",
    "rich",
    "schemas.catalog",
    "difflib",
)


def test_the_bridge_imports_only_its_path() -> None:
    """What `usagepipe bridge` imports up to running: its parser, the settings, the
    broker's logins, the bridge and its probes; no database driver, registry, reports,
    simulator, certificates or telemetry validators."""
    script = (
        "import sys\n"
        "from usagepipe.cli import build_parser\n"
        "build_parser(['bridge']).parse_args(['bridge'])\n"
        "import usagepipe.services.mqtt, ingest.bridge, ingest.metrics, ingest.readiness\n"
        "print(' '.join(sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = run.stdout.split()
    assert "ingest.bridge" in loaded
    assert [
        m for m in loaded if any(m == p or m.startswith(f"{p}.") for p in NOT_ON_THE_BRIDGES_PATH)
    ] == []
