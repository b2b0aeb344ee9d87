"""Helpers for the tests of the two HTTP APIs: serve an app on a loopback port (`served`,
for every test that talks to a real uvicorn server), a client on one keep-alive
connection that counts the connections it opened (`OneConnection`), and run
schemathesis' own CLI against it with the repository's settings.

The CLI is what `deploy/local/schemathesis.sh` runs, so the tests and the documented
command cannot drift apart. (schemathesis' pytest loader, `from_fixture`, reads a
private attribute that pytest 9 no longer has.)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tests.conftest import free_port

CONFIG = Path(__file__).parents[1] / "deploy" / "local" / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Fewer cases than the script's run (the config's 60): the same seed and checks, a
# quicker gate; `bash deploy/local/schemathesis.sh` is the thorough run.
TEST_EXAMPLES = 20


@contextlib.asynccontextmanager
async def served(app: FastAPI, port: int | None = None) -> AsyncIterator[str]:
    """`app` served by uvicorn on loopback `port` (a free one if None), in this event
    loop."""
    port = free_port() if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve(), name="api")
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class OneConnection:
    """An httpx client of `url` allowed one connection, which counts the TCP connections
    it opened: still 1 after several requests means the server kept the first open.
    `headers` go with every request (a bearer token, say)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, headers=headers)
        self.connects = 0

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            self.connects += 1

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """`path` goes as written: percent-escapes (`%ED%A0%80`) reach the server as such."""
        return await self.client.request(method, path, extensions={"trace": self._trace}, **kwargs)

    async def __aenter__(self) -> OneConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()


async def schemathesis_run(url: str, *options: str) -> tuple[int, int, str]:
    """Run `schemathesis run URL/openapi.json --checks all` with the repository's config;
    return (exit status, cases generated, the output). The event loop keeps serving the
    app while the CLI runs."""
    proc = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--no-color",
        "--max-examples",
        str(TEST_EXAMPLES),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    found = re.search(r"(\d+) generated, (\d+) passed", text)
    generated = int(found.group(1)) if found and found.group(1) == found.group(2) else 0
    assert proc.returncode is not None
    return proc.returncode, generated, text
