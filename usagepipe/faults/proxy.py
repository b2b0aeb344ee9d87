"""A TCP proxy that harms a connection on purpose: it delays what the server answers, or
resets every connection it holds at intervals (an RST, as a failing network or a
restarted load balancer sends), so a client sees both kinds of trouble from a real
server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self


class HarmfulProxy:
    """Listens on 127.0.0.1:`port` and forwards each connection to `target_port`.

    `delay_s` holds back each chunk the server sends by that long; `reset_every_s`
    resets all open connections that often. `connections` and `resets` count what it did.
    """

    def __init__(
        self,
        port: int,
        target_port: int,
        *,
        delay_s: float = 0.0,
        reset_every_s: float | None = None,
    ) -> None:
        self.port = port
        self.target_port = target_port
        self.delay_s = delay_s
        self.reset_every_s = reset_every_s
        self.connections = 0
        self.resets = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        if self.reset_every_s:
            self._spawn(self._reset_loop(self.reset_every_s))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for writer in list(self._writers):
            writer.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset_all(self) -> None:
        """Reset every open connection (SO_LINGER 0, then close: the peer gets an RST)."""
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            self._writers.discard(writer)
        self.resets += 1

    async def _reset_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.reset_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        self._spawn(self._pipe(reader, up_writer, 0.0))
        self._spawn(self._pipe(up_reader, writer, self.delay_s))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
