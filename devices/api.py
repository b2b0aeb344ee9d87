"""The registry's HTTP API, for the maker's own site (which signs owners in).

Owners register units, hand them on, change consent, come back from dormancy and ask
for erasure. Every refused request answers the one `Problem` document of
`ingest.httpapi`, `{"reason": ..., "detail": ..., "field": ...}`: a `RejectReason` code
(404 unknown thing, 403 not allowed, 409 conflict with the current state, 429 too many
failed attempts, with `Retry-After`), `invalid_request` (422) for a field that breaks
its rule, `malformed_body` (400) for a body that is not readable JSON, and `unavailable`
(503, with `Retry-After`) when PostgreSQL or the MQTT broker does not answer. Booleans are
JSON `true`/`false` only; text fields refuse control characters (PostgreSQL cannot
store NUL) and lone surrogates. `GET /health` answers while the process serves,
`GET /ready` while PostgreSQL answers too; `GET /metrics` is Prometheus text. The
OpenAPI document is at `/openapi.json`.

Every route but `/health`, `/ready` and `/metrics` needs `Authorization: Bearer
<token>`, a JWT of the maker's sign-in (`ingest.auth`): none or an invalid one is 401
`unauthenticated`. The API acts for the token's subject only:

- `POST /owners` creates the owner account of the token's subject (one per subject: a
  second is 409 `owner_exists`; `GET /owners/me` finds it). Every owner route naming
  an owner id other than the caller's own answers 403 `forbidden`, whether or not that
  owner exists (so ids cannot be probed); so does any owner route for a sign-in with no
  account yet.
- Registration, release, transfer, revocation and reissue act for the caller's owner
  account: on a device someone else owns, 403 `not_current_owner` (404
  `unknown_device` when no device has the id). A transfer is the current owner's
  release to the recipient they name (`to_owner_id`); a buyer without that release
  registers the unit with `resale: true` and the code printed inside it (proof of
  possession).
- Consent is per purpose and policy version (`devices.policies`): `GET /purposes` is
  the catalogue (legal basis per purpose) and the policy in effect; `GET
  /owners/{id}/consents` says where the owner stands on each consent purpose and what is
  pending (a grant lapsed by a newer version, or none yet); `POST
  /owners/{id}/consents/decisions` records a decision under the version the owner was
  shown (required for a grant; a grant names one purpose: 422 `bundled_consent`; an
  older or future version: 409 `stale_policy_version`); `GET
  /owners/{id}/consents/history` is the trail. The older consent fields (sign-up,
  `PUT .../consents`, reactivation) take `policy_version` optionally (the current one
  is recorded without it), so clients written before versions keep working.
- Reactivating a dormant owner needs a token whose `auth_time` is at most
  `auth.reauth_max_age_s` old (403 `reauthentication_required` otherwise).
- Owners download everything held about them (`GET /owners/{owner_id}/export`, JSON or
  a zip of CSV files, streamed: `devices.export`) when the app is given the usage
  tables (`usage`).
- Owners revoke and reissue their own devices' secrets and erase themselves. The same
  for anyone's device or account, on a request support received, is an operator's:
  `/operator/...`, with the scope `auth.operator_scope` (403 `insufficient_scope`
  without it) and a `reason`; each is written to the registry's `audit_log` (who: the
  operator's subject, what, on what, why, when) in the action's transaction.

`/docs` and `/redoc` are served only where `auth.docs` turns them on.

Registration answers one `registration_refused` (403) to every failed proof, whatever
was wrong, and limits failures per caller (`devices.limits.Caller`): the token's subject
and the client address, which uvicorn takes from the
site's proxy's `X-Forwarded-For` when the proxy is trusted (`forwarded_allow_ips`), so
that owners behind one proxy do not share one address's allowance.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from devices.errors import (
    RegistryError,
    RegistryUnavailable,
    Rejected,
    RejectReason,
    TooManyAttempts,
)
from devices.export import (
    Format,
    UsageLink,
    export_owner,
    file_name,
    media_type,
    usage_tables_exist,
)
from devices.limits import Caller
from devices.records import (
    ConsentChange,
    ConsentPurpose,
    ConsentState,
    ConsentStatus,
    LegalBasis,
    MembershipTier,
    NewOwner,
    OperatorAction,
    Owner,
    OwnerStatus,
    PolicyVersion,
    Purchase,
    PurchaseChannel,
    Registration,
)
from devices.registry import Registry
from ingest import auth
from ingest.httpapi import (
    Problem,
    documented,
    install,
    not_replaced,
    problem,
    reason_enum,
    unavailable,
)
from ingest.metrics import HttpMetrics

log = logging.getLogger(__name__)

STATUS_BY_REASON: dict[RejectReason, int] = {
    RejectReason.REGISTRATION_REFUSED: 403,
    RejectReason.OWNED_BY_OTHER: 409,
    RejectReason.TOO_MANY_ATTEMPTS: 429,
    RejectReason.ALREADY_OWNER: 409,
    RejectReason.UNKNOWN_OWNER: 404,
    RejectReason.OWNER_NOT_ACTIVE: 409,
    RejectReason.UNKNOWN_DEVICE: 404,
    RejectReason.NOT_CURRENT_OWNER: 403,
    RejectReason.REAUTHENTICATION_REQUIRED: 403,
    RejectReason.NOT_DORMANT: 409,
    RejectReason.BAD_CSR: 422,
    RejectReason.CERTIFICATE_REQUIRED: 422,
    RejectReason.NO_LIVE_CREDENTIALS: 409,
    RejectReason.OWNER_EXISTS: 409,
    RejectReason.UNKNOWN_POLICY_VERSION: 422,
    RejectReason.STALE_POLICY_VERSION: 409,
    RejectReason.UNKNOWN_PURPOSE: 422,
    RejectReason.CONSENT_NOT_NEEDED: 422,
    RejectReason.BUNDLED_CONSENT: 422,
    RejectReason.INVALID_POLICY: 422,
}
"""HTTP status per reason: 404 unknown thing, 403 not allowed (a failed proof of
purchase among them), 409 conflicts with the current state, 429 too many failed
attempts (with Retry-After)."""

_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """Text PostgreSQL can store and a person can read: no control characters (NUL
    cannot be stored; none belongs in these fields) and no lone surrogates (UTF-8
    cannot encode them). The OpenAPI document states the same rule as a pattern."""
    if _CONTROL.search(text):
        raise ValueError("must not contain control characters (such as NUL or a line break)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be Unicode text (a lone surrogate is not)") from None
    return text


# Lengths first (`_text`), then `Printable` and its documented pattern (`PRINTABLE`):
# pydantic checks constraints placed after a validator on its result, as "items".
Printable = AfterValidator(_printable)
PRINTABLE = Field(json_schema_extra={"pattern": _PRINTABLE})


def _text(min_length: int, max_length: int, pattern: str | None = None) -> StringConstraints:
    return StringConstraints(min_length=min_length, max_length=max_length, pattern=pattern)


def _date_text(value: object) -> object:
    """Dates as JSON text `YYYY-MM-DD` only: pydantic would also take a number (a Unix
    time) or a date-time, which the OpenAPI `format: date` does not allow."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        raise ValueError("must be a date as text, YYYY-MM-DD")
    return value


# Model and serial numbers as typed from a label; `normalize_code` trims and upper-cases.
Code = Annotated[str, _text(1, 40), Printable, PRINTABLE]
Source = Annotated[str, _text(1, 100), Printable, PRINTABLE]
# The policy version the owner was shown when deciding (GET /purposes names the current).
VersionName = Annotated[str, _text(1, 40, r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
IsoDate = Annotated[date, BeforeValidator(_date_text)]
# A path parameter: bytes that are not UTF-8 (`%ED%A0%80`) arrive as U+FFFD.
DeviceId = Annotated[str, _text(1, 100), Printable, AfterValidator(not_replaced), PRINTABLE, Path()]
# PEM is ASCII lines; `devices.certificates.check_csr` says what else is wrong.
Csr = Annotated[str, _text(1, 16384, r"^[\x20-\x7e\r\n]*$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistryProblem(Problem):
    """A refused request: the reason code, a human-readable detail, the field at fault."""

    reason: Annotated[
        str,
        Field(
            json_schema_extra=reason_enum([*(r.value for r in RejectReason), *auth.AUTH_REASONS])
        ),
    ]


class CreateOwnerIn(Body):
    name: Annotated[str, _text(1, 200), Printable, PRINTABLE]
    email: Annotated[str, _text(3, 320, r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")]
    phone: Annotated[str, _text(0, 40), Printable, PRINTABLE] | None = None
    region: Annotated[str, _text(2, 6, r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")]
    membership_tier: MembershipTier = MembershipTier.STANDARD
    analytics_consent: StrictBool
    marketing_consent: StrictBool
    source: Source = "api"
    policy_version: VersionName | None = None
    """The policy version the owner was shown (the current one; null: whichever is)."""

    def new_owner(self) -> NewOwner:
        """The owner to create; `usagepipe registry add-owner` builds it this way too."""
        return NewOwner(
            name=self.name,
            email=self.email,
            phone=self.phone,
            region=self.region,
            membership_tier=self.membership_tier,
            analytics_consent=self.analytics_consent,
            marketing_consent=self.marketing_consent,
            policy_version=self.policy_version,
        )


class OwnerIdOut(Body):
    owner_id: UUID


class OwnerOut(Body):
    """An owner without personal data; the consents are those in force now."""

    owner_id: UUID
    status: OwnerStatus
    region: str | None
    membership_tier: MembershipTier | None
    analytics_consent: bool
    marketing_consent: bool
    last_active_at: datetime

    @classmethod
    def of(cls, owner: Owner) -> "OwnerOut":
        return cls(
            owner_id=owner.owner_id,
            status=owner.status,
            region=owner.region,
            membership_tier=owner.membership_tier,
            analytics_consent=owner.analytics_consent,
            marketing_consent=owner.marketing_consent,
            last_active_at=owner.last_active_at,
        )


class PurchaseIn(Body):
    channel: PurchaseChannel
    store_id: Annotated[str, _text(1, 40), Printable, PRINTABLE] | None = None
    purchased_on: IsoDate | None = None

    def purchase(self) -> Purchase:
        return Purchase(self.channel, self.store_id, self.purchased_on)


class RegistrationIn(Body):
    """A unit to register to the caller's owner account."""

    model_number: Code
    serial_number: Code
    registration_code: Annotated[str, _text(1, 64), Printable, PRINTABLE]
    purchase: PurchaseIn
    resale: StrictBool = False
    """True when the unit was bought second-hand and its previous owner did not release
    it; the code from inside the unit is then the proof of possession."""
    csr: Csr | None = None
    """A PKCS#10 certificate signing request (PEM) from the device, for a TLS client
    certificate; its private key never leaves the device."""


class RegistrationOut(Body):
    """The device's identity and MQTT login. The secret is shown this once only."""

    device_id: str
    owner_id: UUID
    model_number: str
    serial_number: str
    valid_from: datetime
    mqtt_username: str
    mqtt_password: str | None
    """Null for a model that logs in with a certificate only."""
    certificate: str | None = None
    """The device's TLS client certificate (PEM, subject CN = device id) when the
    registration sent a CSR; null otherwise."""

    @classmethod
    def of(cls, done: Registration) -> "RegistrationOut":
        return cls(
            device_id=done.device_id,
            owner_id=done.owner_id,
            model_number=done.model_number,
            serial_number=done.serial_number,
            valid_from=done.valid_from,
            mqtt_username=done.device_id,
            mqtt_password=done.mqtt_secret if done.password_login else None,
            certificate=done.certificate,
        )


class TransferIn(Body):
    """The current owner (the caller) hands the device to `to_owner_id`."""

    to_owner_id: UUID
    purchase: PurchaseIn = Field(default_factory=lambda: PurchaseIn(channel=PurchaseChannel.GIFT))


class RevokedOut(Body):
    revoked: bool
    """False when the device had no live secret (revoking twice is harmless)."""


class ConsentIn(Body):
    """Each stated purpose is a decision of its own."""

    analytics: StrictBool | None = None
    marketing: StrictBool | None = None
    source: Source = "api"
    policy_version: VersionName | None = None
    """The policy version the owner was shown (the current one; null: whichever is)."""


class DecisionIn(Body):
    """The owner's decision on `purposes`: a grant names one purpose (each optional
    purpose is asked on its own; several is 422 `bundled_consent`), a withdrawal may
    name several."""

    purposes: Annotated[list[Annotated[str, _text(1, 40)]], Field(min_length=1, max_length=10)]
    granted: StrictBool
    policy_version: Annotated[VersionName | None, Field(validate_default=True)] = None
    """The policy version the owner was shown, which must be the current one: required
    for a grant (the text consented to is on record), optional for a withdrawal."""
    source: Source = "api"

    @field_validator("policy_version")
    @classmethod
    def _named_for_a_grant(cls, version: str | None, info: ValidationInfo) -> str | None:
        if version is None and info.data.get("granted") is True:
            raise ValueError("a grant names the policy version the owner was shown")
        return version


class PolicyOut(Body):
    """A privacy-policy version: its text, when it takes effect, and the consent
    purposes it asks again (their text changed materially)."""

    version: str
    effective_at: datetime
    published_at: datetime
    text: str
    reasks: list[ConsentPurpose]

    @classmethod
    def of(cls, policy: PolicyVersion) -> "PolicyOut":
        return cls(
            version=policy.version,
            effective_at=policy.effective_at,
            published_at=policy.published_at,
            text=policy.policy_text,
            reasks=sorted(policy.reasks),
        )


class PurposeOut(Body):
    purpose: str
    legal_basis: LegalBasis
    consent_required: bool
    title: str
    description: str


class PurposesOut(Body):
    """The catalogue of purposes, the policy in effect and any published to come."""

    purposes: list[PurposeOut]
    current_policy: PolicyOut
    upcoming_policies: list[PolicyOut]


class ConsentStatusOut(Body):
    """Where the owner stands on one consent purpose."""

    purpose: ConsentPurpose
    state: ConsentState
    in_force: bool
    pending: bool
    """The owner has a decision to make: never asked, or a grant lapsed by a newer policy."""
    decided_at: datetime | None
    policy_version: str | None
    source: str | None

    @classmethod
    def of(cls, status: ConsentStatus) -> "ConsentStatusOut":
        return cls(
            purpose=status.purpose,
            state=status.state,
            in_force=status.in_force,
            pending=status.state.pending,
            decided_at=status.decided_at,
            policy_version=status.policy_version,
            source=status.source,
        )


class ConsentsOut(Body):
    """The owner's consents now: one entry per consent purpose, and those pending."""

    owner_id: UUID
    current_policy_version: str
    consents: list[ConsentStatusOut]
    pending: list[ConsentPurpose]


class ConsentChangeOut(Body):
    purpose: ConsentPurpose
    granted: bool
    changed_at: datetime
    source: str
    policy_version: str

    @classmethod
    def of(cls, change: ConsentChange) -> "ConsentChangeOut":
        return cls(
            purpose=change.purpose,
            granted=change.granted,
            changed_at=change.changed_at,
            source=change.source,
            policy_version=change.policy_version,
        )


class ConsentHistoryOut(Body):
    owner_id: UUID
    history: list[ConsentChangeOut]
    """Oldest first."""


class ReactivationIn(Body):
    """Fresh consent for both purposes; the fresh sign-in is the token's `auth_time`."""

    analytics_consent: StrictBool
    marketing_consent: StrictBool
    source: Source = "api"
    policy_version: VersionName | None = None
    """The policy version the owner was shown (the current one; null: whichever is)."""


class OperatorIn(Body):
    """Why an operator acts (a support ticket, the owner's request): for the audit log."""

    reason: Annotated[str, _text(1, 500), Printable, PRINTABLE]


class ErasureOut(Body):
    owner_id: UUID
    released_devices: list[str]


RegistryFactory = Callable[[], AbstractAsyncContextManager[Registry]]


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(_registry)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route: 401, 403, 422 and 503 for all, plus `statuses`."""
    answers = documented(RegistryProblem, *sorted({*statuses, 403, 422, 503}))
    return dict(sorted({**answers, **auth.documented(RegistryProblem, scoped=False)}.items()))


_WITH_BODY = (400,)
_DEVICE = (404, 409)


async def _own_account(who: auth.Caller, registry: RegistryDep) -> UUID:
    """The caller's owner account, or 403 `forbidden` for a sign-in without one."""
    owner_id = await registry.owner_of_subject(who.subject)
    if owner_id is None:
        raise auth.forbidden("this sign-in has no owner account yet: create it with POST /owners")
    return owner_id


OwnAccount = Annotated[UUID, Depends(_own_account)]


async def _this_owner(owner_id: UUID, mine: OwnAccount) -> UUID:
    """The owner named in the path, which must be the caller's own account (403)."""
    if owner_id != mine:
        raise auth.forbidden("an owner may read and change their own account only")
    return owner_id


ThisOwner = Annotated[UUID, Depends(_this_owner)]


owner_routes = APIRouter()
"""Owners' accounts: creation, consent, reactivation after dormancy, erasure."""

device_routes = APIRouter()
"""Units: registration, release, transfer, and their MQTT credentials."""

operator_routes = APIRouter(prefix="/operator", tags=["operator"])
"""Support's actions on any owner's device or account: scoped, with a reason, audited."""


def create_app(
    registry_factory: RegistryFactory,
    *,
    verifier: auth.Verifier,
    docs: bool = False,
    metrics_registry: CollectorRegistry | None = None,
    usage: UsageLink | None = None,
) -> FastAPI:
    """The API over the registry that `registry_factory()` opens for the app's lifetime,
    for callers whose tokens `verifier` accepts (`/docs` too where `docs`); its request
    metrics go to `metrics_registry` (a fresh one when not given). `usage`: the usage
    tables owners' exports read (without it, an export answers 503 `unavailable`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with registry_factory() as registry:
            app.state.registry = registry
            yield

    app = FastAPI(
        title="usagepipe device registry",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.usage = usage
    metrics = metrics_registry if metrics_registry is not None else CollectorRegistry()

    async def postgresql() -> None:
        registry: Registry = app.state.registry
        async with registry.transaction() as conn:
            await conn.fetchval("SELECT 1")

    install(
        app,
        metrics=HttpMetrics(metrics, "registry"),
        registry=metrics,
        model=RegistryProblem,
        ready={"postgresql": postgresql},
        ready_doc="200 while PostgreSQL answers `SELECT 1` in the registry's schema within "
        "2 s; 503 naming `postgresql` otherwise. The MQTT broker and Kafka are not checked "
        "(registry events wait in the outbox while Kafka is away).",
    )
    auth.install(app, verifier)
    app.add_exception_handler(Rejected, _rejected)
    app.add_exception_handler(RegistryError, _failed)
    app.include_router(owner_routes)
    app.include_router(device_routes)
    app.include_router(operator_routes)
    return app


async def _rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Rejected)
    return problem(STATUS_BY_REASON[exc.reason], exc.reason.value, exc.message)


async def _failed(request: Request, exc: Exception) -> JSONResponse:
    # RegistryUnavailable, or the broker refusing the registry's admin login (a
    # setup fault the caller cannot fix by changing the request).
    if isinstance(exc, RegistryUnavailable):
        log.warning("registry unavailable: %s", exc)
    else:
        log.error("registry failed: %s", exc)
    return unavailable("the registry cannot do this now; try again shortly")


# -- owners --------------------------------------------------------------------------


@owner_routes.post(
    "/owners", status_code=status.HTTP_201_CREATED, responses=_errors(*_WITH_BODY, 409)
)
async def create_owner(body: CreateOwnerIn, who: auth.Caller, registry: RegistryDep) -> OwnerIdOut:
    """Create the caller's owner account (one per sign-in subject: a second is 409
    `owner_exists`). Contacts are kept apart from analytics data."""
    owner_id = await registry.create_owner(
        body.new_owner(), source=body.source, subject=who.subject
    )
    return OwnerIdOut(owner_id=owner_id)


@owner_routes.get("/owners/me", responses=_errors())
async def get_me(owner_id: OwnAccount, registry: RegistryDep) -> OwnerOut:
    """The caller's own owner account (403 `forbidden` when the sign-in has none)."""
    return OwnerOut.of(await registry.get_owner(owner_id))


@owner_routes.get("/owners/{owner_id}", responses=_errors())
async def get_owner(owner_id: ThisOwner, registry: RegistryDep) -> OwnerOut:
    """The owner's status, tier and consents (no personal data): the caller's own only."""
    return OwnerOut.of(await registry.get_owner(owner_id))


@owner_routes.get("/purposes", responses=_errors())
async def purposes(who: auth.Caller, registry: RegistryDep) -> PurposesOut:
    """The purposes owners' data is used for, each with its legal basis (`contract`: no
    consent; `consent`: only while the owner's consent is in force), and the privacy
    policy in effect, whose `version` decisions name."""
    catalogue = await registry.purposes()
    versions = await registry.policy_versions()
    current = await registry.current_policy()
    return PurposesOut(
        purposes=[
            PurposeOut(
                purpose=p.purpose,
                legal_basis=p.legal_basis,
                consent_required=p.legal_basis is LegalBasis.CONSENT,
                title=p.title,
                description=p.description,
            )
            for p in catalogue
        ],
        current_policy=PolicyOut.of(current),
        upcoming_policies=[
            PolicyOut.of(v) for v in versions if v.effective_at > current.effective_at
        ],
    )


@owner_routes.put("/owners/{owner_id}/consents", responses=_errors(*_WITH_BODY, 409))
async def set_consent(owner_id: ThisOwner, body: ConsentIn, registry: RegistryDep) -> OwnerOut:
    """Grant or withdraw consent for analytics and/or marketing, each a decision of its
    own, under `policy_version` (audited). A grant naming an older or future version is
    409 `stale_policy_version`, an unknown one 422 `unknown_policy_version`."""
    owner = await registry.set_consent(
        owner_id,
        analytics=body.analytics,
        marketing=body.marketing,
        source=body.source,
        policy_version=body.policy_version,
    )
    return OwnerOut.of(owner)


@owner_routes.get("/owners/{owner_id}/consents", responses=_errors())
async def get_consents(owner_id: ThisOwner, registry: RegistryDep) -> ConsentsOut:
    """Each consent purpose: granted (in force), declined, lapsed (granted under a
    policy version whose text for it changed since: asked again) or undecided; and the
    purposes pending a decision."""
    status = await registry.consent_status(owner_id)
    current = await registry.current_policy()
    return ConsentsOut(
        owner_id=owner_id,
        current_policy_version=current.version,
        consents=[ConsentStatusOut.of(s) for s in status.values()],
        pending=[p for p, s in status.items() if s.state.pending],
    )


@owner_routes.post("/owners/{owner_id}/consents/decisions", responses=_errors(*_WITH_BODY, 409))
async def decide(owner_id: ThisOwner, body: DecisionIn, registry: RegistryDep) -> ConsentsOut:
    """Record a decision per purpose under the policy version the owner was shown. A
    grant covers one purpose (422 `bundled_consent` otherwise); a purpose on the
    contract is 422 `consent_not_needed`, an unknown one 422 `unknown_purpose`."""
    await registry.decide(
        owner_id,
        body.purposes,
        granted=body.granted,
        source=body.source,
        policy_version=body.policy_version,
    )
    return await get_consents(owner_id, registry)


@owner_routes.get("/owners/{owner_id}/consents/history", responses=_errors())
async def consent_history(owner_id: ThisOwner, registry: RegistryDep) -> ConsentHistoryOut:
    """Every consent decision of the owner, oldest first, with its policy version."""
    await registry.get_owner(owner_id)
    history = await registry.consent_history(owner_id)
    return ConsentHistoryOut(owner_id=owner_id, history=[ConsentChangeOut.of(c) for c in history])


@owner_routes.post("/owners/{owner_id}/reactivation", responses=_errors(*_WITH_BODY, 409))
async def reactivate(
    request: Request,
    owner_id: ThisOwner,
    body: ReactivationIn,
    who: auth.Caller,
    registry: RegistryDep,
) -> OwnerOut:
    """Bring a dormant owner back after a fresh sign-in (the token's `auth_time` at most
    `auth.reauth_max_age_s` old), with fresh consent."""
    max_age = timedelta(seconds=auth.verifier_of(request).settings.reauth_max_age_s)
    try:
        owner = await registry.reactivate(
            owner_id,
            reauthenticated=who.signed_in_within(max_age),
            analytics_consent=body.analytics_consent,
            marketing_consent=body.marketing_consent,
            source=body.source,
            policy_version=body.policy_version,
        )
    except Rejected as exc:
        if exc.reason is not RejectReason.REAUTHENTICATION_REQUIRED:
            raise
        raise Rejected(exc.reason, _stale_sign_in(who, max_age)) from None
    return OwnerOut.of(owner)


def _stale_sign_in(who: auth.Principal, max_age: timedelta) -> str:
    """Why `who`'s token does not reactivate: what the sign-in lacks, and what to do."""
    limit = int(max_age.total_seconds())
    if who.auth_time is None:
        return (
            "reactivating needs a fresh sign-in: this token has no auth_time; sign in"
            f" again and send the new token within {limit} s"
        )
    age = int((datetime.now(UTC) - who.auth_time).total_seconds())
    return (
        f"reactivating needs a sign-in at most {limit} s old; this token's was {age} s ago"
        " (auth_time): sign in again and send the new token"
    )


@owner_routes.post("/owners/{owner_id}/erasure", responses=_errors())
async def erase(owner_id: ThisOwner, registry: RegistryDep) -> ErasureOut:
    """Erase the caller's own personal data and links now; the sign-in's link goes too."""
    released = await registry.erase_owner(owner_id)
    return ErasureOut(owner_id=owner_id, released_devices=released)


_EXPORT_ANSWERS = _errors()
_EXPORT_ANSWERS[200] = {
    "description": "Everything held about the owner, streamed: JSON (`format=json`) or a zip"
    " of one CSV per table and `manifest.csv` (`format=csv`); see the README, Privacy.",
    "headers": {
        "Content-Disposition": {
            "description": "attachment; filename=usagepipe-owner-<owner_id>.json or .zip",
            "schema": {"type": "string"},
        }
    },
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["format", "version", "owner_id", "exported_at", "tables", "counts"],
                "properties": {
                    "format": {"type": "string", "const": "usagepipe-owner-export"},
                    "version": {"type": "integer"},
                    "owner_id": {"type": "string", "format": "uuid"},
                    "exported_at": {"type": "string", "format": "date-time"},
                    "tables": {
                        "type": "object",
                        "additionalProperties": {"type": "array", "items": {"type": "object"}},
                    },
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                },
            }
        },
        "application/zip": {"schema": {"type": "string", "format": "binary"}},
    },
}


@owner_routes.get(
    "/owners/{owner_id}/export",
    response_class=StreamingResponse,
    responses=dict(sorted(_EXPORT_ANSWERS.items(), key=lambda item: str(item[0]))),
)
async def export(
    request: Request,
    owner_id: ThisOwner,
    registry: RegistryDep,
    fmt: Annotated[Format, Query(alias="format")] = "json",
) -> Response:
    """Everything the maker holds about the caller: account, contacts, consent history,
    devices, ownership periods, and the usage rows, rollups and dead letters carrying
    their key, from the live data in one snapshot; streamed as JSON or a zip of CSVs."""
    usage: UsageLink | None = request.app.state.usage
    if usage is None:
        return unavailable(
            "exports are not set up on this registry (it has no usage tables to read)"
        )
    await registry.get_owner(owner_id)  # a database that does not answer: 503, before any byte
    async with registry.snapshot() as conn:
        if not await usage_tables_exist(conn, usage):
            return unavailable(
                f"the usage tables ({usage.table}) do not exist yet: exports wait until"
                " they are migrated"
            )
    chunks = export_owner(
        registry.snapshot,
        owner_id,
        fmt,
        registry_schema=registry.settings.db_schema,
        usage=usage,
        now=datetime.now(UTC),
    )
    return StreamingResponse(
        chunks,
        media_type=media_type(fmt),
        headers={"Content-Disposition": f'attachment; filename="{file_name(owner_id, fmt)}"'},
    )


# -- registrations and devices ------------------------------------------------------


_REGISTRATION_ERRORS = _errors(*_WITH_BODY, 403, 404, 409, 429)
_REGISTRATION_ERRORS[429] = {
    **_REGISTRATION_ERRORS[429],
    "description": "The caller used up its failed registrations for now (reason "
    "`too_many_attempts`); try again after `Retry-After` seconds.",
    "headers": {
        "Retry-After": {
            "description": "Seconds until the caller may try again.",
            "schema": {"type": "integer"},
        }
    },
}


@device_routes.post(
    "/registrations",
    status_code=status.HTTP_201_CREATED,
    response_model=RegistrationOut,
    responses=_REGISTRATION_ERRORS,
)
async def register(
    body: RegistrationIn,
    request: Request,
    who: auth.Caller,
    owner_id: OwnAccount,
    registry: RegistryDep,
) -> RegistrationOut | JSONResponse:
    """Register a unit to the caller with model, serial and the code printed inside it.

    A wrong model, serial or code all answer 403 `registration_refused`; failures are
    limited per caller (the token's subject and the client address), 429
    `too_many_attempts`."""
    caller = Caller(who.subject, request.client.host if request.client else None)
    try:
        done = await registry.register(
            owner_id,
            body.model_number,
            body.serial_number,
            body.registration_code,
            body.purchase.purchase(),
            resale=body.resale,
            csr=body.csr,
            caller=caller,
        )
    except TooManyAttempts as exc:
        return problem(
            STATUS_BY_REASON[exc.reason],
            exc.reason.value,
            exc.message,
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    return RegistrationOut.of(done)


@device_routes.post(
    "/devices/{device_id}/release",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_errors(*_DEVICE),
)
async def release(device_id: DeviceId, owner_id: OwnAccount, registry: RegistryDep) -> Response:
    """The caller, the current owner, gives the device up; its MQTT secret is revoked."""
    await registry.release(device_id, owner_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@device_routes.post("/devices/{device_id}/transfer", responses=_errors(*_WITH_BODY, *_DEVICE))
async def transfer(
    device_id: DeviceId, body: TransferIn, owner_id: OwnAccount, registry: RegistryDep
) -> RegistrationOut:
    """The caller, the current owner, hands the device to `to_owner_id`, who gets a new
    secret (shown in this answer, for the recipient's unit)."""
    done = await registry.transfer(device_id, owner_id, body.to_owner_id, body.purchase.purchase())
    return RegistrationOut.of(done)


@device_routes.post("/devices/{device_id}/credentials/revoke", responses=_errors(*_DEVICE))
async def revoke(device_id: DeviceId, owner_id: OwnAccount, registry: RegistryDep) -> RevokedOut:
    """The caller, the current owner, revokes the device's MQTT secret."""
    return RevokedOut(revoked=await registry.revoke_credentials(device_id, owner_id))


@device_routes.post("/devices/{device_id}/credentials", responses=_errors(*_DEVICE))
async def reissue(
    device_id: DeviceId, owner_id: OwnAccount, registry: RegistryDep
) -> RegistrationOut:
    """The caller, the current owner, gets a new MQTT secret; the previous one stops
    working."""
    return RegistrationOut.of(await registry.reissue_credentials(device_id, owner_id))


# -- device certificates (TLS) -------------------------------------------------------


class CertificateIn(Body):
    csr: Csr
    """A new PKCS#10 request (PEM) from the device: the same key or a new one."""


class CertificateOut(Body):
    """A device's new TLS client certificate and what the registry recorded of it."""

    device_id: str
    certificate: str
    serial: str
    """The certificate's serial number, lower-case hex."""
    fingerprint_sha256: str
    not_after: datetime


@device_routes.post("/devices/{device_id}/certificate", responses=_errors(*_WITH_BODY, *_DEVICE))
async def renew_certificate(
    device_id: DeviceId, body: CertificateIn, owner_id: OwnAccount, registry: RegistryDep
) -> CertificateOut:
    """The caller, the current owner, renews the device's TLS client certificate from a new CSR
    (before the old one expires); the old one stays valid until its own expiry."""
    issued = await registry.renew_certificate(device_id, owner_id, body.csr)
    return CertificateOut(
        device_id=device_id,
        certificate=issued.pem,
        serial=f"{issued.serial:x}",
        fingerprint_sha256=issued.fingerprint,
        not_after=issued.not_after,
    )


# -- operators ------------------------------------------------------------------------


def _action(who: auth.Principal, body: OperatorIn) -> OperatorAction:
    return OperatorAction(actor=who.subject, reason=body.reason)


@operator_routes.post(
    "/devices/{device_id}/credentials/revoke", responses=_errors(*_WITH_BODY, *_DEVICE)
)
async def operator_revoke(
    device_id: DeviceId, body: OperatorIn, who: auth.Operator, registry: RegistryDep
) -> RevokedOut:
    """Revoke the secret of anyone's device (audited: who, why)."""
    revoked = await registry.revoke_credentials(device_id, None, operator=_action(who, body))
    return RevokedOut(revoked=revoked)


@operator_routes.post("/devices/{device_id}/credentials", responses=_errors(*_WITH_BODY, *_DEVICE))
async def operator_reissue(
    device_id: DeviceId, body: OperatorIn, who: auth.Operator, registry: RegistryDep
) -> RegistrationOut:
    """A new secret for anyone's device, for its current owner (audited: who, why)."""
    done = await registry.reissue_credentials(device_id, None, operator=_action(who, body))
    return RegistrationOut.of(done)


@operator_routes.post("/owners/{owner_id}/erasure", responses=_errors(*_WITH_BODY, 404))
async def operator_erase(
    owner_id: UUID, body: OperatorIn, who: auth.Operator, registry: RegistryDep
) -> ErasureOut:
    """Erase an owner on a request support received (audited: who, why; idempotent)."""
    await registry.get_owner(owner_id)  # 404 for an id that never existed
    released = await registry.erase_owner(owner_id, operator=_action(who, body))
    return ErasureOut(owner_id=owner_id, released_devices=released)
