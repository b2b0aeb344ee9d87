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

The implementation is `devices.mosquitto.DynsecAccounts` (Mosquitto's dynamic-security
plugin, over its `$CONTROL/dynamic-security/v1` topic). There is deliberately no
do-nothing implementation: a registry that believes the broker enforces its
credentials when it does not would be worse than one that refuses to start.
"""

from __future__ import annotations

from typing import Protocol


class BrokerAccounts(Protocol):
    """The MQTT broker's device accounts, as the registry drives them."""

    async def add_device(self, device_id: str, secret: str) -> None:
        """Create `device_id`'s account with `secret`, or replace its secret.

        The username is the device id; the device may publish only to its own
        telemetry topic. Raise `devices.errors.RegistryUnavailable` when the broker
        cannot be reached.
        """
        ...

    async def revoke_device(self, device_id: str) -> None:
        """Disable `device_id`'s account and drop its sessions; idempotent."""
        ...
