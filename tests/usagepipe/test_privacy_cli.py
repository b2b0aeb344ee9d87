"""`usagepipe erasure prove` and `usagepipe registry export-owner` as the privacy office
runs them: subprocesses against the real database, their output and exit status."""

from __future__ import annotations

import dataclasses
import json
import uuid
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.erasure import unlink_owners
from ingest.owner_keys import keys_for, load_secrets
from ingest.personal_data import CATALOGUE
from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from tests.conftest import connection
from tests.ingest.test_erasure import add_letter, add_owner
from tests.ingest.test_store import row
from tests.usagepipe.test_cli import environment, usagepipe

AT = datetime(2026, 2, 1, 8, tzinfo=UTC)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[UsageStore]:
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "use_timescaledb": False})
    async with UsageStore(pg) as s:
        await s.migrate()
        yield s


async def test_erasure_prove_says_what_is_left_and_exits_by_it(
    settings: Settings, store: UsageStore, tmp_path: Path
) -> None:
    env = environment(settings)
    schema = settings.registry.db_schema
    owner = uuid.uuid4()
    [key] = keys_for(load_secrets(settings.enrich), owner)
    await add_owner(store, schema, owner, AT, erased=False)
    await store.write(
        [
            dataclasses.replace(row("d1", s, AT + s * timedelta(hours=1)), owner_key=key)
            for s in (1, 2)
        ]
    )
    await add_letter(store, key, 1, AT)

    done = usagepipe("erasure", "prove", str(owner), env=env)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"owner {owner}: active; usage layout partitioned; 1 owner key(s) looked for"
    assert lines[-1] == "not erased: the owner is active; 4 row(s) linked to them"
    assert f"  {store.table}  " in done.stdout

    # The owner's export, before the erasure: to a file (a zip of CSVs), and JSON to stdout.
    out = tmp_path / "ada.zip"
    done = usagepipe(
        "registry", "export-owner", str(owner), "--format", "csv", "--out", str(out), env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (")
    archive = zipfile.ZipFile(out)
    assert archive.namelist() == [f"{h.name}.csv" for h in CATALOGUE] + ["manifest.csv"]
    assert not (tmp_path / "ada.zip.part").exists()
    done = usagepipe("registry", "export-owner", str(owner), "--out", "-", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["counts"]["usage_rows"], doc["counts"]["dead_letters"]) == (2, 1)

    await store.pool.execute(
        f"UPDATE {schema}.owners SET status = 'erased', erased_at = $2 WHERE owner_id = $1",
        owner,
        AT + timedelta(days=1),
    )
    done = usagepipe("erasure", "prove", str(owner), env=env)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == (
        f"NOT PROVEN: 3 row(s) still linked, in {store.table}, {store.table}_dead_letters"
    )
    assert await unlink_owners(store, [(owner, [key])]) == 2
    done = usagepipe("erasure", "prove", str(owner), env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == (
        f"erasure proven: {len(CATALOGUE)} tables checked, nothing left"
    )


async def test_erasure_prove_refuses_what_it_cannot_check(settings: Settings) -> None:
    env = environment(settings)
    stranger, known = uuid.uuid4(), uuid.uuid4()
    done = usagepipe("erasure", "prove", "ada", env=env)
    assert (done.returncode, done.stderr) == (
        2,
        "usagepipe erasure prove: argument OWNER_ID: not an owner id (a UUID): 'ada'\n",
    )
    done = usagepipe("erasure", "prove", str(stranger), env=env)  # no usage table yet
    assert (done.returncode, done.stderr) == (
        2,
        f"usagepipe erasure prove: no usage table {settings.postgres.table!r} in this database:"
        " is USAGEPIPE_POSTGRES__TABLE right? (`usagepipe db migrate` creates it)\n",
    )
    done = usagepipe("registry", "export-owner", str(stranger), env=env)
    assert (done.returncode, done.stderr) == (
        2,
        f"usagepipe registry export-owner: no owner {stranger} in the registry schema"
        f" {settings.registry.db_schema!r}\n",
    )
    async with connection(settings.postgres.dsn.get_secret_value()) as conn:
        await conn.execute(
            f"INSERT INTO {settings.registry.db_schema}.owners (owner_id, created_at,"
            " last_active_at) VALUES ($1, now(), now())",
            known,
        )
    done = usagepipe("registry", "export-owner", str(known), env=env)
    assert (done.returncode, done.stderr) == (
        2,
        f"usagepipe registry export-owner: no usage table {settings.postgres.table!r} in this"
        " database: is USAGEPIPE_POSTGRES__TABLE right? (`usagepipe db migrate` creates it)\n",
    )


async def test_erasure_prove_of_an_unknown_owner(settings: Settings, store: UsageStore) -> None:
    stranger = uuid.uuid4()
    done = usagepipe("erasure", "prove", str(stranger), env=environment(settings))
    assert done.returncode == 2
    assert done.stderr == (
        f"usagepipe erasure prove: no owner {stranger} in the registry schema"
        f" {settings.registry.db_schema!r} (an erased owner keeps its row: check the id)\n"
    )
    assert done.stdout.splitlines()[0].startswith(f"owner {stranger}: unknown to the registry")
