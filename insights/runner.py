"""Running a report against the database: `run_report`.

The report's options are checked and their defaults filled in, its SQL runs in a
read-only transaction, database errors become `StoreUnavailable`, and segments below k
owners are merged along the report's hierarchy, or else suppressed
(`insights.generalise`), before the rows come back as a `Report`.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from ingest.errors import StoreUnavailable
from ingest.migrations import Connection
from ingest.postgres import DB_ERRORS
from insights.filters import FilterError, Filters
from insights.generalise import generalise
from insights.privacy import Privacy
from insights.query import Query
from insights.reports import REPORTS
from insights.specs import Report, ReportSpec


async def run_report(
    conn: Connection,
    name: str,
    filters: Filters,
    *,
    table: str,
    privacy: Privacy,
    options: Mapping[str, str | None] | None = None,
    timezone: str = "Asia/Seoul",
    work_mem_mb: int = 64,
) -> Report:
    """Compute report `name` over `table`; segments below `privacy.k` owners are merged
    along the report's hierarchy until they reach it, or else suppressed
    (`insights.generalise`).

    Raises `FilterError` for an unknown report or a bad option, `StoreUnavailable` when
    the database fails or lacks a table. Read-only: it runs in a read-only transaction,
    with `work_mem` set to `work_mem_mb` for it (`insights.report_work_mem_mb`),
    PostgreSQL's JIT compilation off and every statement planned for its parameters.
    """
    spec = REPORTS.get(name)
    if spec is None:
        raise FilterError("report", f"unknown {name!r}; one of {', '.join(REPORTS)}")
    chosen = _options(spec, options or {}, {"tz": timezone})
    try:
        async with conn.transaction(readonly=True):
            # JIT compiles each report's expressions anew: 70-80 ms a query, more than
            # it saves on these (bench/report_scale.py, EXPLAIN). A custom plan every
            # time: asyncpg prepares each statement, and after five runs on one pooled
            # connection PostgreSQL may keep a generic plan, blind to the range and
            # filters; the API's marketing-usable reports took 3-35 s a request so,
            # against 0.1-0.3 s planned for their parameters.
            await conn.execute(
                f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'; SET LOCAL jit = off;"
                " SET LOCAL plan_cache_mode = force_custom_plan"
            )
            query = Query(conn, table, filters, privacy, chosen, spec.marketing)
            found = await spec.compute(query)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as exc:
        raise StoreUnavailable(
            f"{exc}: run `usagepipe db migrate` (and, for marketing-usable reports, "
            "`usagepipe registry migrate`) first"
        ) from exc
    except DB_ERRORS as exc:
        raise StoreUnavailable(f"report {name} failed: {exc!r}") from exc
    rows = generalise(
        found, spec.generalisation, privacy.k, privacy.reason, privacy.remainder_reason
    )
    return Report(spec, filters, chosen, privacy.k, rows)


def _options(
    spec: ReportSpec, given: Mapping[str, str | None], defaults: Mapping[str, str]
) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for key, value in given.items():
        if value is None:
            continue
        option = spec.options.get(key)
        if option is None:
            raise FilterError(key, f"report {spec.name!r} takes no option {key!r}")
        if option.choices and value not in option.choices:
            raise FilterError(key, f"{value!r} is not one of {', '.join(option.choices)}")
        chosen[key] = value
    for key, option in spec.options.items():
        default = option.default if option.default is not None else defaults.get(key)
        if key not in chosen and default is not None:
            chosen[key] = default
    return chosen
