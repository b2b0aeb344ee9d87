"""What the two HTTP APIs (the registry's, the planners') share: one error document,
`/health`, `/metrics` and request metrics.

Every answer that is not a success is a `Problem`:

    {"reason": "<code>", "detail": "<one line for a person>", "field": "<name>" | null}

`reason` is the machine-readable contract (each API documents its codes as an enum);
`field` names the parameter or body field at fault (`purchase.channel`), else null.
The codes both APIs use:

    400 malformed_body      the body is not readable JSON (syntax, not UTF-8, a number
                            of more than 4300 digits)
    404 not_found           no route has this path
    405 method_not_allowed  the path exists, the method does not (`Allow` lists them)
    422 invalid_request     a parameter or body field breaks its documented rule
    503 unavailable         PostgreSQL (or the broker) did not answer; `Retry-After`
    500 internal_error      a bug: logged with its traceback, never expected

FastAPI's own errors (request validation, unknown paths, body parsing) are answered in
this shape too, so the OpenAPI document holds for every response.

`GET /health` answers 200 `{"status": "ok", "checks": {...}}` while the process serves
and its database answers within `HEALTH_TIMEOUT_S`; 503 `unavailable` otherwise.
`GET /metrics` is the process's Prometheus registry in the text format, with
`usagepipe_http_requests_total` and `usagepipe_http_request_seconds` by route template.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.metrics import HttpMetrics

log = logging.getLogger(__name__)

GENERIC_REASONS = (
    "malformed_body",
    "not_found",
    "method_not_allowed",
    "invalid_request",
    "unavailable",
    "internal_error",
)
"""The reason codes every API may answer, besides its own."""

HEALTH_TIMEOUT_S = 2.0
RETRY_AFTER_S = 5
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
_REASON_BY_STATUS = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}


class Problem(BaseModel):
    """A refused or failed request: the reason code, one line for a person, and the
    parameter or body field at fault (null when the request as a whole is refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str
    detail: str
    field: str | None = None


def reason_enum(reasons: Iterable[str]) -> dict[str, Any]:
    """`json_schema_extra` documenting `Problem.reason` as an enum of these codes."""
    return {"enum": [*dict.fromkeys([*reasons, *GENERIC_REASONS])]}


def problem(
    status: int,
    reason: str,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"reason": reason, "detail": _one_line(detail), "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(detail: str) -> JSONResponse:
    """503 with `Retry-After`: a server this API needs did not answer."""
    return problem(503, "unavailable", detail, headers={"Retry-After": str(RETRY_AFTER_S)})


_DESCRIPTIONS = {
    400: "The body is not readable JSON: bad syntax, not UTF-8, or a number of more than "
    "4300 digits (reason `malformed_body`).",
    403: "Not allowed (the reason says why).",
    404: "Not found (the reason says what).",
    409: "Conflicts with the current state (the reason says how).",
    422: "A parameter or body field breaks its rule; `field` names it (reason "
    "`invalid_request`, or a refusal of the API's own).",
    429: "Too many failed attempts (reason `locked_out`); try again later.",
    503: "A server this API needs did not answer (reason `unavailable`); try again after "
    "`Retry-After` seconds.",
}


def documented(model: type[Problem], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each a `model` document."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": model, "description": _DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again.",
                    "schema": {"type": "integer"},
                }
            }
        out[status] = entry
    return out


class HealthOut(BaseModel):
    """The process serves and every named check passed."""

    status: Literal["ok"]
    checks: dict[str, str]


HealthCheck = Callable[[], Awaitable[dict[str, str]]]
"""Runs the API's checks; returns what each found, or raises to say one failed."""


def install(
    app: FastAPI,
    *,
    metrics: HttpMetrics,
    registry: CollectorRegistry,
    model: type[Problem],
    health: HealthCheck,
    health_doc: str,
) -> None:
    """Answer every error as a `Problem`, count every request in `metrics`, and add
    `GET /health` (running `health`, described by `health_doc`) and `GET /metrics`."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(exc.errors())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        reason = _REASON_BY_STATUS.get(exc.status_code, "invalid_request")
        if exc.status_code == 400:
            # FastAPI's only 400: the body did not decode (not UTF-8, or a number past
            # Python's 4300-digit limit for reading integers).
            detail = "the body is not readable JSON (not UTF-8, or a number too long)"
            field = "body"
        elif exc.status_code == 404:
            detail, field = f"no such path: {request.url.path}", None
        elif exc.status_code == 405:
            detail, field = f"{request.method} is not allowed here", None
        else:
            detail, field = str(exc.detail), None
        return problem(exc.status_code, reason, detail, field=field, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after answering, so the traceback reaches the log too.
        return problem(500, "internal_error", "internal error; the server's log has it")

    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get(
        "/health",
        summary="Liveness and the database",
        description=health_doc,
        response_model=None,
        responses={200: {"model": HealthOut}, **documented(model, 503)},
        tags=["operations"],
    )
    async def health_route() -> Response:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                checks = await health()
        except TimeoutError:
            return unavailable(f"the database did not answer within {HEALTH_TIMEOUT_S:g} s")
        except Exception as exc:  # a failed check is the answer here, not a bug
            log.warning("health check failed: %s", exc)
            return unavailable(str(exc))
        return JSONResponse(HealthOut(status="ok", checks=checks).model_dump())

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        description="The process's metrics in the Prometheus text format (0.0.4), with "
        "`usagepipe_http_requests_total` and `usagepipe_http_request_seconds` by route "
        "template, method and status.",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        tags=["operations"],
    )
    async def metrics_route() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)


def validation_problem(errors: Sequence[Any]) -> JSONResponse:
    """FastAPI's request-validation errors as one `Problem`: the first error's field
    and message, and how many more there were (their inputs are never echoed)."""
    if not errors:
        return problem(422, "invalid_request", "the request is invalid")
    for error in errors:
        if error.get("type") == "json_invalid":
            why = (error.get("ctx") or {}).get("error", "invalid JSON")
            loc = error.get("loc", ())
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            return problem(400, "malformed_body", f"the body is not JSON: {why}{at}", field="body")
    first = errors[0]
    # A validator's own ValueError reads better without pydantic's prefix.
    detail = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if len(errors) > 1:
        others = ", ".join(dict.fromkeys(_field(e.get("loc", ())) or "body" for e in errors[1:]))
        detail += f" (and {len(errors) - 1} more: {others})"
    return problem(422, "invalid_request", detail, field=_field(first.get("loc", ())))


def _field(loc: Sequence[str | int]) -> str | None:
    """`("body", "purchase", "channel")` -> `purchase.channel`; `("query", "end")` ->
    `end`; the body as a whole -> `body`."""
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        where = parts.pop(0)
        if not parts:
            return str(where)
    return ".".join(str(p) for p in parts) or None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class RequestMetrics:
    """ASGI middleware: times each HTTP request and counts it by route template."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router stores the matched route in the (shared) scope.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.observe(method, route, status, time.perf_counter() - started)
