"""The registry's HTTP API, for the maker's own site (which signs owners in).

Owners register units, hand them on, change consent, come back from dormancy and ask
for erasure. A refused request answers 4xx with a JSON body
`{"reason": "<RejectReason>", "detail": "<words>"}`; the reason codes are the contract.
A database or broker outage answers 503 with `reason: "unavailable"`. The OpenAPI
document is at `/openapi.json` (FastAPI's default).

The API trusts the caller about who the owner is (`owner_id`): it is meant to sit
behind the site's authentication, not on the open internet.

`from __future__ import annotations` is left out on purpose: FastAPI reads the route
functions' annotations at runtime.
"""

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import date, datetime
from typing import Annotated
from uuid import UUID

from fastapi import Depends, FastAPI, Request, status
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from devices.errors import RegistryUnavailable, Rejected, RejectReason
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

log = logging.getLogger(__name__)

STATUS_BY_REASON: dict[RejectReason, int] = {
    RejectReason.UNKNOWN_SERIAL: 404,
    RejectReason.MODEL_MISMATCH: 422,
    RejectReason.WRONG_CODE: 403,
    RejectReason.OWNED_BY_OTHER: 409,
    RejectReason.LOCKED_OUT: 429,
    RejectReason.ALREADY_OWNER: 409,
    RejectReason.UNKNOWN_OWNER: 404,
    RejectReason.OWNER_NOT_ACTIVE: 409,
    RejectReason.UNKNOWN_DEVICE: 404,
    RejectReason.NOT_CURRENT_OWNER: 403,
    RejectReason.REAUTHENTICATION_REQUIRED: 403,
    RejectReason.NOT_DORMANT: 409,
}
"""HTTP status per reason: 404 unknown thing, 403 not allowed, 409 conflicts with the
current state, 422 inconsistent input, 429 locked out."""

Code = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
Source = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Problem(Body):
    """A refused request: the machine-readable reason and a human-readable detail."""

    reason: str
    detail: str


class CreateOwnerIn(Body):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    email: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]
    phone: Annotated[str, StringConstraints(max_length=40)] | None = None
    region: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")]
    membership_tier: MembershipTier = MembershipTier.STANDARD
    analytics_consent: bool
    marketing_consent: bool
    source: Source = "api"


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
    store_id: Annotated[str, StringConstraints(min_length=1, max_length=40)] | None = None
    purchased_on: date | None = None

    def purchase(self) -> Purchase:
        return Purchase(self.channel, self.store_id, self.purchased_on)


class RegistrationIn(Body):
    owner_id: UUID
    model_number: Code
    serial_number: Code
    registration_code: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    purchase: PurchaseIn
    resale: bool = False
    """True when the unit was bought second-hand and its previous owner did not release
    it; the code from inside the unit is then the proof of possession."""


class RegistrationOut(Body):
    """The device's identity and MQTT login. The secret is shown this once only."""

    device_id: str
    owner_id: UUID
    model_number: str
    serial_number: str
    valid_from: datetime
    mqtt_username: str
    mqtt_password: str

    @classmethod
    def of(cls, done: Registration) -> "RegistrationOut":
        return cls(
            device_id=done.device_id,
            owner_id=done.owner_id,
            model_number=done.model_number,
            serial_number=done.serial_number,
            valid_from=done.valid_from,
            mqtt_username=done.device_id,
            mqtt_password=done.mqtt_secret,
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
    analytics: bool | None = None
    marketing: bool | None = None
    source: Source = "api"


class ReactivationIn(Body):
    reauthenticated: bool
    """The site confirms the owner just signed in again (password or equivalent)."""
    analytics_consent: bool
    marketing_consent: bool
    source: Source = "api"


class ErasureOut(Body):
    owner_id: UUID
    released_devices: list[str]


RegistryFactory = Callable[[], AbstractAsyncContextManager[Registry]]


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(_registry)]
_PROBLEMS: dict[int | str, dict[str, object]] = {
    code: {"model": Problem} for code in sorted(set(STATUS_BY_REASON.values()))
}


def create_app(registry_factory: RegistryFactory) -> FastAPI:
    """The API over the registry that `registry_factory()` opens for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with registry_factory() as registry:
            app.state.registry = registry
            yield

    app = FastAPI(
        title="usagepipe device registry",
        version="1",
        lifespan=lifespan,
        responses=_PROBLEMS,
    )

    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Rejected)
        return JSONResponse(
            status_code=STATUS_BY_REASON.get(exc.reason, 400),
            content={"reason": exc.reason.value, "detail": exc.message},
        )

    @app.exception_handler(RegistryUnavailable)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("registry unavailable: %s", exc)
        return JSONResponse(
            status_code=503,
            content={"reason": "unavailable", "detail": "try again shortly"},
            headers={"Retry-After": "5"},
        )

    @app.post("/owners", status_code=status.HTTP_201_CREATED)
    async def create_owner(body: CreateOwnerIn, registry: RegistryDep) -> OwnerIdOut:
        """Create an owner account (contacts are kept apart from analytics data)."""
        owner_id = await registry.create_owner(
            NewOwner(
                name=body.name,
                email=body.email,
                phone=body.phone,
                region=body.region,
                membership_tier=body.membership_tier,
                analytics_consent=body.analytics_consent,
                marketing_consent=body.marketing_consent,
            ),
            source=body.source,
        )
        return OwnerIdOut(owner_id=owner_id)

    @app.get("/owners/{owner_id}")
    async def get_owner(owner_id: UUID, registry: RegistryDep) -> OwnerOut:
        """The owner's status, tier and consents (no personal data)."""
        return OwnerOut.of(await registry.get_owner(owner_id))

    @app.post("/registrations", status_code=status.HTTP_201_CREATED)
    async def register(body: RegistrationIn, registry: RegistryDep) -> RegistrationOut:
        """Register a unit with model, serial and the code printed inside it."""
        done = await registry.register(
            body.owner_id,
            body.model_number,
            body.serial_number,
            body.registration_code,
            body.purchase.purchase(),
            resale=body.resale,
        )
        return RegistrationOut.of(done)

    @app.post("/devices/{device_id}/release", status_code=status.HTTP_204_NO_CONTENT)
    async def release(device_id: str, body: OwnerRefIn, registry: RegistryDep) -> Response:
        """The current owner gives the device up; its MQTT secret is revoked."""
        await registry.release(device_id, body.owner_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.post("/devices/{device_id}/transfer")
    async def transfer(device_id: str, body: TransferIn, registry: RegistryDep) -> RegistrationOut:
        """The current owner hands the device to another owner, who gets a new secret."""
        done = await registry.transfer(
            device_id, body.from_owner_id, body.to_owner_id, body.purchase.purchase()
        )
        return RegistrationOut.of(done)

    @app.post("/devices/{device_id}/credentials/revoke")
    async def revoke(device_id: str, body: OwnerRefIn, registry: RegistryDep) -> RevokedOut:
        """The current owner revokes the device's MQTT secret."""
        return RevokedOut(revoked=await registry.revoke_credentials(device_id, body.owner_id))

    @app.post("/devices/{device_id}/credentials")
    async def reissue(device_id: str, body: OwnerRefIn, registry: RegistryDep) -> RegistrationOut:
        """The current owner gets a new MQTT secret; the previous one stops working."""
        return RegistrationOut.of(await registry.reissue_credentials(device_id, body.owner_id))

    @app.put("/owners/{owner_id}/consents")
    async def set_consent(owner_id: UUID, body: ConsentIn, registry: RegistryDep) -> OwnerOut:
        """Grant or withdraw consent for analytics and/or marketing (audited)."""
        owner = await registry.set_consent(
            owner_id, analytics=body.analytics, marketing=body.marketing, source=body.source
        )
        return OwnerOut.of(owner)

    @app.post("/owners/{owner_id}/reactivation")
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

    @app.post("/owners/{owner_id}/erasure")
    async def erase(owner_id: UUID, registry: RegistryDep) -> ErasureOut:
        """Erase the owner's personal data and links now (idempotent)."""
        await registry.get_owner(owner_id)  # 404 for an id that never existed
        released = await registry.erase_owner(owner_id)
        return ErasureOut(owner_id=owner_id, released_devices=released)

    return app
