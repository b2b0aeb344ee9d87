"""The registry's errors, under one base class `RegistryError` (itself a
`schemas.errors.UsagepipeError`, whose module docstring draws the whole tree), and the
reason codes of `Rejected` (a `RejectReason`, part of the HTTP contract).

Library errors (asyncpg, OSError) are wrapped at the boundary into `RegistryUnavailable`,
so callers handle one family. Reason codes are published (API bodies, CLI output): add
new ones, never rename or reuse one. Retired codes, never to be reused:
`unknown_serial`, `model_mismatch`, `wrong_code` (a failed proof of purchase told which
part was wrong; now one answer, `registration_refused`) and `locked_out` (a lockout per
serial anyone could trigger; now `too_many_attempts`, per caller).
"""

from __future__ import annotations

from enum import StrEnum

from schemas.errors import UsagepipeError


class RejectReason(StrEnum):
    """Why the registry refused a request."""

    REGISTRATION_REFUSED = "registration_refused"
    """Model, serial and code do not match a manufactured unit. One answer, with the
    same work behind it, whichever of the three was wrong: it must not tell a guesser
    whether a serial exists or which model it is (`ProofFailure` is what happened)."""
    OWNED_BY_OTHER = "owned_by_other"
    """Someone else owns the unit now: they must release it, or the buyer must state a
    resale (with the code from inside the unit)."""
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    """The caller (its subject or its address) used up its failed registrations for
    now; `TooManyAttempts.retry_after_s` says when the next one is allowed."""
    ALREADY_OWNER = "already_owner"
    """The owner already owns this unit; nothing to register."""
    UNKNOWN_OWNER = "unknown_owner"
    """No owner has this id."""
    OWNER_NOT_ACTIVE = "owner_not_active"
    """The owner is dormant (must reactivate first) or erased."""
    UNKNOWN_DEVICE = "unknown_device"
    """No registered device has this id."""
    NOT_CURRENT_OWNER = "not_current_owner"
    """Only the device's current owner may do this."""
    REAUTHENTICATION_REQUIRED = "reauthentication_required"
    """Reactivating a dormant owner needs proof that they signed in again."""
    NOT_DORMANT = "not_dormant"
    """Only a dormant owner can be reactivated."""
    BAD_CSR = "bad_csr"
    """The certificate signing request is not one the registry signs (not PEM, bad
    signature, or a key type or size it does not accept); the detail says which."""
    CERTIFICATE_REQUIRED = "certificate_required"
    """This model logs in with a client certificate only: send a CSR."""
    NO_LIVE_CREDENTIALS = "no_live_credentials"
    """The device's credentials are revoked; reissue them before renewing its certificate."""
    OWNER_EXISTS = "owner_exists"
    """The signed-in subject already has an owner account (`GET /owners/me` finds it)."""
    UNKNOWN_POLICY_VERSION = "unknown_policy_version"
    """No privacy-policy version has this name."""
    STALE_POLICY_VERSION = "stale_policy_version"
    """A decision names a policy version that is not the current one (an older one, or
    one not yet in effect): the owner must see the current text and decide again."""
    UNKNOWN_PURPOSE = "unknown_purpose"
    """No purpose of the catalogue has this name."""
    CONSENT_NOT_NEEDED = "consent_not_needed"
    """The purpose runs under the service contract: there is no consent to give or
    withdraw."""
    BUNDLED_CONSENT = "bundled_consent"
    """One grant names several purposes: each optional purpose is consented on its own
    (withdrawing several at once is allowed)."""
    INVALID_POLICY = "invalid_policy"
    """A policy version that cannot be published: its name is taken, it takes effect in
    the past or before the latest version, its text is empty, or it re-asks a purpose
    that is not consent-based."""


class ProofFailure(StrEnum):
    """What was wrong with a refused proof of purchase. Recorded in the registry's
    `registration_attempts` (for support and for reviewing abuse), never answered."""

    UNKNOWN_SERIAL = "unknown_serial"
    """No manufactured unit has this serial number."""
    MODEL_MISMATCH = "model_mismatch"
    """The serial exists, but belongs to another model number."""
    WRONG_CODE = "wrong_code"
    """The registration code does not match the one printed inside the unit."""


class RegistryError(UsagepipeError):
    """Base of every registry error; `retriable` says whether trying again may help."""

    retriable: bool = False


class RegistryUnavailable(RegistryError):
    """PostgreSQL or the MQTT broker's account service could not be reached."""

    retriable = True


class Rejected(RegistryError):
    """A request the registry refuses; `reason` is the machine-readable code."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


class TooManyAttempts(Rejected):
    """`too_many_attempts`: the caller may try again in `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            RejectReason.TOO_MANY_ATTEMPTS,
            f"too many failed registrations; try again in {retry_after_s} s",
        )
        self.retry_after_s = retry_after_s


class MigrationError(RegistryError):
    """A migration cannot be applied: bad file name, duplicate number, edited file."""


class InvalidImportFile(RegistryError):
    """A factory export that cannot be read at all (missing columns, not CSV).

    Bad rows in a readable file are not errors: they are reported one by one, and the
    good rows are imported.
    """


class BrokerAccountError(RegistryError):
    """The MQTT broker refused to change device accounts: the admin login is missing
    or wrong, or the broker rejected a command. Retrying will not help; fix the setup."""
