"""How long the registry API takes to answer a registration, by what was wrong with it:
an unknown serial, a real serial with another model, a wrong code, and a success.

The first three must not be told apart (issue 16: one answer and one timing for every
failed proof), so their medians and 95th percentiles should agree within noise, and
the success (which also makes and hashes the device's secret) takes about one hash
longer. The registry API runs on uvicorn on a free loopback port of this process,
against the local PostgreSQL in a database of its own (`reg_bench_<hex>`, dropped
after); the client sends its requests one at a time over HTTP, the four kinds shuffled
in each round so that drift hits them alike. Units are imported and secrets hashed at
`--log2-n` (the production cost, 2^14, by default). Events are kept in memory and
broker accounts collected, so Kafka and Mosquitto are left out of the figures. The
rate limits are raised for the run (a subject may fail 1000 times, an address 10,000
per week) so none of the attempts is limited. This is a benchmark, not a test: it
prints figures and asserts nothing.

    python bench/registration.py [--tries 200] [--log2-n 14]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import uvicorn
from prometheus_client import CollectorRegistry

from devices.api import create_app
from devices.credentials import new_registration_code
from devices.factory_import import import_units
from devices.records import Category, ProductModel
from devices.registry import Registry
from ingest.auth import DevSigner
from ingest.ports import listen
from ingest.settings import AuthSettings, RegistrySettings, Settings
from simulators.provision import CollectedAccounts

KINDS = ("unknown serial", "wrong model", "wrong code", "success")
TARGET = "SN-TARGET"
"""The unit every wrong model and wrong code aims at (never registered)."""
LAUNCHED = date(2025, 3, 1)


class KeptEvents:
    """An `EventPublisher` that keeps the events: Kafka is not what is measured."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def publish(self, event_type: str, key: str, payload: dict[str, Any]) -> None:
        self.events.append((event_type, key))


def database_dsn(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def units_csv(tries: int) -> tuple[list[str], dict[str, str]]:
    codes = {TARGET: new_registration_code()}
    codes.update({f"SN-OK-{i:05d}": new_registration_code() for i in range(tries + 5)})
    lines = ["model_number,serial_number,manufactured_on,registration_code\n"]
    lines += [f"WM-100,{serial},2025-04-01,{code}\n" for serial, code in codes.items()]
    return lines, codes


def purchase() -> dict[str, str]:
    return {"channel": "own_online_shop", "purchased_on": "2025-12-24"}


async def timed(
    client: httpx.AsyncClient, body: dict[str, object], auth: dict[str, str]
) -> tuple[float, int, str]:
    started = time.perf_counter()
    response = await client.post("/registrations", json=body, headers=auth)
    elapsed = time.perf_counter() - started
    return elapsed, response.status_code, response.json().get("reason", "")


async def measure(
    url: str, tries: int, codes: dict[str, str], signer: DevSigner
) -> dict[str, list[float]]:
    """Median and spread per kind; the buyer and the guesser sign in with `signer`."""
    sign_in = {
        who: {"Authorization": f"Bearer {signer.token(who, audience=AuthSettings().audience)}"}
        for who in ("bench-buyer", "bench-guesser")
    }
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        owner = {
            "name": "Bench Owner",
            "email": "bench@example.com",
            "region": "JP-13",
            "analytics_consent": True,
            "marketing_consent": False,
        }
        await client.post("/owners", json=owner, headers=sign_in["bench-buyer"])
        guesser = {**owner, "name": "Bench Guesser"}
        await client.post("/owners", json=guesser, headers=sign_in["bench-guesser"])
        ok = iter(serial for serial in codes if serial != TARGET)

        def who(kind: str) -> dict[str, str]:
            return sign_in["bench-buyer" if kind == "success" else "bench-guesser"]

        def body(kind: str) -> dict[str, object]:
            base: dict[str, object] = {"purchase": purchase()}
            if kind == "unknown serial":
                serial = f"SN-NONE-{secrets.token_hex(4).upper()}"
                return {
                    **base,
                    "model_number": "WM-100",
                    "serial_number": serial,
                    "registration_code": new_registration_code(),
                }
            if kind == "wrong model":
                return {
                    **base,
                    "model_number": "DR-200",
                    "serial_number": TARGET,
                    "registration_code": codes[TARGET],
                }
            if kind == "wrong code":
                return {
                    **base,
                    "model_number": "WM-100",
                    "serial_number": TARGET,
                    "registration_code": new_registration_code(),
                }
            serial = next(ok)
            return {
                **base,
                "model_number": "WM-100",
                "serial_number": serial,
                "registration_code": codes[serial],
            }

        expected = {kind: (403, "registration_refused") for kind in KINDS[:3]}
        expected["success"] = (201, "")
        for kind in KINDS:  # warm-up: connections, code paths, the thread pool
            await timed(client, body(kind), who(kind))
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        order = list(KINDS)
        for _ in range(tries):
            random.shuffle(order)
            for kind in order:
                elapsed, status, reason = await timed(client, body(kind), who(kind))
                if (status, reason) != expected[kind]:
                    print(f"  {kind}: unexpected answer {status} {reason!r}; not counted")
                    continue
                times[kind].append(elapsed)
        return times


def report(times: dict[str, list[float]]) -> None:
    print(f"{'attempt':<15} {'n':>4} {'median ms':>10} {'p95 ms':>8} {'mean ms':>8} {'sd ms':>7}")
    for kind, values in times.items():
        p95 = statistics.quantiles(values, n=20)[18]
        print(
            f"{kind:<15} {len(values):>4} {statistics.median(values) * 1e3:>10.2f}"
            f" {p95 * 1e3:>8.2f} {statistics.fmean(values) * 1e3:>8.2f}"
            f" {statistics.stdev(values) * 1e3:>7.2f}"
        )
    medians = [statistics.median(times[kind]) for kind in KINDS[:3]]
    print(
        f"spread of the failed proofs' medians: {(max(medians) - min(medians)) * 1e3:.2f} ms"
        f" ({(max(medians) / min(medians) - 1) * 100:.1f} %)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=200, help="rounds of the four kinds")
    parser.add_argument("--log2-n", type=int, default=14, help="scrypt cost (log2 N)")
    args = parser.parse_args()
    base = Settings()
    database = f"reg_bench_{secrets.token_hex(4)}"
    admin_dsn = base.postgres.dsn.get_secret_value()
    dsn = database_dsn(admin_dsn, database)
    settings = RegistrySettings(
        secret_hash_log2_n=args.log2_n,
        registration_failures_per_subject=1000,
        registration_failures_per_address=10_000,
        registration_window_s=7 * 86400,
    )
    print(
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; scrypt 2^{args.log2_n};"
        f" {args.tries} rounds; database {database}"
    )
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f"CREATE DATABASE {database}")
    # The bench's own dev signer, in a directory gone after the run.
    keys = tempfile.mkdtemp(prefix="usagepipe-bench-auth-")
    try:
        lines, codes = units_csv(args.tries)
        async with Registry(
            settings, publisher=KeptEvents(), broker=CollectedAccounts(), dsn=dsn
        ) as registry:
            await registry.add_product_model(
                ProductModel("WM-100", Category.WASHER, "Washer", LAUNCHED)
            )
            await registry.add_product_model(
                ProductModel("DR-200", Category.DRYER, "Dryer", LAUNCHED)
            )
            conn = await asyncpg.connect(dsn)
            try:
                await import_units(conn, lines, schema=settings.db_schema, hash_log2_n=args.log2_n)
            finally:
                await conn.close()
            signer = DevSigner(Path(keys) / "dev_signer.pem")
            app = create_app(
                lambda: nullcontext(registry),
                verifier=signer.verifier(AuthSettings()),
                metrics_registry=CollectorRegistry(),
            )
            with listen("127.0.0.1", 0, "--port") as sock:
                port = sock.getsockname()[1]
                server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="error"))
                serving = asyncio.create_task(server.serve(sockets=[sock]), name="registry-api")
                try:
                    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event
                        await asyncio.sleep(0.02)
                    times = await measure(f"http://127.0.0.1:{port}", args.tries, codes, signer)
                finally:
                    server.should_exit = True
                    await serving
            print(
                f"registry counts: {registry.counts.proofs} proofs checked,"
                f" {registry.counts.secrets_hashed} secrets hashed,"
                f" {registry.counts.limited} limited"
            )
        report(times)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        shutil.rmtree(keys, ignore_errors=True)
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
