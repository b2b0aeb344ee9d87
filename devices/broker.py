"""The seam between the registry and the MQTT broker's device accounts.

The registry decides which devices may publish and with which secret; the broker must
enforce it. `BrokerAccounts` is what the registry calls, always, after each change:

- registration and transfer: `add_device(device_id, secret)` creates the device's
  account or replaces its secret (the previous owner's secret stops working);
- revocation, release and erasure: `revoke_device(device_id)` disables the account.

Ordering with the database: `add_device` runs inside the registry's transaction, just
before the commit, so a broker failure rolls the registration back (nobody receives a
secret the broker does not know). If the commit then fails, the registry revokes the
account again. `revoke_device` runs after the commit and is idempotent; if it fails the
registry raises a retriable error and the caller retries the (idempotent) revocation.
`adding_accounts` is the transaction that keeps this order for additions.

The implementation is `devices.mosquitto.DynsecAccounts` (Mosquitto's dynamic-security
plugin, over its `$CONTROL/dynamic-security/v1` topic). There is deliberately no
do-nothing implementation: a registry that believes the broker enforces its
credentials when it does not would be worse than one that refuses to start.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from ingest.migrations import Connection

log = logging.getLogger(__name__)


class BrokerAccounts(Protocol):
    """The MQTT broker's device accounts, as the registry drives them."""

    async def add_device(self, device_id: str, secret: str | None) -> None:
        """Create `device_id`'s account with `secret`, or replace its secret; either
        way its current connections are dropped.

        The username is the device id; the device may publish only to its own
        telemetry topic. `secret` None: no password login, only a TLS client
        certificate with the device id as its CN. Raise
        `devices.errors.RegistryUnavailable` when the broker cannot be reached.
        """
        ...

    async def revoke_device(self, device_id: str) -> None:
        """Disable `device_id`'s account and drop its sessions; idempotent."""
        ...


class AddedAccounts:
    """The broker accounts one transaction gave out (see `adding_accounts`)."""

    def __init__(self, broker: BrokerAccounts) -> None:
        self._broker = broker
        self.device_ids: list[str] = []

    async def add(self, device_id: str, secret: str | None) -> None:
        """Give `device_id` the broker secret `secret`; withdrawn again if the
        transaction does not commit."""
        await self._broker.add_device(device_id, secret)
        self.device_ids.append(device_id)

    async def withdraw(self) -> None:
        for device_id in self.device_ids:
            try:
                await self._broker.revoke_device(device_id)
            except Exception:
                log.exception("could not withdraw broker account %s", device_id)


@asynccontextmanager
async def adding_accounts(
    transaction: AbstractAsyncContextManager[Connection], broker: BrokerAccounts
) -> AsyncIterator[tuple[Connection, AddedAccounts]]:
    """`transaction`, in which devices may get new broker secrets (`AddedAccounts.add`).

    The broker is told last inside the transaction, so a broker failure rolls the
    change back. If the commit itself then fails, the accounts are withdrawn
    again, best effort: nobody holds a secret the database does not know. (A
    transfer whose commit fails thus leaves the device without a broker account
    until its owner reissues credentials; logged loudly.)
    """
    added = AddedAccounts(broker)
    try:
        async with transaction as conn:
            yield conn, added
    except BaseException:
        await added.withdraw()
        raise
