"""Device-side keys and CSRs for the TLS tests, made as a device would make them."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


def csr_for(
    key: CertificateIssuerPrivateKeyTypes | None = None, subject: str = "my washer"
) -> tuple[CertificateIssuerPrivateKeyTypes, str]:
    """A private key (a new P-256 one unless given) and a PEM CSR signed with it."""
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def write_device_files(
    directory: Path, name: str, key: CertificateIssuerPrivateKeyTypes, cert_pem: str
) -> tuple[Path, Path]:
    """The device's key (mode 0600) and certificate as files, for mosquitto_pub."""
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_text(cert_pem)
    return key_path, cert_path
