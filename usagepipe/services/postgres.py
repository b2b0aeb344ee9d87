"""The machine's PostgreSQL: checked, started or installed, never stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ingest.settings import Settings
from usagepipe.services.host import (
    _LOOPBACK,
    RUNNING_NOT_OURS,
    STARTED,
    STOPPED,
    ServiceError,
    ServiceState,
    _apt_install,
    _holder_text,
    _wait_until,
    port_open,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

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
    import asyncpg  # here: every command imports this package, few of them PostgreSQL

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
