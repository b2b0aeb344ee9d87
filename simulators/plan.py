"""What a fleet sends: the plan (`FleetPlan`) and each device's messages under it.

A plain plan gives each device `messages_per_device` messages a few seconds apart,
their schemas drawn in the plan's `mix`; a usage plan (one with a `window`) plays the
usage model over a span of simulated time, faults included (`simulators.traffic`).

Everything a device sends follows from the seed and the run id, so a run can be
repeated message for message; the run id goes into the boot ids, so two runs with the
same seed are different boots of the same devices and do not collide in the store.

A share of messages is sent twice, byte for byte (`duplicate_rate`), as a device does
when it misses a PUBACK: the pipeline must store each key once.

A share of messages (`trace_share`) carries a W3C `traceparent` MQTT v5 user property,
sampled, as a device that traces would send (`ingest.trace`). Its trace id follows
from the run id and the message's key (`traceparent`), so QA can say which trace id a
message had and find it in the consumer's log; a resend carries the same one.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import orjson

from schemas.catalog import SCHEMA_NAMES, current_version
from schemas.envelope import envelope_dict, telemetry_topic
from schemas.examples import example_body
from simulators.faults import FaultRates
from simulators.ledger import Outcome
from simulators.owners import KST
from simulators.traffic import Message, device_traffic
from simulators.units import CATEGORY_PREFIX, category_of, device_ids

_FLEET_NAME = re.compile(r"^[A-Za-z0-9]{1,16}$")


Mix = Literal["uniform", "usage"]


@dataclass(frozen=True)
class FleetPlan:
    """What the fleet sends: how many devices, how many messages each, how often twice."""

    devices: int
    messages_per_device: int
    seed: int = 7
    run_id: str = "run"
    duplicate_rate: float = 0.0
    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(hours=1))
    """Event time of each device's first message; later ones follow a few seconds apart."""
    rate: float = 0.0
    """Messages per second for the whole fleet; 0 sends as fast as the broker takes them."""
    mix: Mix = "uniform"
    """Plain mode: how each message's schema is drawn from its category's. "uniform":
    every schema alike (a sixth of a washer's messages are firmware installations, a
    stress on the registry). "usage": in the shares the usage model produces over a year
    (`usage_mix`): door openings by the dozen a day, firmware a few times a year."""
    fleet: str = "sim"
    """Names this fleet's units (it starts their serial numbers): two fleets that must
    not share devices on one broker and registry use different names."""
    window: timedelta | None = None
    """Usage mode: the span of simulated time the fleet plays, events from the usage
    model (`simulators.traffic`); `messages_per_device` then caps each device (0: no
    cap). None: the plain mode, `messages_per_device` messages a few seconds apart."""
    sim_start: datetime | None = None
    """Usage mode: where the window starts (default: `clock` minus the window)."""
    speed: float = 0.0
    """Usage mode: simulated seconds per wall-clock second; 0 plays as fast as it can."""
    faults: FaultRates = field(default_factory=FaultRates)
    clock: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    """The real time the plan is made: events are never sent dated after it (plus the
    allowed skew) except by the `skew` fault, which dates its messages days after it."""
    max_future_skew_s: float = 300.0
    """The consumer's allowed skew; the fleet holds back events not yet within it."""
    max_payload_bytes: int = 65536
    """The bridge's size limit, which `oversize` messages exceed."""
    trace_share: float = 0.0
    """Share of messages sent with a sampled W3C `traceparent` user property
    (`traceparent`); 0: none, 1: every message."""
    handover_share: float = 0.03
    """Share of units that change hands (resold, given away) inside the played span
    (`simulators.owners.handover`): the registry attributes what they send before
    that to the seller, after it to the buyer."""

    def __post_init__(self) -> None:
        if not _FLEET_NAME.match(self.fleet):
            raise ValueError(f"fleet {self.fleet!r} must be 1-16 letters or digits")
        if not 0.0 <= self.handover_share <= 1.0:
            raise ValueError("handover_share is a share between 0 and 1")
        if not 0.0 <= self.trace_share <= 1.0:
            raise ValueError("trace_share is a share between 0 and 1")
        if self.window is not None:
            if self.window <= timedelta(0):
                raise ValueError("the window must be longer than zero")
            start = self.sim_start or self.clock - self.window
            object.__setattr__(self, "sim_start", start.astimezone(KST))

    @property
    def usage(self) -> bool:
        return self.window is not None


def traceparent(plan: FleetPlan, key: tuple[str, str, int]) -> str | None:
    """The W3C traceparent the message with `key` (device, boot, seq) is sent with under
    `plan` (sampled), or None for the messages outside `plan.trace_share`: its trace id
    and parent id are a hash of the run id and the key, so the same message always has
    the same ones."""
    if plan.trace_share <= 0.0:
        return None
    device_id, boot, seq = key
    digest = hashlib.blake2b(
        f"{plan.run_id}:{device_id}:{boot}:{seq}".encode(), digest_size=32
    ).digest()
    if plan.trace_share < 1.0 and int.from_bytes(digest[24:], "big") >= plan.trace_share * 2**64:
        return None
    trace_id, parent_id = digest[:16].hex(), digest[16:24].hex()
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None  # W3C forbids all-zero ids (a chance of 2^-64)
    return f"00-{trace_id}-{parent_id}-01"


def plan_device(plan: FleetPlan, device_id: str, topic_prefix: str = "") -> list[Message]:
    """Every message one device sends in this plan, duplicates included, in send order."""
    if plan.usage:
        return list(usage_traffic(plan, device_id, topic_prefix))
    rng = random.Random(f"{plan.seed}:{device_id}")
    category = category_of(device_id)
    if plan.mix == "usage":
        schemas, weights = usage_mix(category)
    else:
        schemas = [name for name in SCHEMA_NAMES if name.split(".", 1)[0] == category]
        weights = None
    boot_id = hashlib.blake2s(f"{plan.run_id}:{device_id}".encode(), digest_size=6).hexdigest()
    topic = telemetry_topic(device_id, topic_prefix)
    event_time = plan.start + timedelta(seconds=rng.uniform(0, 60))
    out: list[Message] = []
    for seq in range(plan.messages_per_device):
        event_time += timedelta(seconds=rng.uniform(1, 10))
        schema = rng.choice(schemas) if weights is None else rng.choices(schemas, weights)[0]
        body = example_body(schema, rng)
        doc = envelope_dict(
            device_id=device_id,
            boot_id=boot_id,
            seq=seq,
            event_time=event_time,
            schema_name=schema,
            schema_version=current_version(schema),
            body=body,
        )
        msg = Message((device_id, boot_id, seq), topic, orjson.dumps(doc), False)
        out.append(msg)
        if plan.duplicate_rate and rng.random() < plan.duplicate_rate:
            out.append(Message(msg.key, topic, msg.payload, True, outcome=Outcome.DUPLICATE))
    return out


MIX_YEAR_END = datetime(2026, 1, 1, tzinfo=UTC)
"""The end of the year of usage whose schema shares `usage_mix` gives."""


@functools.cache
def usage_mix(category: str) -> tuple[list[str], list[int]]:
    """The schemas a device of `category` sends, each with how many messages of it the
    usage model (`simulators.traffic`) gives two such devices over a year, faults off:
    the shares `FleetPlan(mix="usage")` draws from. Schemas the model never sends in a
    year are left out. The year is a fixed one (`MIX_YEAR_END`), so the shares, and a
    plain fleet's traffic for a seed, do not depend on the day they are drawn."""
    plan = FleetPlan(devices=2 * len(CATEGORY_PREFIX), messages_per_device=0, seed=1,
                     fleet="mix", window=timedelta(days=365), clock=MIX_YEAR_END)  # fmt: skip
    counts: Counter[str] = Counter()
    for device_id in device_ids(plan):
        if category_of(device_id) == category:
            messages = usage_traffic(plan, device_id, "")
            counts.update(orjson.loads(m.payload)["schema"] for m in messages)
    names = sorted(counts)
    return names, [counts[n] for n in names]


def usage_traffic(
    plan: FleetPlan, device_id: str, topic_prefix: str, *, registered: bool = True
) -> Iterator[Message]:
    """A device's usage-mode traffic, lazily; its `foreign_topic` messages go to the next
    device. `registered=False`: a unit of the `unregistered` fault."""
    ids, positions = _fleet_index(plan.fleet, plan.seed, plan.devices)
    neighbour = None
    if len(ids) > 1:
        neighbour = ids[(positions.get(device_id, -1) + 1) % len(ids)]
    return device_traffic(
        plan,
        device_id,
        category_of(device_id),
        topic_prefix=topic_prefix,
        neighbour=neighbour,
        registered=registered,
    )


@functools.lru_cache(maxsize=8)
def _fleet_index(fleet: str, seed: int, devices: int) -> tuple[list[str], dict[str, int]]:
    """The fleet's device ids and each one's position (computed once per fleet: a
    device id costs two hashes, and each of 10,000 devices needs its neighbour's)."""
    ids = device_ids(FleetPlan(devices=devices, messages_per_device=0, seed=seed, fleet=fleet))
    return ids, {d: i for i, d in enumerate(ids)}
