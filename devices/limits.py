"""Rate limits on registration, per caller: token buckets in PostgreSQL.

A registration proves a purchase with model, serial and the code printed inside the
unit, so a guesser must be slowed; but a limit per serial (or per unit) lets anyone
lock a unit's real owner out by failing on purpose. The limits here are per caller
instead: a `Caller` is the subject it signed in as and the address it came from, and
each is a key with its own bucket. Failures from other callers never touch a caller's
buckets, so the owner with the code can always register.

A bucket holds up to `Budget.capacity` tokens and refills at `capacity` per
`Budget.window`. An attempt takes a token from each of its caller's keys before the
proof is checked, so a caller cannot overspend by sending many at once; an attempt
whose proof succeeds gives them back, so only failures use a bucket up. A caller with
an empty bucket is refused (`TooManyAttempts`, with the seconds until the next token)
before anything is checked or hashed, even with the right code: letting the right
guess through would make the limit a mere delay for a guesser.

The buckets live in the registry schema's `registration_limits` table, one row per
key, so every API process sees the same counts; rows whose bucket is full again carry
no information and are pruned (`prune`). Functions run in a transaction the caller
(`devices.registry.Registry`) opened, with `search_path` set; they lock their rows in
key order, and are taken after any owner or serial lock.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ingest.migrations import Connection

_KEY_TEXT = 200
"""Longer subjects or addresses are cut: a key names a bucket, it is not shown."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Failures allowed per key: `capacity` at once, refilled evenly over `window`."""

    capacity: int
    window: timedelta

    def refilled(self, tokens: float, since: datetime, at: datetime) -> float:
        """The tokens of a bucket that held `tokens` at `since`, at `at`."""
        elapsed = max(0.0, (at - since).total_seconds())
        # Multiplied before divided: a whole share of the window gives whole tokens.
        return min(float(self.capacity), tokens + elapsed * self.capacity / self._window_s)

    def wait_s(self, tokens: float) -> float:
        """Seconds until a bucket holding `tokens` has one."""
        return max(0.0, 1.0 - tokens) * self._window_s / self.capacity

    @property
    def _window_s(self) -> float:
        return self.window.total_seconds()


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The budgets of subjects and of addresses, and how IPv6 addresses are grouped."""

    subject: Budget
    address: Budget
    ipv6_prefix: int = 56


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sends a registration: the subject it signed in as (the bearer token's `sub`;
    the owner id for local tools such as the CLI) and its client address (None for
    those tools)."""

    subject: str
    address: str | None = None

    def keys(self, limits: RateLimits) -> list[tuple[str, Budget]]:
        """The caller's bucket keys with their budgets, in lock order."""
        keys = [(f"subject:{self.subject[:_KEY_TEXT]}", limits.subject)]
        if self.address is not None:
            address = address_key(self.address, limits.ipv6_prefix)
            keys.append((f"address:{address}", limits.address))
        return sorted(keys, key=lambda key: key[0])


def address_key(host: str, ipv6_prefix: int) -> str:
    """The part of a client address that names its bucket: an IPv4 address (also when
    written as IPv4-mapped IPv6), an IPv6 network of `ipv6_prefix` bits, or, for a host
    that is no IP address (a test client, a Unix socket), the text itself."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host[:_KEY_TEXT]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


async def take(conn: Connection, keys: Sequence[tuple[str, Budget]], at: datetime) -> int | None:
    """Take one token from each key's bucket; None if taken, else (taking none) the
    whole seconds until every bucket has a token again."""
    for key, budget in keys:  # in key order: concurrent takers lock rows alike
        await conn.execute(
            "INSERT INTO registration_limits (caller_key, tokens, updated_at)"
            " VALUES ($1, $2, $3) ON CONFLICT (caller_key) DO NOTHING",
            key,
            float(budget.capacity),
            at,
        )
    rows = await _locked(conn, keys)
    now = {
        key: budget.refilled(rows[key]["tokens"], rows[key]["updated_at"], at)
        for key, budget in keys
    }
    waits = [budget.wait_s(now[key]) for key, budget in keys if now[key] < 1.0]
    if waits:
        # Whole seconds for Retry-After, rounded up, after dropping float noise.
        return max(1, math.ceil(round(max(waits), 3)))
    await _store(conn, {key: now[key] - 1.0 for key, _ in keys}, at)
    return None


async def give_back(conn: Connection, keys: Sequence[tuple[str, Budget]], at: datetime) -> None:
    """Return the token `take` took from each key (the proof succeeded)."""
    rows = await _locked(conn, keys)
    await _store(
        conn,
        {
            key: min(
                float(budget.capacity),
                budget.refilled(rows[key]["tokens"], rows[key]["updated_at"], at) + 1.0,
            )
            for key, budget in keys
            if key in rows
        },
        at,
    )


async def _locked(conn: Connection, keys: Sequence[tuple[str, Budget]]) -> dict[str, Any]:
    """The keys' buckets, locked for this transaction (in key order, as every taker)."""
    return {
        row["caller_key"]: row
        for row in await conn.fetch(
            "SELECT caller_key, tokens, updated_at FROM registration_limits"
            " WHERE caller_key = ANY($1::text[]) ORDER BY caller_key FOR UPDATE",
            [key for key, _ in keys],
        )
    }


async def _store(conn: Connection, tokens: dict[str, float], at: datetime) -> None:
    await conn.executemany(
        "UPDATE registration_limits SET tokens = $2, updated_at = greatest(updated_at, $3)"
        " WHERE caller_key = $1",
        [(key, value, at) for key, value in sorted(tokens.items())],
    )


async def prune(conn: Connection, before: datetime) -> int:
    """Delete the buckets untouched since `before` (one window ago: full again)."""
    status = await conn.execute("DELETE FROM registration_limits WHERE updated_at < $1", before)
    return int(status.split()[-1])
