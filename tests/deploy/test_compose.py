"""The production stack (deploy/production/compose.yaml), checked without a container
engine: Debian's `docker-compose config` (1.29.2) must accept it, and every usagepipe
service's command and settings must be ones the code takes.

`docker-compose` is installed here the way deploy/local/env.sh installs Chromium (as
root, with apt-get); without either the tests skip, saying so.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.bridge import subscription
from ingest.settings import Settings, describe
from ingest.topics import topic_specs
from usagepipe.cli import build_parser

ROOT = Path(__file__).parents[2]
STACK = ROOT / "deploy" / "production"
COMPOSE = STACK / "compose.yaml"

SERVICES = {
    "kafka-1", "kafka-2", "kafka-3", "timescaledb", "mosquitto", "mosquitto-init",
    "bridge-1", "bridge-2", "consumer-1", "consumer-2", "consumer-3", "registry",
    "insights", "prometheus", "grafana", "init",
}  # fmt: skip
ONE_SHOTS = {"init", "mosquitto-init"}
"""Run once before the others (restart "no"): no health check to give."""

SECRET_FILES = {
    "postgres_password": "pw-0123456789",
    "postgres_dsn": "postgresql://usagepipe:pw-0123456789@timescaledb:5432/usagepipe",
    "mqtt_admin_password": "admin-0123456789",
    "mqtt_bridge_password": "bridge-0123456789",
    "owner_key_secrets": "1 throwaway-owner-key-secret-0123456789abcdef",
    "auth_keys.pem": "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
    "device_ca.crt": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    "device_ca.key": "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
    "grafana_admin_password": "grafana-0123456789",
}
"""Throwaway contents for every secret file the stack names."""


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"],
            check=False,
            capture_output=True,
        )
        found = shutil.which("docker-compose")
    if found is None:
        pytest.skip(
            "docker-compose is not installed and cannot be (needs root and apt-get): "
            "apt-get install -y docker-compose"
        )
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`docker-compose config` of the stack with throwaway secrets and .env: the file
    as Compose reads it (anchors merged, variables filled in)."""
    tmp = tmp_path_factory.mktemp("stack")
    secrets = tmp / "secrets"
    secrets.mkdir()
    for name, content in SECRET_FILES.items():
        (secrets / name).write_text(content + "\n")
    env = (STACK / ".env.example").read_text()
    env = re.sub(r"(?m)^SECRETS_DIR=.*$", f"SECRETS_DIR={secrets}", env)
    env = re.sub(r"(?m)^KAFKA_CLUSTER_ID=.*$", "KAFKA_CLUSTER_ID=MkU3OEVBNTcwNTJENDM2Qk", env)
    (tmp / "env").write_text(env)
    done = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE), "--env-file", str(tmp / "env"), "config"],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("USAGEPIPE_")},
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr  # an unset variable, an ignored key
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def usagepipe_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in stack["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/production/Dockerfile"
    }


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the service's processes get: its USAGEPIPE_* environment and its
    secrets mounted as USAGEPIPE_* (entrypoint.sh), each a real setting."""
    variables = {k: str(v) for k, v in service.get("environment", {}).items()}
    for secret in service.get("secrets", []):
        target = secret.get("target", secret["source"])
        if target.startswith("USAGEPIPE_"):
            variables[target] = SECRET_FILES[secret["source"]]
    known = {var for var, _, _ in describe()}
    unknown = sorted(v for v in variables if v.startswith("USAGEPIPE_") and v not in known)
    assert not unknown, f"not usagepipe settings: {unknown}"
    for var in list(os.environ):
        if var.startswith("USAGEPIPE_"):
            monkeypatch.delenv(var)
    for var, value in variables.items():
        if var.startswith("USAGEPIPE_"):
            monkeypatch.setenv(var, value)
    return Settings()


def commands_of(service: dict[str, Any]) -> list[list[str]]:
    """The usagepipe command lines a service runs (`sh -c "a && b"`: each of them)."""
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in command[2].split("&&")]
    return [command]


def test_docker_compose_accepts_the_stack(stack: dict[str, Any]) -> None:
    assert set(stack["services"]) == SERVICES
    for name, service in stack["services"].items():
        limits = service["deploy"]["resources"]["limits"]
        assert {"cpus", "memory"} <= set(limits), name
        if name in ONE_SHOTS:
            assert service["restart"] == "no", name
        else:
            assert service["healthcheck"]["test"], name
            assert service["restart"] == "unless-stopped", name


def test_every_usagepipe_command_is_real(stack: dict[str, Any]) -> None:
    parser = build_parser()
    services = usagepipe_services(stack)
    assert set(services) == {
        "init", "mosquitto-init", "bridge-1", "bridge-2", "consumer-1", "consumer-2",
        "consumer-3", "registry", "insights",
    }  # fmt: skip
    seen = []
    for name, service in services.items():
        for argv in commands_of(service):
            if name == "mosquitto-init":  # the project's code, run as a script
                assert argv == ["python", "/usr/local/lib/usagepipe/mosquitto_init.py"]
                dockerfile = (STACK / "Dockerfile").read_text()
                assert "COPY deploy/production/mosquitto/init.py " + argv[1] in dockerfile
                continue
            assert argv[0] == "usagepipe", (name, argv)
            args = parser.parse_args(argv[1:])  # a refused one exits: the test fails
            assert callable(args.handler), (name, argv)
            seen.append(" ".join(argv))
    assert "usagepipe db migrate" in seen
    assert "usagepipe kafka init" in seen
    assert "usagepipe registry migrate" in seen


def test_every_setting_is_real_and_validates(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in usagepipe_services(stack).items():
        with monkeypatch.context() as env:
            s = settings_of(service, env)
        assert s.kafka.enable_idempotence, name  # Apache Kafka has InitProducerId
        assert s.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092,kafka-3:9092", name
        assert s.log.format == "json", name
        assert s.auth.issuer is not None and not s.auth.dev_signer, name
        # A file setting under /run/secrets names a secret this service mounts.
        mounted = {m.get("target", m["source"]) for m in service.get("secrets", [])}
        if name.startswith(("consumer", "registry", "init")):
            path = s.enrich.owner_key_secrets_file
            assert path == Path("/run/secrets/owner_key_secrets"), (name, path)
            assert path.name in mounted and s.enrich.owner_key_version == 1, name
        if name in {"registry", "insights"}:
            for path in (s.auth.keys_file, s.registry.ca_cert_file, s.registry.ca_key_file):
                if name == "insights" and path != s.auth.keys_file:
                    continue
                assert path is not None and path.parent == Path("/run/secrets"), (name, path)
                assert path.name in mounted, (name, path)


def test_nothing_secret_is_in_the_file(stack: dict[str, Any]) -> None:
    for name, service in stack["services"].items():
        for var, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|DSN|_KEY\b|__KEY", var) and not var.endswith("FILE"):
                raise AssertionError(f"{name}: {var}={value!r} belongs in a secret file")
    text = COMPOSE.read_text() + (STACK / ".env.example").read_text()
    for value in SECRET_FILES.values():
        assert value not in text
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert {"/deploy/production/.env", "/deploy/production/secrets/"} <= set(ignored)


def test_kafka_replicates_three_times_and_acks_need_two(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    voters = "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"
    for n in (1, 2, 3):
        env = stack["services"][f"kafka-{n}"]["environment"]
        assert env["KAFKA_NODE_ID"] == str(n)
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://kafka-{n}:9092"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    init = settings_of(stack["services"]["init"], monkeypatch)
    specs = topic_specs(init)
    assert {spec.name for spec in specs} == {"telemetry.raw", "telemetry.dlq", "registry.events"}
    for spec in specs:
        # `usagepipe kafka init` asks for 3 replicas and sets no min.insync.replicas of
        # its own, so the brokers' 2 holds for every topic.
        assert spec.replication_factor == 3, spec.name
        assert "min.insync.replicas" not in spec.configs, spec.name
        assert spec.partitions == int(stack["services"]["kafka-1"]["environment"][
            "KAFKA_NUM_PARTITIONS"
        ])  # fmt: skip


def test_two_bridges_share_one_subscription_and_three_consumers_one_group(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = stack["services"]
    bridges = [settings_of(services[f"bridge-{n}"], monkeypatch) for n in (1, 2)]
    filters = {subscription(s) for s in bridges}
    assert filters == {"$share/bridges/devices/+/telemetry"}  # MQTT v5 shared subscription
    assert len({s.bridge.client_id for s in bridges}) == 2  # a persistent session each
    consumers = [settings_of(services[f"consumer-{n}"], monkeypatch) for n in (1, 2, 3)]
    assert len({s.consumer.group_id for s in consumers}) == 1
    # Each consumer can have a partition: more consumers than partitions sit idle.
    assert len(consumers) <= consumers[0].kafka.partitions


def test_health_checks_ask_each_process_its_own_ready_port(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in usagepipe_services(stack).items():
        if name in ONE_SHOTS:
            continue
        s = settings_of(service, monkeypatch)
        host, port = {
            "bridge": (s.bridge.metrics_host, s.bridge.metrics_port),
            "consumer": (s.consumer.metrics_host, s.consumer.metrics_port),
            "registry": (s.registry.http_host, s.registry.http_port),
            "insights": (s.insights.http_host, s.insights.http_port),
        }[name.split("-")[0]]
        assert host == "0.0.0.0", name  # Prometheus scrapes from its own container
        probe = " ".join(service["healthcheck"]["test"])
        assert f"'http://127.0.0.1:{port}/ready'" in probe, (name, probe)


DIRECTIVES = (
    "persistence", "autosave_on_changes", "autosave_interval", "persistent_client_expiration",
    "max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_connections",
    "max_packet_size", "retain_available", "set_tcp_nodelay", "allow_anonymous",
    "require_certificate", "use_identity_as_username", "use_username_as_clientid",
    "tls_version",
)  # fmt: skip


def test_the_production_broker_keeps_the_projects_limits() -> None:
    def directives(path: Path) -> dict[str, str]:
        found = {}
        for line in path.read_text().splitlines():
            words = line.split(maxsplit=1)
            if words and not line.startswith("#") and words[0] in DIRECTIVES:
                found[words[0]] = words[1].strip() if len(words) > 1 else ""
        return found

    local = directives(ROOT / "deploy" / "mosquitto" / "mosquitto.conf")
    production = directives(STACK / "mosquitto" / "mosquitto.conf")
    assert set(local) == set(DIRECTIVES)
    assert production == local


PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def scrape_problems(stack: dict[str, Any], prometheus: Path, env: pytest.MonkeyPatch) -> list[str]:
    """What in `prometheus`'s scrape config does not match the stack: a target that is
    no service or not its metrics port, a long-running usagepipe service not scraped."""
    config = yaml.safe_load(prometheus.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    ports = {}
    for name, service in usagepipe_services(stack).items():
        if name in ONE_SHOTS:
            continue
        s = settings_of(service, env)
        ports[name] = {
            "bridge": s.bridge.metrics_port,
            "consumer": s.consumer.metrics_port,
            "registry": s.registry.http_port,
            "insights": s.insights.http_port,
        }[name.split("-")[0]]
    wanted = {f"{name}:{port}" for name, port in ports.items()}
    problems = [f"{t}: no such service and port" for t in sorted(targets - wanted)]
    problems += [f"{t}: not scraped" for t in sorted(wanted - targets)]
    return problems


def test_prometheus_scrapes_every_usagepipe_service(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS.relative_to(ROOT)} is not in this checkout")
    assert scrape_problems(stack, PROMETHEUS, monkeypatch) == []
