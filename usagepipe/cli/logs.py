"""How the console script logs: readable lines for people, or one JSON object a line
for machines (`USAGEPIPE_LOG__FORMAT=json`, `--log-format json`).

A JSON line holds `time` (UTC, milliseconds, `Z`), `level`, `logger` and `message`,
then every field the event was logged with (`extra={"device_id": ..., "partition": ...,
"offset": ...}`), and `exception` with the traceback where there is one. Library code
only passes the fields; this module alone configures logging.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord carries; anything else on a record came in through `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line; an event's `extra` fields become fields of their own."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure(level: str, fmt: str) -> None:
    """Log at `level` and above to stderr, as `fmt` (`text` or `json`).

    As `logging.basicConfig`, it leaves a logging already configured alone (a test
    calling `usagepipe.cli.main` in-process, under pytest's own handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # aiokafka logs every retried connection at ERROR; ours say what matters.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
