"""Who may call the registry's API, over a real registry through httpx's ASGI transport:
the hijack of issue 16 refused at every route, the tokens the API refuses, reactivation
by the token's `auth_time`, and the operators' audited actions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI

from devices.api import create_app
from devices.records import AuditEntry
from devices.registry import Registry
from ingest.auth import DevSigner
from tests import tokens
from tests.devices.fakes import RecordingBroker, RecordingPublisher
from tests.devices.test_api import SignedIn, _borrowed, create_owner, registration

INVALID_TOKEN = 'Bearer realm="usagepipe", error="invalid_token"'
NO_TOKEN = 'Bearer realm="usagepipe"'
"""The challenge to a request without a token: no error code (RFC 6750 section 3.1)."""


@pytest.fixture
async def client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry") as c,
    ):
        yield c


async def _register(client: httpx.AsyncClient, who: SignedIn) -> tuple[str, str]:
    """SN0001 registered to `who`: its device id and MQTT password."""
    response = await client.post("/registrations", json=registration(), headers=who.auth)
    assert response.status_code == 201, response.text
    return response.json()["device_id"], response.json()["mqtt_password"]


def _refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["reason"]


async def test_the_hijack_from_the_issue_is_refused(
    client: httpx.AsyncClient,
    registry: Registry,
    broker: RecordingBroker,
    publisher: RecordingPublisher,
    tmp_path: Path,
) -> None:
    """With only the victim's `owner_id` (and the device id, which the victim's own MQTT
    login shows), an attacker with an account of their own takes nothing over."""
    victim = await create_owner(client, "Vic Victim")
    device, password = await _register(client, victim)
    attacker = await create_owner(client, "Mal Attacker")
    events, accounts = list(publisher.events), dict(broker.accounts)
    assert accounts == {device: password}

    # The issue's request as it was sent: no token at all.
    as_sent = {"from_owner_id": victim.owner_id, "to_owner_id": attacker.owner_id}
    response = await client.post(f"/devices/{device}/transfer", json=as_sent)
    assert _refusal(response) == (401, "unauthenticated")
    assert response.headers["www-authenticate"] == NO_TOKEN
    # With the attacker's token, the body may no longer name who gives the device away.
    response = await client.post(f"/devices/{device}/transfer", json=as_sent, headers=attacker.auth)
    assert (response.status_code, response.json()["field"]) == (422, "from_owner_id")

    victim_id = victim.owner_id
    consents = {"analytics_consent": True, "marketing_consent": True}
    hand_over = {"to_owner_id": attacker.owner_id}
    reason = {"reason": "the owner asked by phone"}
    attempts: list[tuple[str, str, object, tuple[int, str]]] = [
        ("POST", f"/devices/{device}/transfer", hand_over, (403, "not_current_owner")),
        ("POST", f"/devices/{device}/release", None, (403, "not_current_owner")),
        ("POST", f"/devices/{device}/credentials/revoke", None, (403, "not_current_owner")),
        ("POST", f"/devices/{device}/credentials", None, (403, "not_current_owner")),
        ("GET", f"/owners/{victim_id}", None, (403, "forbidden")),
        ("PUT", f"/owners/{victim_id}/consents", {"marketing": False}, (403, "forbidden")),
        ("POST", f"/owners/{victim_id}/reactivation", consents, (403, "forbidden")),
        ("POST", f"/owners/{victim_id}/erasure", None, (403, "forbidden")),
        ("GET", f"/owners/{victim_id}/export", None, (403, "forbidden")),
        ("GET", f"/owners/{victim_id}/export?format=csv", None, (403, "forbidden")),
        ("POST", f"/operator/devices/{device}/credentials/revoke", reason,
         (403, "insufficient_scope")),
        ("POST", f"/operator/devices/{device}/credentials", reason, (403, "insufficient_scope")),
        ("POST", f"/operator/owners/{victim_id}/erasure", reason, (403, "insufficient_scope")),
        ("POST", "/registrations", registration(code="GUESS-0001", resale=True),
         (403, "registration_refused")),
    ]  # fmt: skip
    # A token of the attacker's own key, naming the victim's subject, is no better than none.
    forged = DevSigner(tmp_path / "attacker.pem").token("Vic Victim", audience="usagepipe")
    for method, path, body, refused in attempts:
        response = await client.request(method, path, json=body)
        assert _refusal(response) == (401, "unauthenticated"), path
        response = await client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {forged}"}
        )
        assert _refusal(response) == (401, "unauthenticated"), path
        assert response.json()["detail"] == "the token's signature does not verify"
        response = await client.request(method, path, json=body, headers=attacker.auth)
        assert _refusal(response) == refused, (path, response.text)

    # An owner id that exists answers as one that does not: ids cannot be probed.
    stranger = await client.get(f"/owners/{uuid.uuid4()}", headers=attacker.auth)
    victims = await client.get(f"/owners/{victim_id}", headers=attacker.auth)
    assert (stranger.status_code, stranger.json()) == (victims.status_code, victims.json())

    # Nothing changed: the victim's secret still logs in, no event went out, the victim
    # owns the device and keeps their consents.
    assert broker.accounts == accounts
    assert publisher.events == events
    [period] = await registry.ownership_history(device)
    assert (str(period.owner_id), period.valid_to) == (victim_id, None)
    owner = (await client.get(f"/owners/{victim_id}", headers=victim.auth)).json()
    assert (owner["status"], owner["analytics_consent"], owner["marketing_consent"]) == (
        "active",
        True,
        True,
    )

    # The two ways a device does change hands: the current owner's release to a named
    # recipient, and a buyer's proof of possession (the code printed inside the unit).
    response = await client.post(f"/devices/{device}/transfer", json=hand_over, headers=victim.auth)
    assert (response.status_code, response.json()["owner_id"]) == (200, attacker.owner_id)
    buyer = await create_owner(client, "Bea Buyer")
    resale = registration(resale=True)
    response = await client.post("/registrations", json=resale, headers=buyer.auth)
    assert (response.status_code, response.json()["owner_id"]) == (201, buyer.owner_id)
    assert [p.ended_reason for p in await registry.ownership_history(device)] == [
        "transferred",
        "resold",
        None,
    ]


def _encoded(part: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def _hs256(claims: dict[str, object], secret: bytes) -> str:
    """A token "signed" with HMAC-SHA256 (by hand: PyJWT refuses a PEM key as a secret)."""
    signed = f"{_encoded({'alg': 'HS256', 'typ': 'JWT'})}.{_encoded(claims)}"
    mac = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def test_tokens_the_api_refuses(client: httpx.AsyncClient, tmp_path: Path) -> None:
    """Each failed check is 401 `unauthenticated` saying which, with the RFC 6750
    challenge; the same owner's good token then works."""
    ada = await create_owner(client)
    now = datetime.now(UTC)
    good = tokens.token("Ada Owner")
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    public_pem = tokens.SIGNER.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other_key = DevSigner(tmp_path / "other.pem")
    refused = {
        "no token": (None, "sign in: send Authorization: Bearer <token>"),
        "another scheme": ("Basic YWRhOnB3", "sign in: send Authorization: Bearer <token>"),
        "not a JWT": ("Bearer not.a.jwt", "the bearer token is not a JWT"),
        "expired": (
            tokens.token("Ada Owner", now=now - timedelta(hours=13)),
            "the token has expired; sign in again",
        ),
        "issued in the future": (
            tokens.token("Ada Owner", now=now + timedelta(minutes=5)),
            "the token is not valid yet (iat or nbf in the future): check the clocks",
        ),
        "wrong issuer": (
            tokens.token("Ada Owner", issuer="https://sign-in.example.net"),
            "the token comes from another issuer",
        ),
        "wrong audience": (
            tokens.SIGNER.token("Ada Owner", audience="another-app"),
            "the token is not meant for this API (audience usagepipe)",
        ),
        "wrong signature": (
            other_key.token("Ada Owner", audience="usagepipe"),
            "the token's signature does not verify",
        ),
        "a changed claim": (
            f"{header}.{_encoded({**claims, 'sub': 'Vic Victim'})}.{signature}",
            "the token's signature does not verify",
        ),
        "no subject": (
            tokens.token("Ada Owner", extra={"sub": None}),
            "the token lacks the 'sub' claim",
        ),
        "alg none": (
            f"{_encoded({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
            "the token's algorithm is not accepted (one of RS256, ES256)",
        ),
        # The classic confusion: HMAC "signed" with the public key as the secret.
        "HS256 with the public key": (
            _hs256(claims, public_pem),
            "the token's algorithm is not accepted (one of RS256, ES256)",
        ),
    }
    for case, (token, detail) in refused.items():
        if token is None:
            headers = {}
        else:
            headers = {"Authorization": token if " " in token else f"Bearer {token}"}
        response = await client.get("/owners/me", headers=headers)
        assert response.status_code == 401, case
        assert response.json() == {"reason": "unauthenticated", "detail": detail, "field": None}
        sent = not detail.startswith("sign in:")
        assert response.headers["www-authenticate"] == (INVALID_TOKEN if sent else NO_TOKEN), case
    response = await client.get("/owners/me", headers={"Authorization": f"Bearer {good}"})
    assert (response.status_code, response.json()["owner_id"]) == (200, ada.owner_id)


async def test_reactivation_needs_a_recent_sign_in(
    client: httpx.AsyncClient, registry: Registry
) -> None:
    ada = await create_owner(client)
    await registry.mark_dormant(datetime.now(UTC) + timedelta(days=366))
    path = f"/owners/{ada.owner_id}/reactivation"
    consents = {"analytics_consent": True, "marketing_consent": False}
    hour_ago = tokens.bearer("Ada Owner", auth_time=datetime.now(UTC) - timedelta(hours=1))
    response = await client.post(path, json=consents, headers=hour_ago)
    assert _refusal(response) == (403, "reauthentication_required")
    assert re.fullmatch(
        r"reactivating needs a sign-in at most 300 s old; this token's was 360[0-9] s ago"
        r" \(auth_time\): sign in again and send the new token",
        response.json()["detail"],
    ), response.json()["detail"]
    response = await client.post(
        path, json=consents, headers=tokens.bearer("Ada Owner", auth_time=None)
    )
    assert response.json() == {
        "reason": "reauthentication_required",
        "detail": "reactivating needs a fresh sign-in: this token has no auth_time; sign in"
        " again and send the new token within 300 s",
        "field": None,
    }
    # The old body flag is refused outright, whatever it claims.
    response = await client.post(path, json={**consents, "reauthenticated": True}, headers=hour_ago)
    assert (response.status_code, response.json()["field"]) == (422, "reauthenticated")
    assert (await registry.get_owner(uuid.UUID(ada.owner_id))).status == "dormant"
    response = await client.post(path, json=consents, headers=tokens.bearer("Ada Owner"))
    assert (response.status_code, response.json()["status"]) == (200, "active")


async def test_operator_actions_need_the_scope_and_are_audited(
    client: httpx.AsyncClient,
    registry: Registry,
    broker: RecordingBroker,
    pg: asyncpg.Connection,
    reg_schema: str,
) -> None:
    ada = await create_owner(client)
    device, _ = await _register(client, ada)
    why = {"reason": "ticket 4711: the owner lost the phone the app was on"}
    revoke = f"/operator/devices/{device}/credentials/revoke"
    for who in (ada.auth, tokens.bearer("Pat Planner", tokens.PLANNER)):
        response = await client.post(revoke, json=why, headers=who)
        assert response.json() == {
            "reason": "insufficient_scope",
            "detail": "this needs the scope 'usagepipe:operator'",
            "field": None,
        }
        assert response.status_code == 403
        assert response.headers["www-authenticate"] == (
            'Bearer realm="usagepipe", error="insufficient_scope", scope="usagepipe:operator"'
        )
    assert device in broker.accounts
    assert await registry.audit_log() == []

    sam = tokens.bearer("sam@support", tokens.OPERATOR)
    response = await client.post(revoke, json={}, headers=sam)
    assert (response.status_code, response.json()["field"]) == (422, "reason")
    # An operator acts through /operator only: as an owner they have no account.
    response = await client.post(f"/devices/{device}/credentials/revoke", headers=sam)
    assert _refusal(response) == (403, "forbidden")
    for path in (revoke, f"/operator/owners/{uuid.uuid4()}/erasure"):
        missing = path.replace(device, "nope")
        response = await client.post(missing, json=why, headers=sam)
        assert response.status_code == 404, missing
    assert await registry.audit_log() == []

    before = datetime.now(UTC)
    response = await client.post(revoke, json=why, headers=sam)
    assert (response.status_code, response.json()) == (200, {"revoked": True})
    assert device not in broker.accounts
    response = await client.post(f"/operator/devices/{device}/credentials", json=why, headers=sam)
    assert response.status_code == 200
    assert (response.json()["owner_id"], response.json()["mqtt_username"]) == (
        ada.owner_id,
        device,
    )
    assert broker.accounts[device] == response.json()["mqtt_password"]
    erasure = {"reason": "erasure request 88 received by post, identity checked"}
    response = await client.post(
        f"/operator/owners/{ada.owner_id}/erasure", json=erasure, headers=sam
    )
    assert response.json() == {"owner_id": ada.owner_id, "released_devices": [device]}
    after = datetime.now(UTC)

    log = await registry.audit_log()
    assert [(e.actor, e.action, e.target, e.reason) for e in log] == [
        ("sam@support", "revoke_credentials", device, why["reason"]),
        ("sam@support", "reissue_credentials", device, why["reason"]),
        ("sam@support", "erase_owner", ada.owner_id, erasure["reason"]),
    ]
    assert all(before <= e.at <= after for e in log)
    assert await registry.audit_log(ada.owner_id) == [log[2]]
    assert isinstance(log[0], AuditEntry)
    assert await pg.fetchval(f"SELECT count(*) FROM {reg_schema}.audit_log") == 3


async def test_docs_only_where_enabled(registry: Registry) -> None:
    for docs, status in ((False, 404), (True, 200)):
        app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier(), docs=docs)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://registry") as c,
        ):
            for path in ("/docs", "/redoc"):
                assert (await c.get(path)).status_code == status, (docs, path)
            assert (await c.get("/openapi.json")).status_code == 200
