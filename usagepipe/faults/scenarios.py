"""The scenarios: each failure issue 17 found, as harm done to a running pipeline.

Every scenario plays a simulated fleet (`suite.Fleet`) through its own bridge and
consumer and ends in `usagepipe verify`; the ones about records rather than servers
also produce records of their own straight to the raw topic (as the bridge would have
forwarded them, from a hand-made device the consumer stores as unregistered) and add
their expected fates to the ledger.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from schemas.errors import Reason
from simulators.ledger import Entry, Outcome, digest
from simulators.plan import FleetPlan, plan_device
from simulators.traffic import Message
from simulators.units import device_ids
from usagepipe.faults.proxy import HarmfulProxy
from usagepipe.faults.servers import FaultServers
from usagepipe.faults.suite import Fleet, Harm, Result, Run, run_scenario, wait_for


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    play: Callable[[FaultServers, Fleet], Awaitable[Result]]
    quick: bool = False
    """Quick enough for CI (`tests/usagepipe/test_faults.py`)."""
    fleet: Fleet = field(default_factory=Fleet)


def hand_made(run: Run, index: int, count: int) -> tuple[str, list[Message]]:
    """A device of the scenario's own (not registered) and its first `count` messages."""
    # Messages follow each other a few seconds apart (about 5.5 s): start early enough
    # that the last is in the past, or the consumer would refuse it as from the future.
    start = datetime.now(UTC) - timedelta(seconds=8 * count) - timedelta(hours=1)
    plan = FleetPlan(
        devices=index + 1, messages_per_device=count, seed=97, run_id=run.name, start=start
    )
    device = device_ids(plan)[index]
    return device, plan_device(plan, device)


def entry(
    m: Message,
    payload: bytes,
    outcome: Outcome,
    reason: str | None = None,
    *,
    fault: str | None,
    duplicate: bool = False,
) -> Entry:
    device, boot, seq = m.key
    return Entry(device, boot, seq, digest(payload), outcome, reason, duplicate, fault)


def edited(m: Message, **fields: object) -> bytes:
    doc = orjson.loads(m.payload)
    for name, value in fields.items():
        if name == "body_program":
            doc["body"]["program"] = value
        elif name == "body_bump":
            # Another body, still valid: the first whole number in it, one more.
            doc["body"][_whole_numbers(doc)[0]] += 1
        else:
            doc[name] = value
    return orjson.dumps(doc)


# -- records --------------------------------------------------------------------------------


async def poison(run: Run) -> None:
    """Seven poisons among a device's 20 messages, then the fleet: each poison one dead
    letter with its reason, every other message stored, no partition stalled."""
    device, messages = hand_made(run, 0, 20)
    poisons: dict[int, tuple[bytes, str, str]] = {
        2: (
            edited(messages[2], boot_id="ab\u0000cd"),
            Reason.SCHEMA_VIOLATION.value,
            "nul_boot_id",
        ),
        4: (
            edited(messages[4], body_program="quick\u000030"),
            Reason.SCHEMA_VIOLATION.value,
            "nul_in_body",
        ),
        6: (
            edited(messages[6], event_time="0001-01-01T00:00:00+14:00"),
            Reason.EVENT_TIME_EXPIRED.value,
            "year_1",
        ),
        8: (
            edited(messages[8], event_time="1970-01-01T00:00:00Z"),
            Reason.EVENT_TIME_EXPIRED.value,
            "year_1970",
        ),
        10: (
            edited(messages[10], event_time="2100-01-01T00:00:00Z"),
            Reason.EVENT_TIME_IN_FUTURE.value,
            "year_2100",
        ),
        12: (messages[12].payload[:-7], Reason.INVALID_JSON.value, "truncated"),
        14: (
            b'{"seq":1014,' + messages[14].payload[1:],
            Reason.DUPLICATE_KEY.value,
            "duplicate_key",
        ),
    }
    records = []
    for i, m in enumerate(messages):
        if i in poisons:
            payload, reason, fault = poisons[i]
            run.extra.append(
                entry(m, payload, Outcome.DEAD_LETTER, reason, fault=f"poison:{fault}")
            )
        else:
            payload = m.payload
            run.extra.append(entry(m, payload, Outcome.STORED, fault=None))
        records.append((device, payload))
    await run.produce(records)


async def resend(run: Run) -> None:
    """A device's 30 messages, then resends: 10 byte for byte (duplicates), 10 with
    another event time and 1 with another body (conflicting duplicates, dead-lettered),
    and seq 0 again with 100 event times (100 conflicting duplicates, 0 new rows)."""
    device, messages = hand_made(run, 1, 30)
    run.extra += [entry(m, m.payload, Outcome.STORED, fault=None) for m in messages]
    await run.produce([(device, m.payload) for m in messages])

    async def stored() -> bool:
        rows = await run.rows(device)
        return rows >= 30

    await wait_for(stored, 60)
    records: list[tuple[str, bytes]] = []
    for m in messages[:10]:
        run.extra.append(entry(m, m.payload, Outcome.DUPLICATE, fault="resend", duplicate=True))
        records.append((device, m.payload))
    for m in messages[10:20]:
        later = _event_time(m) + timedelta(seconds=1)
        payload = edited(m, event_time=later.isoformat())
        run.extra.append(
            entry(
                m,
                payload,
                Outcome.DEAD_LETTER,
                Reason.CONFLICTING_DUPLICATE.value,
                fault="resend:other_time",
            )
        )
        records.append((device, payload))
    other = next(m for m in messages[20:] if _whole_numbers(m))
    payload = edited(other, body_bump=True)
    run.extra.append(
        entry(
            other,
            payload,
            Outcome.DEAD_LETTER,
            Reason.CONFLICTING_DUPLICATE.value,
            fault="resend:other_body",
        )
    )
    records.append((device, payload))
    first = messages[0]
    for k in range(1, 101):
        payload = edited(first, event_time=(_event_time(first) + timedelta(seconds=k)).isoformat())
        run.extra.append(
            entry(
                first,
                payload,
                Outcome.DEAD_LETTER,
                Reason.CONFLICTING_DUPLICATE.value,
                fault="resend:100_times",
            )
        )
        records.append((device, payload))
    await run.produce(records)


async def flood(run: Run) -> None:
    """One device sends 2,000 messages at once, past its ceiling
    (`consumer.device_rate_per_s`, `consumer.device_burst`): what passes it is stored,
    the rest dead-lettered `rate_limited`, each message exactly one of the two; `dlq
    replay --reason rate_limited` then stores the rest, every message once."""
    device, messages = hand_made(run, 2, 2000)
    run.extra += [entry(m, m.payload, Outcome.STORED, fault="flood") for m in messages]
    await run.produce([(device, m.payload) for m in messages])

    async def judged() -> bool:  # every record of the flood stored or dead-lettered
        rows = await run.rows(device)
        return rows + await run.rows(device, letters=True) >= 2000

    await wait_for(judged, 120)
    rows = await run.rows(device)
    status, output = await run.command("dlq", "replay", "--reason", "rate_limited")
    run.check("flood rows before the replay (the rest limited)", "1 to 1999", rows, 0 < rows < 2000)
    run.check("dlq replay --reason rate_limited", "exit 0", status, status == 0)
    run.notes.append(
        f"flood: {rows:,} of 2,000 stored at once; replay said: "
        f"{output.strip().splitlines()[-1] if output.strip() else ''}"
    )


def _whole_numbers(m: Message | dict[str, Any]) -> list[str]:
    """The body's fields holding whole numbers that may grow by one (no percentages)."""
    doc = orjson.loads(m.payload) if isinstance(m, Message) else m
    return [k for k, v in doc["body"].items() if type(v) is int and not k.endswith("_pct")]


def _event_time(m: Message) -> datetime:
    return datetime.fromisoformat(orjson.loads(m.payload)["event_time"])


# -- processes and servers ------------------------------------------------------------------


async def kill_consumer(run: Run) -> None:
    run.consumer.kill()
    await asyncio.sleep(1)
    run.consumer.start()


async def kill_bridge(run: Run) -> None:
    run.bridge.kill()
    await asyncio.sleep(2)
    run.bridge.start()


async def kill_kafka(run: Run) -> None:
    """SIGKILL the memory-only broker, and while it is down count what it had taken: the
    records the bridge had confirmed (and acknowledged) that no consumer had fetched are
    the most it can have lost (counted after the kill: nothing is confirmed or fetched
    while it is down, so the counters then say what it held)."""
    run.servers.kill("kafka")
    await asyncio.sleep(1)
    acked = run.bridge_counters()["usagepipe_bridge_acked_total"]
    consumed = run.consumer_counters()["usagepipe_consumer_consumed_total"]
    await asyncio.sleep(2)
    run.servers.restart("kafka")
    run.allowed_missing = max(0, int(acked - consumed))
    run.notes.append(
        f"kafka killed with {acked:,.0f} messages confirmed by the broker and acknowledged"
        f" by the bridge and {consumed:,.0f} consumed: at most {run.allowed_missing:,} lost"
    )


MOSQUITTO_LOSS_BOUND = 9_999
"""What a Mosquitto crash may lose: the changes since its last save (README, "What a
broker crash can lose": `autosave_on_changes`, `autosave_interval 10000`)."""


async def kill_mosquitto(run: Run) -> None:
    """Save the broker's state first (SIGUSR1, as its autosave would have on any broker
    that ran a while: the bridge's session and subscription are on disk), then SIGKILL
    it with the bridge live; what it had not saved is the loss the README bounds."""
    os.kill(run.servers.pid("mqtt"), signal.SIGUSR1)
    await asyncio.sleep(0.5)
    run.servers.kill("mqtt")
    await asyncio.sleep(2)
    run.servers.restart("mqtt")
    run.allowed_missing = MOSQUITTO_LOSS_BOUND


async def stop_postgres(run: Run) -> None:
    run.servers.stop_postgres()
    await asyncio.sleep(15)
    run.servers.start_postgres()


def fleet_only(name: str, harm: Harm | None) -> Callable[[FaultServers, Fleet], Awaitable[Result]]:
    async def play(servers: FaultServers, fleet: Fleet) -> Result:
        return await run_scenario(servers, name, fleet, harm=harm)

    return play


def records_first(name: str, make: Harm) -> Callable[[FaultServers, Fleet], Awaitable[Result]]:
    async def play(servers: FaultServers, fleet: Fleet) -> Result:
        return await run_scenario(servers, name, fleet, harm=None, before=make)

    return play


def through_proxy(name: str, **harm: float) -> Callable[[FaultServers, Fleet], Awaitable[Result]]:
    async def play(servers: FaultServers, fleet: Fleet) -> Result:
        proxy = HarmfulProxy(servers.ports.proxy, servers.ports.postgres, **harm)
        result = await run_scenario(servers, name, fleet, harm=None, proxy=proxy)
        run = result.run
        run.notes.append(f"proxy: {proxy.connections} connections, {proxy.resets} resets")
        return result

    return play


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "poison",
        "NUL characters, year 1 and 1970, year 2100, truncated JSON and a "
        "duplicated key among good records",
        records_first("poison", poison),
        quick=True,
    ),
    Scenario(
        "resend",
        "byte-for-byte resends, resends with another event time or body, one id "
        "sent with 100 event times",
        records_first("resend", resend),
        quick=True,
    ),
    Scenario(
        "flood",
        "one device sends 2,000 messages at once; the rest replayed",
        records_first("flood", flood),
        quick=True,
    ),
    Scenario(
        "consumer_kill",
        "the consumer SIGKILLed mid-traffic and started again",
        fleet_only("consumer_kill", kill_consumer),
        quick=True,
    ),
    Scenario(
        "bridge_kill",
        "the bridge SIGKILLed mid-traffic and started again",
        fleet_only("bridge_kill", kill_bridge),
    ),
    Scenario(
        "kafka_kill",
        "the Kafka broker (memory storage) SIGKILLed, back after 3 s",
        fleet_only("kafka_kill", kill_kafka),
    ),
    Scenario(
        "mosquitto_kill",
        "Mosquitto SIGKILLed with the bridge live, back after 2 s",
        fleet_only("mosquitto_kill", kill_mosquitto),
    ),
    Scenario(
        "postgres_stop",
        "PostgreSQL stopped for 15 s mid-traffic",
        fleet_only("postgres_stop", stop_postgres),
    ),
    Scenario(
        "slow_postgres",
        "the consumer's PostgreSQL behind a proxy adding 200 ms a read",
        through_proxy("slow_postgres", delay_s=0.2),
    ),
    Scenario(
        "resetting_postgres",
        "the consumer's PostgreSQL connections reset every 2 s",
        through_proxy("resetting_postgres", reset_every_s=2.0),
    ),
)
