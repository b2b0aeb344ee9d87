"""A small, seeded population for the report tests: owners in a registry of the test's
own, their devices, and three weeks of raw usage rows written through `UsageStore`.

What it holds on purpose:
- 36 owners; analytics consent for most (the rest: no key, no region, no tier on their
  rows, as enrichment stores them), marketing consent for about half, a few dormant;
- models WM-A (washer, two firmware versions), DR-B (dryer), RV-C (robot vacuum), and
  WM-RARE (a washer only 3 owners have: below any k the tests use);
- eight more dryers whose firmware nobody recorded (NULL on their rows, as enrichment
  stores it until the registry knows), so the reports' segments of an unknown firmware
  are checked too: their errors reach k = 3. Their owners have no marketing consent,
  so the marketing reports (which have no firmware) count the same as without them;
- one device handed from a marketing-consenting owner to one without, mid-range;
- gaps in sequence numbers and a reboot, errors raised and cleared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import asyncpg

from devices.schema import migrate_registry
from ingest.owner_keys import owner_key
from ingest.rows import UsageRow
from ingest.sql_names import quote_schema
from ingest.store import UsageStore

START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
END = START + timedelta(days=21)
SECRET = b"tests-only-owner-key-secret-0123456789abcdef"
MODELS = {"WM-A": "washer", "DR-B": "dryer", "RV-C": "robot_vacuum", "WM-RARE": "washer"}
REGIONS = ("KR-11", "KR-26", "KR-41")
TIERS = ("standard", "silver", "gold", "platinum")
CHANNELS = ("own_online_shop", "own_store", "third_party_retailer", "gift")
TRIGGERS = ("panel", "panel", "app_remote", "schedule", "voice")
ERROR_CODES = ("E01", "E07", "F12")


@dataclass
class Owner:
    owner_id: UUID
    region: str
    tier: str
    analytics: bool
    marketing: bool
    status: str  # active or dormant

    @property
    def key(self) -> str | None:
        return owner_key(SECRET, self.owner_id) if self.analytics else None


@dataclass
class Period:
    owner: Owner
    valid_from: datetime
    valid_to: datetime | None
    channel: str


@dataclass
class Device:
    device_id: str
    model: str
    firmware: str | None
    periods: list[Period] = field(default_factory=list)

    def period_at(self, t: datetime) -> Period:
        for p in self.periods:
            if p.valid_from <= t and (p.valid_to is None or t < p.valid_to):
                return p
        raise AssertionError(f"{self.device_id} has no owner at {t}")


@dataclass
class Population:
    owners: list[Owner]
    devices: list[Device]
    rows: list[UsageRow]

    def marketable(self, r: UsageRow) -> bool:
        """The population rule, computed from the seed (not from the registry)."""
        device = next(d for d in self.devices if d.device_id == r.device_id)
        o = device.period_at(r.event_time).owner
        return o.analytics and o.marketing and o.status == "active"

    def marketable_day(self, r: UsageRow) -> bool:
        """The rule the marketing-usable reports apply to device-days: the row has an
        owner key and every ownership period overlapping its UTC day is marketable."""
        device = next(d for d in self.devices if d.device_id == r.device_id)
        day = r.event_time.replace(hour=0, minute=0, second=0, microsecond=0)
        overlapping = [
            p.owner
            for p in device.periods
            if p.valid_from < day + timedelta(days=1) and (p.valid_to is None or p.valid_to > day)
        ]
        return (
            r.owner_key is not None
            and bool(overlapping)
            and all(o.analytics and o.marketing and o.status == "active" for o in overlapping)
        )


def build(seed: int = 11) -> Population:
    rnd = random.Random(seed)
    owners = []
    for i in range(36):
        owners.append(
            Owner(
                UUID(int=rnd.getrandbits(128), version=4),
                REGIONS[i % 3],
                TIERS[i % 4],
                analytics=i % 6 != 5,
                marketing=i % 2 == 0,
                status="dormant" if i % 9 == 4 else "active",
            )
        )
    devices = []
    purchased = START - timedelta(days=200)
    for i, o in enumerate(owners[:33]):
        model = ("WM-A", "DR-B", "RV-C")[i % 3]
        firmware = "1.0" if model != "WM-A" or i % 2 else "2.1"
        d = Device(f"{model.lower()}-{i:03d}", model, firmware)
        d.periods.append(Period(o, purchased, None, CHANNELS[i % 4]))
        devices.append(d)
        if i % 4 == 0:  # a second appliance: a washer beside the dryer or vacuum
            w = Device(f"wm-a-x{i:03d}", "WM-A", "2.1")
            w.periods.append(Period(o, purchased, None, CHANNELS[(i + 1) % 4]))
            devices.append(w)
    for j, o in enumerate(owners[33:]):
        d = Device(f"wm-rare-{j}", "WM-RARE", "0.9")
        d.periods.append(Period(o, purchased, None, "own_store"))
        devices.append(d)
    # Last, so that every other device draws the same rows as before they existed.
    for i, o in enumerate(owners[:33]):
        if i % 4 == 3:  # odd: no marketing consent; 11 and 23 no analytics consent either
            d = Device(f"dr-b-n{i:03d}", "DR-B", None)
            d.periods.append(Period(o, purchased, None, CHANNELS[(i + 2) % 4]))
            devices.append(d)
    # Owner 0 (marketing) hands wm-a-000 to owner 1 (no marketing) after ten days.
    handed = START + timedelta(days=10, hours=5)
    first = devices[0]
    first.periods = [
        Period(owners[0], purchased, handed, "own_online_shop"),
        Period(owners[1], handed, None, "gift"),
    ]
    rows: list[UsageRow] = []
    for d in devices:
        rows.extend(_usage(rnd, d))
    return Population(owners, devices, rows)


def _usage(rnd: random.Random, d: Device) -> list[UsageRow]:
    category = MODELS[d.model]
    out: list[UsageRow] = []
    boot, seq = f"{d.device_id}-b1", 0
    t = START + timedelta(minutes=rnd.randrange(0, 600))
    while t < END:
        if rnd.random() < 0.01:
            boot, seq = f"{d.device_id}-r{len(out)}", 0  # a reboot: new boot, seq from 0
        if rnd.random() < 0.05:
            seq += rnd.randrange(1, 4)  # messages lost on the way: a gap
        out.append(_row(d, boot, seq, t, _event(rnd, category)))
        seq += 1
        t += timedelta(minutes=rnd.randrange(40, 600))
    return out


def _event(rnd: random.Random, category: str) -> tuple[str, dict[str, object]]:
    roll = rnd.random()
    trigger = rnd.choice(TRIGGERS)
    if roll < 0.05:
        state = "raised" if rnd.random() < 0.8 else "cleared"
        code = rnd.choice(ERROR_CODES)
        return f"{category}.error", {"code": code, "severity": "fault", "state": state}
    if roll < 0.55:
        if category == "robot_vacuum":
            mode = rnd.choice(("auto", "spot", "edge"))
            body = {"mode": mode, "duration_s": rnd.randrange(600, 3600), "trigger": trigger}
            return "robot_vacuum.clean_run", body
        program = rnd.choice(("cotton", "quick", "eco", "wool"))
        return f"{category}.cycle", {
            "program": program,
            "duration_s": rnd.randrange(1200, 7200),
            "energy_wh": rnd.randrange(200, 1800),
            "outcome": "completed",
            "trigger": trigger,
        }
    return f"{category}.energy", {"interval_s": 3600, "energy_wh": rnd.randrange(5, 90)}


def _row(
    d: Device, boot: str, seq: int, t: datetime, event: tuple[str, dict[str, object]]
) -> UsageRow:
    schema, body = event
    p = d.period_at(t)
    o = p.owner
    consenting = o.analytics
    return UsageRow(
        d.device_id,
        boot,
        seq,
        t,
        schema,
        1,
        body,
        0,
        seq,
        model=d.model,
        firmware=d.firmware,
        region=o.region if consenting else None,
        category=MODELS[d.model],
        membership_tier=o.tier if consenting else None,
        purchase_channel=p.channel,
        analytics_consent=o.analytics,
        owner_key=o.key,
    )


async def seed(store: UsageStore, dsn: str, registry_schema: str, pop: Population) -> None:
    """Write the rows through the store and the owners and devices into the registry."""
    await store.write(pop.rows)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate_registry(conn, registry_schema)
        reg = quote_schema(registry_schema)
        made = datetime(2025, 1, 1, tzinfo=UTC)
        for model, category in MODELS.items():
            await conn.execute(
                f"INSERT INTO {reg}.product_models VALUES ($1, $2, $3, $4)",
                model,
                category,
                f"test {model}",
                date(2025, 1, 1),
            )
        for o in pop.owners:
            await conn.execute(
                f"INSERT INTO {reg}.owners (owner_id, status, region, membership_tier,"
                " analytics_consent, marketing_consent, created_at, last_active_at,"
                " dormant_since) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)",
                o.owner_id,
                o.status,
                o.region,
                o.tier,
                o.analytics,
                o.marketing,
                made,
                made if o.status == "dormant" else None,
            )
            # The decisions behind the booleans, as the registry records them: what
            # its gates (`consent_in_force`) read.
            await conn.executemany(
                f"INSERT INTO {reg}.consent_events (owner_id, purpose, granted, changed_at,"
                " source, policy_version) VALUES ($1, $2, $3, $4, 'seed', 'initial')",
                [
                    (o.owner_id, "analytics", o.analytics, made),
                    (o.owner_id, "marketing", o.marketing, made),
                ],
            )
        for d in pop.devices:
            serial = d.device_id.upper()
            await conn.execute(
                f"INSERT INTO {reg}.units (serial_number, model_number, manufactured_on,"
                " code_hash) VALUES ($1, $2, $3, 'x')",
                serial,
                d.model,
                date(2025, 1, 1),
            )
            key = await conn.fetchval(
                f"INSERT INTO {reg}.devices (device_id, serial_number, model_number,"
                " firmware_version, registered_at) VALUES ($1, $2, $3, $4, $5)"
                " RETURNING device_key",
                d.device_id,
                serial,
                d.model,
                d.firmware,
                made,
            )
            for p in d.periods:
                await conn.execute(
                    f"INSERT INTO {reg}.ownership_periods (device_key, owner_id, valid_from,"
                    " valid_to, purchase_channel, ended_reason) VALUES ($1, $2, $3, $4, $5, $6)",
                    key,
                    p.owner.owner_id,
                    p.valid_from,
                    p.valid_to,
                    p.channel,
                    None if p.valid_to is None else "transferred",
                )
    finally:
        await conn.close()
