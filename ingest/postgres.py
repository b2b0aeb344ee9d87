"""PostgreSQL's errors, translated at one point.

Whatever asyncpg or the socket under it raises when the database cannot do what was
asked is one of `DB_ERRORS`: the server's refusals (`asyncpg.PostgresError`), a
connection that is closed or in the wrong state (`asyncpg.InterfaceError`), and the
network (`OSError`, which includes `TimeoutError`, so an `asyncio.timeout()` expiring
around a query counts too). `translated()` turns them into one of usagepipe's errors
with a message that names what was being done:

    with translated(StoreUnavailable, f"writing {len(rows)} rows failed"):
        async with pool.acquire() as conn, conn.transaction():
            ...

raises `StoreUnavailable("writing 3 rows failed: ConnectionResetError(...)")` from the
original. Every component of the data path and the read side wraps PostgreSQL here,
so what counts as a database error is decided once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import asyncpg

DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
"""Every error PostgreSQL, asyncpg or the connection's socket raises."""


@contextmanager
def translated(
    error: Callable[[str], Exception],
    what: str,
    *,
    detail: Callable[[object], str] = repr,
) -> Iterator[None]:
    """Raise `error(f"{what}: {detail(exc)}") from exc` for any of `DB_ERRORS` in the
    block. `detail` is `repr` (the error's type is worth reading in a log) or `str`
    (for a one-line message a user reads, such as a refused connection)."""
    try:
        yield
    except DB_ERRORS as exc:
        raise error(f"{what}: {detail(exc)}") from exc
