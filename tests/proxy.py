"""A TCP forwarder for tests: a port that answers only from a moment the test chooses,
then passes bytes both ways to a real server (PostgreSQL, Kafka, MQTT)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self


class Forwarder:
    """Listens on `port` (127.0.0.1) once `start()` is called, forwarding each connection
    to `target_port`; nothing listens there before, as with a server not up yet."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop listening and cut every connection, as a server going away does;
        `start()` may follow."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for pipe in list(self._pipes):
            pipe.cancel()
        for pipe in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError):
                await pipe

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class CommitReplyDropper(Forwarder):
    """A `Forwarder` to PostgreSQL that, once `arm(n, marker)` was called, takes the
    server's reply to the next `n` COMMITs of transactions that sent `marker` (bytes of a
    statement or a parameter) away and resets the client's connection instead: the
    transaction committed, and the client cannot know it (an ambiguous commit)."""

    def __init__(self, port: int, target_port: int) -> None:
        super().__init__(port, target_port)
        self.armed = 0
        self.marker = b""
        self.dropped = 0

    def arm(self, commits: int, marker: bytes) -> None:
        self.armed, self.marker = commits, marker

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        marked = asyncio.Event()
        committing = asyncio.Event()

        async def upstream() -> None:
            try:
                while data := await reader.read(65536):
                    if self.marker and self.marker in data:
                        marked.set()
                    if b"COMMIT" in data and marked.is_set():  # asyncpg sends COMMIT;
                        marked.clear()
                        committing.set()
                    up_writer.write(data)
                    await up_writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                up_writer.close()

        async def downstream() -> None:
            try:
                while data := await up_reader.read(65536):
                    if committing.is_set() and b"COMMIT\x00" in data:  # CommandComplete
                        committing.clear()
                        if self.armed > 0:
                            self.armed -= 1
                            self.dropped += 1
                            writer.transport.abort()  # a reset, not a goodbye
                            up_writer.close()
                            return
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        for coroutine in (upstream(), downstream()):
            task = asyncio.create_task(coroutine)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)
