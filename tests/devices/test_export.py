"""An owner's own export (`GET /owners/{owner_id}/export`, `devices.export`) through
the HTTP API over a real registry and real usage tables: everything held about the
caller, as JSON and as a zip of CSVs, from the live data, and nobody else's."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from devices.api import create_app
from devices.export import BATCH_ROWS, UsageLink
from devices.registry import Registry
from ingest.erasure import unlink_owners
from ingest.erasure_proof import Proof, prove_erasure
from ingest.owner_keys import keys_for, load_secrets
from ingest.personal_data import CATALOGUE
from ingest.settings import PostgresSettings, Settings
from ingest.store import UsageStore
from tests import tokens
from tests.devices.test_api import SignedIn, _borrowed, create_owner, registration
from tests.http_contract import served
from tests.ingest.test_erasure import add_letter
from tests.ingest.test_store import row

AT = datetime(2026, 2, 1, 8, tzinfo=UTC)
ROWS = BATCH_ROWS * 2 + 5
"""More than two of the export's batches, so a table is streamed in several."""


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[UsageStore]:
    """The usage tables of the test (plain PostgreSQL), in the registry's database."""
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "use_timescaledb": False})
    async with UsageStore(pg) as s:
        await s.migrate()
        yield s


@pytest.fixture
async def client(
    registry: Registry, store: UsageStore, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    usage = UsageLink(store.table, lambda owner: keys_for(load_secrets(settings.enrich), owner))
    app: FastAPI = create_app(lambda: _borrowed(registry), verifier=tokens.verifier(), usage=usage)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry") as c,
    ):
        yield c


async def owners_with_usage(
    client: httpx.AsyncClient, store: UsageStore, settings: Settings
) -> tuple[SignedIn, SignedIn, str]:
    """Ada, with a washer, ROWS usage rows and a dead letter under her key; Bob, with
    one row of that washer under his. Returns both and the washer's id."""
    ada = await create_owner(client)
    bob = await create_owner(client, "Bob Other")
    response = await client.post("/registrations", json=registration(), headers=ada.auth)
    assert response.status_code == 201, response.text
    device = response.json()["device_id"]
    [ada_key] = keys_for(load_secrets(settings.enrich), UUID(ada.owner_id))
    [bob_key] = keys_for(load_secrets(settings.enrich), UUID(bob.owner_id))
    rows = [
        dataclasses.replace(row(device, s, AT + s * timedelta(minutes=1)), owner_key=ada_key)
        for s in range(ROWS)
    ]
    bobs = dataclasses.replace(row(device, ROWS, AT + timedelta(days=5)), owner_key=bob_key)
    await store.write([*rows, bobs])
    await store.refresh_rollups(wait=True)
    await add_letter(store, ada_key, 1, AT)
    return ada, bob, device


async def test_the_json_export_holds_everything_of_the_caller_and_nothing_else(
    client: httpx.AsyncClient, store: UsageStore, settings: Settings
) -> None:
    ada, bob, device = await owners_with_usage(client, store, settings)
    [ada_key] = keys_for(load_secrets(settings.enrich), UUID(ada.owner_id))

    response = await client.get(f"/owners/{ada.owner_id}/export", headers=ada.auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="usagepipe-owner-{ada.owner_id}.json"'
    )
    doc = response.json()
    assert (doc["format"], doc["version"], doc["owner_id"]) == (
        "usagepipe-owner-export",
        1,
        ada.owner_id,
    )
    assert list(doc["tables"]) == [h.name for h in CATALOGUE]
    assert doc["counts"] == {
        "owners": 1,
        "owner_contacts": 1,
        "consent_events": 2,
        "ownership_periods": 1,
        "devices": 1,
        "registration_attempts": 1,
        "registration_limits": 1,  # her sign-in's allowance, full again
        "audit_log": 0,
        "event_outbox": 1,
        "usage_rows": ROWS,
        "device_daily": 2,  # two days of the washer
        "hourly_owners": 34,  # the hours of her rows
        "dead_letters": 1,
        "consent_unlinks": 0,
        "erasures": 0,
    }
    assert {k: len(v) for k, v in doc["tables"].items()} == doc["counts"]
    tables = doc["tables"]
    [me] = tables["owners"]
    assert (me["owner_id"], me["subject"], me["region"], me["status"]) == (
        ada.owner_id,
        "Ada Owner",
        "JP-13",
        "active",
    )
    assert tables["owner_contacts"] == [
        {"owner_id": ada.owner_id, "name": "Ada Owner", "email": "ada@example.com", "phone": None}
    ]
    assert [(c["purpose"], c["granted"]) for c in tables["consent_events"]] == [
        ("analytics", True),
        ("marketing", True),
    ]
    assert [d["device_id"] for d in tables["devices"]] == [device]
    assert tables["ownership_periods"][0]["store_id"] == "TKY-01"
    assert tables["event_outbox"][0]["payload"]["owner_id"] == ada.owner_id  # JSON, not text
    usage = tables["usage_rows"]
    assert [(u["device_id"], u["seq"]) for u in usage] == [(device, s) for s in range(ROWS)]
    assert {u["owner_key"] for u in usage} == {ada_key}
    assert usage[0]["body"] == {"energy_wh": 2.5}
    assert usage[0]["event_time"] == "2026-02-01T08:00:00+00:00"
    assert [(d["events"], d["owner_key"]) for d in tables["device_daily"]] == [
        (16 * 60, ada_key),  # 08:00 to midnight
        (ROWS - 16 * 60, ada_key),
    ]
    [letter] = tables["dead_letters"]
    assert bytes.fromhex(letter["original"]) == b'{"bad": true}'

    # Bob's export has his one row, none of Ada's; each may read only their own.
    theirs = (await client.get(f"/owners/{bob.owner_id}/export", headers=bob.auth)).json()
    assert [u["seq"] for u in theirs["tables"]["usage_rows"]] == [ROWS]
    assert theirs["counts"]["devices"] == 0  # the washer was never his in the registry
    for who, whose in ((ada, bob), (bob, ada)):
        response = await client.get(f"/owners/{whose.owner_id}/export", headers=who.auth)
        assert (response.status_code, response.json()["reason"]) == (403, "forbidden")
    response = await client.get(f"/owners/{ada.owner_id}/export?format=xml", headers=ada.auth)
    assert (response.status_code, response.json()["field"]) == (422, "format")


async def test_the_csv_export_is_a_zip_of_one_file_per_table(
    client: httpx.AsyncClient, store: UsageStore, settings: Settings
) -> None:
    ada, _, device = await owners_with_usage(client, store, settings)
    as_json = (await client.get(f"/owners/{ada.owner_id}/export", headers=ada.auth)).json()
    response = await client.get(f"/owners/{ada.owner_id}/export?format=csv", headers=ada.auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="usagepipe-owner-{ada.owner_id}.zip"'
    )
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    assert archive.namelist() == [f"{h.name}.csv" for h in CATALOGUE] + ["manifest.csv"]

    def rows(name: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(archive.read(name).decode())))

    assert rows("manifest.csv") == [
        {"table": h.name, "file": f"{h.name}.csv", "rows": str(n), "about": h.about}
        for h, n in zip(CATALOGUE, as_json["counts"].values(), strict=True)
    ]
    usage = rows("usage_rows.csv")
    assert len(usage) == ROWS
    assert (usage[0]["device_id"], usage[0]["event_time"]) == (device, "2026-02-01T08:00:00+00:00")
    assert json.loads(usage[0]["body"]) == {"energy_wh": 2.5}
    assert usage[0]["region"] == ""  # null (unenriched test rows)
    # A table without rows still says what it would hold.
    assert archive.read("audit_log.csv").decode() == "audit_id,action,target,reason,at\n"
    [contact] = rows("owner_contacts.csv")
    assert contact == {"owner_id": ada.owner_id, "name": "Ada Owner", "email": "ada@example.com",
                       "phone": ""}  # fmt: skip


async def test_an_export_without_the_usage_tables_is_refused_not_partial(
    registry: Registry,
) -> None:
    """A registry not given the usage tables, or given a table that does not exist
    (not migrated yet, or a wrong name), answers 503 rather than an export that would
    show the owner no usage."""
    for usage in (None, UsageLink("usage_never_migrated", lambda _: [])):
        app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier(), usage=usage)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c,
        ):
            ada = await create_owner(c, f"Ada {usage is None}")
            response = await c.get(f"/owners/{ada.owner_id}/export", headers=ada.auth)
        assert (response.status_code, response.json()["reason"]) == (503, "unavailable")
        assert response.headers["retry-after"] == "5"


async def test_after_the_erasure_the_proof_finds_nothing_the_export_showed(
    client: httpx.AsyncClient,
    store: UsageStore,
    settings: Settings,
    pg: asyncpg.Connection,
    reg_schema: str,
) -> None:
    """The owner's erasure through the API, then the usage side's (as the consumer
    applies it): the proof over both stores finds what the export showed before, and
    nothing but what stays by design after."""
    ada, bob, _ = await owners_with_usage(client, store, settings)
    owner = UUID(ada.owner_id)
    keys = keys_for(load_secrets(settings.enrich), owner)
    shown = (await client.get(f"/owners/{ada.owner_id}/export", headers=ada.auth)).json()

    async def proof() -> Proof:
        return await prove_erasure(
            pg, owner, keys=keys, registry_schema=reg_schema, usage_table=store.table
        )

    before = await proof()
    assert {c.holding.name: c.linked for c in before.checked} == shown["counts"]
    response = await client.post(f"/owners/{ada.owner_id}/erasure", headers=ada.auth)
    assert response.status_code == 200
    response = await client.get(f"/owners/{ada.owner_id}/export", headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (403, "forbidden")
    pending = await proof()
    assert (pending.status, pending.proven) == ("erased", False)
    assert {c.holding.name: c.left for c in pending.checked if c.left} == {
        "usage_rows": ROWS,
        "device_daily": 2,
        "hourly_owners": 34,
        "dead_letters": 1,
    }
    await unlink_owners(store, [(owner, keys)])
    after = await proof()
    assert after.proven
    assert {c.holding.name: (c.linked, c.kept) for c in after.checked if c.linked} == {
        "owners": (1, 1),
        "event_outbox": (1, 1),
        "erasures": (1, 1),
    }
    # Bob's row stays, with his key.
    theirs = (await client.get(f"/owners/{bob.owner_id}/export", headers=bob.auth)).json()
    assert theirs["counts"]["usage_rows"] == 1


async def test_served_by_uvicorn_the_export_is_streamed_in_chunks(
    registry: Registry, store: UsageStore, settings: Settings
) -> None:
    """Over a real HTTP connection the export goes out chunked (no Content-Length: it
    is never assembled whole), in more than one piece, and reads back complete."""
    usage = UsageLink(store.table, lambda owner: keys_for(load_secrets(settings.enrich), owner))
    app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier(), usage=usage)
    async with served(app) as url, httpx.AsyncClient(base_url=url) as c:
        ada, _, _ = await owners_with_usage(c, store, settings)
        for fmt in ("json", "csv"):
            path = f"/owners/{ada.owner_id}/export?format={fmt}"
            async with c.stream("GET", path, headers=ada.auth) as response:
                assert response.status_code == 200
                assert response.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in response.headers
                pieces = [piece async for piece in response.aiter_raw()]
            body = b"".join(pieces)
            assert len(pieces) > 1, fmt
            if fmt == "json":
                assert json.loads(body)["counts"]["usage_rows"] == ROWS
            else:
                manifest = zipfile.ZipFile(io.BytesIO(body)).read("manifest.csv").decode()
                assert f"usage_rows,usage_rows.csv,{ROWS}," in manifest
