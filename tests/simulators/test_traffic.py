"""The usage-mode fleet plan: deterministic, time-ordered, every fault with its exact fate
(no servers: the consumer's own `parse_telemetry` judges each payload)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from schemas.errors import InvalidTelemetry
from schemas.parse import parse_telemetry
from simulators.faults import FAULT_NAMES, parse_faults
from simulators.ledger import Outcome
from simulators.owners import profile
from simulators.plan import FleetPlan, plan_device, usage_mix, usage_traffic
from simulators.traffic import MALFORMED
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


WEEK = timedelta(days=7)
PINNED_MODES: dict[str, dict[str, Any]] = {
    "plain": {"messages_per_device": 40, "duplicate_rate": 0.1},
    "plain_usage_mix": {"messages_per_device": 40, "mix": "usage"},
    "usage": {"window": WEEK},
    "usage_capped": {"window": WEEK, "messages_per_device": 15},
    "handover": {"window": WEEK, "handover_share": 1.0},
    **{
        name: {
            "window": WEEK,
            "faults": parse_faults(f"{name}={1 if name == 'old_schema' else 0.3}"),
        }
        for name in FAULT_NAMES
    },
    "all": {"window": WEEK, "faults": parse_faults(ALL_FAULTS)},
}

# How many messages, and the sha256 of repr() of each (key, topic, payload, duplicate,
# send_at, outcome, reason, fault) in turn, 24 devices (and, in usage mode, the
# unregistered units) send in each mode for seed 5: a change to how the traffic is
# written (not what it sends) is proven not to change a byte.
PINNED_TRAFFIC: dict[str, tuple[int, str]] = {
    "plain": (1059, "6fc5a1bfa7e46883f95ffd9f5909bfc06bdb3870ea7c35e459b08f3f0607f8e9"),
    "plain_usage_mix": (960, "2754197013d0f99802b0ab45f6e822263ede3a11c5e8d2c7780d717753f0136a"),
    "usage": (746, "1295c69b37ce2fadfdb208145057eedde8bc873ddb90c794672ca5571525084f"),
    "usage_capped": (305, "e64b5fa5bf854878c442fa2743e0323b3add425fbf6b73a7696ef180652b503e"),
    "handover": (734, "faba86ea194ab45aeed9b918c9e2877e934300ff724f147f69b7c7b7db39a8c9"),
    "dup": (980, "35c4863b2c99695001784d5e888154389297caecae21706d9687be835f6f8dd7"),
    "reorder": (746, "ee804548d15beb5f9aa6a3d907602017017595fbf8cebb2b3cb96c768fcc8a1b"),
    "offline": (746, "1291a428e5e8529f520e2ef43ce9bbf905dab01809cb0f70e5099335248958af"),
    "skew": (746, "2c70d92badef0b4585552b5c2f13079875589cde8d11dfdd3b5453cc04e2428a"),
    "reboot": (746, "748bdc54d9bfbc10fe5460f885ebed3364ee9aed063cc121bb982741e2e4d603"),
    "malformed": (746, "703f5772cbfbc8043866319a7f9755107f4361e366fa56b9c48563a2b08ef4f9"),
    "oversize": (746, "baaa3a8f277b03c7549b9d345a29da349a9b00c7efd3171fe44f7046dfdb2dbb"),
    "foreign_topic": (746, "0473d36aa74e951a18e71f539f7274eb80c263c3e52ee7ff772100f193c78bfa"),
    "unregistered": (931, "4311bd5e3cf4ba3e395bd7646bf7ece3de80f0bb1f4b66ac860f9afde3e6c938"),
    "old_schema": (746, "6f4c4041150e50e6a4e08ee260cc7467cca5c831c06fe80ece8d16538bec8787"),
    "all": (880, "7d82583d93a8572135bbf85d0853eed5923eeaedf0f92e549a37b96331192c08"),
}


def _traffic_digest(mode: str) -> tuple[int, str]:
    settings: dict[str, Any] = {"messages_per_device": 0, **PINNED_MODES[mode]}
    plan = FleetPlan(devices=24, seed=5, run_id="r1", start=CLOCK, clock=CLOCK, **settings)
    messages = [m for d in device_ids(plan) for m in plan_device(plan, d)]
    if plan.usage:
        for unit in unregistered_units(plan):
            messages += usage_traffic(plan, unit.device_id, "", registered=False)
    h = hashlib.sha256()
    for m in messages:
        fields = (m.key, m.topic, m.payload, m.duplicate, m.send_at, m.outcome, m.reason, m.fault)
        h.update(repr(fields).encode())
    return len(messages), h.hexdigest()


@pytest.mark.parametrize("mode", sorted(PINNED_MODES))
def test_each_modes_traffic_for_a_fixed_seed_is_pinned(mode: str) -> None:
    assert _traffic_digest(mode) == PINNED_TRAFFIC[mode]
