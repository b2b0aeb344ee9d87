"""The device CA's costs: signing a device's CSR, signing the revocation list, and the
broker's reload of a list of N revoked certificates on SIGHUP.

    .venv/bin/python bench/certificates.py [--revoked 1000 10000 100000]

Signing is timed in this process (`check_csr` + `DeviceCA.sign_device` over a P-256
CSR; `DeviceCA.sign_crl`). The reload is timed on a private Mosquitto (free ports, a
temporary run dir, the project's config): the list with N entries plus one revoked
device certificate is written, the broker gets SIGHUP, and the clock runs until a TLS
handshake with that certificate is refused; the broker's pid is checked unchanged.
Prints the figures and the command to reproduce them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devices.certificates import DeviceCA, check_csr
from usagepipe.services import MosquittoBroker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def csr_for() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A device's P-256 key and its PEM CSR."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench washer")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def write_device_files(
    directory: Path, key: ec.EllipticCurvePrivateKey, cert_pem: str
) -> tuple[Path, Path]:
    key_path, cert_path = directory / "device.key", directory / "device.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_text(cert_pem)
    return key_path, cert_path


def handshake(broker: MosquittoBroker, cert: Path, key: Path) -> str:
    """ "completed", or the alert a TLS 1.2 handshake ended with."""
    assert broker.tls_port is not None
    context = ssl.create_default_context(cafile=str(broker.ca_cert_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                return "completed"
        except ssl.SSLError as exc:
            return str(exc.reason)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revoked", type=int, nargs="+", default=[1000, 10_000, 100_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="usagepipe-bench-ca-") as tmp:
        run_dir = Path(tmp)
        broker = MosquittoBroker(free_port(), run_dir, tls_port=free_port())
        broker.start()
        try:
            ca = DeviceCA.load(broker.ca_cert_file, broker.ca_key_file)
            now = dt.datetime.now(dt.UTC)
            csrs = [csr_for()[1] for _ in range(200)]
            start = time.perf_counter()
            for request in csrs:
                ca.sign_device(check_csr(request), "WM-100-bench", days=365, at=now)
            per_sign = (time.perf_counter() - start) / len(csrs)
            print(f"check_csr + sign_device (P-256 CSR): {per_sign * 1e3:.2f} ms each")

            key, csr = csr_for()
            victim = ca.sign_device(check_csr(csr), "WM-100-bench", days=365, at=now)
            key_file, cert_file = write_device_files(run_dir, key, victim.pem)
            assert handshake(broker, cert_file, key_file) == "completed"
            pid = broker.running_pid()
            for count in args.revoked:
                entries = [(x509.random_serial_number(), now) for _ in range(count)]
                start = time.perf_counter()
                crl = ca.sign_crl([*entries, (victim.serial, now)], now)
                signed = time.perf_counter() - start
                broker.crl_file.write_bytes(ca.sign_crl([], now))  # back to empty first
                assert pid is not None
                os.kill(pid, signal.SIGHUP)
                while handshake(broker, cert_file, key_file) != "completed":
                    time.sleep(0.01)
                broker.crl_file.write_bytes(crl)
                start = time.perf_counter()
                os.kill(pid, signal.SIGHUP)
                polls = 0
                while (alert := handshake(broker, cert_file, key_file)) == "completed":
                    polls += 1
                reload_s = time.perf_counter() - start
                assert alert == "SSLV3_ALERT_CERTIFICATE_REVOKED", alert
                print(
                    f"revoked {count + 1:>7}: list {len(crl) / 1e6:6.2f} MB, signed in"
                    f" {signed:6.3f} s, SIGHUP to refused handshake {reload_s:6.3f} s"
                    f" ({polls} handshakes still completed)"
                )
            assert broker.running_pid() == pid
            print(f"broker pid {pid} unchanged")
        finally:
            broker.stop()
    print("reproduce: .venv/bin/python bench/certificates.py --revoked", *args.revoked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
