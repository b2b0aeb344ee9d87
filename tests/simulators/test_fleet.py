"""The usage-mode fleet end to end: every fault at once through the real broker, bridge,
Kafka and consumer, reconciled exactly by `usagepipe verify`; and verify catching a
row deleted or added behind the pipeline's back."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from ingest.settings import Settings
from simulators.faults import FAULT_NAMES, parse_faults
from simulators.ledger import LedgerWriter, Outcome, read_ledger
from simulators.plan import FleetPlan
from simulators.verify import run_verify, verify
from tests.pipeline import pipeline, publish

# Small fleet, high rates: every fault and every malformed kind occurs (seed chosen so).
FAULTS = "all=0.04,malformed=0.12,unregistered=0.2,old_schema=1"


def plan(settings: Settings) -> FleetPlan:
    return FleetPlan(
        devices=12,
        messages_per_device=0,
        seed=5,
        run_id="e2e",
        window=timedelta(days=3),
        faults=parse_faults(FAULTS),
        max_future_skew_s=float(settings.consumer.max_future_skew_s),
        max_payload_bytes=settings.bridge.max_payload_bytes,
    )


async def test_every_fault_reconciles_exactly_and_verify_catches_tampering(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "run.jsonl"
    fleet_plan = plan(settings)
    async with pipeline(settings):
        with LedgerWriter(ledger) as writer:
            report = await publish(settings, fleet_plan, writer)
        assert report.surprises == []
        assert set(report.faults) == set(FAULT_NAMES)
        result = await verify(settings, ledger, timeout_s=60)

    entries = list(read_ledger(ledger))
    assert len(entries) == report.planned
    assert result.discrepancies == []
    expected = Counter(e.outcome.value for e in entries)
    assert all(expected[o.value] > 0 for o in Outcome)
    for name, want, found in result.table():
        assert found == want, name
    refused = sum(e.outcome is Outcome.REFUSED_BY_BROKER for e in entries)
    unregistered = sum(e.fault == "unregistered" for e in entries)
    # Each foreign-topic publish got a refusing PUBACK; each unregistered unit a CONNACK.
    assert report.refused == refused - unregistered + len(
        {e.device_id for e in entries if e.fault == "unregistered"}
    )

    # Tamper with the table: delete one stored row, add one nobody sent.
    stored = next(e for e in entries if e.outcome is Outcome.STORED)
    table = settings.postgres.table
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        columns = [
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = $1 ORDER BY ordinal_position",
                table,
            )
        ]
        other = next(e for e in entries if e.outcome is Outcome.STORED and e.key != stored.key)
        picked = ", ".join("seq + 1000000" if c == "seq" else c for c in columns)
        await conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT {picked} FROM {table}"
            " WHERE device_id = $1 AND boot_id = $2 AND seq = $3",
            *other.key,
        )
        await conn.execute(
            f"DELETE FROM {table} WHERE device_id = $1 AND boot_id = $2 AND seq = $3",
            *stored.key,
        )
    finally:
        await conn.close()

    capsys.readouterr()
    code = await asyncio.to_thread(run_verify, settings, str(ledger), 2.0)
    out = capsys.readouterr().out
    assert code == 1
    name = "/".join(map(str, stored.key))
    added = f"{other.device_id}/{other.boot_id}/{other.seq + 1000000}"
    assert f"missing row {name} (expected stored)" in out
    assert f"unexpected row {added} (1 rows)" in out
    assert "FAILED: 2 discrepancies" in out
