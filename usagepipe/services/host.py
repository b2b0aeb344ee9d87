"""What the machine has: ports and who holds them, processes usagepipe started, apt.

The pieces the three servers' modules share: the states a service can be in, the
errors, protocol probes that tell a Kafka or MQTT server from anything else on a
port, and detached processes known by their pid files and `/proc/<pid>/cmdline`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.errors import UsagepipeError

logger = logging.getLogger(__name__)

ServiceName = Literal["kafka", "mqtt", "postgres"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("kafka", "mqtt", "postgres")

RUNNING_OURS = "running (started by usagepipe, pid {pid})"
RUNNING_NOT_OURS = "running (not ours)"
STOPPED = "stopped"
STARTED = "started"
PORT_TAKEN = "port taken by another program"

"""The project's Mosquitto config template (a `string.Template`)."""

_PROBE_TIMEOUT_S = 2.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "")


class ServiceError(UsagepipeError):
    """A service could not be started, stopped or checked; the message says what to do.

    `states` holds what the same call achieved for the other services, so the CLI
    can print them beside the error.
    """

    retriable = False

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
