"""`GET /health` and `GET /ready`: one document for every long-running process.

    /health  200 {"status": "alive"} while the process runs its loop; 503
             {"status": "stalled", ...} when its event loop has not turned for
             `STALL_S` (a liveness probe restarts it)
    /ready   200 {"status": "ready", "not_ready": [], "checks": {"kafka": "ok", ...}}
             while every server it needs answers (and, for a consumer, partitions
             are assigned); 503 {"status": "not_ready", "not_ready": ["kafka"],
             "checks": {"kafka": "no partitions assigned", ...}} otherwise, with
             `Retry-After`: a load balancer or orchestrator sends it no work meanwhile

The bridge and the consumer say what they wait on through a `Checks` callable (their
`readiness()`: each check's name and "ok" or what is wrong); `ProbeServer` serves it
with their Prometheus registry on one port (`/metrics` beside the two). The HTTP APIs
(registry, insights) build the same document in `ingest.httpapi`, from checks they run
per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from pydantic import BaseModel

from ingest.ports import unavailable

log = logging.getLogger(__name__)

OK = "ok"
"""What a passing check says."""
STALL_S = 30.0
"""`/health` answers 503 once the event loop has not turned for this long."""
BEAT_S = 1.0
RETRY_AFTER_S = 5

Checks = Callable[[], Mapping[str, str]]
"""Each check's name and `OK`, or one line saying what is not ready."""


class ReadinessOut(BaseModel):
    """`GET /ready`: ready when every check says `ok`; `not_ready` names the others."""

    status: Literal["ready", "not_ready"]
    not_ready: list[str]
    checks: dict[str, str]


class HealthOut(BaseModel):
    """`GET /health`: the process runs its loop."""

    status: Literal["alive"]


def readiness(checks: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """The status code and document of `GET /ready` for these checks' findings."""
    failing = [name for name, found in checks.items() if found != OK]
    doc = ReadinessOut(
        status="not_ready" if failing else "ready", not_ready=failing, checks=dict(checks)
    )
    return (503 if failing else 200), doc.model_dump()


class Heartbeat:
    """When the event loop last turned: `run()` beats every `BEAT_S` while the loop
    runs; `health()` reads it from any thread."""

    def __init__(self) -> None:
        self._beat = time.monotonic()

    async def run(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(BEAT_S)

    def health(self) -> tuple[int, dict[str, Any]]:
        """The status code and document of `GET /health`."""
        quiet = time.monotonic() - self._beat
        if quiet > STALL_S:
            return 503, {
                "status": "stalled",
                "detail": f"the event loop has not run for {quiet:.0f} s",
            }
        return 200, HealthOut(status="alive").model_dump()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: not worth a log line each."""


@contextlib.contextmanager
def serve_probes(
    registry: CollectorRegistry,
    heartbeat: Heartbeat,
    checks: Checks,
    *,
    host: str,
    port: int,
    setting: str,
    host_setting: str,
) -> Iterator[int | None]:
    """Serve `/metrics` (`registry`), `/health` and `/ready` on `host`:`port` for as long
    as the block runs (port 0: not at all). A port that cannot be had raises
    `PortUnavailable` naming the variables that move it (`setting`, `host_setting`)."""
    if port == 0:
        yield None
        return
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/health", "/ready"):
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        status, doc = heartbeat.health() if path == "/health" else readiness(checks())
        headers = [("Content-Type", "application/json")]
        if status == 503:
            headers.append(("Retry-After", str(RETRY_AFTER_S)))
        start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}", headers)
        return [json.dumps(doc).encode()]

    try:
        server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise unavailable(
            exc, host, port, setting, what="metrics port", host_setting=host_setting
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="probes", daemon=True)
    thread.start()
    log.info("metrics, health and readiness on http://%s:%d (/metrics, /health, /ready)",
             host, port)  # fmt: skip
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
