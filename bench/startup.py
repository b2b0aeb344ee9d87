"""What the services cost to start: CPU and wall time from process start until ready.

    nice -n 10 .venv/bin/python bench/startup.py [--repeat 7]
        [--baseline /path/to/other/checkout/.venv/bin/usagepipe] [--name start<hex>]

Each case runs `--repeat` times in turn (so a busy moment spreads over all of them):
- `usagepipe --help` and `usagepipe settings`: the console script's imports and the
  settings, to the exit (the children's rusage);
- `usagepipe bridge`: a bridge of its own (client id, raw topic) on the local broker
  and Kafka, until its `GET /ready` answers 200 (connected, subscribed, producer up);
- `usagepipe consume`: a consumer of its own (group, usage table, registry schema),
  until its `GET /ready` answers 200 (partitions assigned).
CPU is user + system from /proc/<pid>/stat at the first 200 (all threads). Printed:
min and median of CPU seconds and wall seconds per case; with `--baseline`, the same for
that console script (another checkout's, e.g. the commit before a change) beside it,
taken in the same rounds.

Uses the local servers (`usagepipe services up`), a topic and group of its own, and a
usage table and registry schema of its own, dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from e2e_procs import Service, db_migrate, free_port, pid_cpu_s, say

from ingest.settings import Settings
from ingest.tables import drop_usage_tables

READY_TIMEOUT_S = 90.0


def ran_to_exit(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """CPU seconds (this child's rusage) and wall seconds of one command run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


async def until_ready(
    argv: list[str], env: dict[str, str], port: int, log: Path
) -> tuple[float, float]:
    """CPU and wall seconds of a service from its start to its first `GET /ready` 200."""
    service = Service(argv[-1], argv, env, log)
    started = time.monotonic()
    try:
        while time.monotonic() - started < READY_TIMEOUT_S:
            if not service.alive():
                raise SystemExit(f"{' '.join(argv[1:])} exited early; its log: {log}")
            if await _answers_200(port):
                return pid_cpu_s(service.pid), time.monotonic() - started
            await asyncio.sleep(0.01)
        raise SystemExit(
            f"{' '.join(argv[1:])} not ready after {READY_TIMEOUT_S:.0f} s; log: {log}"
        )
    finally:
        service.stop()


async def _answers_200(port: int) -> bool:
    """Whether `GET /ready` on the port answers 200 now."""
    try:
        async with asyncio.timeout(1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            status = await reader.readline()
            writer.close()
    except (OSError, TimeoutError):
        return False
    return status.split()[1:2] == [b"200"]


async def main(args: argparse.Namespace) -> int:
    settings = Settings()
    name = args.name
    table, schema = f"{name}_usage", f"{name}_registry"
    scripts = {"this": str(Path(sys.executable).with_name("usagepipe"))}
    if args.baseline:
        scripts["baseline"] = str(args.baseline)
    env = {
        **os.environ,
        "USAGEPIPE_LOG__LEVEL": "WARNING",
        "USAGEPIPE_POSTGRES__TABLE": table,
        "USAGEPIPE_REGISTRY__DB_SCHEMA": schema,
        "USAGEPIPE_REGISTRY__EVENTS_TOPIC": f"{name}.events",
        "USAGEPIPE_KAFKA__RAW_TOPIC": f"{name}.raw",
        "USAGEPIPE_KAFKA__DLQ_TOPIC": f"{name}.dlq",
    }
    await db_migrate(scripts["this"], env)
    logs = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    say(f"{args.repeat} rounds; load average {os.getloadavg()[0]:.2f}; logs in {logs}")
    try:
        for round_ in range(args.repeat):
            for who, script in scripts.items():
                for case in ("--help", "settings"):
                    figures.setdefault((case, who), []).append(ran_to_exit([script, case], env))
                port = free_port()
                bridge_env = {
                    **env,
                    "USAGEPIPE_BRIDGE__CLIENT_ID": f"{name}-{who}-{round_}",
                    "USAGEPIPE_BRIDGE__METRICS_PORT": str(port),
                }
                ready = await until_ready([script, "bridge"], bridge_env, port, logs / "bridge.log")
                figures.setdefault(("bridge", who), []).append(ready)
                port = free_port()
                consumer_env = {
                    **env,
                    "USAGEPIPE_CONSUMER__GROUP_ID": f"{name}-{who}-{round_}",
                    "USAGEPIPE_CONSUMER__METRICS_PORT": str(port),
                }
                ready = await until_ready(
                    [script, "consume"], consumer_env, port, logs / "consume.log"
                )
                figures.setdefault(("consume", who), []).append(ready)
        say(f"done; load average {os.getloadavg()[0]:.2f}")
    finally:
        conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
        try:
            await drop_usage_tables(conn, table)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    heads = ("case", "script", "CPU s min", "median", "wall s min", "median")
    print(f"{heads[0]:<10} {heads[1]:<9} {heads[2]:>9} {heads[3]:>7} {heads[4]:>10} {heads[5]:>7}")
    for (case, who), runs in figures.items():
        cpu, wall = [r[0] for r in runs], [r[1] for r in runs]
        print(f"{case:<10} {who:<9} {min(cpu):>9.2f} {statistics.median(cpu):>7.2f}"
              f" {min(wall):>10.2f} {statistics.median(wall):>7.2f}")  # fmt: skip
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds of every case (7)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout's console script, timed beside this one in the same rounds",
    )
    parser.add_argument("--name", default=f"start{secrets.token_hex(3)}")
    args = parser.parse_args(argv)
    if args.baseline and not os.access(args.baseline, os.X_OK):
        parser.error(f"--baseline {args.baseline}: not an executable console script")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
