"""The project's certificate authority: device certificates from CSRs, the broker's own.

Devices that log in over TLS hold a private key that never leaves them: at
registration (or renewal) they send a PKCS#10 certificate signing request, and
`DeviceCA.sign_device` returns a client certificate whose subject is `CN=<device id>`
(whatever subject the CSR asked for), valid for a bounded time. Mosquitto's TLS
listener takes that CN as the username (`use_identity_as_username`) and as the
client id (`use_username_as_clientid`), so the dynamic-security role of that name
(`devices.mosquitto`) decides what the device may do.

`check_csr` refuses, with a message naming the fault: text that is not one PEM
CSR, a signature that does not verify (the sender does not hold the key), and keys
outside the accepted set (RSA of at least 2048 bits, EC on P-256 or P-384, Ed25519).

The CA's key is a file outside the repository (`registry.ca_key_file`); for local
runs `ensure_local_ca` generates it into the state directory, mode 0600, beside its
certificate, and `ensure_server_certificate` issues the broker's. The CA key is an
ECDSA P-256 key: signing is a fraction of a millisecond, so the registry signs in
its request path.

Revocation. The broker knows a certificate client only by its CN, the device id, so
its dynamic-security account cannot tell a device's old certificate from its new one:
deleting the account (revocation) leaves a certificate with no rights only until the
account is made again (a reissue), and a transfer keeps the account. So every revoked
certificate that has not expired goes into a revocation list (`DeviceCA.sign_crl`) that
the TLS listener reads (`crlfile`); `CrlFile.publish` writes it and sends the broker
SIGHUP, on which Mosquitto 2.0 reloads it without dropping a connection. A device
presenting a listed certificate is refused at the TLS handshake ("certificate
revoked"). The list is checked at the handshake only, so the registry publishes it
before it has the broker drop the device's connections (`devices.registry`): the
device's reconnection meets the new list. SIGHUP only sets a flag that Mosquitto acts
on at the end of its current loop iteration, but the signal is sent before the
registry's drop command, and a reconnection takes a later iteration than the drop, so
it cannot reach the handshake before the reload. Certificates are revoked with the device's
credentials (`devices.ownership`: revocation, release, erasure, reissue, transfer, a
new owner's registration); a renewal leaves the previous certificate valid until its
own expiry, so a device that has not yet stored its new one stays connected.

Errors: `BadCsr` (the caller's input: 422 `bad_csr`) and `CaUnavailable` (the CA's
files are not configured or not readable: a setup fault, 503).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices.errors import RegistryError, Rejected, RejectReason
from devices.mosquitto import write_private
from ingest.migrations import Connection

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MAX_CSR_BYTES = 16 * 1024
"""A CSR is under 2 KiB even for RSA-4096; anything far larger is not one."""
CA_NAME = "usagepipe device CA"
_BACKDATE = dt.timedelta(minutes=5)
"""Certificates start a little in the past, so a device whose clock runs behind
accepts its new certificate at once."""


class CaUnavailable(RegistryError):
    """The CA's key or certificate is not configured or cannot be read."""


class BadCsr(Rejected):
    """A certificate signing request the registry will not sign; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(RejectReason.BAD_CSR, message)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A signed device certificate and what the registry keeps of it."""

    pem: str
    serial: int
    fingerprint: str
    """SHA-256 over the DER certificate, lower-case hex."""
    not_before: dt.datetime
    not_after: dt.datetime


def check_csr(pem: str) -> x509.CertificateSigningRequest:
    """The CSR in `pem`, if it is one the registry signs; else `BadCsr` naming the fault."""
    if len(pem) > MAX_CSR_BYTES:
        raise BadCsr(f"csr is {len(pem)} characters; a CSR is under {MAX_CSR_BYTES}")
    if "-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise BadCsr("csr is not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii", "strict"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise BadCsr(f"csr cannot be parsed as a PKCS#10 request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm:
        valid = False
    if not valid:
        raise BadCsr("csr signature does not verify: it must be signed by its own key")
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadCsr(f"csr public key cannot be read: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadCsr(f"csr key is RSA-{key.key_size}; at least RSA-{MIN_RSA_BITS} is required")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ACCEPTED_CURVES):
            raise BadCsr(f"csr key is on curve {key.curve.name}; use P-256 or P-384")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise BadCsr(
            f"csr key type {type(key).__name__} is not accepted; use RSA (2048+), "
            "EC P-256/P-384 or Ed25519"
        )
    return csr


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex (what `openssl x509 -fingerprint
    -sha256` prints, without the colons)."""
    return cert.fingerprint(hashes.SHA256()).hex()


class DeviceCA:
    """The CA's certificate and key, loaded from their files."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key

    @classmethod
    def load(cls, cert_file: Path | None, key_file: Path | None) -> DeviceCA:
        """Read the CA from PEM files; `CaUnavailable` if unset or unreadable."""
        if cert_file is None or key_file is None:
            raise CaUnavailable(
                "the device CA is not configured: set USAGEPIPE_REGISTRY__CA_CERT_FILE and"
                " USAGEPIPE_REGISTRY__CA_KEY_FILE (`usagepipe services up` makes a local one)"
            )
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CaUnavailable(
                f"cannot load the device CA ({cert_file}, {key_file}): {exc}"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaUnavailable(f"{key_file} is not an EC private key")
        return cls(cert, key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign_device(
        self, csr: x509.CertificateSigningRequest, device_id: str, *, days: int,
        at: dt.datetime,
    ) -> IssuedCertificate:  # fmt: skip
        """A client certificate for `device_id` over the CSR's key (checked by `check_csr`)."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        builder = (
            self._builder(subject, csr.public_key(), at, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=cert.serial_number,
            fingerprint=fingerprint(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def sign_server(
        self, key: ec.EllipticCurvePrivateKey, hosts: Sequence[str], *, days: int
    ) -> x509.Certificate:
        """The broker's server certificate for `hosts` (DNS names or IP addresses)."""
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        builder = (
            self._builder(subject, key.public_key(), dt.datetime.now(dt.UTC), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def sign_crl(self, revoked: Sequence[tuple[int, dt.datetime]], now: dt.datetime) -> bytes:
        """A PEM revocation list of `revoked` (serial, when), issued at `now`.

        Its next update is the CA's own expiry: Mosquitto reads the list only at start
        and on SIGHUP, and OpenSSL refuses every client while the list it holds is past
        its next update, so a list that lapsed between two revocations would lock out
        the whole fleet. The registry re-signs it at every revocation instead.
        """
        entries = [
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            for serial, when in revoked
        ]
        # All entries at once: `add_revoked_certificate` copies the list each time
        # (100,000 entries: 17.7 s that way, 0.6 s this way; bench/certificates.py).
        builder = (
            x509.CertificateRevocationListBuilder(revoked_certificates=entries)
            .issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(max(self.cert.not_valid_after_utc, now + dt.timedelta(days=1)))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _builder(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        at: dt.datetime,
        days: int,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(at - _BACKDATE)
            .not_valid_after(at + dt.timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only: a device or server signs its TLS handshakes; the CA signs certificates."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ensure_local_ca(cert_file: Path, key_file: Path, *, days: int = 3650) -> bool:
    """Generate a CA into `cert_file`/`key_file` (key mode 0600) unless both exist.

    Returns whether it generated one. Never replaces an existing CA: every device
    certificate it signed would stop verifying.
    """
    if cert_file.exists() and key_file.exists():
        return False
    if cert_file.exists() or key_file.exists():
        raise CaUnavailable(
            f"only one of {cert_file} and {key_file} exists; restore the other or remove both"
        )
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_file, _pem_key(key))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def ensure_server_certificate(
    ca: DeviceCA, cert_file: Path, key_file: Path, hosts: Sequence[str], *, days: int = 825
) -> bool:
    """Issue the broker's certificate for `hosts` unless a valid one from `ca` exists.

    Returns whether it issued one. A certificate from another CA, for other hosts,
    or within 30 days of expiry is replaced.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        current = (
            key_file.exists()
            and cert.issuer == ca.cert.subject
            and cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=30)
            and _hosts_of(cert) == set(hosts)
        )
        if current:
            cert.verify_directly_issued_by(ca.cert)
            return False
    except (OSError, ValueError, TypeError, InvalidSignature):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_file, _pem_key(key))
    cert_file.write_bytes(
        ca.sign_server(key, hosts, days=days).public_bytes(serialization.Encoding.PEM)
    )
    return True


def _hosts_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress)}


async def record_issued(
    conn: Connection, device_id: str, issued: IssuedCertificate, at: dt.datetime
) -> None:
    """Note a signed certificate in the registry's `device_certificates` (in the caller's
    transaction, whose search_path is the registry schema)."""
    await conn.execute(
        "INSERT INTO device_certificates"
        " (device_key, serial, fingerprint, not_before, not_after, issued_at)"
        " SELECT device_key, $2, $3, $4, $5, $6 FROM devices WHERE device_id = $1",
        device_id,
        Decimal(issued.serial),
        issued.fingerprint,
        issued.not_before,
        issued.not_after,
        at,
    )


async def issued_certificates(conn: Connection, device_id: str) -> list[tuple[int, str]]:
    """(serial, fingerprint) of every certificate signed for the device, oldest first."""
    rows = await conn.fetch(
        "SELECT c.serial, c.fingerprint FROM device_certificates c"
        " JOIN devices d USING (device_key) WHERE d.device_id = $1 ORDER BY c.certificate_id",
        device_id,
    )
    return [(int(r["serial"]), r["fingerprint"]) for r in rows]


async def revoke_certificates(conn: Connection, device_key: int, at: dt.datetime) -> int:
    """Revoke every certificate of the device that is neither revoked nor expired at `at`
    (in the caller's transaction); how many were."""
    revoked = await conn.fetch(
        "UPDATE device_certificates SET revoked_at = greatest($2, issued_at)"
        " WHERE device_key = $1 AND revoked_at IS NULL AND not_after > $2"
        " RETURNING certificate_id",
        device_key,
        at,
    )
    return len(revoked)


async def any_revoked(conn: Connection, device_ids: Sequence[str], now: dt.datetime) -> bool:
    """Whether one of `device_ids` has a revoked certificate that has not expired by `now`."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM device_certificates c JOIN devices d USING (device_key)"
        " WHERE d.device_id = ANY($1) AND c.revoked_at IS NOT NULL AND c.not_after > $2)",
        list(device_ids),
        now,
    )
    return found


async def revoked_serials(conn: Connection, now: dt.datetime) -> list[tuple[int, dt.datetime]]:
    """(serial, revoked at) of every revoked certificate not expired by `now`, the
    revocation list's entries: an expired one is refused by its own dates."""
    rows = await conn.fetch(
        "SELECT serial, revoked_at FROM device_certificates"
        " WHERE revoked_at IS NOT NULL AND not_after > $1 ORDER BY serial",
        now,
    )
    return [(int(r["serial"]), r["revoked_at"]) for r in rows]


def ensure_crl(ca: DeviceCA, crl_file: Path) -> bool:
    """Write an empty revocation list from `ca` unless `crl_file` holds one it signed.

    Mosquitto will not start without the file its `crlfile` names, and a list from
    another CA (after the CA was replaced) would fail every handshake. Returns whether
    it wrote one; an existing list (with the registry's revocations) is kept.
    """
    try:
        crl = x509.load_pem_x509_crl(crl_file.read_bytes())
        if crl.issuer == ca.cert.subject and crl.is_signature_valid(ca.public_key):
            return False
    except (OSError, ValueError, TypeError):
        pass
    CrlFile(crl_file, None).publish(ca.sign_crl([], dt.datetime.now(dt.UTC)))
    return True


@dataclass(frozen=True, slots=True)
class CrlFile:
    """The revocation list the broker's TLS listener reads, and the broker to tell.

    `pid_file` is the broker's (`<run_dir>/mosquitto/mosquitto.pid` for a local one);
    None when the broker runs elsewhere and reloads the file itself.
    """

    path: Path
    pid_file: Path | None

    def publish(self, pem: bytes) -> int | None:
        """Replace the list atomically, then send the broker SIGHUP; its pid, or None
        when no broker was told (no pid file, or no such process: it reads the list
        when it starts). Raises `CaUnavailable` if the file cannot be written."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(pem)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise CaUnavailable(f"cannot write the revocation list {self.path}: {exc}") from exc
        if self.pid_file is None:
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            log.warning(
                "revocation list %s written; the broker (%s) was not told: %s",
                self.path, self.pid_file, exc,
            )  # fmt: skip
            return None
        return pid
