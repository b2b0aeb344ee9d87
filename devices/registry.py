"""The device registry's data layer: registration, ownership over time, and credentials.

An owner proves a purchase with the unit's model number, serial number and the
registration code printed inside it. A failed proof gets one answer, whatever was
wrong, after the same work; failures are limited per caller (`devices.limits`), never
per unit, so nobody can lock a unit's owner out. A success creates the device (its id
derived from model and serial), opens an ownership period and issues MQTT credentials,
whose secret is made only after the proof and is returned once and kept only as a
salted hash.

Ownership is a set of non-overlapping periods per device (an exclusion constraint in
PostgreSQL guarantees it), so `owner_at(device_id, event_time)` answers who owned the
device when a message was produced, which is what telemetry attribution needs, even
for late data after a resale.

Operator actions (revoking or reissuing a device's secret, erasing an owner on a request
support received) are written to the `audit_log` table (who, what, on what, why, when)
in the action's own transaction.

`Registry` is the one entry point; the SQL of each rule lives beside it, in
`devices.ownership` (registration checks, periods, transfers, credentials,
attribution) and `devices.owners` (consent, dormancy, reactivation, erasure), as
functions that run in the transaction `Registry` opens. Its tables are created by
`devices.schema`, which `Registry` runs on entry.

Every change is one PostgreSQL transaction that also writes its event to the outbox
(`devices.outbox`, whose `flush` publishes them after the commit). The MQTT broker is
told about new secrets inside the transaction (`devices.broker.adding_accounts`) and
about revocations after it (see `devices.broker` for why).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self
from uuid import UUID

import asyncpg
from cryptography import x509

from devices import limits, owners, ownership, policies
from devices.broker import BrokerAccounts, adding_accounts
from devices.certificates import (
    CaUnavailable,
    CrlFile,
    DeviceCA,
    IssuedCertificate,
    any_revoked,
    check_csr,
    record_issued,
    revoked_serials,
)
from devices.credentials import (
    hash_secret_async,
    new_device_secret,
    verify_secret_async,
)
from devices.errors import (
    RegistryError,
    RegistryUnavailable,
    Rejected,
    RejectReason,
    TooManyAttempts,
)
from devices.events import EventPublisher
from devices.limits import Budget, Caller, RateLimits
from devices.outbox import flush, pending
from devices.ownership import REJECT_MESSAGES
from devices.records import (
    AuditEntry,
    ConsentChange,
    ConsentPurpose,
    ConsentStatus,
    MarketingContact,
    NewOwner,
    OperatorAction,
    Owner,
    OwnershipPeriod,
    PolicyVersion,
    ProductModel,
    Purchase,
    Purpose,
    Registration,
    normalize_code,
)
from devices.schema import migrate_registry
from ingest.migrations import Connection
from ingest.settings import RegistrySettings
from ingest.sql_names import quote_schema

log = logging.getLogger(__name__)

# Errors that mean "PostgreSQL could not do it now", worth retrying as a whole.
_UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


@dataclass(slots=True)
class RegistrationCounts:
    """What registrations cost this registry instance so far (tests and the bench
    read them): proofs checked (one scrypt verification each), new secrets hashed
    (registrations, transfers, reissues), attempts refused by the rate limits."""

    proofs: int = 0
    secrets_hashed: int = 0
    limited: int = 0


def aware(at: datetime | None) -> datetime:
    """`at`, or now; naive datetimes are refused (their meaning depends on the host)."""
    if at is None:
        return datetime.now(UTC)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"datetime {at!r} has no time zone")
    return at


class Registry:
    """The registry over a PostgreSQL pool: an async context manager.

    Give it a `dsn` (it opens and closes its own pool) or a `pool` (borrowed, left
    open). On entry it applies pending migrations to `settings.db_schema` and sends
    any events left pending by an earlier process.
    """

    def __init__(
        self,
        settings: RegistrySettings,
        *,
        publisher: EventPublisher,
        broker: BrokerAccounts,
        dsn: str | None = None,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ValueError("give the Registry exactly one of dsn= or pool=")
        self.settings = settings
        self._publisher = publisher
        self._broker = broker
        self._dsn = dsn
        self._pool = pool
        self._owns_pool = pool is None
        self._search_path = f"SET LOCAL search_path TO {quote_schema(settings.db_schema)}"
        window = timedelta(seconds=settings.registration_window_s)
        self._limits = RateLimits(
            subject=Budget(settings.registration_failures_per_subject, window),
            address=Budget(settings.registration_failures_per_address, window),
            ipv6_prefix=settings.registration_ipv6_prefix,
        )
        self._dummy_hash = ""
        self.counts = RegistrationCounts()
        self._ca: DeviceCA | None = None

    async def __aenter__(self) -> Self:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=self.settings.pool_size
                )
            except _UNAVAILABLE as exc:
                raise RegistryUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            # What an unknown serial's code is verified against: a hash at the cost
            # units are imported at, so that the refusal takes as long as a wrong code.
            self._dummy_hash = await hash_secret_async(
                new_device_secret(), log2_n=self.settings.secret_hash_log2_n
            )
            async with self._pool.acquire() as conn:
                await migrate_registry(conn, self.settings.db_schema)
            await self.flush_events()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pool if the registry opened it; harmless when already closed."""
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            await pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction, with `search_path` set to the registry schema."""
        if self._pool is None:
            raise RuntimeError("Registry is not open (use `async with`)")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._search_path)
                yield conn
        except _UNAVAILABLE as exc:
            raise RegistryUnavailable(f"registry unavailable: {exc}") from exc

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Connection]:
        """A connection in a read-only REPEATABLE READ transaction with the DSN's own
        `search_path` (the usage tables'), for reads across the registry and the usage
        tables that must agree with each other (the owner's export, `devices.export`):
        the registry's tables must be named with their schema there."""
        if self._pool is None:
            raise RuntimeError("Registry is not open (use `async with`)")
        try:
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                yield conn
        except _UNAVAILABLE as exc:
            raise RegistryUnavailable(f"registry unavailable: {exc}") from exc

    async def flush_events(self) -> int:
        """Publish every pending outbox event; return how many were sent.

        Called after each change and on start-up. A publishing failure is logged and
        the events stay pending (the change itself is committed and stands); the next
        flush, or `usagepipe registry flush-events`, sends them.
        """
        return await flush(
            self.transaction,
            self._publisher,
            schema=self.settings.db_schema,
            limit=self.settings.events_batch,
            retention=timedelta(days=self.settings.events_retention_days),
        )

    async def pending_events(self) -> int:
        """How many events wait in the outbox (a health figure)."""
        async with self.transaction() as conn:
            return await pending(conn)

    # -- product models ------------------------------------------------------------

    async def add_product_model(self, model: ProductModel) -> None:
        """Add a product model, or update its name, category and launch date."""
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO product_models (model_number, category, name, launched_on)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (model_number) DO UPDATE SET"
                " category = EXCLUDED.category, name = EXCLUDED.name,"
                " launched_on = EXCLUDED.launched_on",
                normalize_code(model.model_number),
                model.category.value,
                model.name,
                model.launched_on,
            )

    # -- registration --------------------------------------------------------------

    async def register(
        self,
        owner_id: UUID,
        model_number: str,
        serial_number: str,
        registration_code: str,
        purchase: Purchase,
        *,
        resale: bool = False,
        csr: str | None = None,
        at: datetime | None = None,
        caller: Caller | None = None,
    ) -> Registration:
        """Register a unit to an owner, or raise `Rejected` with the reason.

        With `csr` (PEM) the device also gets a TLS client certificate for its own key
        (`bad_csr` if the CSR is not acceptable); a model not in
        `registry.password_models` must send one (`certificate_required`) and gets no
        password login.

        `caller` is who sent the request, whose rate limits apply (`devices.limits`);
        the API passes the subject and the client address, local tools may leave it to
        the owner (`Caller(str(owner_id))`). In order:

        1. the owner exists and is active (`unknown_owner`, `owner_not_active`);
        2. a token is taken from each of the caller's buckets, or the attempt is refused
           with `too_many_attempts` (`TooManyAttempts`) before anything else is done;
        3. model, serial and code must match a unit, with the same answer and the same
           work whatever is wrong (`registration_refused`); the failure is recorded
           with what was wrong, and the tokens stay taken;
        4. only now a new MQTT secret is made and hashed; then nobody else may own the
           unit now (`owned_by_other`, `already_owner`). With `resale=True` a buyer
           who holds the code takes over a unit still registered to its previous owner
           (whose period ends now): the code inside the unit is the proof of
           possession. The tokens are given back: the proof succeeded.
        """
        at = aware(at)
        model = normalize_code(model_number)
        serial = normalize_code(serial_number)
        password_login = self.settings.allows_password(model)
        request = self._certificate_request(csr, model, password_login)
        issued: IssuedCertificate | None = None
        keys = (caller or Caller(str(owner_id))).keys(self._limits)
        wait_s: int | None = None
        async with self.transaction() as conn:
            refusal = await ownership.owner_refusal(conn, owner_id)
            if refusal is None:
                wait_s = await limits.take(conn, keys, at)
        if refusal is not None:
            raise Rejected(refusal, REJECT_MESSAGES[refusal])
        if wait_s is not None:
            self.counts.limited += 1
            raise TooManyAttempts(wait_s)
        self.counts.proofs += 1
        async with self.transaction() as conn:
            failure = await ownership.check_proof(
                conn,
                model=model,
                serial=serial,
                code=registration_code,
                dummy_hash=self._dummy_hash,
            )
        if failure is not None:
            async with self.transaction() as conn:
                await ownership.record_attempt(
                    conn, owner_id, model=model, serial=serial, at=at, outcome=failure
                )
            reason = RejectReason.REGISTRATION_REFUSED
            raise Rejected(reason, REJECT_MESSAGES[reason])
        secret = new_device_secret()
        secret_hash = await self._hash_new_secret(secret)
        device_id: str | None = None
        async with adding_accounts(self.transaction(), self._broker) as (conn, added):
            refusal = await ownership.check_takeover(
                conn,
                owner_id,
                serial=serial,
                resale=resale,
                at=at,
                schema=self.settings.db_schema,
            )
            await ownership.record_attempt(
                conn, owner_id, model=model, serial=serial, at=at, outcome=refusal
            )
            await limits.give_back(conn, keys, at)
            if refusal is None:
                device_id = await ownership.complete_registration(
                    conn,
                    owner_id,
                    model=model,
                    serial=serial,
                    purchase=purchase,
                    secret_hash=secret_hash,
                    at=at,
                )
                # A unit taken over without a release: its old certificates are revoked.
                await self._publish_crl(conn, [device_id])
                if request is not None:
                    issued = await self._sign(conn, request, device_id, at)
                # Last, so a broker failure rolls the registration back.
                await added.add(device_id, secret if password_login else None)
        if refusal is not None:
            raise Rejected(refusal, REJECT_MESSAGES[refusal])
        assert device_id is not None
        await self._flush_after_change()
        log.info("device %s registered (model %s)", device_id, model)
        return Registration(
            device_id, owner_id, model, serial, at, secret, password_login,
            issued.pem if issued is not None else None,
        )  # fmt: skip

    def _certificate_request(
        self, csr: str | None, model: str, password_login: bool
    ) -> x509.CertificateSigningRequest | None:
        """The checked CSR, if any; a model that may not use a password must send one."""
        if csr is None:
            if not password_login:
                raise Rejected(
                    RejectReason.CERTIFICATE_REQUIRED,
                    f"model {model} logs in with a TLS client certificate only: send a csr",
                )
            return None
        return check_csr(csr)

    def _device_ca(self) -> DeviceCA:
        if self._ca is None:
            self._ca = DeviceCA.load(self.settings.ca_cert_file, self.settings.ca_key_file)
        return self._ca

    async def _sign(
        self, conn: Connection, csr: x509.CertificateSigningRequest, device_id: str, at: datetime
    ) -> IssuedCertificate:
        """Sign the device's certificate and record its serial and fingerprint."""
        ca = self._device_ca()
        issued = ca.sign_device(csr, device_id, days=self.settings.certificate_days, at=at)
        await record_issued(conn, device_id, issued, at)
        return issued

    async def _publish_crl(self, conn: Connection, device_ids: list[str]) -> None:
        """Publish the revocation list to the broker if one of `device_ids` has a revoked
        certificate that has not expired (`devices.certificates` says why a list).

        Called before the broker drops the devices' connections, so a device that
        reconnects with a revoked certificate is refused at the handshake. Inside a
        transaction the list already holds its revocations; should it roll back, the
        list is stricter than the registry until the next one is published. Repeats
        are harmless (a retry publishes again).
        """
        now = datetime.now(UTC)
        if not await any_revoked(conn, device_ids, now):
            return
        if self.settings.crl_file is None:
            raise CaUnavailable(
                f"device {', '.join(device_ids)} has revoked certificates but no revocation"
                " list is configured: set USAGEPIPE_REGISTRY__CRL_FILE to the file the"
                " broker's TLS listener reads (crlfile)"
            )
        pem = self._device_ca().sign_crl(await revoked_serials(conn, now), now)
        pid = CrlFile(self.settings.crl_file, self.settings.broker_pid_file).publish(pem)
        log.info(
            "revocation list %s published%s", self.settings.crl_file,
            f" (broker pid {pid} reloads it)" if pid is not None else "",
        )  # fmt: skip

    async def renew_certificate(
        self, device_id: str, owner_id: UUID, csr: str, *, at: datetime | None = None
    ) -> IssuedCertificate:
        """The current owner gets the device a new certificate for the CSR's key (before
        the old one expires, or with a new key). The broker account is left as it is:
        its identity is the device id, whichever certificate carries it; the previous
        certificate stays valid until its own expiry, so a device that has not yet
        stored the new one stays connected (revoke the credentials to end it sooner)."""
        at = aware(at)
        request = check_csr(csr)
        async with self.transaction() as conn:
            await conn.execute("SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id)
            await ownership.current_period(conn, device_id, owner_id, at)
            if await ownership.live_secret_hash(conn, device_id) is None:
                raise Rejected(
                    RejectReason.NO_LIVE_CREDENTIALS,
                    f"device {device_id}'s credentials are revoked; reissue them first",
                )
            issued = await self._sign(conn, request, device_id, at)
        log.info("device %s renewed its certificate (serial %x)", device_id, issued.serial)
        return issued

    async def _hash_new_secret(self, secret: str) -> str:
        self.counts.secrets_hashed += 1
        return await hash_secret_async(secret, log2_n=self.settings.secret_hash_log2_n)

    async def _flush_after_change(self) -> None:
        try:
            await self.flush_events()
        except RegistryUnavailable as exc:
            log.warning("events stay pending, will be sent by the next flush: %s", exc)

    # -- transfer, release, revocation ---------------------------------------------

    async def transfer(
        self,
        device_id: str,
        from_owner_id: UUID,
        to_owner_id: UUID,
        purchase: Purchase,
        *,
        at: datetime | None = None,
    ) -> Registration:
        """The current owner hands the device to another owner (sale or gift).

        The giver's period ends at `at`, the receiver's starts there, and the device
        gets a new secret for the receiver: the giver's stops working.
        """
        at = aware(at)
        secret = new_device_secret()
        secret_hash = await self._hash_new_secret(secret)
        async with adding_accounts(self.transaction(), self._broker) as (conn, added):
            device = await ownership.hand_over(
                conn,
                device_id,
                from_owner_id,
                to_owner_id,
                purchase=purchase,
                secret_hash=secret_hash,
                at=at,
            )
            password_login = self.settings.allows_password(device["model_number"])
            await self._publish_crl(conn, [device_id])
            await added.add(device_id, secret if password_login else None)
        await self._flush_after_change()
        return Registration(
            device_id, to_owner_id, device["model_number"], device["serial_number"], at, secret,
            password_login,
        )  # fmt: skip

    async def release(self, device_id: str, owner_id: UUID, *, at: datetime | None = None) -> None:
        """The current owner gives the device up (sold on, thrown away): their period
        ends, the device's secret is revoked, and anyone with the code may register it."""
        at = aware(at)
        async with self.transaction() as conn:
            await conn.execute("SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id)
            device = await ownership.current_period(conn, device_id, owner_id, at)
            await ownership.end_period(conn, device["period_id"], at, "released")
            await ownership.revoke_live(conn, device["device_key"], device_id, "released", at)
        await self._after_revocation([device_id])

    async def revoke_credentials(
        self,
        device_id: str,
        owner_id: UUID | None,
        *,
        operator: OperatorAction | None = None,
        at: datetime | None = None,
    ) -> bool:
        """The current owner `owner_id` revokes the device's secret (leaked, device
        replaced); or, with `owner_id` None, an `operator` does for whoever owns it, and
        the audit log records it in the same transaction.

        Returns whether a live secret was revoked; revoking twice is harmless, and the
        broker is told again either way, so a retry after a broker failure completes.
        """
        at = aware(at)
        async with self.transaction() as conn:
            owner_id = await self._acting_owner(conn, device_id, owner_id, operator)
            await conn.execute("SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id)
            device = await ownership.current_period(conn, device_id, owner_id, at)
            why = "owner_request" if operator is None else "operator_request"
            revoked = await ownership.revoke_live(conn, device["device_key"], device_id, why, at)
            if operator is not None:
                await _audit(conn, operator, "revoke_credentials", device_id, at)
        await self._after_revocation([device_id])
        return revoked

    async def reissue_credentials(
        self,
        device_id: str,
        owner_id: UUID | None,
        *,
        operator: OperatorAction | None = None,
        at: datetime | None = None,
    ) -> Registration:
        """The current owner `owner_id` gets a new MQTT secret (lost it, reset the
        device, or revoked the old one); any previous secret stops working. With
        `owner_id` None an `operator` does it for whoever owns the device, audited."""
        at = aware(at)
        secret = new_device_secret()
        secret_hash = await self._hash_new_secret(secret)
        async with adding_accounts(self.transaction(), self._broker) as (conn, added):
            owner_id = await self._acting_owner(conn, device_id, owner_id, operator)
            await conn.execute("SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id)
            device = await ownership.current_period(conn, device_id, owner_id, at)
            await ownership.revoke_live(conn, device["device_key"], device_id, "reissued", at)
            await ownership.issue_credentials(conn, device["device_key"], secret_hash, at)
            if operator is not None:
                await _audit(conn, operator, "reissue_credentials", device_id, at)
            password_login = self.settings.allows_password(device["model_number"])
            await self._publish_crl(conn, [device_id])
            await added.add(device_id, secret if password_login else None)
        await self._flush_after_change()
        return Registration(
            device_id, owner_id, device["model_number"], device["serial_number"], at, secret,
            password_login,
        )  # fmt: skip

    @staticmethod
    async def _acting_owner(
        conn: Connection, device_id: str, owner_id: UUID | None, operator: OperatorAction | None
    ) -> UUID:
        """`owner_id`, or for an operator the device's current owner (which
        `current_period` checks again under the locks)."""
        if (owner_id is None) == (operator is None):
            raise ValueError("give exactly one of owner_id or operator=")
        if owner_id is not None:
            return owner_id
        row = await conn.fetchrow(
            "SELECT p.owner_id FROM devices d LEFT JOIN ownership_periods p"
            " ON p.device_key = d.device_key AND p.valid_to IS NULL WHERE d.device_id = $1",
            device_id,
        )
        if row is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, f"no registered device {device_id!r}")
        if row["owner_id"] is None:
            raise Rejected(RejectReason.NOT_CURRENT_OWNER, "the device has no current owner")
        current: UUID = row["owner_id"]
        return current

    async def audit_log(self, target: str | None = None) -> list[AuditEntry]:
        """The operator actions recorded (on `target` only, if given), oldest first."""
        async with self.transaction() as conn:
            rows = await conn.fetch(
                "SELECT actor, action, target, reason, at FROM audit_log"
                " WHERE $1::text IS NULL OR target = $1 ORDER BY at, audit_id",
                target,
            )
        return [
            AuditEntry(r["actor"], r["action"], r["target"], r["reason"], r["at"]) for r in rows
        ]

    async def _after_revocation(self, device_ids: list[str]) -> None:
        """After the commit: publish the revocation list, tell the broker, then publish
        the events. The broker is told even when the list could not be published (the
        error is raised after): a deleted account may do nothing in any case."""
        failed: RegistryError | None = None
        try:
            async with self.transaction() as conn:
                await self._publish_crl(conn, device_ids)
        except RegistryError as exc:
            failed = exc
        for device_id in device_ids:
            await self._broker.revoke_device(device_id)
        if failed is not None:
            raise failed
        await self._flush_after_change()

    async def verify_device_secret(self, device_id: str, secret: str) -> bool:
        """Whether `secret` is the device's live MQTT secret (for a broker auth hook)."""
        async with self.transaction() as conn:
            stored = await ownership.live_secret_hash(conn, device_id)
        return stored is not None and await verify_secret_async(secret, stored)

    # -- attribution ---------------------------------------------------------------

    async def owner_at(self, device_id: str, event_time: datetime) -> UUID | None:
        """The owner of `device_id` at `event_time`, or None (no owner then, or erased).

        This is ownership, not permission: who usage may be attributed to, for
        analytics, is the registry's view `analytics_owners` (not erased, analytics
        consent in force), which enrichment (`ingest.enrich`) joins the periods to.
        """
        async with self.transaction() as conn:
            return await ownership.owner_at(conn, device_id, aware(event_time))

    async def current_owners(self, device_ids: list[str]) -> dict[str, UUID]:
        """The current owner of each of `device_ids` that has one (unowned ones are left out)."""
        async with self.transaction() as conn:
            return await ownership.current_owners(conn, device_ids)

    async def ownership_history(self, device_id: str) -> list[OwnershipPeriod]:
        """Every ownership period of the device, oldest first."""
        async with self.transaction() as conn:
            return await ownership.history(conn, device_id)

    # -- owners (rules in devices.owners) -------------------------------------------

    async def create_owner(
        self,
        new: NewOwner,
        *,
        source: str,
        subject: str | None = None,
        at: datetime | None = None,
    ) -> UUID:
        """Create an owner account, linked to the sign-in `subject` when given (one
        owner per subject: a second is `Rejected(owner_exists)`); initial consents go
        to the audit trail."""
        async with self.transaction() as conn:
            return await owners.create(conn, new, subject=subject, source=source, at=aware(at))

    async def owner_of_subject(self, subject: str) -> UUID | None:
        """The owner the sign-in `subject` is linked to, if any."""
        async with self.transaction() as conn:
            return await owners.of_subject(conn, subject)

    async def get_owner(self, owner_id: UUID) -> Owner:
        """The owner's non-personal data, or `Rejected(unknown_owner)`."""
        async with self.transaction() as conn:
            return await owners.get(conn, owner_id)

    async def record_activity(self, owner_id: UUID, *, at: datetime | None = None) -> None:
        """Note that an active owner did something (signed in, used the app)."""
        async with self.transaction() as conn:
            await owners.touch(conn, owner_id, aware(at))

    async def set_consent(
        self,
        owner_id: UUID,
        *,
        analytics: bool | None = None,
        marketing: bool | None = None,
        source: str,
        policy_version: str | None = None,
        at: datetime | None = None,
    ) -> Owner:
        """Grant or withdraw consent per purpose (None leaves it); one audit row each,
        under `policy_version` (the current one; None: whichever is current)."""
        async with self.transaction() as conn:
            return await owners.set_consent(
                conn,
                owner_id,
                analytics=analytics,
                marketing=marketing,
                source=source,
                at=aware(at),
                policy_version=policy_version,
            )

    async def decide(
        self,
        owner_id: UUID,
        purposes: list[str],
        *,
        granted: bool,
        source: str,
        policy_version: str | None = None,
        at: datetime | None = None,
    ) -> Owner:
        """Record the owner's decision on each of `purposes` under `policy_version`
        (`devices.owners.decide`: one purpose per grant)."""
        async with self.transaction() as conn:
            return await owners.decide(
                conn,
                owner_id,
                purposes,
                granted=granted,
                source=source,
                at=aware(at),
                policy_version=policy_version,
            )

    async def consent_status(
        self, owner_id: UUID, *, at: datetime | None = None
    ) -> dict[ConsentPurpose, ConsentStatus]:
        """Where the owner stands on each consent purpose (in force, lapsed, ...)."""
        async with self.transaction() as conn:
            await owners.get(conn, owner_id)  # unknown_owner
            return await policies.consent_status(conn, owner_id, aware(at))

    # -- purposes and policy versions (rules in devices.policies) ------------------

    async def purposes(self) -> list[Purpose]:
        """The catalogue of purposes with their legal basis."""
        async with self.transaction() as conn:
            return await policies.catalogue(conn)

    async def policy_versions(self) -> list[PolicyVersion]:
        """Every policy version, oldest first."""
        async with self.transaction() as conn:
            return await policies.versions(conn)

    async def current_policy(self, at: datetime | None = None) -> PolicyVersion:
        """The policy version in effect now (or at `at`)."""
        async with self.transaction() as conn:
            return await policies.current(conn, aware(at))

    async def publish_policy(
        self,
        version: str,
        *,
        effective_at: datetime,
        text: str,
        reasks: set[str],
        at: datetime | None = None,
    ) -> PolicyVersion:
        """Publish a policy version (`devices.policies.publish`)."""
        async with self.transaction() as conn:
            return await policies.publish(
                conn, version, effective_at=aware(effective_at), text=text, reasks=reasks,
                at=aware(at),
            )  # fmt: skip

    async def consent_history(self, owner_id: UUID) -> list[ConsentChange]:
        """The owner's consent audit trail, oldest first."""
        async with self.transaction() as conn:
            return await owners.consent_history(conn, owner_id)

    async def mark_dormant(self, now: datetime | None = None) -> list[UUID]:
        """Make owners idle for `dormancy_days` dormant; return their ids (sorted)."""
        async with self.transaction() as conn:
            return await owners.mark_dormant(
                conn, aware(now), timedelta(days=self.settings.dormancy_days)
            )

    async def prune_attempts(self, now: datetime | None = None) -> int:
        """Delete registration attempts older than `attempts_retention_days`; how many.
        Rate-limit buckets untouched for a window (full again) go too, uncounted."""
        now = aware(now)
        cutoff = now - timedelta(days=self.settings.attempts_retention_days)
        async with self.transaction() as conn:
            await limits.prune(conn, now - timedelta(seconds=self.settings.registration_window_s))
            return await ownership.prune_attempts(conn, cutoff)

    async def marketing_audience(self) -> list[MarketingContact]:
        """Owners marketing may contact: active, with marketing consent in force."""
        async with self.transaction() as conn:
            return await owners.marketing_audience(conn)

    async def reactivate(
        self,
        owner_id: UUID,
        *,
        reauthenticated: bool,
        analytics_consent: bool,
        marketing_consent: bool,
        source: str,
        policy_version: str | None = None,
        at: datetime | None = None,
    ) -> Owner:
        """Bring a dormant owner back: needs a fresh sign-in and fresh consent (under
        `policy_version`, the current one)."""
        async with self.transaction() as conn:
            return await owners.reactivate(
                conn,
                owner_id,
                reauthenticated=reauthenticated,
                analytics_consent=analytics_consent,
                marketing_consent=marketing_consent,
                source=source,
                at=aware(at),
                policy_version=policy_version,
            )

    async def erase_owner(
        self,
        owner_id: UUID,
        *,
        operator: OperatorAction | None = None,
        at: datetime | None = None,
    ) -> list[str]:
        """Erase an owner (see `devices.owners.erase` for what remains and why), at
        their own request or, with `operator`, on one support received (audited in the
        same transaction).

        Returns the devices they still owned, whose secrets were revoked. Erasing twice
        is harmless (the second call finds nothing left and returns []).
        """
        at = aware(at)
        async with self.transaction() as conn:
            released = await owners.erase(conn, owner_id, at)
            if operator is not None:
                await _audit(conn, operator, "erase_owner", str(owner_id), at)
        await self._after_revocation(released)
        return released


async def _audit(
    conn: Connection, operator: OperatorAction, action: str, target: str, at: datetime
) -> None:
    """One row of the audit log: who (the operator's subject), what, on what, why, when.
    Runs in the action's own transaction, so an action is never left unrecorded."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, target, reason, at) VALUES ($1, $2, $3, $4, $5)",
        operator.actor,
        action,
        target,
        operator.reason,
        at,
    )
