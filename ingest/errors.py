"""Errors of the running pipeline, under `schemas.errors.UsagepipeError` (the module
whose docstring draws the whole tree).

Library errors are wrapped where they cross into usagepipe
(`raise StoreUnavailable(...) from exc`). A message that can never become a row is not an
error of the pipeline: it is `schemas.InvalidTelemetry`, and it goes to the dead-letter
topic with its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.errors import UsagepipeError

if TYPE_CHECKING:
    from ingest.rows import UsageRow


class ConfigurationError(UsagepipeError):
    """The settings are unsafe or contradict each other."""

    retriable = False


class PortUnavailable(ConfigurationError):
    """A port usagepipe would serve on is taken (or not ours to take); the message names
    the port and the setting that moves it."""


class BrokerUnavailable(UsagepipeError):
    """The MQTT broker or the Kafka cluster cannot be reached right now."""

    retriable = True


class StoreUnavailable(UsagepipeError):
    """PostgreSQL cannot be reached, or a write transaction failed and was rolled back."""

    retriable = True


class RowsRefused(UsagepipeError):
    """PostgreSQL refused some rows of a write for what they hold (a data exception or
    an integrity violation), not for an outage: `rows` are those rows, each with the
    database's message. Nothing of the write was kept; the rest can be written again
    without them, and the refused ones are dead-lettered `unstorable`."""

    retriable = False

    def __init__(self, rows: list[tuple[UsageRow, str]]) -> None:
        self.rows = rows
        shown = "; ".join(f"{row.key[:3]}: {message}" for row, message in rows[:3])
        more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
        super().__init__(f"PostgreSQL refused {len(rows)} row(s): {shown}{more}")


class ConflictingDuplicates(RowsRefused):
    """Rows of a write whose message id `(device_id, boot_id, seq)` is already stored,
    or is earlier in the same write, with other content (event time, schema, schema
    version or body): an id names one message, and the first one stored stays. `rows`
    pairs each with what differs. Nothing of the write was kept; the rest can be
    written again without them, and these are dead-lettered `conflicting_duplicate`."""

    def __init__(self, rows: list[tuple[UsageRow, str]]) -> None:
        super().__init__(rows)
        shown = "; ".join(message for _, message in rows[:3])
        more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
        UsagepipeError.__init__(
            self, f"{len(rows)} row(s) conflict with stored messages: {shown}{more}"
        )


class RegistryLookupFailed(UsagepipeError):
    """The device registry could not be read (down, or slower than the lookup timeout);
    the batch waits and is retried, never stored without enrichment."""

    retriable = True


class MigrationError(UsagepipeError):
    """A migration cannot be applied: bad file name, duplicate number, edited file."""

    retriable = False
