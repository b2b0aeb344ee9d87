"""In-memory adapters implementing the registry's Protocols, for fast tests.

`test_events.py` runs the same contract against these and the real Kafka publisher;
`tests/devices/test_broker_accounts.py` against `RecordingBroker` and the real Mosquitto accounts.
"""

from __future__ import annotations

from typing import Any

from devices.errors import RegistryUnavailable


class RecordingPublisher:
    """An EventPublisher that keeps what it is given (and can be told to fail)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = False

    async def publish(self, event_type: str, key: str, payload: dict[str, Any]) -> None:
        if self.fail:
            raise RegistryUnavailable("publisher told to fail")
        self.events.append((event_type, key, payload))

    def types(self) -> list[str]:
        return [event_type for event_type, _, _ in self.events]


class RecordingBroker:
    """BrokerAccounts that remembers which device has which secret (and can fail)."""

    def __init__(self) -> None:
        self.accounts: dict[str, str | None] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail = False

    async def add_device(self, device_id: str, secret: str | None) -> None:
        if self.fail:
            raise RegistryUnavailable("broker told to fail")
        self.calls.append(("add", device_id))
        self.accounts[device_id] = secret

    async def revoke_device(self, device_id: str) -> None:
        self.calls.append(("revoke", device_id))
        self.accounts.pop(device_id, None)
