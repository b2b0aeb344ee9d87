"""The TimescaleDB jobs of a usage table: created once, changed only on request.

Two policies, from the settings:

- compression: `compress_after` = allowed lateness + the table's partition interval, so
  only chunks no late event is expected in any more are compressed;
- retention: `drop_after` = the retention.

A migrate adds a policy that is missing. One that exists is read back
(`timescaledb_information.jobs`, its `config`): if it says what the settings say,
nothing is touched; if not, it is kept and a warning names the setting, both values
and the command that applies it, unless the migrating command asked for the change
(`usagepipe db migrate --update-policies`), which then edits the job's config in place
with `alter_job`, so its job id and whatever an operator set with `alter_job` (paused,
another schedule) survive. Every process migrates (each consumer start, the demo,
`db retention`, `db refresh`); none of them but the one asked may rewrite a policy, or a
one-off `USAGEPIPE_POSTGRES__RETENTION_DAYS=5 usagepipe db retention` would become the
table's retention.

The continuous aggregates have no refresh policy: the consumers refresh them from notes
(`ingest.caggs`). Tables created before that had three; they are removed once, by the
migrate that applies `ROLLUP_NOTES`, and never added again.

Followed (TimescaleDB 2.28's signatures, checked on a 2.28.3 server):
add_compression_policy(hypertable, compress_after "any", ...) and
add_retention_policy(relation, drop_after "any", ...) return the job id and store the
interval as text in the job's config (`{"hypertable_id": 1, "compress_after": "4 days"}`);
alter_job(job_id, ..., config => jsonb, ...) validates the config with the policy's check
function; remove_continuous_aggregate_policy(cagg, if_exists => true). The offsets are
declared "any", hence the casts: a bare parameter there has no type PostgreSQL could
infer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from ingest import migrations
from ingest.migrations import Connection
from ingest.rollups import ROLLUPS
from ingest.setting_errors import variable
from ingest.settings import PostgresSettings

log = logging.getLogger(__name__)

ROLLUP_NOTES = "004_rollup_notes"
"""The migration from which the consumers refresh the continuous aggregates from notes;
the migrate that applies it removes their refresh policies."""

UPDATE_COMMAND = "usagepipe db migrate --update-policies"

PolicyAction = Literal["created", "unchanged", "kept", "updated", "removed"]


@dataclass(frozen=True, slots=True)
class PolicyReport:
    """What one migrate did to one policy; `describe()` is the line `usagepipe db
    migrate` prints (and the warning, for a policy kept although it differs)."""

    policy: str
    action: PolicyAction
    job_ids: tuple[int, ...]
    key: str = ""
    value: str = ""  # the policy's, before this migrate; as PostgreSQL prints an interval
    setting: str = ""  # the settings'
    variable: str = ""  # where the settings' value comes from

    def describe(self) -> str:
        jobs = ", ".join(str(j) for j in self.job_ids)
        head = f"{self.policy} ({'jobs' if len(self.job_ids) > 1 else 'job'} {jobs})"
        match self.action:
            case "created":
                return f"{head}: created, {self.key} {self.setting}"
            case "unchanged":
                return f"{head}: unchanged, {self.key} {self.value}"
            case "kept":
                return (
                    f"{head}: differs: kept {self.key} {self.value}; {self.variable} says"
                    f" {self.setting}, run `{UPDATE_COMMAND}` to apply it"
                )
            case "updated":
                return f"{head}: updated {self.key} {self.value} -> {self.setting}"
            case "removed":
                return f"{head}: removed (the consumers refresh the continuous aggregates)"


@dataclass(frozen=True, slots=True)
class _Wanted:
    """One policy as the settings would have it."""

    policy: str
    proc_name: str  # the job's procedure, how timescaledb_information.jobs tells policies apart
    add: str  # the function that creates it
    key: str  # its config key, which is also the add function's argument
    created_before: str  # the config key of the other form, which excludes `key`
    value: timedelta
    variable: str


async def apply_policies(
    conn: Connection,
    table: str,
    settings: PostgresSettings,
    partition_interval: timedelta,
    applied: Sequence[str],
    *,
    update: bool = False,
) -> list[PolicyReport]:
    """Bring `table`'s policies in line with `settings` as far as allowed; returns what
    was done to each. `partition_interval` is the table's own (the setting applies to
    new tables only); `applied` the migrations this migrate applied; `update` the
    migrating command's say-so to change a policy that exists."""
    lateness = variable(["postgres", "allowed_lateness_s"])
    wanted = [
        _Wanted(
            "compression policy",
            "policy_compression",
            "add_compression_policy",
            "compress_after",
            "compress_created_before",
            settings.allowed_lateness + partition_interval,
            f"{lateness} ({settings.allowed_lateness_s}) plus the table's partition interval",
        ),
        _Wanted(
            "retention policy",
            "policy_retention",
            "add_retention_policy",
            "drop_after",
            "drop_created_before",
            settings.retention,
            f"{variable(['postgres', 'retention_days'])} ({settings.retention_days})",
        ),
    ]
    reports: list[PolicyReport] = []
    # Concurrent migrates (consumers starting together) see each other's new jobs.
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1)", migrations.advisory_lock_key("policies", table)
        )
        if ROLLUP_NOTES in applied:
            removed = await _remove_refresh_policies(conn, table)
            if removed:
                reports.append(PolicyReport("refresh policy", "removed", removed))
        for w in wanted:
            reports.append(await _apply(conn, table, w, update))
    for report in reports:
        if report.action == "kept":
            log.warning("%s: %s", table, report.describe())
        elif report.action != "unchanged":
            log.info("%s: %s", table, report.describe())
    return reports


async def _remove_refresh_policies(conn: Connection, table: str) -> tuple[int, ...]:
    """Remove the continuous aggregates' refresh policies; returns their job ids."""
    views = [f"{table}_{rollup}" for rollup in ROLLUPS]
    jobs = await conn.fetch(
        "SELECT job_id FROM timescaledb_information.jobs"
        " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        " AND hypertable_schema = current_schema() AND hypertable_name = ANY($1::text[])"
        " ORDER BY job_id",
        views,
    )
    for view in views:
        await conn.execute(
            "SELECT remove_continuous_aggregate_policy($1::regclass, if_exists => true)", view
        )
    return tuple(r["job_id"] for r in jobs)


async def _apply(conn: Connection, table: str, w: _Wanted, update: bool) -> PolicyReport:
    """Create policy `w` if missing; else leave it, or with `update` alter it in place
    where its config differs from the settings."""
    job = await conn.fetchrow(
        "SELECT job_id, config ->> $3 AS value, $4::interval::text AS setting,"
        " (config ->> $3)::interval IS NOT DISTINCT FROM $4::interval AS same"
        " FROM timescaledb_information.jobs"
        " WHERE proc_name = $2 AND hypertable_schema = current_schema()"
        " AND hypertable_name = $1",
        table,
        w.proc_name,
        w.key,
        w.value,
    )
    if job is None:
        created = await conn.fetchrow(
            f"SELECT {w.add}($1::regclass, {w.key} => $2::interval) AS job_id,"
            " $2::interval::text AS setting",
            table,
            w.value,
        )
        assert created is not None  # a SELECT without FROM: one row
        return PolicyReport(
            w.policy, "created", (created["job_id"],), w.key, "", created["setting"], w.variable
        )
    value = job["value"] if job["value"] is not None else "unset"  # an operator's other form
    report = PolicyReport(
        w.policy, "unchanged", (job["job_id"],), w.key, value, job["setting"], w.variable
    )
    if job["same"]:
        return report
    if not update:
        return dataclasses.replace(report, action="kept")
    # The config as it is, with the settings' value: nothing else of the job changes.
    await conn.execute(
        "SELECT alter_job(j.job_id, config => j.config - $2::text"
        " || jsonb_build_object($3::text, $4::interval::text))"
        " FROM timescaledb_information.jobs j WHERE j.job_id = $1",
        job["job_id"],
        w.created_before,
        w.key,
        w.value,
    )
    return dataclasses.replace(report, action="updated")
