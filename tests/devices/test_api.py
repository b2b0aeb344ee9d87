"""The HTTP API over a real registry, through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from devices.api import create_app
from devices.registry import Registry
from tests.devices.fakes import RecordingBroker, RecordingPublisher


@pytest.fixture
async def client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose lifespan enters (a borrowed view of) the test registry."""

    @asynccontextmanager
    async def borrowed() -> AsyncIterator[Registry]:
        yield registry

    app: FastAPI = create_app(borrowed)
    # ASGITransport does not run the lifespan; run it around the client ourselves.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry") as c,
    ):
        yield c


OWNER = {
    "name": "Ada Owner",
    "email": "ada@example.com",
    "phone": None,
    "region": "JP-13",
    "membership_tier": "gold",
    "analytics_consent": True,
    "marketing_consent": True,
}


async def create_owner(client: httpx.AsyncClient, name: str = "Ada Owner") -> str:
    response = await client.post("/owners", json={**OWNER, "name": name})
    assert response.status_code == 201, response.text
    owner_id: str = response.json()["owner_id"]
    return owner_id


def registration(
    owner_id: str, serial: str = "SN0001", code: str = "CODE-0001", **more: object
) -> dict[str, object]:
    return {
        "owner_id": owner_id,
        "model_number": "WM-100",
        "serial_number": serial,
        "registration_code": code,
        "purchase": {"channel": "own_store", "store_id": "TKY-01", "purchased_on": "2025-12-24"},
        **more,
    }


async def test_register_and_rejections(
    client: httpx.AsyncClient, broker: RecordingBroker, publisher: RecordingPublisher
) -> None:
    ada = await create_owner(client)
    bob = await create_owner(client, "Bob Other")

    cases = [
        (registration(ada, serial="SN9999"), 404, "unknown_serial"),
        ({**registration(ada), "model_number": "DR-200"}, 422, "model_mismatch"),
        (registration(bob, code="WRONG"), 403, "wrong_code"),
    ]
    for body, code, reason in cases:
        response = await client.post("/registrations", json=body)
        assert (response.status_code, response.json()["reason"]) == (code, reason)

    response = await client.post("/registrations", json=registration(ada))
    assert response.status_code == 201, response.text
    done = response.json()
    assert set(done) == {
        "device_id",
        "owner_id",
        "model_number",
        "serial_number",
        "valid_from",
        "mqtt_username",
        "mqtt_password",
    }
    assert done["mqtt_username"] == done["device_id"]
    assert broker.accounts == {done["device_id"]: done["mqtt_password"]}
    assert publisher.types() == ["device.registered"]

    response = await client.post("/registrations", json=registration(bob))
    assert (response.status_code, response.json()["reason"]) == (409, "owned_by_other")
    response = await client.post("/registrations", json=registration(ada))
    assert (response.status_code, response.json()["reason"]) == (409, "already_owner")
    response = await client.post("/registrations", json=registration(ada, "SN0002", "WRONG"))
    assert (response.status_code, response.json()["reason"]) == (403, "wrong_code")
    # Ada made three failed guesses: she is locked out now, even for a good unit.
    response = await client.post("/registrations", json=registration(ada, "SN0002", "CODE-0002"))
    assert (response.status_code, response.json()["reason"]) == (429, "locked_out")
    # Malformed input is refused by validation before reaching the registry.
    response = await client.post("/registrations", json={**registration(ada), "resale": "maybe"})
    assert response.status_code == 422


async def test_transfer_release_revoke(client: httpx.AsyncClient, registry: Registry) -> None:
    ada = await create_owner(client)
    bob = await create_owner(client, "Bob Other")
    device = (await client.post("/registrations", json=registration(ada))).json()["device_id"]

    response = await client.post(
        f"/devices/{device}/transfer",
        json={"from_owner_id": ada, "to_owner_id": bob, "purchase": {"channel": "gift"}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["owner_id"] == bob
    response = await client.post(f"/devices/{device}/release", json={"owner_id": ada})
    assert (response.status_code, response.json()["reason"]) == (403, "not_current_owner")
    response = await client.post(f"/devices/{device}/credentials/revoke", json={"owner_id": bob})
    assert (response.status_code, response.json()) == (200, {"revoked": True})
    response = await client.post(f"/devices/{device}/credentials", json={"owner_id": bob})
    assert response.status_code == 200
    assert response.json()["mqtt_username"] == device
    response = await client.post(f"/devices/{device}/release", json={"owner_id": bob})
    assert response.status_code == 204
    response = await client.post("/devices/nope/release", json={"owner_id": bob})
    assert (response.status_code, response.json()["reason"]) == (404, "unknown_device")
    assert [p.ended_reason for p in await registry.ownership_history(device)] == [
        "transferred",
        "released",
    ]


async def test_consent_reactivation_erasure(client: httpx.AsyncClient, registry: Registry) -> None:
    ada = await create_owner(client)
    response = await client.put(
        f"/owners/{ada}/consents", json={"marketing": False, "source": "web"}
    )
    assert response.status_code == 200
    assert (response.json()["analytics_consent"], response.json()["marketing_consent"]) == (
        True,
        False,
    )

    response = await client.post(
        f"/owners/{ada}/reactivation",
        json={"reauthenticated": True, "analytics_consent": True, "marketing_consent": True},
    )
    assert (response.status_code, response.json()["reason"]) == (409, "not_dormant")
    # Make Ada dormant: nothing she did is younger than a year from then.
    await registry.mark_dormant(datetime.now(UTC) + timedelta(days=366))
    response = await client.post(
        f"/owners/{ada}/reactivation",
        json={"reauthenticated": False, "analytics_consent": True, "marketing_consent": True},
    )
    assert (response.status_code, response.json()["reason"]) == (403, "reauthentication_required")
    response = await client.post(
        f"/owners/{ada}/reactivation",
        json={"reauthenticated": True, "analytics_consent": False, "marketing_consent": True},
    )
    assert response.status_code == 200
    assert response.json()["status"] == "active"

    device = (await client.post("/registrations", json=registration(ada))).json()["device_id"]
    response = await client.post(f"/owners/{ada}/erasure")
    assert response.json() == {"owner_id": ada, "released_devices": [device]}
    response = await client.get(f"/owners/{ada}")
    assert response.json()["status"] == "erased"
    assert response.json()["region"] is None
    response = await client.post("/owners/00000000-0000-0000-0000-000000000000/erasure")
    assert (response.status_code, response.json()["reason"]) == (404, "unknown_owner")


async def test_openapi_is_published(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert set(paths) == {
        "/owners",
        "/owners/{owner_id}",
        "/registrations",
        "/devices/{device_id}/release",
        "/devices/{device_id}/transfer",
        "/devices/{device_id}/credentials/revoke",
        "/devices/{device_id}/credentials",
        "/owners/{owner_id}/consents",
        "/owners/{owner_id}/reactivation",
        "/owners/{owner_id}/erasure",
    }
    assert "409" in paths["/registrations"]["post"]["responses"]
