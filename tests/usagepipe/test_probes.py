"""`/health` and `/ready` of the long-running commands, started for real (`usagepipe
bridge`, `consume`, `registry serve`) against the local servers, with the server they
wait on behind a `Forwarder` the test opens and closes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from ingest.settings import Settings
from tests.proxy import Forwarder
from tests.usagepipe.test_cli import USAGEPIPE, environment

# This helper's own ports (none of the local servers' defaults).
BRIDGE_PROBES, MQTT_FORWARD = 19300, 19301
CONSUMER_PROBES, KAFKA_FORWARD = 19302, 19303
REGISTRY_HTTP, POSTGRES_FORWARD = 19304, 19305
CONSUMER_POSTGRES_FORWARD = 19306


def forwarded_dsn(settings: Settings, port: int) -> tuple[str, int]:
    """The settings' DSN through 127.0.0.1:`port`, and PostgreSQL's own port."""
    dsn = urlsplit(settings.postgres.dsn.get_secret_value())
    assert dsn.port is not None
    login = dsn.netloc.rsplit("@", 1)[0]
    return dsn._replace(netloc=f"{login}@127.0.0.1:{port}").geturl(), dsn.port


@contextlib.contextmanager
def started(argv: list[str], env: Mapping[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A real `usagepipe` process until the block ends (SIGTERM, then wait)."""
    proc = subprocess.Popen(
        [USAGEPIPE, *argv], env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def answer(
    client: httpx.AsyncClient,
    proc: subprocess.Popen[bytes],
    url: str,
    until: Callable[[httpx.Response], bool],
    seconds: float = 60,
) -> httpx.Response:
    """GET `url` until its answer satisfies `until` (the process must keep running)."""
    last: httpx.Response | None = None
    async with asyncio.timeout(seconds):
        while True:
            assert proc.poll() is None, f"the process exited with {proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                last = await client.get(url)
                if until(last):
                    return last
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url}: {last and last.text}")  # pragma: no cover


def status(code: int) -> Callable[[httpx.Response], bool]:
    return lambda response: response.status_code == code


def ready_doc(**checks: str) -> dict[str, Any]:
    failing = [name for name, found in checks.items() if found != "ok"]
    return {"status": "not_ready" if failing else "ready", "not_ready": failing, "checks": checks}


async def test_a_bridge_is_ready_once_subscribed(settings: Settings) -> None:
    env = environment(
        settings,
        USAGEPIPE_MQTT__PORT=str(MQTT_FORWARD),
        USAGEPIPE_BRIDGE__METRICS_PORT=str(BRIDGE_PROBES),
    )
    base = f"http://127.0.0.1:{BRIDGE_PROBES}"
    async with Forwarder(MQTT_FORWARD, settings.mqtt.port) as broker, httpx.AsyncClient() as c:
        with started(["bridge"], env) as proc:
            waiting = await answer(c, proc, f"{base}/ready", status(503))
            assert waiting.headers["retry-after"] == "5"
            doc = waiting.json()
            assert (doc["status"], doc["checks"]["mqtt"]) == ("not_ready", "not connected")
            assert "mqtt" in doc["not_ready"]
            alive = await c.get(f"{base}/health")
            assert (alive.status_code, alive.json()) == (200, {"status": "alive"})

            await broker.start()  # the broker "comes up"
            ready = await answer(c, proc, f"{base}/ready", status(200))
            assert ready.json() == ready_doc(mqtt="ok", kafka="ok")
            metrics = await c.get(f"{base}/metrics")
            assert "usagepipe_bridge_subscribed 1.0" in metrics.text

            await broker.stop()  # and goes away: the bridge is connected no more
            gone = await answer(c, proc, f"{base}/ready", status(503))
            assert gone.json() == ready_doc(mqtt="not connected", kafka="ok")
            await broker.start()
            again = await answer(c, proc, f"{base}/ready", status(200))
            assert again.json() == ready_doc(mqtt="ok", kafka="ok")


async def test_a_consumer_is_ready_once_partitions_are_assigned(settings: Settings) -> None:
    kafka_port = int(settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    dsn, postgres_port = forwarded_dsn(settings, CONSUMER_POSTGRES_FORWARD)
    env = environment(
        settings,
        USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{KAFKA_FORWARD}",
        USAGEPIPE_POSTGRES__DSN=dsn,
        USAGEPIPE_CONSUMER__METRICS_PORT=str(CONSUMER_PROBES),
    )
    base = f"http://127.0.0.1:{CONSUMER_PROBES}"
    async with (
        Forwarder(KAFKA_FORWARD, kafka_port) as kafka,
        Forwarder(CONSUMER_POSTGRES_FORWARD, postgres_port) as postgres,
        httpx.AsyncClient() as c,
    ):
        await postgres.start()
        with started(["consume"], env) as proc:
            waiting = await answer(c, proc, f"{base}/ready", status(503))
            assert waiting.json() == ready_doc(
                kafka="connecting", postgresql="connecting", partitions="not in the group yet"
            )
            alive = await c.get(f"{base}/health")
            assert (alive.status_code, alive.json()) == (200, {"status": "alive"})

            await kafka.start()
            ready = await answer(c, proc, f"{base}/ready", status(200))
            assert ready.json() == ready_doc(kafka="ok", postgresql="ok", partitions="ok")

            await postgres.stop()  # an idle consumer learns it from its ping (PING_S)
            away = await answer(c, proc, f"{base}/ready", status(503))
            doc = away.json()
            assert (doc["not_ready"], doc["checks"]["kafka"]) == (["postgresql"], "ok")
            assert doc["checks"]["postgresql"].startswith("unreachable: ")
            await postgres.start()
            back = await answer(c, proc, f"{base}/ready", status(200))
            assert back.json() == ready_doc(kafka="ok", postgresql="ok", partitions="ok")

            # Kafka's bootstrap port goes away: the topic check (every kafka.topic_check_s)
            # finds it. (The records come over the address Kafka advertises, which the
            # Forwarder does not front, so here only the check sees the outage.)
            await kafka.stop()
            gone = await answer(c, proc, f"{base}/ready", status(503))
            doc = gone.json()
            assert (doc["not_ready"], doc["checks"]["postgresql"]) == (["kafka"], "ok")
            assert doc["checks"]["kafka"].startswith("unreachable: ")
            await kafka.start()
            again = await answer(c, proc, f"{base}/ready", status(200))
            assert again.json() == ready_doc(kafka="ok", postgresql="ok", partitions="ok")


async def test_the_registry_is_not_ready_while_postgresql_is_away(settings: Settings) -> None:
    dsn, postgres_port = forwarded_dsn(settings, POSTGRES_FORWARD)
    env = environment(settings, USAGEPIPE_POSTGRES__DSN=dsn)
    base = f"http://127.0.0.1:{REGISTRY_HTTP}"
    async with Forwarder(POSTGRES_FORWARD, postgres_port) as postgres, httpx.AsyncClient() as c:
        await postgres.start()
        with started(["registry", "serve", "--port", str(REGISTRY_HTTP)], env) as proc:
            ready = await answer(c, proc, f"{base}/ready", status(200))
            assert ready.json() == ready_doc(postgresql="ok")

            await postgres.stop()  # PostgreSQL's port closes, its connections are cut
            away = await answer(c, proc, f"{base}/ready", status(503))
            assert away.headers["retry-after"] == "5"
            doc = away.json()
            assert (doc["status"], doc["not_ready"]) == ("not_ready", ["postgresql"])
            assert doc["checks"]["postgresql"] != "ok"
            alive = await c.get(f"{base}/health")
            assert (alive.status_code, alive.json()) == (200, {"status": "alive"})

            await postgres.start()
            back = await answer(c, proc, f"{base}/ready", status(200))
            assert back.json() == ready_doc(postgresql="ok")
