"""The deploy stack's alert rules and dashboards, tested with real parts.

`promtool` checks the alert rules (`deploy/prometheus/alerts.yml`) and runs their unit
tests (`alerts_test.yml`: each alert a firing and a quiet case). Then Debian's
Prometheus, started here on a private port with a copy of the deploy scrape config
whose targets are a real bridge, consumer, registry API and insights API of this
test's own (ports 19351-19354), scrapes them after a few messages (one of them a dead
letter at each stage) went through, and every query the alerts and dashboards make is
asked of it:

- every Grafana panel's expression (`$__rate_interval` as 1m) returns a series;
- every metric selector inside an alert rule's or a panel's expression returns a
  series. An alert's expression itself need not fire (a healthy pipeline fires none),
  so for the rules this is the criterion: each selector they compare has data, and the
  whole expression is valid PromQL that Prometheus evaluates (its rule health "ok").

Prometheus comes from Debian's `prometheus` package: `deploy/local/env.sh dev` installs
it as root; elsewhere these tests are skipped, saying so. Never the package's service:
the binary is run here, on port 19390, its data in the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from devices.api import create_app as devices_app
from ingest.metrics import serve_metrics
from ingest.settings import BridgeSettings, ConsumerSettings, InsightsSettings, Settings
from insights.api import create_app as insights_app_for
from simulators.plan import FleetPlan, plan_device
from simulators.provision import open_registry
from simulators.units import device_ids
from tests import tokens
from tests.http_contract import served
from tests.pipeline import pipeline, publish_payloads, wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# The private ports of this test (never the defaults other processes may hold).
PROMETHEUS_PORT = 19390
BRIDGE_METRICS_PORT = 19351
CONSUMER_METRICS_PORT = 19352
REGISTRY_PORT = 19353
INSIGHTS_PORT = 19354

VERIFIER = tokens.verifier()

ALERTS = {
    "ConsumerLagGrowing",
    "BridgeDown",
    "NoBridgeUp",
    "ConsumerDown",
    "NoConsumerUp",
    "DeadLettersSpiking",
    "BridgeDeadLettersSpiking",
    "RollupRefreshNotRun",
    "ErasureNotApplied",
}


def tool(name: str) -> str:
    """The path of Debian's `name` (package `prometheus`), else skip saying why."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed: Debian's prometheus package brings it "
            "(deploy/local/env.sh dev installs it as root: apt-get install -y prometheus)"
        )
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
        for rule in group["rules"]
    ]


def panel_exprs() -> dict[str, list[str]]:
    """Every target expression of each dashboard, by file name."""
    found: dict[str, list[str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        found[path.name] = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return found


def grafana_query(expr: str) -> str:
    """A panel's expression as Grafana sends it: its interval variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")


_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[str]:
    """The instant-vector selectors in a PromQL expression (metric name and matchers),
    their ranges dropped: what must have data for the expression to mean anything."""
    text = _CLAUSE.sub(" ", re.sub(r"\[[^\]]*\]", "", expr))
    found: list[str] = []
    for match in _NAME.finditer(text):
        name, matchers = match.group(1), match.group(2) or ""
        after = text[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or (not matchers and after.startswith("(")):
            continue  # an operator, or a function or aggregation called
        found.append(name + matchers)
    return found


def test_selectors_are_found_in_each_kind_of_expression() -> None:
    assert selectors(
        'histogram_quantile(0.99, sum by (le, stage) (rate(x_bucket{stage="store"}[1m])))'
    ) == ['x_bucket{stage="store"}']
    assert selectors("time() - max by (g) (a) > 3 * max by (g) (b)") == ["a", "b"]
    assert selectors('absent(up{job="bridge"} == 1)') == ['up{job="bridge"}']
    assert selectors("deriv(lag[10m]) > 0 and lag > 1000 or vector(0)") == ["lag", "lag"]


# -- promtool ---------------------------------------------------------------------------


def test_promtool_checks_the_alert_rules() -> None:
    promtool = tool("promtool")
    done = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_runs_each_alerts_firing_and_quiet_case() -> None:
    promtool = tool("promtool")
    done = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_rule_has_a_firing_and_a_quiet_case() -> None:
    assert {rule["alert"] for rule in alert_rules()} == ALERTS
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS


# -- the deploy files ---------------------------------------------------------------------


def test_the_scrape_config_names_the_stacks_services_on_the_default_ports() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    bridge, consumer = BridgeSettings().metrics_port, ConsumerSettings().metrics_port
    registry, insights = Settings().registry.http_port, InsightsSettings().http_port
    assert targets == {
        "bridge": [f"bridge-1:{bridge}", f"bridge-2:{bridge}"],
        "consumer": [f"consumer-{n}:{consumer}" for n in (1, 2, 3)],
        "registry": [f"registry:{registry}"],
        "insights": [f"insights:{insights}"],
    }


def test_grafana_provisions_the_datasource_the_dashboards_name() -> None:
    [source] = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    [provider] = load_yaml(PROVISIONING / "dashboards" / "usagepipe.yml")["providers"]
    assert (provider["type"], provider["options"]["path"]) == (
        "file",
        "/var/lib/grafana/dashboards",
    )
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == [
        "broker.json",
        "database.json",
        "pipeline.json",
    ]
    uids: set[str] = set()
    for path in DASHBOARDS.glob("*.json"):
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        assert board["panels"], path.name
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
            assert panel["targets"], f"{path.name}: {panel['title']}"
    assert len(uids) == 3


# -- Prometheus against a running bridge and consumer -------------------------------------


def scrape_config(tmp: Path) -> Path:
    """The deploy scrape config, each job's targets replaced by this test's process
    (bridge, consumer, registry API, insights API), scraped and evaluated every second;
    with a copy of the alert rules beside it."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    ours = {
        "bridge": BRIDGE_METRICS_PORT,
        "consumer": CONSUMER_METRICS_PORT,
        "registry": REGISTRY_PORT,
        "insights": INSIGHTS_PORT,
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(ours)
    config["scrape_configs"] = [
        {**job, "static_configs": [{"targets": [f"127.0.0.1:{ours[job['job_name']]}"]}]}
        for job in config["scrape_configs"]
    ]
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp / "alerts.yml")
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def prometheus(tmp: Path) -> Iterator[str]:
    """Debian's Prometheus on 127.0.0.1:19390 with `scrape_config`; stopped at the end.
    Yields its base URL."""
    binary = tool("prometheus")
    config = scrape_config(tmp)
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{PROMETHEUS_PORT}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    """An instant query through /api/v1/query; its result's series."""
    answer = await client.get("/api/v1/query", params={"query": expr})
    body = answer.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def value(client: httpx.AsyncClient, expr: str) -> float | None:
    """The one value `expr` gives, None while it gives none."""
    result = await query(client, expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


async def without_series(client: httpx.AsyncClient) -> list[str]:
    """Every query of the alerts and dashboards that gives no series (see the module
    docstring), named by where it comes from."""
    missing: list[str] = []
    for rule in alert_rules():
        await query(client, rule["expr"])  # valid PromQL, whether or not it fires
        for selector in selectors(rule["expr"]):
            if not await query(client, selector):
                missing.append(f"alert {rule['alert']}: {selector}")
    for board, exprs in panel_exprs().items():
        for expr in exprs:
            promql = grafana_query(expr)
            if not await query(client, promql):
                missing.append(f"{board}: {promql}")
            for selector in selectors(promql):
                if not await query(client, selector):
                    missing.append(f"{board}: {selector} in {promql}")
    return missing


@contextlib.asynccontextmanager
async def metrics_on(registry: CollectorRegistry, port: int) -> AsyncIterator[None]:
    with serve_metrics(registry, port):
        yield


@contextlib.asynccontextmanager
async def apis(s: Settings) -> AsyncIterator[None]:
    """The registry and insights APIs on their private ports, as their `serve` commands
    build them, each asked once for /health so that request series exist beyond the
    scrapes'."""
    async with open_registry(s) as registry:
        registry_app = devices_app(lambda: contextlib.nullcontext(registry), verifier=VERIFIER)
        insights_app = insights_app_for(
            s.postgres, s.insights, s.registry.db_schema, verifier=VERIFIER
        )
        async with (
            served(registry_app, REGISTRY_PORT) as registry_url,
            served(insights_app, INSIGHTS_PORT) as insights_url,
            httpx.AsyncClient() as client,
        ):
            for url in (registry_url, insights_url):
                assert (await client.get(f"{url}/health")).status_code == 200
            yield


async def test_every_alert_and_panel_query_returns_series_from_a_running_pipeline(
    settings: Settings, tmp_path: Path
) -> None:
    tool("prometheus")
    s = settings.model_copy(
        update={
            "consumer": settings.consumer.model_copy(update={"lag_interval_s": 1.0}),
            "postgres": settings.postgres.model_copy(update={"rollup_refresh_s": 1.0}),
        }
    )
    plan = FleetPlan(devices=2, messages_per_device=4, seed=61)
    device, other_device = device_ids(plan)
    good = plan_device(plan, device, s.mqtt.topic_prefix)
    topic = good[0].topic
    # A message of another device on this device's topic (the bridge dead-letters it,
    # device_id_mismatch) and one cut short (the consumer's, invalid_json).
    mismatch = plan_device(plan, other_device, s.mqtt.topic_prefix)[0].payload
    cut = orjson.dumps({**orjson.loads(good[0].payload), "seq": 100})[:-9]
    payloads = [m.payload for m in good[:2]] + [mismatch, cut] + [m.payload for m in good[2:]]

    bridge_metrics, consumer_metrics = CollectorRegistry(), CollectorRegistry()
    async with (
        pipeline(s, bridge_metrics, consumer_registry=consumer_metrics) as run,
        metrics_on(bridge_metrics, BRIDGE_METRICS_PORT),
        metrics_on(consumer_metrics, CONSUMER_METRICS_PORT),
    ):
        await publish_payloads(s, device, topic, payloads)
        await wait_for(lambda: run.consumer.report.stored == len(good), "the 4 good messages")
        await wait_for(lambda: run.bridge.report.acked == len(payloads), "6 PUBACKs")
        async with apis(s):
            await check_with_prometheus(s, tmp_path)


async def check_with_prometheus(s: Settings, tmp_path: Path) -> None:
    """Prometheus over the running processes: the exact counts, every query with series,
    every rule evaluated."""
    wanted = {
        'sum(up{job="bridge"})': 1.0,
        'sum(up{job="consumer"})': 1.0,
        'sum(up{job="registry"})': 1.0,
        'sum(up{job="insights"})': 1.0,
        'count(usagepipe_http_requests_total{route="/health",status="200"})': 2.0,
        "sum(usagepipe_bridge_acked_total)": 6.0,
        'sum(usagepipe_bridge_rejected_total{reason="device_id_mismatch"})': 1.0,
        "sum(usagepipe_consumer_stored_total)": 4.0,
        'sum(usagepipe_consumer_dead_letters_total{reason="invalid_json"})': 1.0,
        f'count(usagepipe_consumer_lag_messages{{topic="{s.kafka.raw_topic}"}})': 3.0,
        "count(usagepipe_consumer_rollup_refresh_buckets_total)": 2.0,
    }
    got: dict[str, float | None] = {}
    missing: list[str] = []
    rules: dict[str, str] = {}
    with prometheus(tmp_path) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            # Scrapes and rule evaluations come every second; a give-up bound, well
            # inside the test's timeout, not a timing assertion.
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    got = {expr: await value(client, expr) for expr in wanted}
                    missing = await without_series(client)
                    groups = (await client.get("/api/v1/rules")).json()["data"]["groups"]
                    rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
                    if got == wanted and not missing and set(rules.values()) == {"ok"}:
                        break
    assert got == wanted
    assert missing == []
    assert rules == {name: "ok" for name in ALERTS}
