"""`ingest.httpapi`'s guard over a small app of its own on a real uvicorn server: inputs
JSON cannot carry and bugs answer a `Problem`, and the connection stays open."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import pytest
from fastapi import FastAPI, Query
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator, BaseModel

from ingest.httpapi import Problem, install, non_finite, not_replaced, shown
from ingest.metrics import HttpMetrics
from tests.http_contract import OneConnection, served


class Reading(BaseModel):
    value: float
    note: str = ""


def guarded_app() -> FastAPI:
    app = FastAPI()
    metrics = CollectorRegistry()

    async def itself() -> None:
        return None

    install(
        app,
        metrics=HttpMetrics(metrics, "http500"),
        registry=metrics,
        model=Problem,
        ready={"self": itself},
        ready_doc="always 200",
    )

    @app.post("/readings")
    async def reading(body: Reading) -> Reading:
        return body  # a lone surrogate answered back could not be encoded

    @app.get("/names")
    async def name(q: Annotated[str, AfterValidator(not_replaced), Query()]) -> dict[str, str]:
        return {"q": q}

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug \x00 with\nlines")

    return app


@pytest.mark.parametrize(
    ("body", "status", "reason", "field"),
    [
        (b'{"value": NaN}', 400, "malformed_body", "body"),
        (b'{"value": Infinity}', 400, "malformed_body", "body"),
        (b'{"value": -Infinity}', 400, "malformed_body", "body"),
        (b'{"value": 1e999}', 400, "malformed_body", "body"),
        (b'{"value": -1e999}', 400, "malformed_body", "body"),
        (b'{"value": 1.5, "note": NaN}', 400, "malformed_body", "body"),  # in a string field
        (b'{"value": ' + b"1" * 400 + b".0}", 400, "malformed_body", "body"),  # inf as well
        (b'{"note": "\\ud800", "value": NaN}', 400, "malformed_body", "body"),  # both: 400
        (b'{"value": 1e308}', 200, None, None),
        (b'{"value": 1e-999}', 200, None, None),  # underflows to 0.0: finite
        (b'{"value": 1.5, "note": "A\\u0000"}', 200, None, None),  # this app takes NUL
        (b'{"value": 1, "note": "\\ud800"}', 422, "invalid_request", "note"),  # echoed: 500
        (b'{"value": 1, "note": "\xed\xa0\x80"}', 422, "invalid_request", "note"),  # as bytes
        (b'{"value": ', 400, "malformed_body", "body"),
        (b'{"value": 1, "\\u0000": 2}', 200, None, None),  # extra keys are ignored
        (b'{"value": 1, "a\\ud800": 2}', 422, "invalid_request", "a\\ud800"),  # not this one
        (b'{"value": 1, "note": ["x", {"y": "\\udfff"}]}', 422, "invalid_request", "note.1.y"),
        (b'{"value": 1, "note": "\\ud83d\\ude00"}', 200, None, None),  # a pair: an emoji
    ],
)
async def test_bodies_json_cannot_carry_are_malformed(
    body: bytes, status: int, reason: str | None, field: str | None
) -> None:
    async with served(guarded_app()) as url, OneConnection(url) as client:
        headers = {"content-type": "application/json"}
        answer = await client.request("POST", "/readings", content=body, headers=headers)
        assert answer.status_code == status, answer.text
        if reason is not None:
            problem = Problem.model_validate(answer.json())
            assert (problem.reason, problem.field) == (reason, field)
        after = await client.request("GET", "/metrics")
        assert after.status_code == 200
        assert client.connects == 1  # the refusal kept the keep-alive connection


async def test_a_bug_is_a_problem_on_a_connection_kept_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with served(guarded_app()) as url, OneConnection(url) as client:
        answer = await client.request("GET", "/bug")
        assert (answer.status_code, answer.json()) == (
            500,
            {"reason": "internal_error", "detail": "internal error; the server's log has it",
             "field": None},
        )  # fmt: skip
        assert (await client.request("GET", "/health")).status_code == 200
        assert client.connects == 1
    assert any("GET /bug failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_bytes_that_are_not_utf8_in_a_parameter_are_refused() -> None:
    async with served(guarded_app()) as url, OneConnection(url) as client:
        for query in ("q=%ED%A0%80", "q=%FF", "q=a%FFb"):
            answer = await client.request("GET", f"/names?{query}")
            assert answer.status_code == 422, query
            assert Problem.model_validate(answer.json()).field == "q"
        answer = await client.request("GET", "/names?q=%E2%82%AC")  # the euro sign
        assert answer.json() == {"q": "\u20ac"}
        answer = await client.request("GET", "/nowhere%00%ED%A0%80")
        assert answer.status_code == 404
        assert answer.json()["detail"] == "no such path: /nowhere\\x00\ufffd\ufffd\ufffd"
        assert client.connects == 1


def test_shown_escapes_what_is_not_printable_and_cuts_it_short() -> None:
    assert shown("a\x00b\ud800c\n", 100) == "a\\x00b\\ud800c\\n"
    assert shown("x" * 50, 10) == "xxxxxxx..."
    assert shown("Seoul 서울 €", 100) == "Seoul 서울 €"
    json.dumps(shown("\udfff", 10), ensure_ascii=False).encode("utf-8")  # encodable


def test_non_finite_says_what_it_found() -> None:
    assert non_finite(b"[NaN]") == "NaN is not a JSON value"
    assert non_finite(b'{"a": [1, -Infinity]}') == "-Infinity is not a JSON value"
    assert non_finite(b"1e999") == "the number 1e999 is past a double's range"
    assert (
        non_finite(b"-" + b"9" * 400 + b".5")
        == "the number -9999999999999999... is past a double's range"
    )
    assert non_finite(b'{"a": "NaN", "b": 1e308}') is None
    assert non_finite(b"not json") is None  # FastAPI's own 400 says why
    assert non_finite(b"[" * 100_000) is None  # too deep: FastAPI's 400 too


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nX-Note: a\x00b\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
)
async def test_what_is_not_http_is_uvicorns_plain_400(request_bytes: bytes) -> None:
    """The documented limit: the app never sees these, so they get no `Problem`."""
    async with served(guarded_app()) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request_bytes)
        answer = await reader.read()  # to EOF: uvicorn closes the connection
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert body == b"Invalid HTTP request received."
