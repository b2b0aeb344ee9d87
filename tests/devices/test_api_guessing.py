"""Guessing and jamming registration codes through the registry API served by uvicorn:
the one answer to every failed proof, the limits per subject and per address (an IPv6
caller by its /56), the real owner never locked out, no secret hashed for a failure.

Callers' addresses reach the app as a site's proxy passes them on, in
`X-Forwarded-For`: uvicorn trusts that header from loopback by default
(`forwarded_allow_ips`), and the test client is on loopback. The test settings allow
a subject 3 failures an hour and an address 5 (`tests.devices.conftest`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest

from devices.api import create_app
from devices.registry import Registry
from tests import tokens
from tests.devices.fakes import RecordingBroker
from tests.devices.test_api import SignedIn
from tests.http_contract import served

C2 = "CODE-0002-7KQ2-M9DX"
"""The code printed inside SN0002 (a WM-100)."""

HOME, JAMMER = "198.51.100.7", "203.0.113.66"

REFUSED = {"reason": "registration_refused", "detail": "model, serial or code do not match"}


@asynccontextmanager
async def _borrowed(registry: Registry) -> AsyncIterator[Registry]:
    yield registry


@pytest.fixture
async def api(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the registry API on a real uvicorn server on a loopback port."""
    app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
    async with (
        app.router.lifespan_context(app),
        served(app) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        yield client


async def owner(api: httpx.AsyncClient, name: str) -> SignedIn:
    """An owner account made by its own sign-in (subject: `name`): anyone can make one."""
    auth = tokens.bearer(name)
    body = {
        "name": name,
        "email": f"{name.split(maxsplit=1)[0].lower()}@example.com",
        "phone": None,
        "region": "JP-13",
        "membership_tier": "silver",
        "analytics_consent": True,
        "marketing_consent": False,
    }
    response = await api.post("/owners", json=body, headers=auth)
    assert response.status_code == 201, response.text
    return SignedIn(response.json()["owner_id"], auth)


async def register(
    api: httpx.AsyncClient,
    who: SignedIn,
    address: str,
    *,
    model: str = "WM-100",
    serial: str = "SN0002",
    code: str = C2,
) -> httpx.Response:
    body = {
        "model_number": model,
        "serial_number": serial,
        "registration_code": code,
        "purchase": {"channel": "own_online_shop", "purchased_on": "2025-12-24"},
    }
    headers = {**who.auth, "X-Forwarded-For": address}
    return await api.post("/registrations", json=body, headers=headers)


def answer(response: httpx.Response) -> tuple[int, dict[str, object]]:
    body = response.json()
    return response.status_code, {k: body[k] for k in ("reason", "detail")}


async def credentials(pg: asyncpg.Connection, registry: Registry) -> int:
    count: int = await pg.fetchval(
        f"SELECT count(*) FROM {registry.settings.db_schema}.device_credentials"
    )
    return count


async def test_every_failed_proof_is_one_answer(
    api: httpx.AsyncClient, registry: Registry, broker: RecordingBroker, pg: asyncpg.Connection
) -> None:
    """Unknown serial, a real serial with another model, a wrong code: the same status,
    headers and bytes, so nothing tells a guesser which serials exist; and no new
    secret was made or hashed for any of them."""
    subjects = [await owner(api, f"Try{i} Owner") for i in range(3)]
    tries = [
        {"serial": "SN9999"},  # no unit has it
        {"model": "DR-200"},  # SN0002 is a WM-100; the code is right
        {"code": "CODE-0002-7KQ2-M9DY"},  # one character off
    ]
    responses = [
        await register(api, subject, f"192.0.2.{i}", **kwargs)
        for i, (subject, kwargs) in enumerate(zip(subjects, tries, strict=True))
    ]
    assert {r.status_code for r in responses} == {403}
    assert {r.content for r in responses} == {
        b'{"reason":"registration_refused","detail":"model, serial or code do not match",'
        b'"field":null}'
    }
    # Every header alike too, but the clock's.
    headers = {tuple((k, v) for k, v in r.headers.items() if k != "date") for r in responses}
    assert headers == {
        (("server", "uvicorn"), ("content-length", "92"), ("content-type", "application/json"))
    }
    # Each proof was checked (one scrypt verification, the unknown serial's against a
    # dummy hash); no secret was hashed, no credential row written, no broker account.
    assert (registry.counts.proofs, registry.counts.secrets_hashed) == (3, 0)
    assert await credentials(pg, registry) == 0
    assert broker.calls == []


async def test_a_guesser_is_slowed_and_the_owner_registers_at_once(
    api: httpx.AsyncClient, registry: Registry, broker: RecordingBroker, pg: asyncpg.Connection
) -> None:
    """Eve fails three times (her subject's allowance) at SN0002 and is then refused
    429 with Retry-After, even with the right code and from another address, without
    the proof being checked; Ada, the buyer, registers SN0002 from home at once."""
    eve = await owner(api, "Eve Guesser")
    for guess in ("AAAA-AAAA-AAAA-AAAA", "BBBB-BBBB-BBBB-BBBB", "CCCC-CCCC-CCCC-CCCC"):
        assert answer(await register(api, eve, JAMMER, code=guess)) == (403, REFUSED)
    for address in (JAMMER, "192.0.2.200"):
        limited = await register(api, eve, address)
        assert (limited.status_code, limited.json()["reason"]) == (429, "too_many_attempts")
        # One token per 3600 s / 3, less the second or so the test took.
        assert 1190 <= int(limited.headers["Retry-After"]) <= 1200
        assert limited.json()["detail"] == (
            f"too many failed registrations; try again in {limited.headers['Retry-After']} s"
        )
    assert (registry.counts.proofs, registry.counts.limited) == (3, 2)

    ada = await owner(api, "Ada Owner")
    done = await register(api, ada, HOME)
    assert done.status_code == 201, done.text
    assert done.json()["owner_id"] == ada.owner_id
    assert registry.counts.secrets_hashed == 1
    assert await credentials(pg, registry) == 1
    assert broker.calls == [("add", done.json()["device_id"])]


async def test_jammers_on_one_address_cannot_lock_the_owner_out(
    api: httpx.AsyncClient, pg: asyncpg.Connection, registry: Registry
) -> None:
    """Throwaway owners, made for nothing on the same API, fail at SN0002 from one
    address until the address's allowance (5) is spent; the next subject from there is
    refused 429 before its proof; Ada, on her own address, registers at once."""
    jammers = [await owner(api, f"Jam{i} Owner") for i in range(6)]
    outcomes = [
        (await register(api, jammer, JAMMER, code=f"JAM{i}-0000-0000-0000")).status_code
        for i, jammer in enumerate(jammers)
    ]
    assert outcomes == [403] * 5 + [429]
    ada = await owner(api, "Ada Owner")
    done = await register(api, ada, HOME)
    assert (done.status_code, done.json()["serial_number"]) == (201, "SN0002")
    outcomes_recorded = await pg.fetch(
        "SELECT outcome, count(*) AS n FROM"
        f" {registry.settings.db_schema}.registration_attempts GROUP BY outcome ORDER BY outcome"
    )
    assert [(r["outcome"], r["n"]) for r in outcomes_recorded] == [
        ("registered", 1),
        ("wrong_code", 5),
    ]


async def test_an_ipv6_caller_is_limited_by_its_56(api: httpx.AsyncClient) -> None:
    """Five failures from addresses all in 2001:db8:1:200::/56, each by its own subject,
    spend that prefix's allowance: a sixth subject from another address of that /56 is
    refused (one token per 3600 s / 5), one from the next /56 registers at once."""
    subjects = [await owner(api, f"Net{i} Owner") for i in range(7)]
    inside = ["2001:db8:1:200::1", "2001:db8:1:2ff::9", "2001:db8:1:201:abcd::5"]
    for i, subject in enumerate(subjects[:5]):
        failed = await register(api, subject, inside[i % 3], code=f"NET{i}-0000-0000-0000")
        assert answer(failed) == (403, REFUSED)
    limited = await register(api, subjects[5], "2001:db8:1:2aa::1")
    assert (limited.status_code, limited.json()["reason"]) == (429, "too_many_attempts")
    assert 710 <= int(limited.headers["Retry-After"]) <= 720
    done = await register(api, subjects[6], "2001:db8:1:300::1")
    assert (done.status_code, done.json()["owner_id"]) == (201, subjects[6].owner_id)
