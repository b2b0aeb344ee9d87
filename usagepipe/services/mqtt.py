"""usagepipe's own Mosquitto: the project's config, the dynamic-security plugin, logins."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import string
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from devices.errors import BrokerAccountError, RegistryError
from devices.mosquitto import BrokerLogins, prepare_broker_dir, read_logins
from ingest.settings import MqttSettings, Settings
from usagepipe.services.host import (
    PORT_TAKEN,
    RUNNING_NOT_OURS,
    RUNNING_OURS,
    STARTED,
    STOPPED,
    PortInUse,
    ServiceError,
    ServiceState,
    _alive,
    _apt_install,
    _cmdline,
    _holder_text,
    _log_tail,
    _read_pid,
    _require_loopback,
    _stop_pid,
    _wait_until,
    mqtt_answers,
    port_holder,
    port_open,
)

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


MOSQUITTO_TEMPLATE = (
    Path(__file__).resolve().parent.parent.parent / "deploy/mosquitto/mosquitto.conf"
)

# ----------------------------------------------------------------------- Mosquitto


def mosquitto_binary(install: bool = False) -> Path:
    """The mosquitto executable; with install=True, apt-get installs it if missing."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if found is None and install:
        _apt_install("mosquitto")
        return mosquitto_binary(install=False)
    if found is None:
        raise ServiceError("mosquitto is not installed; run: apt-get install -y mosquitto")
    return Path(found)


DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
"""Where distributions put Mosquitto's dynamic-security plugin (Debian multiarch first)."""


def dynsec_plugin_path() -> Path:
    """Mosquitto's dynamic-security plugin: a known path, else what `dpkg -L` lists."""
    for candidate in DYNSEC_PLUGIN_PATHS:
        if os.path.isfile(candidate):
            return Path(candidate)
    if shutil.which("dpkg") is not None:
        done = subprocess.run(
            ["dpkg", "-L", "mosquitto"], capture_output=True, text=True, check=False
        )
        for line in done.stdout.splitlines():
            if line.endswith("/mosquitto_dynamic_security.so") and os.path.isfile(line):
                return Path(line)
    raise ServiceError(
        "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so, shipped with "
        "mosquitto >= 2.0) was not found in " + ", ".join(DYNSEC_PLUGIN_PATHS) + " nor in "
        "`dpkg -L mosquitto`; install mosquitto 2.0 or later"
    )


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """The TLS listener's port and address, and the files it uses."""

    port: int
    host: str
    ca_cert_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    password_port: int | None = None
    """A second TLS listener (server certificate only, password logins), or None."""


def render_mosquitto_config(port: int, run_dir: Path, tls: BrokerTls) -> str:
    """The project's Mosquitto config for these ports and run dir (not yet written)."""
    try:
        template = string.Template(MOSQUITTO_TEMPLATE.read_text())
        return template.substitute(
            port=port,
            run_dir=str(run_dir.resolve()),
            user=pwd.getpwuid(os.geteuid()).pw_name,
            dynsec_plugin=str(dynsec_plugin_path()),
            tls_port=tls.port,
            tls_host=tls.host,
            cafile=str(tls.ca_cert_file.resolve()),
            certfile=str(tls.cert_file.resolve()),
            keyfile=str(tls.key_file.resolve()),
            crlfile=str(tls.crl_file.resolve()),
            password_listener=_password_listener(tls),
        )
    except OSError as exc:
        raise ServiceError(
            f"cannot read the Mosquitto config template {MOSQUITTO_TEMPLATE}: {exc}; "
            "`services up` runs from a source checkout"
        ) from exc
    except (KeyError, ValueError) as exc:
        raise ServiceError(f"bad placeholder in {MOSQUITTO_TEMPLATE}: {exc}") from exc


def _password_listener(tls: BrokerTls) -> str:
    """The password TLS listener's lines, or a comment saying it is off."""
    if tls.password_port is None:
        return "# (off: USAGEPIPE_MQTT__PASSWORD_TLS_PORT is unset)"
    return "\n".join(
        [
            f"listener {tls.password_port} {tls.host}",
            f"certfile {tls.cert_file.resolve()}",
            f"keyfile {tls.key_file.resolve()}",
            "tls_version tlsv1.2",
        ]
    )


def local_ca_files(run_dir: Path) -> tuple[Path, Path]:
    """Where `services up` keeps a local device CA: `<run_dir>/ca/ca.crt` and `ca.key`."""
    ca_dir = run_dir.resolve() / "ca"
    return ca_dir / "ca.crt", ca_dir / "ca.key"


class MosquittoBroker:
    """usagepipe's Mosquitto on 127.0.0.1:port, with its files under run_dir/mosquitto."""

    def __init__(
        self,
        port: int,
        run_dir: Path,
        host: str = "127.0.0.1",
        *,
        tls_port: int | None = None,
        tls_host: str = "127.0.0.1",
        tls_server_names: Sequence[str] = ("localhost", "127.0.0.1"),
        password_tls_port: int | None = None,
        ca_cert_file: Path | None = None,
        ca_key_file: Path | None = None,
    ) -> None:
        """`tls_port` None picks a free port at start (a test's private broker); the
        CA files default to `local_ca_files(run_dir)`, generated if missing."""
        self.host = host
        self.port = port
        self.dir = run_dir.resolve() / "mosquitto"
        self.config_path = self.dir / "mosquitto.conf"
        self.pid_path = self.dir / "mosquitto.pid"
        self.log_path = self.dir / "mosquitto.log"
        self.tls_port = tls_port
        self.tls_host = tls_host
        self.tls_server_names = list(tls_server_names)
        self.password_tls_port = password_tls_port
        local_cert, local_key = local_ca_files(run_dir)
        self.ca_cert_file = ca_cert_file or local_cert
        self.ca_key_file = ca_key_file or local_key
        self.server_cert_file = self.dir / "tls" / "server.crt"
        self.server_key_file = self.dir / "tls" / "server.key"
        self.crl_file = self.dir / "tls" / "crl.pem"
        """The device CA's revocation list; the registry rewrites it (`registry.crl_file`)."""

    @classmethod
    def of(cls, settings: Settings) -> MosquittoBroker:
        """The broker `settings` describe (`services up` and `status` use this)."""
        return cls(
            settings.mqtt.port,
            settings.services.run_dir,
            settings.mqtt.host,
            tls_port=settings.mqtt.tls_port,
            tls_host=settings.mqtt.tls_host,
            tls_server_names=settings.mqtt.tls_server_names,
            password_tls_port=settings.mqtt.password_tls_port,
            ca_cert_file=settings.registry.ca_cert_file,
            ca_key_file=settings.registry.ca_key_file,
        )

    def prepare_tls(self) -> BrokerTls:
        """Generate the local CA (if there is none) and the server certificate (if
        there is no current one); safe to repeat. Picks the TLS port if unset."""
        # Here, not at the top: the certificates' cryptography is for `services up`,
        # and every command reads the broker's logins through this module.
        from devices.certificates import (
            DeviceCA,
            ensure_crl,
            ensure_local_ca,
            ensure_server_certificate,
        )

        try:
            if ensure_local_ca(self.ca_cert_file, self.ca_key_file):
                logger.info(
                    "generated the device CA %s (key %s)", self.ca_cert_file, self.ca_key_file
                )
            ca = DeviceCA.load(self.ca_cert_file, self.ca_key_file)
            (self.dir / "tls").mkdir(parents=True, exist_ok=True, mode=0o700)
            ensure_server_certificate(
                ca, self.server_cert_file, self.server_key_file, self.tls_server_names
            )
            ensure_crl(ca, self.crl_file)
        except RegistryError as exc:
            raise ServiceError(str(exc)) from exc
        if self.tls_port is None:
            self.tls_port = _free_port()
        return BrokerTls(
            self.tls_port, self.tls_host, self.ca_cert_file, self.server_cert_file,
            self.server_key_file, self.crl_file, self.password_tls_port,
        )  # fmt: skip

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def running_pid(self) -> int | None:
        """The pid of the broker this run dir started, if it is still that broker."""
        pid = _read_pid(self.pid_path)
        if pid is None or not _alive(pid):
            return None
        argv = _cmdline(pid)
        if argv and Path(argv[0]).name == "mosquitto" and str(self.config_path) in argv:
            return pid
        return None

    def start(self, ready_timeout: float = 15.0) -> int:
        """Render the config, start the broker daemonised, wait for a CONNACK."""
        tls = self.prepare_tls()
        if port_open(self.host, self.port):
            raise PortInUse(
                f"cannot start Mosquitto: {self.address} is {_holder_text(self.port)}; "
                "stop it or set USAGEPIPE_MQTT__PORT to a free port"
            )
        old_pid = self.running_pid()
        if old_pid is not None:
            # Starting another would overwrite its config and pid file and orphan it.
            raise ServiceError(
                f"{self.dir} already has a Mosquitto running (pid {old_pid}) on another "
                "port; run `usagepipe services down` with the settings that started it, "
                f"or kill {old_pid}"
            )
        binary = mosquitto_binary(install=True)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        try:
            prepare_broker_dir(self.dir)
        except BrokerAccountError as exc:
            raise ServiceError(str(exc)) from exc
        tls_ports = {"USAGEPIPE_MQTT__TLS_PORT": tls.port}
        if tls.password_port is not None:
            tls_ports["USAGEPIPE_MQTT__PASSWORD_TLS_PORT"] = tls.password_port
        for variable, tls_port in tls_ports.items():
            if port_open(self.host if tls.host == "0.0.0.0" else tls.host, tls_port):
                raise PortInUse(
                    f"cannot start Mosquitto: its TLS port {tls_port} is"
                    f" {_holder_text(tls_port)}; stop it or set {variable} to a free port"
                )
        self.config_path.write_text(render_mosquitto_config(self.port, self.dir.parent, tls))
        self.pid_path.unlink(missing_ok=True)
        done = subprocess.run(
            [str(binary), "-c", str(self.config_path), "-d"],
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,
        )
        if done.returncode != 0:
            raise ServiceError(
                f"mosquitto -c {self.config_path} failed (exit {done.returncode}):\n"
                f"{(done.stderr or done.stdout).strip()}\n{_log_tail(self.log_path)}"
            )

        def ready() -> bool:
            return self.running_pid() is not None and mqtt_answers(self.host, self.port)

        if not _wait_until(ready, ready_timeout):
            raise ServiceError(
                f"Mosquitto did not accept MQTT connections on {self.address} within "
                f"{ready_timeout:.0f}s; last lines of {self.log_path}:\n"
                f"{_log_tail(self.log_path)}"
            )
        pid = self.running_pid()
        if pid is None:
            raise ServiceError(f"Mosquitto exited right after start-up; see {self.log_path}")
        logger.info("started Mosquitto pid %d on %s", pid, self.address)
        return pid

    def logins(self) -> BrokerLogins | None:
        """The admin and bridge logins `start` generated, or None before the first start."""
        return read_logins(self.dir)

    def mqtt_settings(self, mqtt: MqttSettings) -> MqttSettings:
        """`mqtt` pointed at this broker: its port, and the logins its first start made."""
        logins = self.logins()
        if logins is None:
            raise ServiceError(
                f"{self.address}: start the broker first; its first start makes the logins"
            )
        return mqtt.model_copy(
            update={
                "port": self.port,
                "username": logins.bridge_username,
                "password": SecretStr(logins.bridge_password),
                "admin_username": logins.admin_username,
                "admin_password": SecretStr(logins.admin_password),
            }
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the broker this run dir started (it saves its sessions); its pid or None."""
        pid = self.running_pid()
        if pid is not None:
            _stop_pid(pid, timeout)
        self.pid_path.unlink(missing_ok=True)
        return pid


def with_broker_logins(settings: Settings) -> Settings:
    """`settings` with the MQTT logins left unset filled in from the local broker's
    `<run_dir>/mosquitto/credentials.json`, if `services up` wrote one, and the device
    CA's files left unset from `<run_dir>/ca/`, if `services up` made them there.

    Set ones (from the environment, as in production) are kept. Used by the CLI and
    the tests' fixtures only; components take the settings they are given.
    """
    return _with_local_ca(_with_logins(settings))


def _with_local_ca(settings: Settings) -> Settings:
    """Fill the CA's files, the revocation list and the broker's pid file left unset
    from the local run dir, each only if `services up` made it there."""
    registry = settings.registry
    broker = MosquittoBroker.of(settings)
    cert, key = local_ca_files(settings.services.run_dir)
    filled: dict[str, Path] = {}
    unset = registry.ca_cert_file is None and registry.ca_key_file is None
    if unset and cert.exists() and key.exists():
        filled = {"ca_cert_file": cert, "ca_key_file": key}
    if registry.crl_file is None and broker.crl_file.exists():
        filled["crl_file"] = broker.crl_file
        if registry.broker_pid_file is None:
            filled["broker_pid_file"] = broker.pid_path
    if not filled:
        return settings
    return settings.model_copy(update={"registry": registry.model_copy(update=filled)})


def _with_logins(settings: Settings) -> Settings:
    mqtt = settings.mqtt
    if None not in (mqtt.username, mqtt.password, mqtt.admin_username, mqtt.admin_password):
        return settings
    try:
        logins = read_logins(settings.services.run_dir.resolve() / "mosquitto")
    except BrokerAccountError as exc:
        raise ServiceError(str(exc)) from exc
    if logins is None:
        return settings
    filled = {
        "username": mqtt.username or logins.bridge_username,
        "password": mqtt.password or SecretStr(logins.bridge_password),
        "admin_username": mqtt.admin_username or logins.admin_username,
        "admin_password": mqtt.admin_password or SecretStr(logins.admin_password),
    }
    return settings.model_copy(update={"mqtt": mqtt.model_copy(update=filled)})


def _mqtt_status(settings: Settings) -> ServiceState:
    broker = MosquittoBroker.of(settings)
    name = "mqtt (mosquitto)"
    if not port_open(broker.host, broker.port):
        return ServiceState(name, broker.address, STOPPED)
    if not mqtt_answers(broker.host, broker.port):
        return ServiceState(
            name,
            broker.address,
            PORT_TAKEN,
            f"{broker.address} is {_holder_text(broker.port)}, which does not answer "
            "MQTT; stop it or set USAGEPIPE_MQTT__PORT to another port",
        )
    pid = broker.running_pid()
    if pid is not None:
        return ServiceState(name, broker.address, RUNNING_OURS.format(pid=pid))
    detail = "its queue limits are unknown; the bridge expects deploy/mosquitto's"
    holder = port_holder(broker.port)
    return ServiceState(
        name, broker.address, RUNNING_NOT_OURS, f"{holder}; {detail}" if holder else detail
    )


def _mqtt_up(settings: Settings) -> ServiceState:
    state = _mqtt_status(settings)
    if state.state == PORT_TAKEN:
        raise PortInUse(state.detail)
    if state.state != STOPPED:
        return state
    _require_loopback(settings.mqtt.host, "Mosquitto", "USAGEPIPE_MQTT__HOST")
    broker = MosquittoBroker.of(settings)
    pid = broker.start()
    return ServiceState(
        state.name, state.address, STARTED, f"pid {pid}, config {broker.config_path}"
    )


def _mqtt_down(settings: Settings) -> ServiceState:
    broker = MosquittoBroker.of(settings)
    pid = broker.stop()
    if pid is not None:
        return ServiceState("mqtt (mosquitto)", broker.address, STOPPED, f"stopped pid {pid}")
    state = _mqtt_status(settings)
    if state.state == RUNNING_NOT_OURS:
        return ServiceState(
            state.name, state.address, state.state, "left running: usagepipe did not start it"
        )
    return ServiceState(state.name, state.address, STOPPED, "was not running")
