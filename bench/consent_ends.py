"""How long the registry takes to list ended analytics consents
(`analytics_consent_ends(since, owners)`, devices/sql/011), the question each consumer
asks on an owner notification (one owner), on its schedule (every owner, since an hour
before the latest end recorded) and at its start (the whole history).

A registry schema of its own (`reg_bench_ends_<hex>`, dropped after) in the local
PostgreSQL gets `--owners` owners, each with an analytics grant, and `--withdrawn` of
them a withdrawal within the last day; then the same questions once more after a policy
version re-asking analytics took effect a minute ago (every grant lapses). This is a
benchmark, not a test: it prints figures and asserts nothing.

    python bench/consent_ends.py [--owners 100000] [--withdrawn 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from devices.schema import migrate_registry_at
from ingest.settings import Settings


async def best_of(
    repeat: int, conn: asyncpg.Connection, query: str, *args: object
) -> tuple[float, int]:
    """The fastest of `repeat` runs of `query`, and how many rows it returned."""
    best, count = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        count = len(await conn.fetch(query, *args))
        best = min(best, time.perf_counter() - started)
    return best, count


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=100_000)
    parser.add_argument("--withdrawn", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    dsn = Settings().postgres.dsn.get_secret_value()
    schema = f"reg_bench_ends_{secrets.token_hex(4)}"
    await migrate_registry_at(dsn, schema)
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        now = datetime.now(UTC)
        await conn.execute(
            f"INSERT INTO {schema}.owners (owner_id, created_at, last_active_at,"
            " analytics_consent) SELECT gen_random_uuid(), $1, $1, true"
            " FROM generate_series(1, $2)",
            now - timedelta(days=30),
            args.owners,
        )
        await conn.execute(
            f"INSERT INTO {schema}.consent_events (owner_id, purpose, granted, changed_at,"
            " source, policy_version) SELECT owner_id, 'analytics', true, created_at, 'bench',"
            f" 'initial' FROM {schema}.owners"
        )
        await conn.execute(
            f"INSERT INTO {schema}.consent_events (owner_id, purpose, granted, changed_at,"
            " source, policy_version) SELECT owner_id, 'analytics', false,"
            " $1::timestamptz - random() * interval '1 day', 'bench', 'initial'"
            f" FROM {schema}.owners ORDER BY owner_id LIMIT $2",
            now,
            args.withdrawn,
        )
        await conn.execute(f"ANALYZE {schema}.owners, {schema}.consent_events")
        one = await conn.fetchval(f"SELECT owner_id FROM {schema}.owners LIMIT 1")
        ends = f"SELECT * FROM {schema}.analytics_consent_ends($1, $2::uuid[])"
        questions: list[tuple[str, datetime, list[object] | None]] = [
            ("one owner (a notification)", now - timedelta(hours=2), [one]),
            ("every owner, the last 2 hours", now - timedelta(hours=2), None),
            ("every owner, the whole history", datetime(1970, 1, 1, tzinfo=UTC), None),
        ]
        print(
            f"{args.owners:,} owners with analytics granted, {args.withdrawn:,} withdrawn in"
            f" the last day; PostgreSQL {version}, Python {platform.python_version()};"
            f" best of {args.repeat}"
        )
        for state in ("no re-asking version", "a version re-asking analytics, a minute ago"):
            if state.startswith("a version"):
                effective = datetime.now(UTC) - timedelta(minutes=1)
                await conn.execute(
                    f"INSERT INTO {schema}.policy_versions (version, effective_at, policy_text,"
                    " published_at) VALUES ('bench', $1, 'text', $1)",
                    effective,
                )
                await conn.execute(
                    f"INSERT INTO {schema}.policy_reasks VALUES ('bench', 'analytics')"
                )
            print(f"{state}:")
            for name, since, among in questions:
                seconds, count = await best_of(args.repeat, conn, ends, since, among)
                print(f"  {name:<32} {seconds * 1000:10.1f} ms  {count:>9,} ends")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
