"""The HTTP API over a real registry, through httpx's ASGI transport, and schemathesis
against it served by uvicorn."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from devices.api import STATUS_BY_REASON, RegistryProblem, create_app
from devices.errors import RejectReason
from devices.registry import Registry
from ingest.auth import AUTH_REASONS
from ingest.httpapi import GENERIC_REASONS
from tests import tokens
from tests.devices.fakes import RecordingBroker, RecordingPublisher
from tests.http_contract import schemathesis_run, served


@asynccontextmanager
async def _borrowed(registry: Registry) -> AsyncIterator[Registry]:
    """The test's registry, lent to an app's lifespan (which must not close it)."""
    yield registry


@pytest.fixture
async def client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose lifespan enters (a borrowed view of) the test registry.
    It sends no token of its own: each request names its caller (`bearer`)."""
    app: FastAPI = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
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


@dataclass(frozen=True)
class SignedIn:
    """An owner account and its sign-in's `Authorization` header."""

    owner_id: str
    auth: dict[str, str]


async def create_owner(client: httpx.AsyncClient, name: str = "Ada Owner") -> SignedIn:
    """An owner created by their own sign-in (subject: `name`)."""
    auth = tokens.bearer(name)
    response = await client.post("/owners", json={**OWNER, "name": name}, headers=auth)
    assert response.status_code == 201, response.text
    return SignedIn(response.json()["owner_id"], auth)


def registration(
    serial: str = "SN0001", code: str = "CODE-0001-7KQ2-M9DX", **more: object
) -> dict[str, object]:
    return {
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

    refused = {
        "reason": "registration_refused",
        "detail": "model, serial or code do not match",
        "field": None,
    }
    for who, body in (
        (ada, registration(serial="SN9999")),
        (ada, {**registration(), "model_number": "DR-200"}),
        (bob, registration(code="WRONG")),
    ):
        response = await client.post("/registrations", json=body, headers=who.auth)
        assert (response.status_code, response.json()) == (403, refused)

    response = await client.post("/registrations", json=registration(), headers=ada.auth)
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
        "certificate",
    }
    assert done["owner_id"] == ada.owner_id  # the caller's account, from the token
    assert done["mqtt_username"] == done["device_id"]
    assert broker.accounts == {done["device_id"]: done["mqtt_password"]}
    assert publisher.types() == ["device.registered"]

    response = await client.post("/registrations", json=registration(), headers=bob.auth)
    assert (response.status_code, response.json()["reason"]) == (409, "owned_by_other")
    response = await client.post("/registrations", json=registration(), headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (409, "already_owner")
    wrong = registration("SN0002", "WRONG")
    response = await client.post("/registrations", json=wrong, headers=ada.auth)
    assert (response.status_code, response.json()) == (403, refused)
    # Ada failed three times, her subject's allowance: refused now, even for a good
    # unit, until a token comes back (one per 20 minutes).
    good = registration("SN0002", "CODE-0002-7KQ2-M9DX")
    response = await client.post("/registrations", json=good, headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (429, "too_many_attempts")
    assert 1100 < int(response.headers["Retry-After"]) <= 1200
    # Malformed input is refused by validation before reaching the registry.
    body = {**registration(), "resale": "maybe"}
    response = await client.post("/registrations", json=body, headers=ada.auth)
    assert response.status_code == 422
    # A sign-in without an owner account registers nothing.
    response = await client.post("/registrations", json=good, headers=tokens.bearer("nobody"))
    assert (response.status_code, response.json()["reason"]) == (403, "forbidden")


async def test_transfer_release_revoke(client: httpx.AsyncClient, registry: Registry) -> None:
    ada = await create_owner(client)
    bob = await create_owner(client, "Bob Other")
    registered = await client.post("/registrations", json=registration(), headers=ada.auth)
    device = registered.json()["device_id"]

    response = await client.post(
        f"/devices/{device}/transfer",
        json={"to_owner_id": bob.owner_id, "purchase": {"channel": "gift"}},
        headers=ada.auth,
    )
    assert response.status_code == 200, response.text
    assert response.json()["owner_id"] == bob.owner_id
    response = await client.post(f"/devices/{device}/release", headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (403, "not_current_owner")
    response = await client.post(f"/devices/{device}/credentials/revoke", headers=bob.auth)
    assert (response.status_code, response.json()) == (200, {"revoked": True})
    response = await client.post(f"/devices/{device}/credentials", headers=bob.auth)
    assert response.status_code == 200
    assert response.json()["mqtt_username"] == device
    response = await client.post(f"/devices/{device}/release", headers=bob.auth)
    assert response.status_code == 204
    response = await client.post("/devices/nope/release", headers=bob.auth)
    assert (response.status_code, response.json()["reason"]) == (404, "unknown_device")
    assert [p.ended_reason for p in await registry.ownership_history(device)] == [
        "transferred",
        "released",
    ]


async def test_consent_reactivation_erasure(client: httpx.AsyncClient, registry: Registry) -> None:
    ada = await create_owner(client)
    response = await client.put(
        f"/owners/{ada.owner_id}/consents",
        json={"marketing": False, "source": "web"},
        headers=ada.auth,
    )
    assert response.status_code == 200
    assert (response.json()["analytics_consent"], response.json()["marketing_consent"]) == (
        True,
        False,
    )
    consents = {"analytics_consent": True, "marketing_consent": True}
    reactivation = f"/owners/{ada.owner_id}/reactivation"
    response = await client.post(reactivation, json=consents, headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (409, "not_dormant")
    # Make Ada dormant: nothing she did is younger than a year from then.
    await registry.mark_dormant(datetime.now(UTC) + timedelta(days=366))
    # A token from a sign-in longer ago than auth.reauth_max_age_s (300 s), or one
    # without `auth_time`, does not reactivate; the body cannot claim otherwise.
    stale = tokens.bearer("Ada Owner", auth_time=datetime.now(UTC) - timedelta(seconds=301))
    for auth in (stale, tokens.bearer("Ada Owner", auth_time=None)):
        response = await client.post(reactivation, json=consents, headers=auth)
        assert (response.status_code, response.json()["reason"]) == (
            403,
            "reauthentication_required",
        )
    claimed = {**consents, "reauthenticated": True}
    response = await client.post(reactivation, json=claimed, headers=stale)
    assert (response.status_code, response.json()["field"]) == (422, "reauthenticated")
    assert (await registry.get_owner(UUID(ada.owner_id))).status == "dormant"
    fresh = tokens.bearer("Ada Owner", auth_time=datetime.now(UTC) - timedelta(seconds=10))
    response = await client.post(
        reactivation, json={**consents, "analytics_consent": False}, headers=fresh
    )
    assert response.status_code == 200
    assert response.json()["status"] == "active"

    registered = await client.post("/registrations", json=registration(), headers=ada.auth)
    device = registered.json()["device_id"]
    response = await client.post(f"/owners/{ada.owner_id}/erasure", headers=ada.auth)
    assert response.json() == {"owner_id": ada.owner_id, "released_devices": [device]}
    erased = await registry.get_owner(UUID(ada.owner_id))
    assert (erased.status, erased.region) == ("erased", None)
    # The sign-in's link went with the account: it reaches nothing now.
    response = await client.get(f"/owners/{ada.owner_id}", headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (403, "forbidden")
    response = await client.get("/owners/me", headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (403, "forbidden")


async def test_one_owner_per_sign_in(client: httpx.AsyncClient) -> None:
    ada = await create_owner(client)
    response = await client.post("/owners", json=OWNER, headers=ada.auth)
    assert (response.status_code, response.json()["reason"]) == (409, "owner_exists")
    response = await client.get("/owners/me", headers=ada.auth)
    assert (response.status_code, response.json()["owner_id"]) == (200, ada.owner_id)


async def test_openapi_is_published(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    paths = doc["paths"]
    assert set(paths) == {
        "/owners",
        "/owners/me",
        "/owners/{owner_id}",
        "/registrations",
        "/devices/{device_id}/release",
        "/devices/{device_id}/transfer",
        "/devices/{device_id}/credentials/revoke",
        "/devices/{device_id}/credentials",
        "/devices/{device_id}/certificate",
        "/purposes",
        "/owners/{owner_id}/consents",
        "/owners/{owner_id}/consents/decisions",
        "/owners/{owner_id}/consents/history",
        "/owners/{owner_id}/reactivation",
        "/owners/{owner_id}/erasure",
        "/owners/{owner_id}/export",
        "/operator/devices/{device_id}/credentials/revoke",
        "/operator/devices/{device_id}/credentials",
        "/operator/owners/{owner_id}/erasure",
        "/health",
        "/ready",
        "/metrics",
    }
    problem = {"$ref": "#/components/schemas/RegistryProblem"}
    answers = paths["/registrations"]["post"]["responses"]
    assert set(answers) == {"201", "400", "401", "403", "404", "409", "422", "429", "503"}
    for code in ("400", "401", "403", "404", "409", "422", "429", "503"):
        assert answers[code]["content"]["application/json"]["schema"] == problem, code
    assert "Retry-After" in answers["503"]["headers"]
    # FastAPI's own validation document is replaced everywhere by the one we answer.
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    reasons = doc["components"]["schemas"]["RegistryProblem"]["properties"]["reason"]["enum"]
    assert set(reasons) == {r.value for r in RejectReason} | set(GENERIC_REASONS) | set(
        AUTH_REASONS
    )
    # Every route but the operational two needs the bearer token.
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    for path, operations in paths.items():
        for method, operation in operations.items():
            secured = operation.get("security") == [{"bearer": []}]
            assert secured == (path not in {"/health", "/ready", "/metrics"}), (method, path)
            assert ("401" in operation["responses"]) == secured, (method, path)
    response = await client.get("/docs")  # only where auth.docs turns it on
    assert (response.status_code, response.json()["reason"]) == (404, "not_found")
    owner = doc["components"]["schemas"]["CreateOwnerIn"]["properties"]
    assert owner["analytics_consent"] == {"title": "Analytics Consent", "type": "boolean"}
    assert set(STATUS_BY_REASON) == set(RejectReason)  # every reason has its status


async def test_booleans_are_strict(
    client: httpx.AsyncClient, pg: asyncpg.Connection, reg_schema: str
) -> None:
    schema = reg_schema
    before = await pg.fetchval(f"SELECT count(*) FROM {schema}.owners")
    response = await client.post(
        "/owners",
        json={**OWNER, "analytics_consent": "yes", "marketing_consent": 0},
        headers=tokens.bearer("Ada Owner"),
    )
    assert response.status_code == 422
    assert response.json() == {
        "reason": "invalid_request",
        "detail": "Input should be a valid boolean (and 1 more: marketing_consent)",
        "field": "analytics_consent",
    }
    assert await pg.fetchval(f"SELECT count(*) FROM {schema}.owners") == before
    ada = await create_owner(client)
    for path, body, field in [
        (f"/owners/{ada.owner_id}/consents", {"analytics": 1}, "analytics"),
        (f"/owners/{ada.owner_id}/consents", {"marketing": "false"}, "marketing"),
        (
            f"/owners/{ada.owner_id}/reactivation",
            {"analytics_consent": "true", "marketing_consent": True},
            "analytics_consent",
        ),
        ("/registrations", registration(resale=1), "resale"),
    ]:
        method = "PUT" if "consents" in path else "POST"
        response = await client.request(method, path, json=body, headers=ada.auth)
        assert (response.status_code, response.json()["field"]) == (422, field), path
    owner = (await client.get(f"/owners/{ada.owner_id}", headers=ada.auth)).json()
    assert (owner["analytics_consent"], owner["marketing_consent"]) == (True, True)


async def test_every_error_is_one_problem_document(client: httpx.AsyncClient) -> None:
    """Bad input of every kind gets a 4xx `RegistryProblem`, never a 500."""
    ada = await create_owner(client)
    json_headers = {"content-type": "application/json", **ada.auth}

    def owner(name: str) -> bytes:  # `name` is JSON text, put in as it stands
        return json.dumps({**OWNER, "name": "X"}).replace('"X"', name).encode("utf-8")

    def reg(serial: str = "SN0001", **more: object) -> bytes:
        return json.dumps({**registration(serial), **more}).encode()

    def bought(on: object) -> bytes:
        return reg(purchase={"channel": "gift", "purchased_on": on})

    ref = json.dumps({"to_owner_id": ada.owner_id}).encode()
    invalid, malformed = "invalid_request", "malformed_body"
    cases: list[tuple[str, str, bytes | None, int, str, str | None]] = [
        ("POST", "/owners", owner('"A\\u0000"'), 422, invalid, "name"),  # NUL
        ("POST", "/owners", owner('"A\\ud800"'), 422, invalid, "name"),  # a lone surrogate
        ("POST", "/owners", owner('"A\\nB"'), 422, invalid, "name"),
        ("POST", "/owners", owner("NaN"), 400, malformed, "body"),  # not JSON
        ("POST", "/owners", owner("Infinity"), 400, malformed, "body"),
        ("POST", "/owners", owner("1" * 300), 422, invalid, "name"),
        ("POST", "/owners", owner("1e400"), 400, malformed, "body"),  # past a double's range
        ("POST", "/owners", owner("1" * 5000), 400, malformed, "body"),  # past 4300 digits
        ("POST", "/owners", owner('"\xff"').replace(b"\xc3\xbf", b"\xff"), 400, malformed, "body"),
        ("POST", "/owners", b'{"name": ', 400, malformed, "body"),
        ("POST", "/owners", None, 422, invalid, "body"),
        ("POST", "/owners", json.dumps({**OWNER, "extra": 1}).encode(), 422, invalid, "extra"),
        ("POST", "/registrations", bought(1e300), 422, invalid, "purchase.purchased_on"),
        ("POST", "/registrations", bought(10**30), 422, invalid, "purchase.purchased_on"),
        ("POST", "/registrations", bought(0), 422, invalid, "purchase.purchased_on"),
        ("POST", "/registrations", reg(serial="S\x00"), 422, invalid, "serial_number"),
        ("POST", "/devices/a%00b/release", ref, 422, invalid, "device_id"),
        ("POST", "/devices/" + "a" * 5000 + "/release", ref, 422, invalid, "device_id"),
        ("POST", "/devices/a%ff/release", ref, 422, invalid, "device_id"),  # not UTF-8
        ("GET", "/owners/not-a-uuid", None, 422, invalid, "owner_id"),
        ("GET", "/owners/" + "9" * 10000, None, 422, invalid, "owner_id"),
        ("GET", "/nowhere", None, 404, "not_found", None),
        ("PATCH", "/owners", None, 405, "method_not_allowed", None),
    ]
    for method, path, body, code, reason, field in cases:
        response = await client.request(method, path, content=body, headers=json_headers)
        assert response.status_code == code, (path, body, response.text)
        problem = RegistryProblem.model_validate(response.json())
        assert (problem.reason, problem.field) == (reason, field), (path, body, response.text)
        assert "\n" not in problem.detail
    response = await client.patch("/owners", headers=ada.auth)
    assert response.headers["allow"] == "POST"


async def test_health_and_metrics(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "alive"})
    response = await client.get("/ready")
    assert (response.status_code, response.json()) == (
        200,
        {"status": "ready", "not_ready": [], "checks": {"postgresql": "ok"}},
    )
    ada = await create_owner(client)
    await client.get(f"/owners/{ada.owner_id}", headers=ada.auth)
    await client.get("/owners/00000000-0000-0000-0000-000000000000", headers=ada.auth)
    await client.get(f"/owners/{ada.owner_id}")
    await client.get("/no/such/path")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    counts = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(response.text)
        if family.name == "usagepipe_http_requests"
        for s in family.samples
        if s.name == "usagepipe_http_requests_total"
    }
    assert counts == {
        ("GET", "/health", "200"): 1,
        ("GET", "/ready", "200"): 1,
        ("POST", "/owners", "201"): 1,
        ("GET", "/owners/{owner_id}", "200"): 1,
        ("GET", "/owners/{owner_id}", "403"): 1,
        ("GET", "/owners/{owner_id}", "401"): 1,
        ("GET", "unmatched", "404"): 1,
    }
    assert ada.owner_id not in response.text  # labels are route templates, never raw paths
    assert 'usagepipe_http_request_seconds_count{api="registry",method="GET",' in response.text


async def test_ready_says_when_postgresql_is_gone(registry: Registry) -> None:
    app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
    async with app.router.lifespan_context(app):
        await registry.aclose()  # the pool is gone: as good as a database that left
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as c:
            ready = await c.get("/ready")
            alive = await c.get("/health")
    assert (ready.status_code, ready.headers["retry-after"]) == (503, "5")
    assert ready.json() == {
        "status": "not_ready",
        "not_ready": ["postgresql"],
        "checks": {"postgresql": ready.json()["checks"]["postgresql"]},
    }
    assert ready.json()["checks"]["postgresql"] != "ok"
    assert (alive.status_code, alive.json()) == (200, {"status": "alive"})  # it still serves


async def test_schemathesis_finds_nothing(registry: Registry) -> None:
    app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
    # An owner who is also an operator: the /operator routes get past their scope too.
    auth = tokens.bearer("schemathesis-owner", tokens.OPERATOR)["Authorization"]
    async with served(app) as url:
        status, generated, output = await schemathesis_run(
            url, "--header", f"Authorization: {auth}"
        )
    assert status == 0, output[-6000:]
    assert generated > 500, output[-2000:]
    print(f"schemathesis: {generated} cases, no failure")


async def test_purposes_policy_and_decisions(client: httpx.AsyncClient, registry: Registry) -> None:
    """The owner reads the catalogue and the current policy, decides per purpose under
    it, sees what a new version asks again, and reads the history with its versions."""
    ada = await create_owner(client)
    response = await client.get("/purposes", headers=ada.auth)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert [(p["purpose"], p["legal_basis"], p["consent_required"]) for p in doc["purposes"]] == [
        ("service", "contract", False),
        ("analytics", "consent", True),
        ("marketing", "consent", True),
    ]
    assert (doc["current_policy"]["version"], doc["upcoming_policies"]) == ("initial", [])

    now = datetime.now(UTC)
    await registry.publish_policy(
        "2026-12",
        effective_at=now - timedelta(seconds=1),
        text="Marketing now includes partner offers.",
        reasks={"marketing"},
        at=now - timedelta(seconds=2),
    )
    consents = f"/owners/{ada.owner_id}/consents"
    response = await client.get(consents, headers=ada.auth)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert (doc["current_policy_version"], doc["pending"]) == ("2026-12", ["marketing"])
    assert [
        (c["purpose"], c["state"], c["in_force"], c["policy_version"]) for c in doc["consents"]
    ] == [
        ("analytics", "granted", True, "initial"),
        ("marketing", "lapsed", False, "initial"),
    ]
    owner = (await client.get(f"/owners/{ada.owner_id}", headers=ada.auth)).json()
    assert (owner["analytics_consent"], owner["marketing_consent"]) == (True, False)

    decisions = f"{consents}/decisions"
    refusals = [
        ({"purposes": ["marketing"], "granted": True}, 422, "invalid_request"),
        ({"purposes": ["analytics", "marketing"], "granted": True, "policy_version": "2026-12"},
         422, "bundled_consent"),
        ({"purposes": ["marketing"], "granted": True, "policy_version": "initial"}, 409,
         "stale_policy_version"),
        ({"purposes": ["marketing"], "granted": True, "policy_version": "v9"}, 422,
         "unknown_policy_version"),
        ({"purposes": ["service"], "granted": False}, 422, "consent_not_needed"),
        ({"purposes": ["profiling"], "granted": True, "policy_version": "2026-12"}, 422,
         "unknown_purpose"),
    ]  # fmt: skip
    for body, status_code, reason in refusals:
        response = await client.post(decisions, json=body, headers=ada.auth)
        assert (response.status_code, response.json()["reason"]) == (status_code, reason), body
    answer = (await client.post(decisions, json=refusals[0][0], headers=ada.auth)).json()
    assert answer == {
        "reason": "invalid_request",
        "detail": "a grant names the policy version the owner was shown",
        "field": "policy_version",
    }
    answer = (await client.post(decisions, json=refusals[1][0], headers=ada.auth)).json()
    assert "decisions of their own" in answer["detail"]

    body = {
        "purposes": ["marketing"],
        "granted": True,
        "policy_version": "2026-12",
        "source": "app",
    }
    response = await client.post(decisions, json=body, headers=ada.auth)
    assert response.status_code == 200, response.text
    assert (response.json()["pending"], response.json()["consents"][1]["state"]) == ([], "granted")

    response = await client.get(f"{consents}/history", headers=ada.auth)
    assert response.status_code == 200, response.text
    assert [
        (c["purpose"], c["granted"], c["source"], c["policy_version"])
        for c in response.json()["history"]
    ] == [
        ("analytics", True, "api", "initial"),
        ("marketing", True, "api", "initial"),
        ("marketing", True, "app", "2026-12"),
    ]
    # Another owner's consents are not the caller's to read.
    bob = await create_owner(client, "Bob Owner")
    response = await client.get(f"{consents}/history", headers=bob.auth)
    assert (response.status_code, response.json()["reason"]) == (403, "forbidden")
