"""The fault suite's quick scenarios (`bench/faults.py --quick`), on private servers of
their own: each must end with every message of its ledger at its expected fate."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from usagepipe.faults.scenarios import SCENARIOS, Scenario
from usagepipe.faults.servers import FaultServers, Ports
from usagepipe.faults.suite import Fleet, plain

# Not bench/faults.py's ports, so a developer's fault run and the tests never meet.
TEST_PORTS = Ports(kafka=19792, mqtt=11784, mqtt_tls=18783, postgres=5436, proxy=18780)
QUICK = [s for s in SCENARIOS if s.quick]


@pytest.fixture(scope="module")
def servers() -> Iterator[FaultServers]:
    root = Path(tempfile.mkdtemp(prefix="usagepipe-faults-test-"))
    servers = FaultServers(root, TEST_PORTS)
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", QUICK, ids=[s.name for s in QUICK])
async def test_quick_scenario_meets_every_fate(servers: FaultServers, scenario: Scenario) -> None:
    result = await scenario.play(servers, Fleet(devices=30, duration_s=15))
    r = result.reconciliation
    assert r.discrepancies == [], plain(result.verify_output)
    assert result.verify_status == 0
    assert {k: v for k, v in r.expected.items() if v} == {k: v for k, v in r.found.items() if v}
    assert [c for c in result.run.checks if not c[3]] == []
    assert r.expected["stored"] > 100


def test_every_scenario_of_the_issue_is_there() -> None:
    assert [s.name for s in SCENARIOS] == [
        "poison",
        "resend",
        "flood",
        "consumer_kill",
        "bridge_kill",
        "kafka_kill",
        "mosquitto_kill",
        "postgres_stop",
        "slow_postgres",
        "resetting_postgres",
    ]
