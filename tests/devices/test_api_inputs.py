"""Inputs JSON or UTF-8 cannot carry, against the registry's API on a real uvicorn
server: each is a 4xx `RegistryProblem` naming the field, never a 500, and the
keep-alive connection serves the next request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from devices.api import RegistryProblem, create_app
from devices.registry import Registry
from tests import tokens
from tests.devices.test_api import OWNER, _borrowed, registration
from tests.http_contract import OneConnection, served

OWNER_ID = "00000000-0000-0000-0000-000000000000"
INVALID, MALFORMED = "invalid_request", "malformed_body"

# JSON text put in place of a field's value, and what each answers wherever it stands.
STRINGS = [('"A\\u0000"', 422), ('"A\\ud800"', 422), ('"\\udfff"', 422)]
NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
NUMBER = (400, MALFORMED, "body")


def _with(doc: dict[str, object], field: str, raw: str) -> bytes:
    """`doc` as JSON with `field` (`purchase.store_id`) holding the JSON text `raw`."""
    *parents, name = field.split(".")
    inner = doc
    for parent in parents:
        inner = inner[parent]  # type: ignore[assignment]
    inner[name] = "\x01PLACEHOLDER"
    return json.dumps(doc).replace('"\\u0001PLACEHOLDER"', raw).encode()


def _body_cases() -> list[tuple[str, str, bytes, tuple[int, str, str]]]:
    owner_fields = ["name", "email", "phone", "region", "membership_tier", "source"]
    reg_fields = [
        "model_number", "serial_number", "registration_code",
        "purchase.channel", "purchase.store_id", "purchase.purchased_on",
    ]  # fmt: skip
    booleans = ["analytics_consent", "marketing_consent"]  # the only non-text fields
    cases = []
    for path, base, fields in (
        ("/owners", OWNER, owner_fields + booleans),
        ("/registrations", registration(), [*reg_fields, "resale"]),
    ):
        for field in fields:
            for raw, status in STRINGS:
                body = _with(json.loads(json.dumps(base)), field, raw)
                cases.append((path, f"{field}={raw}", body, (status, INVALID, field)))
            for raw in NUMBERS:
                body = _with(json.loads(json.dumps(base)), field, raw)
                cases.append((path, f"{field}={raw}", body, NUMBER))
    owner = json.dumps(OWNER).encode()
    cases += [
        ("/owners", "raw surrogate bytes", owner.replace(b'"Ada Owner"', b'"\xed\xa0\x80"'),
         (422, INVALID, "name")),
        ("/owners", "raw NUL byte in a string", owner.replace(b"Ada", b"A\x00"),
         (400, MALFORMED, "body")),
        ("/owners", "raw FF byte", owner.replace(b"Ada", b"\xff"), (400, MALFORMED, "body")),
        ("/owners", "a key with NUL", b'{"a\\u0000": 1, ' + owner[1:],
         (422, INVALID, "a\\x00")),
        ("/owners", "a key with a surrogate", b'{"\\ud800": 1, ' + owner[1:],
         (422, INVALID, "\\ud800")),
        ("/owners", "the body NaN", b"NaN", NUMBER),
        ("/owners", "the body [1e999]", b"[1e999]", NUMBER),
        ("/owners", "the body a surrogate", b'"\\ud800"', (422, INVALID, "body")),
    ]  # fmt: skip
    return cases


@pytest.fixture
async def api(registry: Registry) -> AsyncIterator[OneConnection]:
    """One connection to the API, signed in as an owner with an account (so each route
    gets past the sign-in to its input checks)."""
    auth = tokens.bearer("Inputs Owner")
    app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
    async with served(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=auth) as setup:
            assert (await setup.post("/owners", json=OWNER)).status_code == 201
        async with OneConnection(url, headers=auth) as client:
            yield client


async def _answered(
    client: OneConnection, method: str, path: str, body: bytes | None
) -> tuple[int, str, str | None]:
    headers = {"content-type": "application/json"}
    answer = await client.request(method, path, content=body, headers=headers)
    problem = RegistryProblem.model_validate(answer.json())
    assert "\x00" not in answer.text and "\n" not in problem.detail  # never echoed raw
    # The same connection serves the next request.
    assert (await client.request("GET", "/metrics")).status_code == 200
    assert client.connects == 1
    return answer.status_code, problem.reason, problem.field


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [pytest.param(path, body, expected, id=f"{path} {label}")
     for path, label, body, expected in _body_cases()],
)  # fmt: skip
async def test_a_body_json_cannot_carry(
    api: OneConnection, path: str, body: bytes, expected: tuple[int, str, str]
) -> None:
    assert await _answered(api, "POST", path, body) == expected


DEVICE_ROUTES: dict[str, dict[str, str] | None] = {
    "release": None,
    "transfer": {"to_owner_id": OWNER_ID},
    "credentials": None,
    "credentials/revoke": None,
}
OWNER_ROUTES = {
    ("GET", ""): None,
    ("PUT", "/consents"): {"analytics": True},
    ("POST", "/reactivation"): {"analytics_consent": True, "marketing_consent": True},
    ("POST", "/erasure"): None,
    ("GET", "/export"): None,
}
SEGMENTS = ["%00", "a%00b", "%ED%A0%80", "a%ED%A0%80b", "%FF", "%ED%A0%80%00"]


@pytest.mark.parametrize("segment", SEGMENTS)
async def test_a_path_parameter_utf8_cannot_carry(api: OneConnection, segment: str) -> None:
    for route, fields in DEVICE_ROUTES.items():
        path = f"/devices/{segment}/{route}"
        body = None if fields is None else json.dumps(fields).encode()
        answer = await _answered(api, "POST", path, body)
        assert answer == (422, INVALID, "device_id"), path
    for (method, route), doc in OWNER_ROUTES.items():
        path = f"/owners/{segment}{route}"
        content = None if doc is None else json.dumps(doc).encode()
        assert await _answered(api, method, path, content) == (422, INVALID, "owner_id"), path
    answer = await _answered(api, "GET", f"/nowhere/{segment}", None)
    assert answer == (404, "not_found", None)
