"""The registry's vocabulary: enums and the immutable records its methods return.

These are plain dataclasses; the HTTP API has its own pydantic models, so the wire
format can evolve without touching the data layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from uuid import UUID


class Category(StrEnum):
    """What kind of appliance a product model is."""

    WASHER = "washer"
    DRYER = "dryer"
    REFRIGERATOR = "refrigerator"
    AIR_CONDITIONER = "air_conditioner"
    AIR_PURIFIER = "air_purifier"
    ROBOT_VACUUM = "robot_vacuum"


class MembershipTier(StrEnum):
    """An owner's tier in the maker's membership programme."""

    STANDARD = "standard"
    SILVER = "silver"
    GOLD = "gold"
    PLATINUM = "platinum"


class OwnerStatus(StrEnum):
    """active; dormant (idle past the dormancy period: no marketing until they come
    back, sign in again and consent afresh); erased (nothing personal remains)."""

    ACTIVE = "active"
    DORMANT = "dormant"
    ERASED = "erased"


class PurchaseChannel(StrEnum):
    """Where the owner got the unit: the maker's own channels, a retailer, or a gift."""

    OWN_ONLINE_SHOP = "own_online_shop"
    OWN_STORE = "own_store"
    THIRD_PARTY_RETAILER = "third_party_retailer"
    GIFT = "gift"


class ConsentPurpose(StrEnum):
    """What an owner may consent to: the purposes of the registry's catalogue
    (`purposes`) whose legal basis is consent."""

    ANALYTICS = "analytics"
    """Product planning analytics: usage linked to the owner's region, tier and key."""
    MARKETING = "marketing"
    """Marketing: contacting the owner, and the customer-describing reports."""


class LegalBasis(StrEnum):
    """Why a purpose may be pursued: the service contract, or the owner's consent."""

    CONTRACT = "contract"
    CONSENT = "consent"


class ConsentState(StrEnum):
    """Where an owner stands on one consent purpose now.

    granted: the latest decision is a grant in force; declined: it is a refusal or a
    withdrawal; lapsed: a grant made under a policy version whose text for the purpose
    has since changed materially (not in force; the owner is asked again); undecided:
    no decision recorded (not in force; the owner is asked)."""

    GRANTED = "granted"
    DECLINED = "declined"
    LAPSED = "lapsed"
    UNDECIDED = "undecided"

    @property
    def pending(self) -> bool:
        """Whether the owner has a decision to make."""
        return self in (ConsentState.LAPSED, ConsentState.UNDECIDED)


def normalize_code(text: str) -> str:
    """Model and serial numbers as stored: trimmed and upper-cased (typed from labels)."""
    return text.strip().upper()


def device_id_for(model_number: str, serial_number: str) -> str:
    """The device id of a unit, the same every time it is (re-)registered.

    Model number plus 80 bits of SHA-256 over model and serial: readable enough for
    operators, safe in MQTT topics and Kafka keys, and without the serial itself, which
    retailers' sales records hold next to the buyer's name. It is pseudonymous, not
    secret: whoever knows model and serial can compute it; the MQTT secret is what
    proves the device.
    """
    model = normalize_code(model_number)
    digest = hashlib.sha256(f"{model}\x1f{normalize_code(serial_number)}".encode()).hexdigest()
    return f"{model}-{digest[:20]}"


@dataclass(frozen=True, slots=True)
class ProductModel:
    """A product model the maker sells."""

    model_number: str
    category: Category
    name: str
    launched_on: date


@dataclass(frozen=True, slots=True)
class Purchase:
    """How the owner got the unit. `store_id` only for own stores and retailers."""

    channel: PurchaseChannel
    store_id: str | None = None
    purchased_on: date | None = None


@dataclass(frozen=True, slots=True)
class NewOwner:
    """An owner account as the maker's site creates it (contacts stay in the registry's
    `owner_contacts` table, away from analytics)."""

    name: str
    email: str
    phone: str | None
    region: str
    membership_tier: MembershipTier
    analytics_consent: bool
    marketing_consent: bool
    policy_version: str | None = None
    """The policy version the owner saw when deciding; None: the current one."""


@dataclass(frozen=True, slots=True)
class Owner:
    """An owner without personal data: what any part of the registry may show."""

    owner_id: UUID
    status: OwnerStatus
    region: str | None
    membership_tier: MembershipTier | None
    analytics_consent: bool
    """Product-planning consent in force now (granted, not lapsed by a newer policy)."""
    marketing_consent: bool
    """Marketing consent in force now."""
    last_active_at: datetime


@dataclass(frozen=True, slots=True)
class Registration:
    """A successful registration or transfer.

    `mqtt_secret` is shown to the owner once and stored nowhere; the device logs in
    to the broker with username `device_id` and this secret.
    """

    device_id: str
    owner_id: UUID
    model_number: str
    serial_number: str
    valid_from: datetime
    mqtt_secret: str
    password_login: bool = True
    """False for a model that logs in with a certificate only (`registry.password_models`):
    the broker knows no password for it, and `mqtt_secret` is not shown."""
    certificate: str | None = None
    """The TLS client certificate (PEM) signed from the device's CSR, if it sent one."""


@dataclass(frozen=True, slots=True)
class OwnershipPeriod:
    """One owner's time with a device: [valid_from, valid_to), valid_to None if current.

    `owner_id` is None once that owner has been erased."""

    owner_id: UUID | None
    valid_from: datetime
    valid_to: datetime | None
    purchase_channel: PurchaseChannel
    store_id: str | None
    purchased_on: date | None
    ended_reason: str | None


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """One row of the consent audit trail: a decision, under the policy version the
    owner saw (`initial` for those recorded before versions were)."""

    purpose: ConsentPurpose
    granted: bool
    changed_at: datetime
    source: str
    policy_version: str


@dataclass(frozen=True, slots=True)
class Purpose:
    """One purpose of the catalogue, with its legal basis."""

    purpose: str
    legal_basis: LegalBasis
    title: str
    description: str


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """A privacy-policy text, in effect from `effective_at` until the next version's;
    `reasks` are the consent purposes whose text it changed materially (a grant made
    under an earlier version is no longer in force for them once this one is)."""

    version: str
    effective_at: datetime
    policy_text: str
    published_at: datetime
    reasks: frozenset[ConsentPurpose]


@dataclass(frozen=True, slots=True)
class ConsentStatus:
    """An owner's standing on one consent purpose now, and the decision behind it."""

    purpose: ConsentPurpose
    state: ConsentState
    decided_at: datetime | None
    policy_version: str | None
    source: str | None

    @property
    def in_force(self) -> bool:
        return self.state is ConsentState.GRANTED


@dataclass(frozen=True, slots=True)
class MarketingContact:
    """An owner marketing may write to (active, consenting)."""

    owner_id: UUID
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class OperatorAction:
    """Who does an operator action and why: the operator's sign-in subject and the
    reason they give (a support ticket, say); both go to the audit log."""

    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the registry's audit log of operator actions."""

    actor: str
    action: str
    """`revoke_credentials`, `reissue_credentials` or `erase_owner`."""
    target: str
    """The device id, or the owner id."""
    reason: str
    at: datetime
