"""The usage-mode fleet plan: deterministic, time-ordered, every fault with its exact fate
(no servers: the consumer's own `parse_telemetry` judges each payload)."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from schemas.errors import InvalidTelemetry
from schemas.parse import parse_telemetry
from simulators.faults import FAULT_NAMES, parse_faults
from simulators.ledger import Outcome
from simulators.plan import FleetPlan, plan_device, usage_mix
from simulators.traffic import MALFORMED, profile
from simulators.units import category_of, device_ids, unregistered_units


@pytest.fixture(scope="session", autouse=True)
def running_services() -> None:
    """These tests need no server."""


CLOCK = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def usage_plan(seed: int = 5, faults: str = "", devices: int = 12) -> FleetPlan:
    return FleetPlan(
        devices=devices,
        messages_per_device=0,
        seed=seed,
        run_id="r1",
        window=timedelta(days=3),
        clock=CLOCK,
        faults=parse_faults(faults),
    )


ALL_FAULTS = "all=0.04,malformed=0.12,unregistered=0.2,old_schema=1"


def test_the_same_seed_gives_the_same_bytes_in_the_same_order() -> None:
    first, second = usage_plan(faults=ALL_FAULTS), usage_plan(faults=ALL_FAULTS)
    for device in device_ids(first):
        a, b = plan_device(first, device), plan_device(second, device)
        assert [(m.topic, m.payload, m.outcome) for m in a] == [
            (m.topic, m.payload, m.outcome) for m in b
        ]
    other = usage_plan(seed=6, faults=ALL_FAULTS)
    device = device_ids(first)[0]
    assert plan_device(first, device) != plan_device(other, device_ids(other)[0])


def test_faults_leave_the_usage_itself_alone() -> None:
    """Turning faults on changes which messages break, not what the households do."""
    clean, faulty = usage_plan(), usage_plan(faults="dup=0.2,reorder=0.2,offline=0.05")
    for device in device_ids(clean):
        assert {m.payload for m in plan_device(clean, device)} == {
            m.payload for m in plan_device(faulty, device)
        }


def test_messages_leave_each_device_in_time_order_within_the_window() -> None:
    plan = usage_plan(faults=ALL_FAULTS)
    assert plan.sim_start is not None
    for device in device_ids(plan):
        sends = [m.send_at for m in plan_device(plan, device)]
        assert sends == sorted(sends)  # type: ignore[type-var]
        assert all(plan.sim_start <= s <= CLOCK for s in sends if s is not None)


def test_every_payload_gets_exactly_the_fate_its_ledger_line_expects() -> None:
    plan = usage_plan(faults=ALL_FAULTS)
    seen: Counter[str] = Counter()
    for device in device_ids(plan):
        for msg in plan_device(plan, device):
            seen[(msg.fault or "none").split(":")[0]] += 1
            if msg.fault and msg.fault.startswith("malformed:"):
                seen[msg.fault] += 1
            if msg.outcome is Outcome.REFUSED_BY_BROKER:
                assert msg.fault == "foreign_topic" and device not in msg.topic
                continue
            if msg.fault == "oversize":
                assert len(msg.payload) > plan.max_payload_bytes
                assert msg.reason == "oversize"
                continue
            try:
                parse_telemetry(
                    msg.payload,
                    now=CLOCK,
                    max_future_skew=timedelta(seconds=plan.max_future_skew_s),
                    max_bytes=plan.max_payload_bytes,
                )
                reason = None
            except InvalidTelemetry as exc:
                reason = exc.reason.value
            expected = msg.reason if msg.outcome is Outcome.DEAD_LETTER else None
            assert reason == expected, (msg.fault, msg.payload[:120])
    assert set(seen) >= {*FAULT_NAMES} - {"unregistered"}
    assert {f"malformed:{kind}" for kind in MALFORMED} <= set(seen)
    assert unregistered_units(plan)


def test_reboots_and_firmware_upgrades_start_a_new_boot_at_seq_zero() -> None:
    plan = usage_plan(faults="reboot=0.05", devices=30)
    firmware = 0
    for device in device_ids(plan):
        messages = plan_device(plan, device)
        boots = list(dict.fromkeys(m.key[1] for m in messages))
        for boot in boots:
            seqs = [m.key[2] for m in messages if m.key[1] == boot and not m.duplicate]
            assert seqs == list(range(len(seqs)))
        firmware += sum(b'.firmware"' in m.payload for m in messages)
    assert firmware >= 1


def test_owners_get_korean_regions_tiers_and_consents_in_realistic_shares() -> None:
    plan = usage_plan(devices=600)
    profiles = [profile(plan, d, category_of(d)) for d in device_ids(plan)]
    assert all(re.fullmatch(r"KR-\d{2}", p.region_code) for p in profiles)
    regions = Counter(p.region_code for p in profiles)
    assert regions.most_common(1)[0][0] in ("KR-11", "KR-41")  # Seoul, Gyeonggi
    analytics = sum(p.analytics_consent for p in profiles) / len(profiles)
    marketing = sum(p.marketing_consent for p in profiles) / len(profiles)
    assert 0.75 < analytics < 0.9 and 0.22 < marketing < 0.4
    tiers = Counter(p.membership_tier for p in profiles)
    assert tiers["standard"] > tiers["silver"] > tiers["gold"] > tiers["platinum"] > 0


def test_simulate_options_map_onto_a_usage_plan() -> None:
    from simulators.cli import plan_from_args
    from usagepipe.cli import build_parser

    args = build_parser().parse_args(
        ["simulate", "--devices", "3", "--duration", "60s", "--seed", "9", "--duplicates",
         "0.02", "--faults", "reorder=0.01", "--sim-start", "2026-11-16T00:00+09:00"]
    )  # fmt: skip
    plan = plan_from_args(args)
    assert plan.usage and plan.window == timedelta(days=7)
    assert plan.speed == pytest.approx(7 * 86400 / 60)
    assert (plan.faults.dup, plan.faults.reorder, plan.seed) == (0.02, 0.01, 9)
    assert plan.sim_start == datetime(2026, 11, 15, 15, 0, tzinfo=UTC)
    with pytest.raises(SystemExit, match="unknown fault 'dupe'"):
        plan_from_args(build_parser().parse_args(["simulate", "--faults", "dupe=0.1"]))
    demo = plan_from_args(build_parser().parse_args(["demo"]))
    assert (demo.usage, demo.devices, demo.window, demo.faults.dup) == (
        True, 1200, timedelta(days=28), 0.02,
    )  # fmt: skip
    stress = plan_from_args(build_parser().parse_args(["demo", "--mix", "uniform"]))
    assert (stress.usage, stress.mix, stress.messages_per_device) == (False, "uniform", 100)
    assert build_parser().parse_args(["verify", "run.jsonl"]).timeout == timedelta(seconds=60)


def test_a_plain_plan_with_the_usage_mix_draws_schemas_in_the_usage_models_shares() -> None:
    plain = FleetPlan(devices=12, messages_per_device=3000, seed=3, mix="usage")
    uniform = FleetPlan(devices=12, messages_per_device=3000, seed=3)
    for plan, firmware_share in ((plain, 0.01), (uniform, 0.1)):
        for device in device_ids(plan):
            names, weights = usage_mix(category_of(device))
            schemas = Counter(orjson.loads(m.payload)["schema"] for m in plan_device(plan, device))
            assert sum(schemas.values()) == 3000
            firmware = schemas[f"{category_of(device)}.firmware"] / 3000
            if plan is plain:
                assert set(schemas) <= set(names)
                assert firmware < firmware_share
                top = names[weights.index(max(weights))]
                assert schemas.most_common(1)[0][0] == top
            else:
                assert firmware > firmware_share
