"""What a fleet run did: `FleetReport`, which `simulators.fleet.Fleet` fills from the
broker's PUBACKs and CONNACKs as it plays, and `usagepipe simulate` and the demo print."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class FleetReport:
    """What the fleet did, counted on the broker's PUBACKs."""

    devices: int = 0
    sent: int = 0
    duplicates_sent: int = 0
    unique_keys: int = 0
    elapsed_s: float = 0.0
    boot_ids: list[str] = field(default_factory=list)
    connected: int = 0
    planned: int = 0
    """Messages taken from the plan so far (each one is a ledger line)."""
    refused: int = 0
    """Publishes and connections the broker refused, as the plan expected."""
    faults: Counter[str] = field(default_factory=Counter)
    """Faults injected so far, by name."""
    surprises: list[str] = field(default_factory=list)
    """What the broker did that the plan did not expect (should stay empty)."""
    connect_s: float = 0.0
    lag_s: float = 0.0
    """How far behind its schedule the fleet ran at worst (time-compressed mode)."""

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
