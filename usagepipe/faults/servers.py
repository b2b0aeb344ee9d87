"""Private servers for the fault suite: Tansu, Mosquitto and a PostgreSQL cluster of its
own, on ports no other server uses, so that a scenario may kill or stop them.

Tansu and Mosquitto come up through `usagepipe services up` with the suite's run dir
and ports (the same code path a user's `services up` takes); PostgreSQL is a throwaway
cluster made by the machine's own `initdb` in the suite's directory (as the `postgres`
user when the suite runs as root, since PostgreSQL refuses to run as root). Nothing is
installed and the machine's clusters are never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from usagepipe.services.host import ServiceError, port_open

Killable = Literal["kafka", "mqtt"]

_PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


@dataclass(frozen=True)
class Ports:
    """The suite's ports (none of them the machine's servers')."""

    kafka: int = 19692
    mqtt: int = 11684
    mqtt_tls: int = 18683
    postgres: int = 5435
    proxy: int = 18680
    """A proxy in front of PostgreSQL, for the slow and resetting database scenarios."""


def usagepipe_command() -> str:
    """The console script of the interpreter running the suite."""
    return str(Path(sys.executable).with_name("usagepipe"))


class FaultServers:
    """The suite's three servers under `root`; `start()` brings them up, `close()` ends
    them and removes `root`."""

    def __init__(self, root: Path, ports: Ports = Ports()) -> None:
        self.root = root
        self.ports = ports
        self.run_dir = root / "run"
        self.pg_dir = root / "postgres"
        self.log_dir = root / "logs"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports.postgres}/faults"

    def env(self, *, postgres_port: int | None = None) -> dict[str, str]:
        """The variables that point usagepipe at these servers (PostgreSQL at
        `postgres_port` instead, for a scenario that puts a proxy in between)."""
        port = postgres_port or self.ports.postgres
        return {
            "USAGEPIPE_SERVICES__RUN_DIR": str(self.run_dir),
            "USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{self.ports.kafka}",
            "USAGEPIPE_MQTT__PORT": str(self.ports.mqtt),
            "USAGEPIPE_MQTT__TLS_PORT": str(self.ports.mqtt_tls),
            "USAGEPIPE_POSTGRES__DSN": f"postgresql://postgres@127.0.0.1:{port}/faults",
        }

    # -- the whole set -----------------------------------------------------------------

    def start(self) -> None:
        taken = [
            p
            for p in (
                self.ports.kafka,
                self.ports.mqtt,
                self.ports.mqtt_tls,
                self.ports.postgres,
                self.ports.proxy,
            )
            if port_open("127.0.0.1", p)
        ]
        if taken:
            raise ServiceError(
                f"the fault suite's ports {', '.join(map(str, taken))} are in use; "
                "is another fault run going? (its servers stop when it ends)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.log_dir.mkdir(exist_ok=True)
        self._init_postgres()
        self.start_postgres()
        self.services("up")

    def close(self, *, keep_files: bool = False) -> None:
        """Stop the servers; remove `root` unless `keep_files` (the logs, for a look)."""
        self.services("down")
        self.stop_postgres()
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def services(self, action: str) -> None:
        """`usagepipe services ACTION` on the suite's run dir and ports."""
        done = subprocess.run(
            [usagepipe_command(), "--log-level", "WARNING", "services", action],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ServiceError(f"services {action} failed: {done.stderr.strip()}")

    # -- Kafka and Mosquitto -----------------------------------------------------------

    def pid(self, name: Killable) -> int:
        path = self.run_dir / ("tansu.pid" if name == "kafka" else "mosquitto/mosquitto.pid")
        return int(path.read_text().split()[0])

    def kill(self, name: Killable) -> None:
        """SIGKILL the server and wait until its port is closed."""
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        port = self.ports.kafka if name == "kafka" else self.ports.mqtt
        deadline = time.monotonic() + 10
        while port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, name: Killable) -> None:
        """Start `name` again (`services up` starts only what is not answering)."""
        del name
        self.services("up")

    # -- PostgreSQL --------------------------------------------------------------------

    def _as_postgres(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def _pg_tool(self, name: str) -> str:
        for bin_dir in _PG_BIN_DIRS:
            if (bin_dir / name).exists():
                return str(bin_dir / name)
        raise ServiceError(f"PostgreSQL's {name} is not installed (Debian: postgresql)")

    def _init_postgres(self) -> None:
        self.pg_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.pg_dir, "postgres", "postgres")
        done = self._as_postgres(
            [
                self._pg_tool("initdb"),
                "-D",
                str(self.pg_dir / "data"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ]
        )
        if done.returncode != 0:
            raise ServiceError(f"initdb failed: {done.stderr.strip()}")

    def start_postgres(self) -> None:
        options = (
            f"-p {self.ports.postgres} -c listen_addresses=127.0.0.1"
            f" -k {self.pg_dir} -c fsync=off -c max_connections=200"
        )
        done = self._as_postgres(
            [
                self._pg_tool("pg_ctl"),
                "-D",
                str(self.pg_dir / "data"),
                "-l",
                str(self.pg_dir / "postgres.log"),
                "-o",
                options,
                "-w",
                "start",
            ]
        )
        if done.returncode != 0:
            raise ServiceError(
                f"PostgreSQL did not start: {done.stdout.strip()} {done.stderr.strip()}"
            )
        created = self._as_postgres(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ports.postgres),
                "-U",
                "postgres",
                "-tAc",
                "SELECT 1 FROM pg_database WHERE datname = 'faults'",
            ]
        )
        if created.stdout.strip() != "1":
            self._as_postgres(
                [
                    "createdb",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.ports.postgres),
                    "-U",
                    "postgres",
                    "faults",
                ]
            )

    def stop_postgres(self) -> None:
        """Stop the cluster at once (`-m fast`: sessions cut, as a crash or a failover
        looks to a client)."""
        if not (self.pg_dir / "data" / "postmaster.pid").exists():
            return
        self._as_postgres(
            [self._pg_tool("pg_ctl"), "-D", str(self.pg_dir / "data"), "-m", "fast", "-w", "stop"]
        )
