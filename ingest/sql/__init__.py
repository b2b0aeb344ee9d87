"""The usage store's migrations: one directory per storage layout, `NNN_name.sql` files
applied in order by `ingest.migrations`, with `{table}` replaced by the configured
usage table's name (so each table, tests' included, is its own migration component)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.resources import files
from importlib.resources.abc import Traversable
from io import BytesIO, StringIO
from os import PathLike
from typing import IO, Any, Literal

Kind = Literal["partitioned", "timescaledb"]
"""A storage layout, and the name of its directory here."""


def migration_directory(kind: Kind, table: str) -> Traversable:
    """The migrations of layout `kind`, rendered for `table`."""
    return _Rendered(files(__name__).joinpath(kind), table)


class _Rendered(Traversable):
    """A directory of migration templates with `{table}` filled in, as the runner reads
    it: the runner takes a directory and checksums each file's text as read."""

    def __init__(self, source: Traversable, table: str) -> None:
        self._source = source
        self._table = table

    @property
    def name(self) -> str:
        return self._source.name

    def iterdir(self) -> Iterator[Traversable]:
        for entry in self._source.iterdir():
            yield _Rendered(entry, self._table)

    def is_dir(self) -> bool:
        return self._source.is_dir()

    def is_file(self) -> bool:
        return self._source.is_file()

    def joinpath(self, *descendants: str | PathLike[str]) -> Traversable:
        return _Rendered(self._source.joinpath(*descendants), self._table)

    def __truediv__(self, child: str | PathLike[str]) -> Traversable:
        return self.joinpath(child)

    def read_text(self, encoding: str | None = None) -> str:
        return self._source.read_text(encoding).replace("{table}", self._table)

    def read_bytes(self) -> bytes:
        return self.read_text().encode()

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        text = self.read_text()
        return BytesIO(text.encode()) if "b" in mode else StringIO(text)
