"""Private releases made once, replayed after, and charged to a planner's budget:
`private_report`.

A release is identified by its `release_key`, a SHA-256 of everything that decides it:
the report, its filters and options, and its privacy plan (epsilon, delta, bounds,
threshold, k; `insights.dp.Plan`). The first request for a key computes the release
(`insights.dp`), stores it in `<table>_dp_releases` and charges its epsilon to the
requesting planner in `<table>_dp_spend`, in one transaction. Every later request
for the same key, by anyone, gets the stored release back and is charged nothing.

Why cache and replay, and not noise derived from a keyed hash: OpenDP draws its noise
from the operating system's randomness and takes no seed, and a sampler of our own
seeded by a hash would be hand-rolled noise. Replaying the stored numbers makes a
repeat exactly the same (averaging repeats gains nothing), and a repeat reveals nothing
new, so it costs nothing; the cache is shared by all planners for the same reason.
The data behind a key is the data at its first request: a private release covers
only time that is over (its end at most the current hour; by default it ends at
today's 00:00 UTC), and late rows or erasures after it do not make a new one (a new
release of changed data would be a second look at the same owners, charged again).

A planner is the token's subject on the API, `cli:<user>` on the command line (which
reads the database directly, as the analytics team does). A planner's spend is the
sum of their ledger rows; a request whose release would take it past
`insights.dp_budget` is refused before anything is computed (`BudgetExceeded`, naming
what is left). Two requests at once serialise on advisory locks, the release key's
first and then the planner's, so neither a release nor a charge is made twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ingest.errors import ConfigurationError, StoreUnavailable
from ingest.migrations import Connection, advisory_lock_key
from ingest.postgres import DB_ERRORS
from insights.dp import DP_REPORTS, Plan, bounded_segments, noisy_rows, within
from insights.filters import FilterError, Filters
from insights.privacy import Privacy
from insights.query import Query
from insights.reports import REPORTS
from schemas.errors import UsagepipeError

RELEASE_VERSION = 1
"""Part of every release key: raised when what a release computes changes, so that no
release made by older code is replayed as if it were one of the new."""
_SLACK = 1e-9
"""Budgets are sums of floats: a release that fits but for rounding is allowed."""


class BudgetExceeded(UsagepipeError):
    """A new release would cost more of the planner's privacy budget than is left."""

    def __init__(self, planner: str, cost: float, left: float, total: float) -> None:
        super().__init__(
            f"this release costs epsilon {cost:g}; planner {planner!r} has epsilon "
            f"{max(left, 0):g} left of a budget of {total:g} (a release already made "
            "is replayed at no cost)"
        )
        self.planner = planner
        self.cost = cost
        self.left = max(left, 0.0)
        self.total = total


@dataclass(frozen=True, slots=True)
class Budget:
    """A planner's privacy budget: the total, and the epsilon spent on releases."""

    planner: str
    total: float
    spent: float

    @property
    def left(self) -> float:
        return max(self.total - self.spent, 0.0)

    def describe(self) -> dict[str, Any]:
        return {
            "planner": self.planner,
            "total": self.total,
            "spent": self.spent,
            "left": self.left,
        }


@dataclass(frozen=True, slots=True)
class Release:
    """A private release as stored (`body`), and what this request was charged."""

    body: dict[str, Any]
    replayed: bool
    charged: float
    budget: Budget

    def describe(self) -> dict[str, Any]:
        """The release as JSON: the stored release, and this request's accounting."""
        return {
            **self.body,
            "replayed": self.replayed,
            "charged_epsilon": self.charged,
            "budget": self.budget.describe(),
        }

    @property
    def columns(self) -> list[str]:
        return [*self.body["dimensions"], *self.body["measures"]]


def default_end(now: datetime | None = None) -> str:
    """A private release's default end: today's 00:00 UTC (whole past days only)."""
    today = (now or datetime.now(UTC)).astimezone(UTC)
    return today.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()


def epsilons(overrides: Mapping[str, float]) -> dict[str, float]:
    """Each private report's epsilon, `overrides` (`insights.dp_epsilon`) applied;
    a name that is not a private report is refused (`ConfigurationError`), so a typo
    cannot silently leave a default in force."""
    unknown = sorted(set(overrides) - set(DP_REPORTS))
    if unknown:
        raise ConfigurationError(
            f"insights.dp_epsilon names {', '.join(map(repr, unknown))}: not a report with a"
            f" private release (one of {', '.join(DP_REPORTS)})"
        )
    return {name: overrides.get(name, spec.epsilon) for name, spec in DP_REPORTS.items()}


async def budget_of(conn: Connection, table: str, planner: str, total: float) -> Budget:
    """`planner`'s budget: `total`, and what the ledger says they spent."""
    spent = await conn.fetchval(
        f"SELECT coalesce(sum(epsilon), 0) FROM {table}_dp_spend WHERE planner = $1", planner
    )
    return Budget(planner, total, float(spent))


async def private_report(
    conn: Connection,
    name: str,
    filters: Filters,
    *,
    table: str,
    privacy: Privacy,
    planner: str,
    budget: float,
    epsilon: float,
    delta: float,
    now: datetime | None = None,
) -> Release:
    """Report `name`'s private release for `filters`, replayed if made before (no
    charge), else made now and charged `epsilon` to `planner`.

    Raises `FilterError` for a report without a private release or a range not yet
    over, `BudgetExceeded` when a new release would take `planner` past `budget`,
    `StoreUnavailable` when the database fails or lacks a table.
    """
    spec = DP_REPORTS.get(name)
    if spec is None:
        raise FilterError(
            "report", f"{name[:40]!r} has no private release; one of {', '.join(DP_REPORTS)}"
        )
    hour = (now or datetime.now(UTC)).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if filters.end > hour:
        raise FilterError(
            "end",
            f"a private release covers only time that is over: end {filters.end:%Y-%m-%d %H:%M}"
            f" UTC is after {hour:%Y-%m-%d %H:%M} UTC",
        )
    plan = Plan.make(spec, epsilon, delta, privacy.k)
    parameters = {
        "version": RELEASE_VERSION,
        "report": name,
        "filters": filters.describe(),
        "options": {},
        "privacy": plan.describe(),
    }
    key = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
    try:
        stored = await _stored(conn, table, key)
        if stored is not None:
            return Release(stored, True, 0.0, await budget_of(conn, table, planner, budget))
        before = await budget_of(conn, table, planner, budget)
        if epsilon > before.left + _SLACK:
            raise BudgetExceeded(planner, epsilon, before.left, budget)
        async with conn.transaction(readonly=True):
            query = Query(conn, table, filters, privacy, {}, REPORTS[name].marketing)
            segments = await bounded_segments(query, spec)
        loss = plan.loss()
        if not within(loss, epsilon, delta):  # a bug in the plan, never a user's mistake
            raise AssertionError(f"{name}: the plan's loss {loss} exceeds ({epsilon}, {delta})")
        body = {
            "report": name,
            "title": REPORTS[name].title,
            "private": True,
            "marketing_usable": REPORTS[name].marketing,
            "population": "owners with analytics consent"
            + (", active now with marketing consent" if REPORTS[name].marketing else ""),
            "filters": filters.describe(),
            "options": {},
            "privacy": {**plan.describe(), "bound": spec.bound(), "loss": list(loss)},
            "release_key": key,
            "released_at": datetime.now(UTC).isoformat(),
            "dimensions": list(spec.dimensions),
            "measures": spec.measures,
            "rows": noisy_rows(spec, plan, segments),
        }
        return await _record(
            conn,
            table,
            key,
            parameters=parameters,
            body=body,
            planner=planner,
            budget=budget,
            plan=plan,
        )
    except asyncpg.UndefinedTableError as exc:
        raise StoreUnavailable(f"{exc}: run `usagepipe db migrate` first") from exc
    except DB_ERRORS as exc:
        raise StoreUnavailable(f"private release of {name} failed: {exc!r}") from exc


async def _stored(conn: Connection, table: str, key: str) -> dict[str, Any] | None:
    body = await conn.fetchval(f"SELECT body FROM {table}_dp_releases WHERE release_key = $1", key)
    return None if body is None else dict(json.loads(body))


async def _record(
    conn: Connection,
    table: str,
    key: str,
    *,
    parameters: dict[str, Any],
    body: dict[str, Any],
    planner: str,
    budget: float,
    plan: Plan,
) -> Release:
    """Store release `body` and charge it to `planner`, unless a request at the same
    time stored it first (then that one is replayed, free) or spent the budget."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", advisory_lock_key("dp", table, key))
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1)", advisory_lock_key("dp-planner", table, planner)
        )
        stored = await _stored(conn, table, key)
        if stored is not None:
            return Release(stored, True, 0.0, await budget_of(conn, table, planner, budget))
        before = await budget_of(conn, table, planner, budget)
        if plan.epsilon > before.left + _SLACK:
            raise BudgetExceeded(planner, plan.epsilon, before.left, budget)
        await conn.execute(
            f"""INSERT INTO {table}_dp_releases
                (release_key, report, parameters, epsilon, delta, planner, body)
                VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            key,
            plan.report,
            json.dumps(parameters),
            plan.epsilon,
            plan.delta,
            planner,
            json.dumps(body),
        )
        await conn.execute(
            f"INSERT INTO {table}_dp_spend (planner, release_key, epsilon, delta)"
            " VALUES ($1, $2, $3, $4)",
            planner,
            key,
            plan.epsilon,
            plan.delta,
        )
    spent = Budget(planner, budget, before.spent + plan.epsilon)
    return Release(body, False, plan.epsilon, spent)
