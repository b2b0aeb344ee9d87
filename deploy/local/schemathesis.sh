#!/usr/bin/env bash
# Fuzz both HTTP APIs with schemathesis, every check on (`--checks all`), with the
# settings in deploy/local/schemathesis.toml: install with the dev extra, start the local
# servers, serve `registry serve` and `insights serve` on a schema and a usage table of
# their own (dropped before and after: mutating operations create owners), run
# schemathesis against each, stop them. Exit status 0 when neither run found anything.
# Every request carries a bearer token of the local dev signer (`usagepipe auth token`)
# with the planner and operator scopes, so the runs reach past the sign-in; schemathesis'
# `ignored_auth` check sends requests without it too and expects 401.
#
#   bash deploy/local/schemathesis.sh                       # both APIs
#   bash deploy/local/schemathesis.sh --max-examples 300    # more cases (options go to `run`)
#
# USAGEPIPE_FUZZ_NAME (default `fuzz`) names the schema `reg_<name>` and the table
# `usage_<name>`; USAGEPIPE_REGISTRY__HTTP_PORT / USAGEPIPE_INSIGHTS__HTTP_PORT move the
# servers (default 18040 and 18050, beside the usual 8040 and 8050).
source "$(dirname "$0")/env.sh" dev
name="${USAGEPIPE_FUZZ_NAME:-fuzz}"
export USAGEPIPE_POSTGRES__TABLE="usage_${name}" USAGEPIPE_REGISTRY__DB_SCHEMA="reg_${name}"
export USAGEPIPE_REGISTRY__EVENTS_TOPIC="${name}.registry"
export USAGEPIPE_REGISTRY__HTTP_PORT="${USAGEPIPE_REGISTRY__HTTP_PORT:-18040}"
export USAGEPIPE_INSIGHTS__HTTP_PORT="${USAGEPIPE_INSIGHTS__HTTP_PORT:-18050}"
logs="$(mktemp -d "${TMPDIR:-/tmp}/usagepipe-schemathesis.XXXXXX")"
pids=()

drop() {  # the fuzz schema and table, with the usage table's derived tables
  .venv/bin/python - "$USAGEPIPE_POSTGRES__TABLE" "$USAGEPIPE_REGISTRY__DB_SCHEMA" <<'PY'
import asyncio, sys
import asyncpg
from ingest.settings import Settings

async def main(table: str, schema: str) -> None:
    conn = await asyncpg.connect(Settings().postgres.dsn.get_secret_value())
    try:
        derived = ("layout", "offsets", "hourly", "daily", "device_daily",
                   "rollup_invalidations", "erasures")
        tables = ", ".join([table, *(f"{table}_{suffix}" for suffix in derived)])
        await conn.execute(f"DROP TABLE IF EXISTS {tables} CASCADE")
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is not None:
            await conn.execute("DELETE FROM schema_migrations WHERE component = $1",
                               f"store.{table}")
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
PY
}

stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  drop
}
trap stop EXIT

wait_ready() {  # URL: until GET URL/ready answers 200 (PostgreSQL too; 30 s at most)
  for _ in $(seq 150); do
    if .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
        "$1/ready" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "schemathesis.sh: $1/ready did not answer 200; logs in $logs" >&2
  return 1
}

drop
.venv/bin/usagepipe --log-level WARNING db migrate >/dev/null
.venv/bin/usagepipe --log-level WARNING registry serve >"$logs/registry.log" 2>&1 &
pids+=($!)
.venv/bin/usagepipe --log-level WARNING insights serve >"$logs/insights.log" 2>&1 &
pids+=($!)
registry="http://127.0.0.1:${USAGEPIPE_REGISTRY__HTTP_PORT}"
insights="http://127.0.0.1:${USAGEPIPE_INSIGHTS__HTTP_PORT}"
wait_ready "$registry"
wait_ready "$insights"
token="$(.venv/bin/usagepipe --log-level WARNING auth token --subject "schemathesis-${name}" \
  --scope planner --scope operator --ttl 2h)"

status=0
for url in "$registry" "$insights"; do
  echo "== schemathesis against $url"
  .venv/bin/schemathesis --config-file deploy/local/schemathesis.toml run \
    "$url/openapi.json" --checks all --no-color --header "Authorization: Bearer $token" "$@" \
    || status=1
done
echo "server logs: $logs"
exit "$status"
