"""The TCP ports usagepipe's own servers listen on: metrics, and the registry's and the
planners' HTTP APIs.

A port another process holds is a user's mistake to fix, not a crash: `unavailable`
turns the operating system's error into `PortUnavailable`, one line naming the port and
the setting that moves it, and `listen` binds a socket for an HTTP server so that the
error comes before the server starts (uvicorn would log the error and exit on its own).
"""

from __future__ import annotations

import argparse
import errno
import socket

from ingest.errors import PortUnavailable


def unavailable(
    exc: OSError,
    host: str,
    port: int,
    setting: str,
    *,
    what: str = "port",
    host_setting: str | None = None,
) -> PortUnavailable:
    """`PortUnavailable` for `exc`, raised binding `host`:`port` (`what`: "metrics
    port"); `setting` moves the port, `host_setting` (if any) the address."""
    if exc.errno == errno.EADDRINUSE:
        return PortUnavailable(
            f"{what} {port} is already in use on {host}; set {setting} to a free port"
        )
    if exc.errno == errno.EACCES:
        return PortUnavailable(
            f"{what} {port} on {host} needs privileges this user lacks; set {setting} to a"
            " port above 1023"
        )
    reason = exc.strerror or str(exc)
    check = f"{host_setting} and {setting}" if host_setting else setting
    return PortUnavailable(f"cannot listen on {host}:{port} ({reason}); check {check}")


def listen(host: str, port: int, setting: str, host_setting: str | None = None) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: any free port), for `uvicorn.Server.serve(
    sockets=[...])`; raises `PortUnavailable` naming the settings when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise unavailable(exc, host, port, setting, host_setting=host_setting) from exc
    try:
        # As asyncio's own create_server does on Unix: a port left in TIME_WAIT by the
        # previous run is free; one another process listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise unavailable(exc, host, port, setting, host_setting=host_setting) from exc
    return sock


def port_number(text: str) -> int:
    """An argparse type for `--port`: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (use 0 to 65535)")
    return port
