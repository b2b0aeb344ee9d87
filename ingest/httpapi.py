"""What the two HTTP APIs (the registry's, the planners') share: one error document,
`/health`, `/ready`, `/metrics` and request metrics.

Every answer that is not a success is a `Problem`:

    {"reason": "<code>", "detail": "<one line for a person>", "field": "<name>" | null}

`reason` is the machine-readable contract (each API documents its codes as an enum);
`field` names the parameter or body field at fault (`purchase.channel`), else null.
The codes both APIs use:

    400 malformed_body      the body is not readable JSON (syntax, not UTF-8, a number
                            of more than 4300 digits, `NaN`/`Infinity`, or a number
                            past a double's range such as 1e999)
    404 not_found           no route has this path
    405 method_not_allowed  the path exists, the method does not (`Allow` lists them)
    422 invalid_request     a parameter or body field breaks its documented rule
    503 unavailable         PostgreSQL (or the broker) did not answer; `Retry-After`
    500 internal_error      a bug: logged with its traceback, never expected

FastAPI's own errors (request validation, unknown paths, body parsing) are answered in
this shape too, so the OpenAPI document holds for every response.

No input gets a 500 or a dropped connection (`RequestGuard`):

- JSON has no NaN or Infinity (RFC 8259), and a number past a double's range (`1e999`)
  would be read as one: a body holding either is not readable JSON, 400
  `malformed_body`, wherever it stands (Python's `json`, which FastAPI reads bodies
  with, would take all three).
- Percent-encoded bytes that are not UTF-8 in a path or query (`%ED%A0%80`, a lone
  surrogate; `%FF`) reach the app as U+FFFD (uvicorn's and Starlette's decoding): a
  parameter's rule refuses it, 422 `invalid_request` naming it (`not_replaced` for
  free text, a pattern or an enum otherwise).
- A lone surrogate (`"\\ud800"`, a JSON escape no UTF-8 can encode) in any string or key
  of a JSON body is 422 `invalid_request` naming where (`purchase.store_id`), for every
  field alike: pydantic's `str` takes it, and answering it back could not be encoded.
- `detail` and `field` never carry the input raw: control characters and lone
  surrogates (a NUL, `\\ud800` from a JSON escape) are shown escaped (`\\x00`), and both
  are cut short, so rendering a refusal cannot fail.
- A bug answers 500 `internal_error` (its traceback logged) on a connection that stays
  open; Starlette's own handler would make uvicorn close it.

What the HTTP server itself refuses never reaches the app: a request line or header
with a raw NUL or space is not HTTP, and uvicorn answers it 400 in plain text (`Invalid
HTTP request received.`) and closes the connection.

`GET /health` answers 200 `{"status": "alive"}` while the process serves (liveness).
`GET /ready` runs the API's named checks, each within `HEALTH_TIMEOUT_S`, and answers
the readiness document every long-running process serves (`ingest.readiness`): 200
`{"status": "ready", ...}`, or 503 `{"status": "not_ready", "not_ready": [names],
"checks": {name: what is wrong}}` with `Retry-After`, the one non-success answer that is
not a `Problem` (it is the same document as the bridge's and the consumer's).
`GET /metrics` is the process's Prometheus registry in the text format, with
`usagepipe_http_requests_total` and `usagepipe_http_request_seconds` by route template.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.metrics import HttpMetrics
from ingest.readiness import OK, HealthOut, ReadinessOut, readiness

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
DETAIL_CHARS = 300
FIELD_CHARS = 100
"""Longest `detail` and `field` shown: an input quoted in either is cut short."""


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
    body = {
        "reason": reason,
        "detail": shown(_one_line(detail), DETAIL_CHARS),
        "field": None if field is None else shown(field, FIELD_CHARS),
    }
    return JSONResponse(body, status_code=status, headers=headers)


def shown(text: str, limit: int) -> str:
    """`text` safe to show and to encode: each control character, lone surrogate or
    other unprintable character as its Python escape (`\\x00`, `\\ud800`), cut to
    `limit` characters with `...`."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unavailable(detail: str) -> JSONResponse:
    """503 with `Retry-After`: a server this API needs did not answer."""
    return problem(503, "unavailable", detail, headers={"Retry-After": str(RETRY_AFTER_S)})


_DESCRIPTIONS = {
    400: "The body is not readable JSON: bad syntax, not UTF-8, `NaN` or `Infinity`, or a "
    "number past a double's range or of more than 4300 digits (reason `malformed_body`).",
    403: "Not allowed (the reason says why).",
    404: "Not found (the reason says what).",
    409: "Conflicts with the current state (the reason says how).",
    422: "A parameter or body field breaks its rule; `field` names it (reason "
    "`invalid_request`, or a refusal of the API's own).",
    429: "Too many failed attempts by this caller (reason `too_many_attempts`); try again "
    "after `Retry-After` seconds.",
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


ReadyCheck = Callable[[], Awaitable[None]]
"""One of `GET /ready`'s checks: returns when it passes, raises saying why it does not."""


def _routes(routes: Iterable[Any]) -> Iterable[Route]:
    """Every path route of an app, those of included routers too (FastAPI keeps an
    included router whole, as `original_router`, rather than copying its routes)."""
    for route in routes:
        if isinstance(route, Route):
            yield route
        elif (inner := getattr(route, "original_router", None)) is not None:
            yield from _routes(inner.routes)


def install(
    app: FastAPI,
    *,
    metrics: HttpMetrics,
    registry: CollectorRegistry,
    model: type[Problem],
    ready: Mapping[str, ReadyCheck],
    ready_doc: str,
) -> None:
    """Answer every error as a `Problem`, count every request in `metrics`, and add
    `GET /health`, `GET /ready` (running the named checks `ready`, in order, described
    by `ready_doc`) and `GET /metrics`."""

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
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only;
            # a path served by several routes (GET and PUT) allows all of theirs.
            allowed = {
                method
                for route in _routes(request.app.routes)
                if route.path_regex.match(request.url.path)
                for method in route.methods or ()
            }
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return problem(exc.status_code, reason, detail, field=field, headers=headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # Only what escapes RequestGuard (which answers the app's own bugs) gets here;
        # Starlette re-raises after answering, so the traceback reaches the log too.
        return problem(500, "internal_error", "internal error; the server's log has it")

    # The last added runs first: the metrics count what the guard answers too.
    app.add_middleware(RequestGuard)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get(
        "/health",
        summary="Liveness",
        description="200 while the process serves requests; a liveness probe restarts it "
        "when this does not answer. Checks nothing else: `/ready` does.",
        response_model=HealthOut,
        tags=["operations"],
    )
    async def health_route() -> HealthOut:
        return HealthOut(status="alive")

    @app.get(
        "/ready",
        summary="Readiness: the servers this API needs answer",
        description=ready_doc,
        response_model=None,
        responses={
            200: {"model": ReadinessOut, "description": "Every check passed."},
            503: {
                "model": ReadinessOut,
                "description": "A check failed: `not_ready` names it, `checks` says why.",
                "headers": {
                    "Retry-After": {
                        "description": "Seconds to wait before asking again.",
                        "schema": {"type": "integer"},
                    }
                },
            },
        },
        tags=["operations"],
    )
    async def ready_route() -> Response:
        found: dict[str, str] = {}
        for name, check in ready.items():
            try:
                async with asyncio.timeout(HEALTH_TIMEOUT_S):
                    await check()
            except TimeoutError:
                found[name] = f"no answer within {HEALTH_TIMEOUT_S:g} s"
            except Exception as exc:  # a failed check is the answer here, not a bug
                log.warning("readiness check %s failed: %s", name, exc)
                found[name] = shown(_one_line(str(exc)), DETAIL_CHARS) or type(exc).__name__
            else:
                found[name] = OK
        status, doc = readiness(found)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(doc, status_code=status, headers=headers)

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


class _NotJson:
    """Stands, in a parsed body, for a number JSON cannot carry (`why` says which)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _constant(name: str) -> _NotJson:
    return _NotJson(f"{name} is not a JSON value")


def _number(text: str) -> float | _NotJson:
    value = float(text)
    if math.isfinite(value):
        return value
    return _NotJson(f"the number {shown(text, 20)} is past a double's range")


def body_problem(body: bytes) -> JSONResponse | None:
    """The refusal of a JSON body holding what JSON cannot carry, or None (also when it
    is not JSON at all, which FastAPI answers itself): a non-finite number (`NaN`,
    `Infinity`, `1e999`) is 400 `malformed_body`; a lone surrogate (`"\\ud800"`, which
    no UTF-8 can encode) in a key or a string is 422 `invalid_request` naming where."""
    try:
        doc = json.loads(body, parse_constant=_constant, parse_float=_number)
    except (ValueError, RecursionError):  # bad syntax, not UTF-8, 4300+ digits, too deep
        return None
    found = _unfit(doc)
    if isinstance(found, _NotJson):
        return problem(400, "malformed_body", f"the body is not JSON: {found.why}", field="body")
    if found is None:
        return None
    return problem(
        422,
        "invalid_request",
        "must be Unicode text (a lone surrogate is not)",
        field=".".join(str(part) for part in found) or "body",
    )


def non_finite(body: bytes) -> str | None:
    """Why this JSON body holds a number JSON cannot carry (`NaN`, `Infinity`, `1e999`),
    or None: also when it is not JSON at all."""
    try:
        found = _unfit(json.loads(body, parse_constant=_constant, parse_float=_number))
    except (ValueError, RecursionError):
        return None
    return found.why if isinstance(found, _NotJson) else None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unfit(doc: Any) -> _NotJson | list[str | int] | None:
    """A number JSON cannot carry in `doc`, else where (keys and indices) a string or
    key with a lone surrogate is, else None."""
    surrogate: list[str | int] | None = None
    pending: list[tuple[list[str | int], Any]] = [([], doc)]
    while pending:  # a loop, not recursion: json.loads took any depth it allows
        path, value = pending.pop()
        if isinstance(value, _NotJson):
            return value
        if isinstance(value, str):
            if surrogate is None and _SURROGATE.search(value):
                surrogate = path
        elif isinstance(value, dict):
            for key, item in value.items():
                if surrogate is None and _SURROGATE.search(key):
                    surrogate = [*path, key]
                pending.append(([*path, key], item))
        elif isinstance(value, list):
            pending.extend(([*path, at], item) for at, item in enumerate(value))
    return surrogate


def not_replaced(text: str) -> str:
    """A pydantic validator: `text` holds no U+FFFD, the character uvicorn and Starlette
    put in a path or query parameter for percent-encoded bytes that are not UTF-8
    (`%ED%A0%80`, `%FF`): such a parameter was not text, so no id or name can match it."""
    if "\ufffd" in text:
        raise ValueError("must be UTF-8 text (it held percent-encoded bytes that are not)")
    return text


def _is_json(scope: Scope) -> bool:
    """FastAPI reads the body as JSON: `application/json` or `application/*+json`."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind: bytes = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (
                kind.startswith(b"application/") and kind.endswith(b"+json")
            )
    return False


class RequestGuard:
    """ASGI middleware answering, as a `Problem`, what the app would otherwise misread
    or fail on: a JSON body with a non-finite number or a lone surrogate
    (`body_problem`), and any exception the app lets through (500 `internal_error`,
    the connection kept open).

    JSON bodies are read once more here (the APIs' bodies are small): FastAPI reads
    them with Python's `json`, which takes NaN and has no switch to refuse it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _is_json(scope):
            body, receive = await _buffered(receive)
            refusal = body_problem(body) if body else None
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if started:  # too late for an answer: uvicorn closes the connection
                raise
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            log.exception("%s %s failed", scope["method"], route)
            answer = problem(500, "internal_error", "internal error; the server's log has it")
            await answer(scope, receive, send)


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The request's whole body, and a `receive` that hands it to the app again."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: nothing to replay
            return b"", receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay
