"""The `mosquitto-init` service of deploy/production/compose.yaml: what Mosquitto needs
before it starts, made from the Compose secrets, with the project's own code.

- `/mosquitto/data/dynamic-security.json`: the dynamic-security plugin's accounts (the
  registry's admin and the bridge, passwords from the secrets `mqtt_admin_password` and
  `mqtt_bridge_password`), laid out by `devices.mosquitto.prepare_broker_dir` without the
  local test role; device accounts the broker saved are kept.
- `/mosquitto/tls/`: the device CA's certificate, the broker's server certificate for
  `USAGEPIPE_MQTT__TLS_SERVER_NAMES` (issued by the device CA, renewed within 30 days of
  expiry) and an empty revocation list unless the registry has written one.

Run on every `up` while Mosquitto is stopped or running: it rewrites the service accounts
and keeps the rest. Needs root (it hands the files to Mosquitto's user, 1883, and the
revocation list to the registry's, 10001, which rewrites it on revocations).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from devices.certificates import DeviceCA, ensure_crl, ensure_server_certificate
from devices.mosquitto import ADMIN_USERNAME, BRIDGE_USERNAME, CREDENTIALS_FILE, prepare_broker_dir

SECRETS = Path("/run/secrets")
DATA = Path("/mosquitto/data")
TLS = Path("/mosquitto/tls")
MOSQUITTO_UID = 1883
REGISTRY_UID = 10001


def secret(name: str) -> str:
    return (SECRETS / name).read_text().strip()


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    logins = {
        "admin": {"username": ADMIN_USERNAME, "password": secret("mqtt_admin_password")},
        "bridge": {"username": BRIDGE_USERNAME, "password": secret("mqtt_bridge_password")},
    }
    (DATA / CREDENTIALS_FILE).write_text(json.dumps(logins, indent=2) + "\n")
    prepare_broker_dir(DATA, local_test_roles=False)
    (DATA / CREDENTIALS_FILE).unlink()  # the secrets are the record; no copy in the volume

    ca = DeviceCA.load(SECRETS / "device_ca_cert", SECRETS / "device_ca_key")
    TLS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SECRETS / "device_ca_cert", TLS / "ca.crt")
    names = json.loads(os.environ.get("USAGEPIPE_MQTT__TLS_SERVER_NAMES", '["mosquitto"]'))
    ensure_server_certificate(ca, TLS / "server.crt", TLS / "server.key", names)
    ensure_crl(ca, TLS / "crl.pem")

    for path in [DATA, *DATA.rglob("*"), TLS / "server.key"]:
        os.chown(path, MOSQUITTO_UID, MOSQUITTO_UID)
    os.chown(TLS, REGISTRY_UID, REGISTRY_UID)
    os.chown(TLS / "crl.pem", REGISTRY_UID, REGISTRY_UID)
    for public in ("ca.crt", "server.crt", "crl.pem"):
        (TLS / public).chmod(0o644)
    TLS.chmod(0o755)
    print(f"mosquitto-init: accounts in {DATA}, TLS files in {TLS} for {', '.join(names)}")


if __name__ == "__main__":
    main()
