"""Logs for machines: `USAGEPIPE_LOG__FORMAT=json` (or `--log-format json`) makes every
event one JSON object a line, with the fields it was logged with."""

from __future__ import annotations

import logging
import re
import sys

import orjson
import pytest

from ingest.settings import Settings
from tests.usagepipe.test_cli import environment, one_line, usagepipe
from usagepipe.cli.logs import JsonFormatter


def record(**extra: object) -> logging.LogRecord:
    r = logging.makeLogRecord(
        {
            "name": "ingest.consumer",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "row %s refused",
            "args": ("7",),
            "created": 1796295606.7351,
        }
    )
    r.__dict__.update(extra)
    return r


def test_a_json_line_holds_the_event_and_its_fields() -> None:
    line = JsonFormatter().format(record(device_id="WM-1", partition=3, offset=1042))
    assert orjson.loads(line) == {
        "time": "2026-12-03T11:00:06.735Z",
        "level": "WARNING",
        "logger": "ingest.consumer",
        "message": "row 7 refused",
        "device_id": "WM-1",
        "partition": 3,
        "offset": 1042,
    }
    assert "\n" not in line


def test_a_traceback_stays_inside_its_line() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        r = record()
        r.exc_info = sys.exc_info()
    doc = orjson.loads(JsonFormatter().format(r))
    assert doc["exception"].startswith("Traceback (most recent call last):")
    assert doc["exception"].endswith("ValueError: bad value")


def test_a_field_json_cannot_hold_is_written_as_text() -> None:
    doc = orjson.loads(JsonFormatter().format(record(where=object)))
    assert doc["where"] == "<class 'object'>"


def test_consume_logs_json_lines_from_the_setting(settings: Settings) -> None:
    env = environment(settings, USAGEPIPE_LOG__FORMAT="json", USAGEPIPE_LOG__LEVEL="info")
    done = usagepipe("consume", "--duration", "1s", env=env)
    assert done.returncode == 0, done.stderr
    docs = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert docs, "nothing was logged"
    for doc in docs:
        assert {"time", "level", "logger", "message"} <= doc.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert any(d["message"].startswith("consumer stopped") for d in docs)


def test_the_flags_win_over_the_settings(settings: Settings) -> None:
    env = environment(settings, USAGEPIPE_LOG__FORMAT="json", USAGEPIPE_LOG__LEVEL="debug")
    done = usagepipe(
        "--log-format", "text", "--log-level", "error", "consume", "--duration", "1s", env=env
    )
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"USAGEPIPE_LOG__FORMAT": "xml"},
            "usagepipe: USAGEPIPE_LOG__FORMAT='xml' is not allowed: use one of 'text', 'json'",
        ),
        (
            {"USAGEPIPE_LOG__LEVEL": "loud"},
            "usagepipe: USAGEPIPE_LOG__LEVEL='LOUD' is not allowed: use one of 'DEBUG', 'INFO',"
            " 'WARNING', 'ERROR'",
        ),
    ],
)
def test_a_bad_log_setting_is_one_line(variables: dict[str, str], message: str) -> None:
    done = usagepipe("settings", env=environment(None, **variables))
    assert (done.returncode, one_line(done)) == (2, message)
