"""The registry's device accounts on Mosquitto, through its dynamic-security plugin.

Layout (the same on every broker usagepipe sets up; `initial_config` writes it and
`DynsecAccounts` keeps the per-device part of it current while the broker runs):

- default access: every ACL type is denied unless a role grants it, except
  `unsubscribe` (harmless). The plugin's own default lets any client receive what it
  may subscribe to; denying `publishClientReceive` too means a subscription is worth
  nothing without an explicit grant, so one wrong subscribe ACL cannot leak telemetry.
- role `admin` (client `usagepipe-admin`): publish to `$CONTROL/dynamic-security/v1`,
  subscribe to and receive its `/response` topic. Nothing else.
- role `bridge` (client `usagepipe-bridge`): subscribe to and receive
  `devices/+/telemetry`, the same under one level of topic prefix
  (`+/devices/+/telemetry`, used by test runs), and the `$share/<group>/` forms of
  both for shared subscriptions. It may publish nothing.
- role `prefixed-publisher`, held by the bridge client on the local development broker
  only (`services up`): publish to `+/devices/+/+`, i.e. only to four-level, prefixed
  topics that production never uses, so tests can inject malformed messages next to
  their own devices with the bridge's login. Production brokers leave it out.
- one role and one client per device: client `<device_id>` (username and client id
  both the device id, so a device can neither log in as another nor take over another
  device's session) holding role `device:<device_id>`, which may publish to its own
  telemetry topic only, `{topic_prefix}devices/<device_id>/telemetry`, and nothing
  else: no subscriptions at all.

Why a role per device: Mosquitto 2.0.11's dynamic-security ACLs do not substitute
`%u`/`%c` (checked on the running broker: a role granting `devices/%u/telemetry`
refuses `devices/dev1/telemetry` to user dev1), and the plugin attaches ACLs to roles
only.

What the broker does with each command (also checked live on 2.0.11): `setClientPassword`
and `deleteClient` disconnect every connection logged in with that username
("Administrative action"), so a reissued or revoked secret stops working at once, not
at the device's next reconnect.

Devices on the TLS listener (deploy/mosquitto, `use_identity_as_username`) log in
with a certificate: Mosquitto 2.0.11 then takes the username from its CN and skips
the plugin's password check altogether, so such a client needs no password (a
certificate-only device's client has none, and cannot log in on the plain listener)
and even a username the plugin does not know gets CONNACK success. What stops it is
the ACL check: the plugin defers for a username it does not know, and the broker
denies what every plugin deferred, so a revoked (deleted) certificate client may
publish and subscribe to nothing (v5 PUBACK "Not authorized"). `deleteClient` also
disconnects its TLS connections. `disableClient` is no revocation for them: it
disconnects, but the plugin's ACL check ignores the disabled flag, so the device
reconnects and publishes again (checked live); revocation deletes the client. An
account names a device, not a certificate, so it cannot retire one certificate and
keep another (transfer, reissue): the CA's revocation list does that at the TLS
handshake (`devices.certificates`).

Responses are published to one topic every admin connection receives, so each
command carries a `correlationData` the plugin echoes.

Errors: a broker that cannot be reached or does not answer in time raises
`RegistryUnavailable` (retriable); a broker that refuses the admin login or a command
raises `BrokerAccountError` (not retriable: configuration or a bug).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho

from devices.errors import BrokerAccountError, RegistryUnavailable
from ingest.errors import BrokerUnavailable
from ingest.mqtt import MqttClient, PublishRefused
from ingest.settings import MqttSettings
from schemas.envelope import DEVICE_ID_PATTERN, telemetry_topic

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
ADMIN_USERNAME = "usagepipe-admin"
BRIDGE_USERNAME = "usagepipe-bridge"
SERVICE_ACCOUNTS = frozenset({ADMIN_USERNAME, BRIDGE_USERNAME})
DEVICE_ROLE_PREFIX = "device:"
CREDENTIALS_FILE = "credentials.json"
DYNSEC_FILE = "dynamic-security.json"

# PBKDF2-SHA512 with 101 iterations and a 12-byte salt is what the plugin itself
# uses for clients created over its API in 2.0.x; the passwords hashed here are
# 256-bit random tokens, so the iteration count is not what protects them.
_PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}
"""Deny unless granted (see the module docstring for `publishClientReceive`)."""

_TELEMETRY = ("devices/+/telemetry", "+/devices/+/telemetry")
BASE_ROLES: dict[str, list[dict[str, Any]]] = {
    "admin": [
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("subscribeLiteral", RESPONSE_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
    ],
    "bridge": [
        *(_acl("subscribePattern", topic) for topic in _TELEMETRY),
        *(_acl("subscribePattern", f"$share/+/{topic}") for topic in _TELEMETRY),
        *(_acl("publishClientReceive", topic) for topic in _TELEMETRY),
    ],
    "prefixed-publisher": [_acl("publishClientSend", "+/devices/+/+")],
}
"""The roles `services up` writes; device roles are added at registration."""


@dataclass(frozen=True, slots=True)
class BrokerLogins:
    """The service accounts' logins on the local broker (`<run_dir>/mosquitto/credentials.json`)."""

    admin_username: str
    admin_password: str
    bridge_username: str
    bridge_password: str

    @classmethod
    def generate(cls) -> BrokerLogins:
        return cls(
            ADMIN_USERNAME, secrets.token_urlsafe(32), BRIDGE_USERNAME, secrets.token_urlsafe(32)
        )

    def __repr__(self) -> str:  # the dataclass default would print the passwords
        return f"BrokerLogins(admin={self.admin_username!r}, bridge={self.bridge_username!r})"


def read_logins(directory: Path) -> BrokerLogins | None:
    """The logins kept in `directory/credentials.json`, or None if there is no such file."""
    path = directory / CREDENTIALS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BrokerAccountError(f"cannot read broker logins from {path}: {exc}") from exc
    try:
        return BrokerLogins(
            doc["admin"]["username"],
            doc["admin"]["password"],
            doc["bridge"]["username"],
            doc["bridge"]["password"],
        )
    except (KeyError, TypeError) as exc:
        raise BrokerAccountError(f"{path} lacks {exc}; delete it and the dynsec file") from exc


def write_private(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` readable by its owner only, replacing it atomically (the
    broker's logins and accounts here, the CA's and the broker's keys in
    `devices.certificates`)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def hash_password(password: str) -> dict[str, Any]:
    """The plugin's stored form of a password: PBKDF2-SHA512 over a random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _PBKDF2_ITERATIONS,
    }


def prepare_broker_dir(directory: Path, *, local_test_roles: bool = True) -> BrokerLogins:
    """Create or update the plugin's config file before Mosquitto starts; return the logins.

    The first call generates the admin and bridge passwords and keeps them in
    `credentials.json` (mode 0600); later calls reuse them. Every call rewrites the
    service roles, the service clients and the default access from this module, so a
    changed layout takes effect at the next start, and keeps every device client and
    role the broker saved (registrations survive restarts). Never logs a password.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # the plugin writes its file with the broker's umask (0644)
    logins = read_logins(directory)
    if logins is None:
        logins = BrokerLogins.generate()
        doc = {
            "admin": {"username": logins.admin_username, "password": logins.admin_password},
            "bridge": {"username": logins.bridge_username, "password": logins.bridge_password},
        }
        write_private(directory / CREDENTIALS_FILE, json.dumps(doc, indent=2) + "\n")
        log.info("generated broker logins in %s", directory / CREDENTIALS_FILE)
    path = directory / DYNSEC_FILE
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError) as exc:
        raise BrokerAccountError(f"cannot read {path}: {exc}") from exc
    write_private(path, json.dumps(_with_layout(config, logins, local_test_roles), indent=1))
    return logins


def _with_layout(
    config: dict[str, Any], logins: BrokerLogins, local_test_roles: bool
) -> dict[str, Any]:
    roles = dict(BASE_ROLES)
    bridge_roles = ["bridge"]
    if local_test_roles:
        bridge_roles.append("prefixed-publisher")
    else:
        roles.pop("prefixed-publisher")
    service = {
        logins.admin_username: ["admin"],
        logins.bridge_username: bridge_roles,
    }
    passwords = {
        logins.admin_username: logins.admin_password,
        logins.bridge_username: logins.bridge_password,
    }
    kept_roles = [r for r in config.get("roles", []) if r.get("rolename") not in BASE_ROLES]
    kept_clients = [c for c in config.get("clients", []) if c.get("username") not in service]
    return {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "clients": [
            {
                "username": username,
                "textname": "usagepipe service account",
                **hash_password(passwords[username]),
                "roles": [{"rolename": name} for name in role_names],
            }
            for username, role_names in service.items()
        ]
        + kept_clients,
        "groups": config.get("groups", []),
        "roles": [{"rolename": name, "acls": acls} for name, acls in roles.items()] + kept_roles,
    }


def device_role(device_id: str) -> str:
    """The role that lets one device publish its telemetry."""
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def _check_device_id(device_id: str) -> None:
    if not _DEVICE_ID.match(device_id) or device_id in SERVICE_ACCOUNTS:
        raise ValueError(f"{device_id!r} is not a device id a broker account can be made for")


class DynsecAccounts:
    """`devices.broker.BrokerAccounts` over Mosquitto's `$CONTROL/dynamic-security/v1`.

    An async context manager holding one MQTT connection, logged in as the admin
    (`settings.admin_username` / `admin_password`). Device ACLs name the topic as
    `settings.topic_prefix` makes it, so a test's devices may publish only under the
    test's own prefix. Safe to share between concurrent tasks.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        timeout_s: float = 10.0,
        client_id: str | None = None,
    ) -> None:
        if settings.admin_username is None or settings.admin_password is None:
            raise BrokerAccountError(
                "the broker's admin login is not configured: set USAGEPIPE_MQTT__ADMIN_USERNAME"
                " and USAGEPIPE_MQTT__ADMIN_PASSWORD (a local broker's are in"
                " <run_dir>/mosquitto/credentials.json, written by `usagepipe services up`)"
            )
        self._settings = settings
        self._timeout_s = timeout_s
        self._mqtt = MqttClient(
            settings,
            client_id=client_id or f"usagepipe-accounts-{secrets.token_hex(4)}",
            username=settings.admin_username,
            password=settings.admin_password.get_secret_value(),
            subscriptions=[RESPONSE_TOPIC],
            on_message=self._on_response,
            connect_timeout_s=timeout_s,
        )
        self._waiting: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._open = False

    async def __aenter__(self) -> Self:
        where = f"{self._settings.host}:{self._settings.port}"
        try:
            await self._mqtt.connect()
            async with asyncio.timeout(self._timeout_s):
                await self._mqtt.subscribed.wait()
        except BrokerUnavailable as exc:
            await self._mqtt.close()
            if "Not authorized" in str(exc) or "Bad user name or password" in str(exc):
                raise BrokerAccountError(f"broker {where} refused the admin login") from exc
            raise RegistryUnavailable(f"cannot reach the MQTT broker {where}: {exc}") from exc
        except TimeoutError as exc:
            await self._mqtt.close()
            raise BrokerAccountError(
                f"broker {where} did not grant the admin {RESPONSE_TOPIC!r}; is the"
                " dynamic-security plugin loaded?"
            ) from exc
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect; harmless when already closed."""
        self._open = False
        await self._mqtt.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(RegistryUnavailable("broker account sync closed"))
        self._waiting.clear()

    # -- BrokerAccounts ----------------------------------------------------------------

    async def add_device(self, device_id: str, secret: str | None) -> None:
        """Create the device's client and role, or give the existing client `secret`.

        Replacing the secret disconnects whoever is logged in with the old one.
        `secret` None makes a client without a password: it logs in only over the
        TLS listener, with a certificate whose CN is the device id; an existing one
        is deleted and made again, which disconnects its connections too.
        """
        _check_device_id(device_id)
        role = device_role(device_id)
        acls = [_acl("publishClientSend", telemetry_topic(device_id, self._settings.topic_prefix))]
        client: dict[str, Any] = {
            "command": "createClient",
            "username": device_id,
            "clientid": device_id,
            "roles": [{"rolename": role}],
        }
        if secret is not None:
            client["password"] = secret
        created_role, created_client = await self._call(
            [{"command": "createRole", "rolename": role, "acls": acls}, client],
            tolerate={"Role already exists", "Client already exists"},
        )
        if "error" not in created_client:
            log.debug("broker account %s created", device_id)
            return
        fix: list[dict[str, Any]]
        if secret is None:
            fix = [{"command": "deleteClient", "username": device_id}, client]
        else:
            fix = [
                {"command": "modifyClient", "username": device_id, "clientid": device_id,
                 "roles": [{"rolename": role}]},
                {"command": "enableClient", "username": device_id},
                # Last: it disconnects connections made with the previous secret.
                {"command": "setClientPassword", "username": device_id, "password": secret},
            ]  # fmt: skip
        if "error" in created_role:
            fix.insert(0, {"command": "modifyRole", "rolename": role, "acls": acls})
        await self._call(fix)
        log.debug("broker account %s given a new secret", device_id)

    async def revoke_device(self, device_id: str) -> None:
        """Delete the device's client (disconnecting it) and its role; idempotent."""
        await self.revoke_devices([device_id])

    async def revoke_devices(self, device_ids: Iterable[str]) -> None:
        """`revoke_device` for many devices in one round trip."""
        commands: list[dict[str, Any]] = []
        for device_id in device_ids:
            _check_device_id(device_id)
            commands.append({"command": "deleteClient", "username": device_id})
            commands.append({"command": "deleteRole", "rolename": device_role(device_id)})
        if commands:
            await self._call(commands, tolerate={"Client not found", "Role not found"})

    # -- the control topic ---------------------------------------------------------------

    async def _call(
        self, commands: Sequence[dict[str, Any]], *, tolerate: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Send `commands` in one message and return their responses, in order.

        A response with an error not in `tolerate` raises `BrokerAccountError`.
        """
        if not self._open:
            raise RuntimeError("DynsecAccounts is not open (use `async with`)")
        request = secrets.token_hex(8)
        tagged = [{**cmd, "correlationData": f"{request}:{i}"} for i, cmd in enumerate(commands)]
        fut: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiting[request] = fut
        try:
            async with asyncio.timeout(self._timeout_s):
                acked = await self._mqtt.publish(
                    CONTROL_TOPIC, json.dumps({"commands": tagged}).encode()
                )
                await acked
                responses = await fut
        except PublishRefused as exc:
            raise BrokerAccountError(f"the broker refused the admin's command: {exc}") from exc
        except (TimeoutError, BrokerUnavailable) as exc:
            raise RegistryUnavailable(
                f"the MQTT broker did not answer {commands[0]['command']} in time: {exc!r}"
            ) from exc
        finally:
            self._waiting.pop(request, None)
        allowed = set(tolerate)
        for cmd, response in zip(commands, responses, strict=True):
            error = response.get("error")
            if error is not None and error not in allowed:
                target = cmd.get("username") or cmd.get("rolename") or ""
                raise BrokerAccountError(f"broker refused {cmd['command']} {target}: {error}")
        return responses

    def _on_response(self, msg: paho.MQTTMessage, generation: int) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError, IndexError):
            responses = json.loads(msg.payload)["responses"]
            request = responses[0]["correlationData"].split(":", 1)[0]
            fut = self._waiting.get(request)
            if fut is not None and not fut.done():
                ordered = sorted(responses, key=lambda r: int(r["correlationData"].split(":")[1]))
                fut.set_result(ordered)
