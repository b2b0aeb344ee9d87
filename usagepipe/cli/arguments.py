"""What the commands' parsers share: the one-line parser, the value types, the options
more than one command takes, and the handler each command sets.

Every command's parser calls `set_defaults(handler=...)` with a `Handler`: it takes
the parsed arguments and the root settings (built from the environment by
`usagepipe.cli.main`, the only reader of the environment) and returns the exit status.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn, TypeAlias

from ingest.settings import Settings

Handler: TypeAlias = Callable[[argparse.Namespace, Settings], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What `add_subparsers` returns: each module's `add_*` functions add their command."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with a mistake as one line: `usagepipe: argument --log-level: invalid
    choice: 'LOUD' (choose from ...)`, without the usage block argparse prints first
    (`--help` shows it). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)" if "required" in message else ""
        self.exit(2, f"{self.prog}: {message}{hint}\n")


def duration(text: str) -> float:
    """`90`, `90s`, `5m`, `1h` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 30, 30s, 5m)")
    return seconds


def count(text: str) -> int:
    """A whole number, 0 or more (an offset, a partition, a limit)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number of 0 or more: {text!r}")
    return value


def add_stop_options(p: argparse.ArgumentParser, what: str) -> None:
    """`--max-messages` and `--duration`, for a service that stops by itself."""
    p.add_argument("--max-messages", type=int, default=None, help=f"stop after this many {what}")
    p.add_argument("--duration", type=duration, default=None, help="stop after this long (30s, 5m)")


def command(commands: Commands, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """The parser of command `name`, which `handler` runs."""
    parser = commands.add_parser(name, help=help)
    parser.set_defaults(handler=handler)
    return parser
