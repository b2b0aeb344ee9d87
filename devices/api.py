"""The registry's HTTP API, for the maker's own site (which signs owners in).

Owners register units, hand them on, change consent, come back from dormancy and ask
for erasure. Every refused request answers the one `Problem` document of
`ingest.httpapi`, `{"reason": ..., "detail": ..., "field": ...}`: a `RejectReason` code
(404 unknown thing, 403 not allowed, 409 conflict with the current state, 429 too many
failed attempts, with `Retry-After`), `invalid_request` (422) for a field that breaks
its rule, `malformed_body` (400) for a body that is not readable JSON, and `unavailable`
(503, with `Retry-After`) when PostgreSQL or the MQTT broker does not answer. Booleans are
JSON `true`/`false` only; text fields refuse control characters (PostgreSQL cannot
store NUL) and lone surrogates. `GET /health` checks that PostgreSQL answers;
`GET /metrics` is Prometheus text. The OpenAPI document is at `/openapi.json`.

The API trusts the caller about who the owner is (`owner_id`): it is meant to sit
behind the site's authentication, not on the open internet.

Registration answers one `registration_refused` (403) to every failed proof, whatever
was wrong, and limits failures per caller (`devices.limits.Caller`): the subject
(today the body's `owner_id`) and the client address, which uvicorn takes from the
site's proxy's `X-Forwarded-For` when the proxy is trusted (`forwarded_allow_ips`), so
that owners behind one proxy do not share one address's allowance.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import date, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Path, Request, status
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
)

from devices.errors import (
    RegistryError,
    RegistryUnavailable,
    Rejected,
    RejectReason,
    TooManyAttempts,
)
from devices.limits import Caller
from devices.records import (
    MembershipTier,
    NewOwner,
    Owner,
    OwnerStatus,
    Purchase,
    PurchaseChannel,
    Registration,
)
from devices.registry import Registry
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
IsoDate = Annotated[date, BeforeValidator(_date_text)]
# A path parameter: bytes that are not UTF-8 (`%ED%A0%80`) arrive as U+FFFD.
DeviceId = Annotated[str, _text(1, 100), Printable, AfterValidator(not_replaced), PRINTABLE, Path()]
# PEM is ASCII lines; `devices.certificates.check_csr` says what else is wrong.
Csr = Annotated[str, _text(1, 16384, r"^[\x20-\x7e\r\n]*$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistryProblem(Problem):
    """A refused request: the reason code, a human-readable detail, the field at fault."""

    reason: Annotated[str, Field(json_schema_extra=reason_enum(r.value for r in RejectReason))]


class CreateOwnerIn(Body):
    name: Annotated[str, _text(1, 200), Printable, PRINTABLE]
    email: Annotated[str, _text(3, 320, r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")]
    phone: Annotated[str, _text(0, 40), Printable, PRINTABLE] | None = None
    region: Annotated[str, _text(2, 6, r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")]
    membership_tier: MembershipTier = MembershipTier.STANDARD
    analytics_consent: StrictBool
    marketing_consent: StrictBool
    source: Source = "api"

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
        )


class OwnerIdOut(Body):
    owner_id: UUID


class OwnerOut(Body):
    """An owner without personal data."""

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
    owner_id: UUID
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


class OwnerRefIn(Body):
    owner_id: UUID


class TransferIn(Body):
    from_owner_id: UUID
    to_owner_id: UUID
    purchase: PurchaseIn = Field(default_factory=lambda: PurchaseIn(channel=PurchaseChannel.GIFT))


class RevokedOut(Body):
    revoked: bool
    """False when the device had no live secret (revoking twice is harmless)."""


class ConsentIn(Body):
    analytics: StrictBool | None = None
    marketing: StrictBool | None = None
    source: Source = "api"


class ReactivationIn(Body):
    reauthenticated: StrictBool
    """The site confirms the owner just signed in again (password or equivalent)."""
    analytics_consent: StrictBool
    marketing_consent: StrictBool
    source: Source = "api"


class ErasureOut(Body):
    owner_id: UUID
    released_devices: list[str]


RegistryFactory = Callable[[], AbstractAsyncContextManager[Registry]]


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(_registry)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route: 422 and 503 for all, plus `statuses`."""
    return documented(RegistryProblem, *sorted({*statuses, 422, 503}))


_WITH_BODY = (400,)
_DEVICE = (*_WITH_BODY, 403, 404, 409)


owner_routes = APIRouter()
"""Owners' accounts: creation, consent, reactivation after dormancy, erasure."""

device_routes = APIRouter()
"""Units: registration, release, transfer, and their MQTT credentials."""


def create_app(
    registry_factory: RegistryFactory, *, metrics_registry: CollectorRegistry | None = None
) -> FastAPI:
    """The API over the registry that `registry_factory()` opens for the app's lifetime;
    its request metrics go to `metrics_registry` (a fresh one when not given)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with registry_factory() as registry:
            app.state.registry = registry
            yield

    app = FastAPI(
        title="usagepipe device registry",
        version="1",
        lifespan=lifespan,
    )
    metrics = metrics_registry if metrics_registry is not None else CollectorRegistry()

    async def health() -> dict[str, str]:
        registry: Registry = app.state.registry
        async with registry.transaction() as conn:
            await conn.fetchval("SELECT 1")
        return {"postgresql": "ok"}

    install(
        app,
        metrics=HttpMetrics(metrics, "registry"),
        registry=metrics,
        model=RegistryProblem,
        health=health,
        health_doc="200 while the process serves and PostgreSQL answers `SELECT 1` in the "
        "registry's schema within 2 s; 503 `unavailable` otherwise. The MQTT broker and "
        "Kafka are not checked (registry events wait in the outbox while Kafka is away).",
    )
    app.add_exception_handler(Rejected, _rejected)
    app.add_exception_handler(RegistryError, _failed)
    app.include_router(owner_routes)
    app.include_router(device_routes)
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


@owner_routes.post("/owners", status_code=status.HTTP_201_CREATED, responses=_errors(*_WITH_BODY))
async def create_owner(body: CreateOwnerIn, registry: RegistryDep) -> OwnerIdOut:
    """Create an owner account (contacts are kept apart from analytics data)."""
    owner_id = await registry.create_owner(body.new_owner(), source=body.source)
    return OwnerIdOut(owner_id=owner_id)


@owner_routes.get("/owners/{owner_id}", responses=_errors(404))
async def get_owner(owner_id: UUID, registry: RegistryDep) -> OwnerOut:
    """The owner's status, tier and consents (no personal data)."""
    return OwnerOut.of(await registry.get_owner(owner_id))


@owner_routes.put("/owners/{owner_id}/consents", responses=_errors(*_WITH_BODY, 404, 409))
async def set_consent(owner_id: UUID, body: ConsentIn, registry: RegistryDep) -> OwnerOut:
    """Grant or withdraw consent for analytics and/or marketing (audited)."""
    owner = await registry.set_consent(
        owner_id, analytics=body.analytics, marketing=body.marketing, source=body.source
    )
    return OwnerOut.of(owner)


@owner_routes.post("/owners/{owner_id}/reactivation", responses=_errors(*_WITH_BODY, 403, 404, 409))
async def reactivate(owner_id: UUID, body: ReactivationIn, registry: RegistryDep) -> OwnerOut:
    """Bring a dormant owner back after a fresh sign-in, with fresh consent."""
    owner = await registry.reactivate(
        owner_id,
        reauthenticated=body.reauthenticated,
        analytics_consent=body.analytics_consent,
        marketing_consent=body.marketing_consent,
        source=body.source,
    )
    return OwnerOut.of(owner)


@owner_routes.post("/owners/{owner_id}/erasure", responses=_errors(404))
async def erase(owner_id: UUID, registry: RegistryDep) -> ErasureOut:
    """Erase the owner's personal data and links now (idempotent)."""
    await registry.get_owner(owner_id)  # 404 for an id that never existed
    released = await registry.erase_owner(owner_id)
    return ErasureOut(owner_id=owner_id, released_devices=released)


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
    body: RegistrationIn, request: Request, registry: RegistryDep
) -> RegistrationOut | JSONResponse:
    """Register a unit with model, serial and the code printed inside it.

    A wrong model, serial or code all answer 403 `registration_refused`; failures are
    limited per caller (the owner and the client address), 429 `too_many_attempts`."""
    # The subject is the body's owner until the API checks tokens (issue 16).
    caller = Caller(str(body.owner_id), request.client.host if request.client else None)
    try:
        done = await registry.register(
            body.owner_id,
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
async def release(device_id: DeviceId, body: OwnerRefIn, registry: RegistryDep) -> Response:
    """The current owner gives the device up; its MQTT secret is revoked."""
    await registry.release(device_id, body.owner_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@device_routes.post("/devices/{device_id}/transfer", responses=_errors(*_DEVICE))
async def transfer(device_id: DeviceId, body: TransferIn, registry: RegistryDep) -> RegistrationOut:
    """The current owner hands the device to another owner, who gets a new secret."""
    done = await registry.transfer(
        device_id, body.from_owner_id, body.to_owner_id, body.purchase.purchase()
    )
    return RegistrationOut.of(done)


@device_routes.post("/devices/{device_id}/credentials/revoke", responses=_errors(*_DEVICE))
async def revoke(device_id: DeviceId, body: OwnerRefIn, registry: RegistryDep) -> RevokedOut:
    """The current owner revokes the device's MQTT secret."""
    return RevokedOut(revoked=await registry.revoke_credentials(device_id, body.owner_id))


@device_routes.post("/devices/{device_id}/credentials", responses=_errors(*_DEVICE))
async def reissue(device_id: DeviceId, body: OwnerRefIn, registry: RegistryDep) -> RegistrationOut:
    """The current owner gets a new MQTT secret; the previous one stops working."""
    return RegistrationOut.of(await registry.reissue_credentials(device_id, body.owner_id))


# -- device certificates (TLS) -------------------------------------------------------


class CertificateIn(Body):
    owner_id: UUID
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


@device_routes.post("/devices/{device_id}/certificate", responses=_errors(*_DEVICE))
async def renew_certificate(
    device_id: DeviceId, body: CertificateIn, registry: RegistryDep
) -> CertificateOut:
    """The current owner renews the device's TLS client certificate from a new CSR
    (before the old one expires); the old one stays valid until its own expiry."""
    issued = await registry.renew_certificate(device_id, body.owner_id, body.csr)
    return CertificateOut(
        device_id=device_id,
        certificate=issued.pem,
        serial=f"{issued.serial:x}",
        fingerprint_sha256=issued.fingerprint,
        not_after=issued.not_after,
    )
