"""The faults a simulated fleet can inject, each with a rate, and what each must cause.

`--faults dup=0.01,reorder=0.01,reboot=0.001` sets per-message rates (0..1). Each
fault has a fate the pipeline must give it, which the fleet writes in its ledger:

    dup            sends a message again, byte for byte     -> duplicate (no second row)
    reorder        sends a message after the next one       -> stored
    offline        offline a while, then sends the backlog  -> stored
    skew           clock ahead or behind by minutes..hours  -> stored, or dead letter
                                                               event_time_in_future
    reboot         new boot id, sequence back to 0          -> stored
    malformed      bytes that are not a valid message       -> dead letter (its reason)
    oversize       a payload over the size limit            -> dead letter oversize
    foreign_topic  publishes to another device's topic      -> refused by the broker
    unregistered   a device the registry does not know      -> refused by the broker
    old_schema     a device on old firmware: washer.cycle v1 -> stored (upgraded)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

FAULT_NAMES = (
    "dup",
    "reorder",
    "offline",
    "skew",
    "reboot",
    "malformed",
    "oversize",
    "foreign_topic",
    "unregistered",
    "old_schema",
)


@dataclass(frozen=True)
class FaultRates:
    """Per-message rate of each fault (per device for `unregistered` and `old_schema`)."""

    dup: float = 0.0
    reorder: float = 0.0
    offline: float = 0.0
    skew: float = 0.0
    reboot: float = 0.0
    malformed: float = 0.0
    oversize: float = 0.0
    foreign_topic: float = 0.0
    unregistered: float = 0.0
    old_schema: float = 0.0

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def __str__(self) -> str:
        on = [f"{f.name}={getattr(self, f.name):g}" for f in fields(self) if getattr(self, f.name)]
        return ",".join(on) or "none"


def parse_faults(text: str) -> FaultRates:
    """`dup=0.01,reorder=0.02` -> FaultRates; `all=R` sets every fault to R.

    Raises ValueError naming the part that is wrong.
    """
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"fault {part!r} has no rate: write {part}=0.01")
        if name != "all" and name not in FAULT_NAMES:
            raise ValueError(f"unknown fault {name!r}; known: all, {', '.join(FAULT_NAMES)}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"fault {name!r}: rate {value!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault {name!r}: rate {rate:g} is not between 0 and 1")
        if name == "all":
            rates.update(dict.fromkeys(FAULT_NAMES, rate))
        else:
            rates[name] = rate
    return FaultRates(**rates)
