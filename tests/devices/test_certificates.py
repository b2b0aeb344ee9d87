"""Device certificates from CSRs: the checks, signing, recording, renewal, the API.

A real registry on PostgreSQL with the in-memory broker (`RecordingBroker`) and a CA
generated into the test's tmp dir; `test_tls.py` takes the certificates to a real
Mosquitto. WM-100 (the washer) logs in with certificates only; DR-200 may use a password.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devices.api import create_app
from devices.certificates import (
    CaUnavailable,
    DeviceCA,
    check_csr,
    ensure_crl,
    ensure_local_ca,
    issued_certificates,
)
from devices.errors import Rejected, RejectReason
from devices.records import Purchase, PurchaseChannel
from devices.registry import Registry
from ingest.settings import RegistrySettings
from tests import tokens
from tests.devices.catalog import T0, new_owner
from tests.devices.device_keys import csr_for
from tests.devices.fakes import RecordingBroker

SHOP = Purchase(PurchaseChannel.OWN_STORE)


@pytest.fixture
def ca_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key"
    assert ensure_local_ca(cert, key) is True
    return cert, key


@pytest.fixture
def reg_settings(reg_schema: str, ca_files: tuple[Path, Path], tmp_path: Path) -> RegistrySettings:
    """No broker to signal: the revocation list is a file the tests read."""
    return RegistrySettings(
        db_schema=reg_schema,
        secret_hash_log2_n=10,
        ca_cert_file=ca_files[0],
        ca_key_file=ca_files[1],
        crl_file=tmp_path / "crl.pem",
        certificate_days=30,
        password_models=["DR-200"],
    )


def tampered(pem: str) -> str:
    """The CSR with the last byte of its signature changed: parses, does not verify."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: "hello", "csr is not a PEM certificate request"),
        (
            lambda: (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "csr cannot be parsed as a PKCS#10 request",
        ),
        (lambda: tampered(csr_for()[1]), "csr signature does not verify"),
        (
            lambda: csr_for(rsa.generate_private_key(65537, 1024))[1],
            "csr key is RSA-1024; at least RSA-2048 is required",
        ),
        (
            lambda: csr_for(ec.generate_private_key(ec.SECP256K1()))[1],
            "csr key is on curve secp256k1; use P-256 or P-384",
        ),
        (lambda: "x" * 20_000, "csr is 20000 characters; a CSR is under 16384"),
    ],
    ids=["not-pem", "not-pkcs10", "bad-signature", "rsa-1024", "secp256k1", "huge"],
)
def test_check_csr_names_the_fault(make: object, message: str) -> None:
    with pytest.raises(Rejected) as refused:
        check_csr(make())  # type: ignore[operator]
    assert refused.value.reason is RejectReason.BAD_CSR
    assert refused.value.message.startswith(message)


def test_check_csr_accepts_the_usual_keys() -> None:
    for key in (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
    ):
        assert check_csr(csr_for(key)[1]).is_signature_valid


async def test_registration_with_a_csr_signs_and_records_a_certificate(
    registry: Registry, broker: RecordingBroker, pg: asyncpg.Connection, ca_files: tuple[Path, Path]
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    key, csr = csr_for(subject="CN the device asked for, ignored")
    done = await registry.register(
        owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, csr=csr, at=T0
    )
    assert done.certificate is not None and done.password_login is False
    cert = x509.load_pem_x509_certificate(done.certificate.encode())
    assert cert.subject.rfc4514_string() == f"CN={done.device_id}"
    assert cert.public_key() == key.public_key()
    ca = DeviceCA.load(*ca_files)
    cert.verify_directly_issued_by(ca.cert)
    assert (cert.not_valid_after_utc - T0).days == 30
    # The broker account has no password: the device logs in with its certificate.
    assert broker.accounts == {done.device_id: None}
    await pg.execute(f"SET search_path TO {registry.settings.db_schema}")
    assert await issued_certificates(pg, done.device_id) == [
        (cert.serial_number, cert.fingerprint(hashes.SHA256()).hex())
    ]


async def test_a_certificate_only_model_without_a_csr_is_refused(
    registry: Registry, broker: RecordingBroker, pg: asyncpg.Connection
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    with pytest.raises(Rejected) as refused:
        await registry.register(owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, at=T0)
    assert refused.value.reason is RejectReason.CERTIFICATE_REQUIRED
    assert refused.value.message == (
        "model WM-100 logs in with a TLS client certificate only: send a csr"
    )
    schema = registry.settings.db_schema
    assert await pg.fetchval(f"SELECT count(*) FROM {schema}.devices") == 0
    assert broker.accounts == {}
    # A password model may still register without one, and may send one too.
    dryer = await registry.register(owner, "DR-200", "SN0003", "CODE-0003-7KQ2-M9DX", SHOP, at=T0)
    assert (dryer.password_login, dryer.certificate) == (True, None)
    assert broker.accounts == {dryer.device_id: dryer.mqtt_secret}


async def test_renewal_signs_a_new_certificate_for_the_current_owner_only(
    registry: Registry, pg: asyncpg.Connection
) -> None:
    owner = await registry.create_owner(new_owner(), source="test")
    other = await registry.create_owner(new_owner("Bob Other"), source="test")
    done = await registry.register(
        owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, csr=csr_for()[1], at=T0
    )
    new_key, new_csr = csr_for()
    renewed = await registry.renew_certificate(done.device_id, owner, new_csr)
    cert = x509.load_pem_x509_certificate(renewed.pem.encode())
    assert cert.public_key() == new_key.public_key()
    assert cert.subject.rfc4514_string() == f"CN={done.device_id}"
    await pg.execute(f"SET search_path TO {registry.settings.db_schema}")
    serials = [serial for serial, _ in await issued_certificates(pg, done.device_id)]
    assert len(serials) == 2 and serials[1] == renewed.serial
    with pytest.raises(Rejected) as refused:
        await registry.renew_certificate(done.device_id, other, new_csr)
    assert refused.value.reason is RejectReason.NOT_CURRENT_OWNER
    assert await registry.revoke_credentials(done.device_id, owner) is True
    with pytest.raises(Rejected) as revoked:
        await registry.renew_certificate(done.device_id, owner, new_csr)
    assert revoked.value.reason is RejectReason.NO_LIVE_CREDENTIALS


@asynccontextmanager
async def _borrowed(registry: Registry) -> AsyncIterator[Registry]:
    yield registry


async def test_the_api_answers_certificates_and_clear_422s(registry: Registry) -> None:
    app = create_app(lambda: _borrowed(registry), verifier=tokens.verifier())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client,
    ):
        await registry.create_owner(new_owner(), source="test", subject="ada")
        client.headers.update(tokens.bearer("ada"))
        body = {
            "model_number": "WM-100",
            "serial_number": "SN0001",
            "registration_code": "CODE-0001-7KQ2-M9DX",
            "purchase": {"channel": "own_store"},
        }
        missing = await client.post("/registrations", json=body)
        assert (missing.status_code, missing.json()["reason"]) == (422, "certificate_required")
        bad = await client.post("/registrations", json={**body, "csr": tampered(csr_for()[1])})
        assert (bad.status_code, bad.json()["reason"]) == (422, "bad_csr")
        assert bad.json()["detail"].startswith("csr signature does not verify")
        done = await client.post("/registrations", json={**body, "csr": csr_for()[1]})
        assert done.status_code == 201, done.text
        out = done.json()
        assert out["mqtt_password"] is None
        assert out["certificate"].startswith("-----BEGIN CERTIFICATE-----")

        device = out["device_id"]
        renewed = await client.post(f"/devices/{device}/certificate", json={"csr": csr_for()[1]})
        assert renewed.status_code == 200, renewed.text
        cert = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
        assert renewed.json()["serial"] == f"{cert.serial_number:x}"
        assert renewed.json()["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
        junk = await client.post(f"/devices/{device}/certificate", json={"csr": "hello"})
        assert (junk.status_code, junk.json()["reason"]) == (422, "bad_csr")

        # The largest CSR the schema takes, framed as PEM or not, and one over it.
        framed = (
            "-----BEGIN CERTIFICATE REQUEST-----\n"
            + "A" * (16384 - 70)
            + "\n-----END CERTIFICATE REQUEST-----\n"
        )
        for csr, reason, field in (
            ("0" * 16384, "bad_csr", None),
            (framed[:16384], "bad_csr", None),
            ("0" * 16385, "invalid_request", "csr"),
            ("-----BEGIN CERTIFICATE REQUEST-----\x00", "invalid_request", "csr"),
        ):
            answer = await client.post(f"/devices/{device}/certificate", json={"csr": csr})
            assert (answer.status_code, answer.json()["reason"]) == (422, reason), answer.text
            assert answer.json()["field"] == field


async def test_revocation_lists_every_certificate_of_the_device(
    registry: Registry, ca_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Renewal revokes nothing; revoking the credentials lists both certificates in the
    revocation list the broker reads, signed by the CA; `ensure_crl` keeps that list."""
    owner = await registry.create_owner(new_owner(), source="test")
    done = await registry.register(
        owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, csr=csr_for()[1]
    )
    assert done.certificate is not None
    first = x509.load_pem_x509_certificate(done.certificate.encode()).serial_number
    second = (await registry.renew_certificate(done.device_id, owner, csr_for()[1])).serial
    crl_file = tmp_path / "crl.pem"
    assert not crl_file.exists()  # nothing revoked yet: no list written

    assert await registry.revoke_credentials(done.device_id, owner) is True
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    ca = DeviceCA.load(*ca_files)
    assert crl.is_signature_valid(ca.public_key)
    assert sorted(r.serial_number for r in crl) == sorted([first, second])
    assert crl.next_update_utc == ca.cert.not_valid_after_utc
    before = crl_file.read_bytes()
    assert ensure_crl(ca, crl_file) is False
    assert crl_file.read_bytes() == before


async def test_revoking_certificates_without_a_revocation_list_is_refused(
    registry: Registry, reg_settings: RegistrySettings, broker: RecordingBroker
) -> None:
    """Without `registry.crl_file` a transfer would leave the seller's certificate
    working (the broker's account keeps the device id): the registry refuses instead."""
    owner = await registry.create_owner(new_owner(), source="test")
    buyer = await registry.create_owner(new_owner("Bob Buyer"), source="test")
    done = await registry.register(
        owner, "WM-100", "SN0001", "CODE-0001-7KQ2-M9DX", SHOP, csr=csr_for()[1]
    )
    registry.settings = reg_settings.model_copy(update={"crl_file": None})
    with pytest.raises(CaUnavailable) as refused:
        await registry.transfer(done.device_id, owner, buyer, SHOP)
    assert str(refused.value) == (
        f"device {done.device_id} has revoked certificates but no revocation list is"
        " configured: set USAGEPIPE_REGISTRY__CRL_FILE to the file the broker's TLS"
        " listener reads (crlfile)"
    )
    assert (await registry.current_owners([done.device_id])) == {done.device_id: owner}
    assert broker.accounts == {done.device_id: None}
