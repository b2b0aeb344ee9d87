"""What one simulated device sends over a window of simulated time, faults included.

`device_traffic` turns a device of a `FleetPlan` (with a `window`) into its messages in
the order the device sends them, each with `send_at`, the simulated time it leaves the
device, and the fate the pipeline must give it (`simulators.ledger.Outcome`). The
fleet merges every device's traffic by `send_at` and plays it.

Everything follows from the plan, the seed and the device id, through three random
generators per device, so turning faults on or off never changes the usage itself:

- usage: the household's events (`simulators.usage.device_days`) and their bodies;
- firmware: the version the device starts with (by model cohort) and whether, and
  when, it upgrades during the window (a `*.firmware` event, then a reboot);
- owners: the household that owns the device (`simulators.owners.profile`) and, for a
  few percent of units, the one it is resold or given to inside the window
  (`handover`, `buyer_profile` there), whose habits the usage follows from then on;
- faults: which messages are hit by which fault (`simulators.faults`), and how.

Fault semantics (rates are per message unless noted):

    dup            the message again, byte for byte, right after it   duplicate
    reorder        the message held back and sent after the next one  stored
    offline        30 min..8 h of sim time offline; what happens then
                   is buffered and sent in one burst on reconnect     stored
    skew           the device clock behind by 2 min..6 h (half)       stored
                   or ahead by 1..30 days (half)                      dead letter
                                                                      event_time_in_future
    reboot         a new boot id before the message, seq back to 0    stored
    malformed      one of six broken payloads, each with its reason   dead letter (see MALFORMED)
    oversize       the message padded past bridge.max_payload_bytes   dead letter oversize
    foreign_topic  published to the next device's topic              refused_by_broker (PUBACK 0x87)
    unregistered   per device: an extra unit never registered        refused_by_broker (CONNACK)
    old_schema     per device: old firmware sending washer.cycle v1  stored (upgraded)
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from schemas.catalog import current_version
from schemas.envelope import envelope_dict, telemetry_topic
from schemas.errors import Reason
from schemas.examples import example_v1_body
from simulators.ledger import Outcome
from simulators.owners import FIRMWARE, Profile, buyer_profile, handover, profile
from simulators.usage import device_days

if TYPE_CHECKING:
    from simulators.plan import FleetPlan

UPGRADES_PER_WEEK = 0.15
"""Chance that a unit not on its cohort's newest firmware upgrades in a week."""

MALFORMED: dict[str, Reason] = {
    "truncated_json": Reason.INVALID_JSON,
    "invalid_utf8": Reason.INVALID_UTF8,
    "wrong_type": Reason.SCHEMA_VIOLATION,
    "nan": Reason.NON_FINITE_NUMBER,
    "unknown_schema": Reason.UNKNOWN_SCHEMA,
    "unknown_version": Reason.UNKNOWN_SCHEMA_VERSION,
}
"""The malformed payloads the `malformed` fault sends, and the reason each must get."""


@dataclass(frozen=True, slots=True)
class Message:
    """One planned publish and its expected fate."""

    key: tuple[str, str, int]
    topic: str
    payload: bytes
    duplicate: bool
    send_at: datetime | None = None
    """Simulated time the device sends it (None: as soon as possible)."""
    outcome: Outcome = Outcome.STORED
    reason: str | None = None
    fault: str | None = None
    """The fault that made this message what it is, if any."""


def boot_id(plan: FleetPlan, device_id: str, boot: int) -> str:
    return hashlib.blake2s(f"{plan.run_id}:{device_id}:{boot}".encode(), digest_size=6).hexdigest()


def unregistered_count(plan: FleetPlan) -> int:
    """How many never-registered units join the fleet (the `unregistered` fault)."""
    rate = plan.faults.unregistered
    rng = random.Random(f"{plan.seed}:unregistered")
    return sum(1 for _ in range(plan.devices) if rng.random() < rate)


def device_traffic(
    plan: FleetPlan,
    device_id: str,
    category: str,
    *,
    topic_prefix: str = "",
    neighbour: str | None = None,
    registered: bool = True,
) -> Iterator[Message]:
    """Every message the device sends in `plan`'s window, in send order.

    `neighbour` is the device whose topic a `foreign_topic` message goes to.
    An unregistered device's messages are all `refused_by_broker`.
    """
    prof = profile(plan, device_id, category)
    fault_rng = random.Random(f"{plan.seed}:{device_id}:faults")
    topic = telemetry_topic(device_id, topic_prefix)
    sender = _Sender(
        plan,
        fault_rng,
        device_id=device_id,
        category=category,
        topic=topic,
        foreign=telemetry_topic(neighbour, topic_prefix) if neighbour else None,
        registered=registered,
        old_schema=fault_rng.random() < plan.faults.old_schema,
    )
    events = _events(plan, device_id, category, prof)
    if registered:
        yield _last_install(plan, device_id, category, prof, topic)
    cap = plan.messages_per_device or None
    for made, (at, schema_name, body) in enumerate(events):
        if cap is not None and made >= cap:
            break
        yield from sender.send(sender.message(at, schema_name, body), at)
    yield from sender.finish()


def _events(
    plan: FleetPlan, device_id: str, category: str, prof: Profile
) -> Iterator[tuple[datetime, str, dict[str, Any]]]:
    """The device's events over the window, in time order: its household's usage and a
    firmware upgrade, if one falls inside it.

    A unit that changes hands is used by the buyer's household from then on (the same
    usage generator, continued: the buyer's first day is made afresh)."""
    assert plan.window is not None and plan.sim_start is not None
    start = plan.sim_start
    end = start + plan.window
    usage_rng = random.Random(f"{plan.seed}:{device_id}")
    firmware_rng = random.Random(f"{plan.seed}:{device_id}:firmware")
    passes = handover(plan, device_id)
    events: Iterator[tuple[datetime, str, dict[str, Any]]]
    if passes is not None and start < passes.at < end:
        buyer = buyer_profile(plan, device_id, category).household
        events = itertools.chain(
            device_days(category, prof.household, usage_rng, start, passes.at),
            device_days(category, buyer, usage_rng, passes.at, end),
        )
    else:
        events = device_days(category, prof.household, usage_rng, start, end)
    upgrade = _upgrade(prof, category, firmware_rng, start, plan.window)
    if upgrade is not None:
        events = heapq.merge(events, [upgrade], key=lambda e: e[0])
    return events


class _Sender:
    """One device over the window: its boot and seq, and the messages it holds back
    (while offline, or reordered behind the next one).

    Every fault draws from the one `rng`, in the order `message` then `send` take them
    for each event, then the next event's: that order is what a seed reproduces."""

    def __init__(
        self,
        plan: FleetPlan,
        rng: random.Random,
        *,
        device_id: str,
        category: str,
        topic: str,
        foreign: str | None,
        registered: bool,
        old_schema: bool,
    ) -> None:
        assert plan.window is not None and plan.sim_start is not None
        self.plan, self.rng = plan, rng
        self.device_id, self.category, self.registered = device_id, category, registered
        self.topic, self.foreign = topic, foreign
        self.old_schema = old_schema
        self.end = plan.sim_start + plan.window
        self.boot, self.seq = 0, 0
        self.boot_of = boot_id(plan, device_id, 0)
        self.reboot_next = False
        self.offline_until: datetime | None = None
        self.held: list[Message] = []  # sent when the offline period ends
        self.behind: list[Message] = []  # a reordered message, sent after the next one
        self.last_at = plan.sim_start

    def message(self, at: datetime, schema_name: str, body: dict[str, Any]) -> Message:
        """The event's message, on a new boot if a reboot comes before it."""
        faults = self.plan.faults
        fault: str | None = None
        if self.reboot_next or (faults.reboot and self.rng.random() < faults.reboot):
            fault = None if self.reboot_next else "reboot"
            self.boot, self.seq = self.boot + 1, 0
            self.boot_of = boot_id(self.plan, self.device_id, self.boot)
            self.reboot_next = False
        if schema_name.endswith(".firmware") and body.get("outcome") == "installed":
            self.reboot_next = True  # a new firmware boots the device afresh
        version = None
        if self.old_schema and schema_name == "washer.cycle":
            # Old firmware: the event in the v1 wire format (its own generator, so the
            # usage that follows is the same as without the fault).
            version, body = 1, example_v1_body(schema_name, self.rng)
            fault = fault or "old_schema"
        msg = _message(
            self.plan, self.rng, device_id=self.device_id, category=self.category,
            boot=self.boot_of, seq=self.seq, at=at, schema_name=schema_name, body=body,
            version=version, topic=self.topic, foreign=self.foreign, fault=fault,
            registered=self.registered,
        )  # fmt: skip
        self.seq += 1
        return msg

    def send(self, msg: Message, at: datetime) -> Iterator[Message]:
        """What leaves the device when the event of `msg` happens at `at`: nothing while
        offline or while `msg` is held back, else `msg` (and its duplicate), after the
        burst of an offline period that has ended, before a reordered message."""
        faults = self.plan.faults
        # Offline: this event happens while the device cannot reach the broker.
        if self.offline_until is not None and at >= self.offline_until:
            yield from _burst(self.held, self.offline_until)
            self.held, self.last_at, self.offline_until = [], self.offline_until, None
        if self.offline_until is None and faults.offline and self.rng.random() < faults.offline:
            self.offline_until = min(at + timedelta(minutes=self.rng.uniform(30, 480)), self.end)
        if self.offline_until is not None:
            self.held.append(_tag(msg, "offline"))
            self.held.extend(_dup(msg, faults.dup, self.rng))
            return

        out = [msg, *_dup(msg, faults.dup, self.rng)]
        if self.behind:
            out += [_with(m, at) for m in self.behind]
            self.behind = []
        elif faults.reorder and self.rng.random() < faults.reorder:
            self.behind = [_tag(m, "reorder") for m in out]  # with its duplicate, if any
            return
        self.last_at = at
        yield from out

    def finish(self) -> Iterator[Message]:
        """What is still held back when the window ends."""
        if self.behind:
            yield from (_with(m, self.last_at) for m in self.behind)
        if self.held and self.offline_until is not None:
            yield from _burst(self.held, self.offline_until)


def _last_install(
    plan: FleetPlan, device_id: str, category: str, prof: Profile, topic: str
) -> Message:
    """The installation of the firmware the device runs, from the overnight update wave
    of the 1 to 9 days before the window (after the unit was registered:
    `simulators.history`), sent first, on the boot before the window's.

    A unit's firmware is history like its purchase: without this event the pipeline
    would know a device's firmware only from an upgrade inside the window, and the
    reports by model and firmware would find most devices' firmware unknown. Its own
    generator, and no fault touches it, so the window's traffic stays the same."""
    assert plan.sim_start is not None
    rng = random.Random(f"{plan.seed}:{device_id}:installed")
    versions = [v for v, _ in FIRMWARE[category]]
    at = (plan.sim_start - timedelta(days=rng.randint(1, 9))).replace(
        hour=rng.randint(2, 4), minute=rng.randint(0, 59), second=rng.randint(0, 59),
        microsecond=0,
    )  # fmt: skip
    index = versions.index(prof.firmware)
    major, minor, build = prof.firmware.split(".")
    previous = versions[index - 1] if index else f"{major}.{minor}.{int(build) - 41}"
    body = {"from_version": previous, "to_version": prof.firmware, "outcome": "installed",
            "trigger": "schedule"}  # fmt: skip
    boot = boot_id(plan, device_id, -1)
    schema_name = f"{category}.firmware"
    doc = envelope_dict(
        device_id=device_id, boot_id=boot, seq=0, event_time=at, schema_name=schema_name,
        schema_version=current_version(schema_name), body=body,
    )  # fmt: skip
    return Message((device_id, boot, 0), topic, orjson.dumps(doc), False, plan.sim_start)


def _upgrade(
    prof: Profile, category: str, rng: random.Random, start: datetime, window: timedelta
) -> tuple[datetime, str, dict[str, Any]] | None:
    versions = [v for v, _ in FIRMWARE[category]]
    chance = min(1.0, UPGRADES_PER_WEEK * window / timedelta(days=7))
    if prof.firmware == versions[-1] or rng.random() >= chance:
        return None
    at = start + timedelta(seconds=rng.uniform(0, window.total_seconds()))
    at = at.replace(hour=rng.randint(2, 4), minute=rng.randint(0, 59))  # overnight
    if at < start:
        at += timedelta(days=1)
    if at >= start + window:
        return None
    body = {
        "from_version": prof.firmware,
        "to_version": versions[versions.index(prof.firmware) + 1],
        "outcome": "installed",
        "trigger": rng.choice(("schedule", "schedule", "app_remote")),
    }
    return at, f"{category}.firmware", body


def _message(
    plan: FleetPlan,
    rng: random.Random,
    *,
    device_id: str,
    category: str,
    boot: str,
    seq: int,
    at: datetime,
    schema_name: str,
    body: dict[str, Any],
    version: int | None,
    topic: str,
    foreign: str | None,
    fault: str | None,
    registered: bool,
) -> Message:
    """The message for one event, hit by at most one payload fault."""
    faults = plan.faults
    key = (device_id, boot, seq)
    event_time = at
    outcome, reason = Outcome.STORED, None
    hit = ""
    # One draw per fault, always, so one fault's rate does not shift another's choices.
    draws = {name: rng.random() for name in ("skew", "malformed", "oversize", "foreign_topic")}
    for name in ("malformed", "oversize", "foreign_topic", "skew"):
        if draws[name] < getattr(faults, name):
            hit = name
            break
    if hit == "skew":
        if rng.random() < 0.5:
            event_time = at - timedelta(minutes=rng.uniform(2, 360))
        else:
            # Dated from the end of the day the plan is made, so the plan is the same
            # all day long, and the clock is ahead of any real time the run reaches.
            anchor = plan.clock.replace(hour=0, minute=0, second=0, microsecond=0)
            event_time = max(at, anchor + timedelta(days=1)) + timedelta(days=rng.uniform(1, 30))
            outcome, reason = Outcome.DEAD_LETTER, Reason.EVENT_TIME_IN_FUTURE.value
    doc = envelope_dict(
        device_id=device_id,
        boot_id=boot,
        seq=seq,
        event_time=event_time,
        schema_name=schema_name,
        schema_version=version or current_version(schema_name),
        body=body,
    )
    payload = orjson.dumps(doc)
    if hit == "malformed":
        kind = rng.choice(sorted(MALFORMED))
        payload = _malformed(kind, doc, payload, category)
        outcome, reason = Outcome.DEAD_LETTER, MALFORMED[kind].value
        hit = f"malformed:{kind}"
    elif hit == "oversize":
        payload += b" " * (plan.max_payload_bytes + 1 - len(payload))  # still valid JSON
        outcome, reason = Outcome.DEAD_LETTER, Reason.OVERSIZE.value
    elif hit == "foreign_topic" and foreign is not None:
        topic = foreign
        outcome = Outcome.REFUSED_BY_BROKER
    elif hit == "foreign_topic":
        hit = ""
    if not registered:
        outcome, reason, hit = Outcome.REFUSED_BY_BROKER, None, "unregistered"
    return Message(key, topic, payload, False, at, outcome, reason, hit or fault)


def _malformed(kind: str, doc: dict[str, Any], payload: bytes, category: str) -> bytes:
    if kind == "truncated_json":
        return payload[: len(payload) // 2]
    if kind == "invalid_utf8":
        return payload.replace(b'"boot_id":"', b'"boot_id":"\xff', 1)
    if kind == "wrong_type":
        return orjson.dumps({**doc, "seq": str(doc["seq"])})
    if kind == "nan":
        return payload.replace(b'"seq":%d' % doc["seq"], b'"seq":NaN', 1)
    if kind == "unknown_schema":
        return orjson.dumps({**doc, "schema": f"{category}.teleport"})
    if kind == "unknown_version":
        return orjson.dumps({**doc, "schema_version": 99})
    raise AssertionError(kind)


def _dup(msg: Message, rate: float, rng: random.Random) -> list[Message]:
    """A byte-for-byte resend of a message the pipeline stores, at `rate`."""
    if msg.outcome is not Outcome.STORED or not rate or rng.random() >= rate:
        return []
    return [
        Message(msg.key, msg.topic, msg.payload, True, msg.send_at, Outcome.DUPLICATE, None, "dup")
    ]


def _tag(msg: Message, fault: str) -> Message:
    return Message(
        msg.key, msg.topic, msg.payload, msg.duplicate, msg.send_at, msg.outcome, msg.reason,
        msg.fault or fault,
    )  # fmt: skip


def _with(msg: Message, send_at: datetime) -> Message:
    return Message(
        msg.key, msg.topic, msg.payload, msg.duplicate, send_at, msg.outcome, msg.reason, msg.fault
    )


def _burst(held: list[Message], at: datetime) -> Iterator[Message]:
    for msg in held:
        yield _with(msg, at)
