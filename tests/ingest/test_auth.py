"""`ingest.auth.Verifier` with a real issuer's keys: a PEM file, a JWK Set file, and a
JWKS URL served over HTTP on loopback that rotates its keys; and the settings that
cannot start."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from pydantic import ValidationError

from ingest import auth
from ingest.auth import KeysUnavailable, Refused, Verifier, build_verifier
from ingest.errors import ConfigurationError
from ingest.settings import AuthSettings
from tests.conftest import free_port
from tests.http_contract import served

ISSUER = "https://sign-in.example.com"


class Issuer:
    """An RS256 signing key of a pretend sign-in, with its JWK."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**doc, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, subject: str = "user-1", **claims: Any) -> str:
        now = datetime.now(UTC)
        body = {
            "iss": ISSUER,
            "sub": subject,
            "aud": "usagepipe",
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(minutes=5)).timestamp()),
            **claims,
        }
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})


async def _refusal(verifier: Verifier, token: str) -> tuple[int, str]:
    with pytest.raises(Refused) as refused:
        await verifier.verify(token)
    return refused.value.status, refused.value.detail


async def test_keys_from_a_pem_or_a_jwk_set_file(tmp_path: Path) -> None:
    one, two = Issuer("k1"), Issuer("k2")
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(one.pem())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [one.jwk(), two.jwk()]}))
    settings = AuthSettings(issuer=ISSUER, keys_file=pem, scope_claim="scp")
    verifier, signer = build_verifier(settings, tmp_path / "run")
    assert signer is None and not (tmp_path / "run").exists()  # no dev signer with an issuer
    who = await verifier.verify(one.token(scp=["usagepipe:planner", "other"], auth_time=1))
    assert (who.subject, who.scopes) == ("user-1", frozenset({"usagepipe:planner", "other"}))
    assert who.auth_time == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert await _refusal(verifier, two.token()) == (401, "the token's signature does not verify")

    verifier, _ = build_verifier(settings.model_copy(update={"keys_file": jwks}), tmp_path / "run")
    for issuer in (one, two):
        assert (await verifier.verify(issuer.token("user-2"))).subject == "user-2"
    stranger = Issuer("k3")
    assert await _refusal(verifier, stranger.token()) == (
        401,
        "the token is signed with a key this API does not know",
    )


async def test_keys_from_a_jwks_url_follow_a_rotation() -> None:
    old, new = Issuer("2026-11"), Issuer("2026-12")
    published = {"keys": [old.jwk()]}
    fetches = []
    app = FastAPI()

    @app.get("/jwks")
    async def keys() -> dict[str, Any]:
        fetches.append(len(published["keys"]))
        return published

    async with served(app) as url:
        settings = AuthSettings(issuer=ISSUER, jwks_url=f"{url}/jwks")
        verifier = Verifier(settings, issuer=ISSUER, jwks_url=f"{url}/jwks", jwks_cooldown_s=0)
        assert (await verifier.verify(old.token())).subject == "user-1"
        assert (await verifier.verify(old.token("user-2"))).subject == "user-2"
        assert fetches == [1]  # cached
        published["keys"] = [old.jwk(), new.jwk()]  # the issuer rotates
        assert (await verifier.verify(new.token())).subject == "user-1"
        assert fetches == [1, 2]  # an unknown key id fetched the set again
        assert await _refusal(verifier, Issuer("made-up").token()) == (
            401,
            "the token is signed with a key the issuer does not list",
        )
        no_kid = jwt.encode({"sub": "x"}, old.key, algorithm="RS256")
        assert await _refusal(verifier, no_kid) == (401, "the token names no key id (kid)")


async def test_a_jwks_that_does_not_answer_is_503_not_401() -> None:
    gone = f"http://127.0.0.1:{free_port()}/jwks"
    settings = AuthSettings(issuer=ISSUER, jwks_url=gone)
    verifier = Verifier(settings, issuer=ISSUER, jwks_url=gone)
    with pytest.raises(KeysUnavailable) as unavailable:
        await verifier.verify(Issuer("k1").token())
    assert unavailable.value.retriable

    app = FastAPI()
    auth.install(app, verifier)

    @app.get("/me")
    async def me(who: auth.Caller) -> dict[str, str]:
        return {"subject": who.subject}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        token = Issuer("k1").token()
        answer = await client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "5")
    assert answer.json() == {
        "reason": "unavailable",
        "detail": "the sign-in's keys cannot be fetched now; try again shortly",
        "field": None,
    }


def test_settings_that_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one of jwks_url or keys_file"):
        AuthSettings(issuer=ISSUER)
    with pytest.raises(ValidationError, match=r"need auth\.issuer too"):
        AuthSettings(jwks_url="https://sign-in.example.com/jwks")
    with pytest.raises(ConfigurationError) as off:
        build_verifier(AuthSettings(dev_signer=False), tmp_path)
    assert str(off.value) == (
        "no token issuer: set USAGEPIPE_AUTH__ISSUER (and its keys), or turn the local"
        " dev signer on with USAGEPIPE_AUTH__DEV_SIGNER=true"
    )
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=f"auth.keys_file {missing}: No such file"):
        build_verifier(AuthSettings(issuer=ISSUER, keys_file=missing), tmp_path)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    with pytest.raises(ConfigurationError, match="neither a PEM public key nor a JWK"):
        build_verifier(AuthSettings(issuer=ISSUER, keys_file=garbage), tmp_path)
    # The dev signer's key is made once, private to its owner, outside the repository.
    verifier, signer = build_verifier(AuthSettings(), tmp_path)
    assert signer is not None and signer.path == tmp_path / "auth" / "dev_signer.pem"
    assert signer.path.stat().st_mode & 0o777 == 0o600
    assert verifier.issuer == auth.DEV_ISSUER
    assert (
        AuthSettings().docs_enabled
        and not AuthSettings(issuer=ISSUER, keys_file=garbage).docs_enabled
    )
