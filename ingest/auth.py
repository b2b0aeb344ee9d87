"""Bearer tokens for both HTTP APIs: who is calling, and what they may do.

Every data route of the registry's API and the planners' API needs
`Authorization: Bearer <token>`, an OpenID Connect JWT from the maker's sign-in (ID or
access token). `Verifier` checks, with PyJWT:

- the signature, against the keys of `auth.keys_file` (a PEM public key, a JWK or a
  JWK Set) or of `auth.jwks_url` (fetched on first use, cached, fetched again when a
  token names a key id the cache lacks: the issuer rotated its keys);
- `iss` is `auth.issuer`, `aud` holds `auth.audience`, `exp` has not passed and `iat`
  is not in the future (`auth.leeway_s` either way), and `sub`, `iat`, `exp` are there;
- only the algorithms of `auth.algorithms` (never `none`, never HMAC with a public key).

A request without a token, or with one that fails a check, is answered 401
`unauthenticated` with `WWW-Authenticate: Bearer` (RFC 6750); a valid token that lacks
the route's scope 403 `insufficient_scope`; a token whose subject may not act on the
thing named 403 `forbidden` (the registry's own rule). Each is the `Problem` document of
`ingest.httpapi`. Scopes are read from `auth.scope_claim` (OAuth's space-separated
`scope`, or a JSON list such as Azure's `scp`): `auth.planner_scope` for the insights
API, `auth.operator_scope` for the registry's operator actions. Owners need no scope:
the registry acts for the token's subject only.

Local runs and tests: with no `auth.issuer` configured, the APIs trust the dev signer
(`DevSigner`), an ES256 key generated into `<run_dir>/auth/dev_signer.pem` (mode 0600,
outside the repository), whose tokens `usagepipe auth token` prints. With an issuer
configured the dev signer is never used; with neither (and `auth.dev_signer` off) the
APIs refuse to start.

`from __future__ import annotations` is left out on purpose: FastAPI reads the
dependency functions' annotations at runtime.
"""

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ingest.errors import ConfigurationError
from ingest.httpapi import Problem, problem, unavailable
from ingest.owner_keys import create_once
from ingest.settings import AuthSettings
from schemas.errors import UsagepipeError

log = logging.getLogger(__name__)

AUTH_REASONS = ("unauthenticated", "insufficient_scope", "forbidden")
"""The reason codes of a refused token, which each API's `Problem` enum lists."""

DEV_ISSUER = "urn:usagepipe:dev-signer"
"""The `iss` of the dev signer's tokens (never a real issuer's URL)."""
DEV_KEY_ID = "usagepipe-dev"
_DEV_ALGORITHM = "ES256"
# Algorithms PyJWT may be told to accept: asymmetric only. An HMAC algorithm with a
# public key as its "secret" is the classic JWT confusion attack.
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]


class Refused(UsagepipeError):
    """A request whose token is missing or invalid (401), or valid but not allowed
    (403); `reason` and `detail` go into the `Problem` answer."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        scope: str | None = None,
        token_sent: bool = True,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.scope = scope
        self.token_sent = token_sent

    def challenge(self) -> str:
        """The `WWW-Authenticate` header (RFC 6750 section 3): a request that sent no
        token gets no error code, one whose token failed `invalid_token`."""
        if self.status == 401:
            if not self.token_sent:
                return 'Bearer realm="usagepipe"'
            return 'Bearer realm="usagepipe", error="invalid_token"'
        if self.reason == "insufficient_scope" and self.scope:
            return f'Bearer realm="usagepipe", error="insufficient_scope", scope="{self.scope}"'
        return 'Bearer realm="usagepipe"'


def unauthenticated(detail: str) -> Refused:
    return Refused(401, "unauthenticated", detail)


def forbidden(detail: str) -> Refused:
    """403 `forbidden`: the caller is signed in but may not act on what they named."""
    return Refused(403, "forbidden", detail)


class KeysUnavailable(UsagepipeError):
    """The issuer's JWKS could not be fetched: not the caller's fault (503)."""

    retriable = True


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for: its subject, scopes and sign-in time."""

    subject: str
    scopes: frozenset[str] = frozenset()
    auth_time: datetime | None = None
    """When the person last signed in (OIDC `auth_time`); None when the token lacks it."""
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def signed_in_within(self, max_age: timedelta, now: datetime | None = None) -> bool:
        """Whether the sign-in behind this token is at most `max_age` old."""
        if self.auth_time is None:
            return False
        return (now or datetime.now(UTC)) - self.auth_time <= max_age


# -- keys ---------------------------------------------------------------------------


def _load_keys(path: Path) -> dict[str | None, Any]:
    """The public keys in `path`: a PEM public key (id None), a JWK or a JWK Set."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"auth.keys_file {path}: {exc.strerror}") from exc
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return {None: serialization.load_pem_public_key(data)}
        except ValueError as exc:
            raise ConfigurationError(f"auth.keys_file {path}: not a PEM public key") from exc
    try:
        found = json.loads(data)
        members = found["keys"] if isinstance(found, dict) and "keys" in found else [found]
        keys = [jwt.PyJWK(member) for member in members]
    except (ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
        raise ConfigurationError(
            f"auth.keys_file {path}: neither a PEM public key nor a JWK (Set): {exc}"
        ) from exc
    if not keys:
        raise ConfigurationError(f"auth.keys_file {path}: the JWK Set holds no keys")
    return {key.key_id: key for key in keys}


class Verifier:
    """Checks bearer tokens against one issuer's keys (see the module docstring)."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        issuer: str,
        keys: Mapping[str | None, Any] | None = None,
        jwks_url: str | None = None,
        jwks_cooldown_s: float = 30.0,
    ) -> None:
        if (keys is None) == (jwks_url is None):
            raise ValueError("give the Verifier exactly one of keys= or jwks_url=")
        self.settings = settings
        self.issuer = issuer
        self._keys = dict(keys or {})
        # PyJWKClient caches the set and fetches it again for an unknown key id, at most
        # once per `cooldown_duration` (so a flood of made-up kids cannot hammer the
        # issuer). It is synchronous (urllib): it runs in a worker thread.
        self._jwks = (
            None
            if jwks_url is None
            else jwt.PyJWKClient(
                jwks_url, cache_jwk_set=True, lifespan=3600, cooldown_duration=jwks_cooldown_s
            )
        )
        self.algorithms = [a for a in settings.algorithms if a in ASYMMETRIC]

    async def verify(self, token: str) -> Principal:
        """The token's `Principal`; raises `Refused` (401) for any failed check and
        `KeysUnavailable` when the issuer's JWKS cannot be fetched."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("the bearer token is not a JWT") from None
        if header.get("alg") not in self.algorithms:
            raise unauthenticated(
                f"the token's algorithm is not accepted (one of {', '.join(self.algorithms)})"
            )
        key = await self._key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.settings.audience,
                issuer=self.issuer,
                leeway=self.settings.leeway_s,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("the token has expired; sign in again") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated(
                "the token is not valid yet (iat or nbf in the future): check the clocks"
            ) from None
        except jwt.InvalidAudienceError:
            raise unauthenticated(
                f"the token is not meant for this API (audience {self.settings.audience})"
            ) from None
        except jwt.InvalidIssuerError:
            raise unauthenticated("the token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise unauthenticated("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthenticated(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise unauthenticated(f"the token is invalid: {exc}") from None
        return self._principal(claims)

    async def _key(self, kid: object) -> Any:
        if self._jwks is None:
            if not isinstance(kid, str | None):
                raise unauthenticated("the token's key id is not text")
            key = self._keys.get(kid)
            if key is None and len(self._keys) == 1:
                key = next(iter(self._keys.values()))  # one key: its id need not match
            if key is None:
                raise unauthenticated("the token is signed with a key this API does not know")
            return key
        if not isinstance(kid, str):
            raise unauthenticated("the token names no key id (kid)")
        client = self._jwks
        try:
            return await asyncio.to_thread(client.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnavailable(f"the issuer's keys cannot be fetched: {exc}") from exc
        except jwt.PyJWKClientError:
            raise unauthenticated(
                "the token is signed with a key the issuer does not list"
            ) from None

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise unauthenticated("the token's subject (sub) must be text of 1 to 255 characters")
        auth_time = claims.get("auth_time")
        when = None
        if isinstance(auth_time, int | float) and not isinstance(auth_time, bool):
            when = datetime.fromtimestamp(auth_time, UTC)
        return Principal(subject, _scopes(claims.get(self.settings.scope_claim)), when, claims)


def _scopes(value: object) -> frozenset[str]:
    """`"a b"` (OAuth) or `["a", "b"]` (a JSON list) -> {"a", "b"}; anything else: none."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


# -- the dev signer -------------------------------------------------------------------


def dev_key_path(settings: AuthSettings, run_dir: Path) -> Path:
    return settings.dev_key_file or run_dir / "auth" / "dev_signer.pem"


def _new_dev_key() -> bytes:
    """A new ES256 private key, PEM (PKCS#8)."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class DevSigner:
    """The local runs' token issuer: an ES256 key in a file (made on first use, mode
    0600). Never used when `auth.issuer` is set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = self._load_or_create(path)

    @staticmethod
    def _load_or_create(path: Path) -> ec.EllipticCurvePrivateKey:
        path.parent.mkdir(parents=True, exist_ok=True)
        if create_once(path, _new_dev_key):
            log.info("generated the dev signer's key in %s", path)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{path} is not the dev signer's EC key")
        return loaded

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def verifier(self, settings: AuthSettings) -> Verifier:
        """A verifier of this signer's tokens (ES256 accepted whatever `algorithms` says)."""
        algorithms = list(dict.fromkeys([*settings.algorithms, _DEV_ALGORITHM]))
        local = settings.model_copy(update={"algorithms": algorithms})
        return Verifier(local, issuer=DEV_ISSUER, keys={DEV_KEY_ID: self.public_key()})

    def token(
        self,
        subject: str,
        *,
        audience: str,
        scopes: Iterable[str] = (),
        scope_claim: str = "scope",
        auth_time: datetime | None = None,
        ttl: timedelta = timedelta(hours=12),
        issuer: str = DEV_ISSUER,
        now: datetime | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token for `subject` (`issuer` and `now` are for tests of refusals)."""
        issued = now or datetime.now(UTC)
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "iat": int(issued.timestamp()),
            "exp": int((issued + ttl).timestamp()),
        }
        scope = " ".join(scopes)
        if scope:
            claims[scope_claim] = scope
        if auth_time is not None:
            claims["auth_time"] = int(auth_time.timestamp())
        claims.update(extra or {})
        return jwt.encode(claims, self._key, algorithm=_DEV_ALGORITHM, headers={"kid": DEV_KEY_ID})


def build_verifier(settings: AuthSettings, run_dir: Path) -> tuple[Verifier, DevSigner | None]:
    """The verifier `settings` configure, and the dev signer when it is the issuer.

    An issuer configured: its keys (file or JWKS), never the dev signer. No issuer: the
    dev signer's key (generated on first use) with a warning, unless `auth.dev_signer`
    is off, which is refused (`ConfigurationError`).
    """
    if settings.issuer is not None:
        if settings.keys_file is not None:
            keys = _load_keys(settings.keys_file)
            return Verifier(settings, issuer=settings.issuer, keys=keys), None
        assert settings.jwks_url is not None  # AuthSettings requires one of the two
        return Verifier(settings, issuer=settings.issuer, jwks_url=settings.jwks_url), None
    if not settings.dev_signer:
        raise ConfigurationError(
            "no token issuer: set USAGEPIPE_AUTH__ISSUER (and its keys), or turn the local"
            " dev signer on with USAGEPIPE_AUTH__DEV_SIGNER=true"
        )
    signer = DevSigner(dev_key_path(settings, run_dir))
    log.warning(
        "USAGEPIPE_AUTH__ISSUER is not set: the API trusts the local dev signer's tokens"
        " (key %s; `usagepipe auth token` prints one). Never run production like this",
        signer.path,
    )
    return signer.verifier(settings), signer


# -- FastAPI --------------------------------------------------------------------------

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An OpenID Connect JWT from the maker's sign-in (locally: `usagepipe auth "
    "token`). Missing or invalid: 401 `unauthenticated`; without the route's scope: 403 "
    "`insufficient_scope`.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def install(app: FastAPI, verifier: Verifier) -> None:
    """Keep `verifier` for the app's routes and answer `Refused` and `KeysUnavailable`
    as `Problem` documents (401/403 with `WWW-Authenticate`, 503)."""
    app.state.verifier = verifier

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Refused)
        return problem(
            exc.status, exc.reason, exc.detail, headers={"WWW-Authenticate": exc.challenge()}
        )

    @app.exception_handler(KeysUnavailable)
    async def keys_gone(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s", exc)
        return unavailable("the sign-in's keys cannot be fetched now; try again shortly")


def verifier_of(request: Request) -> Verifier:
    verifier: Verifier = request.app.state.verifier
    return verifier


async def caller(request: Request, credentials: Credentials) -> Principal:
    """The dependency of every authenticated route: the verified caller, or 401."""
    if credentials is None:
        raise Refused(
            401,
            "unauthenticated",
            "sign in: send Authorization: Bearer <token>",
            token_sent=False,
        )
    return await verifier_of(request).verify(credentials.credentials)


Caller = Annotated[Principal, Depends(caller)]


async def planner(request: Request, who: Caller) -> Principal:
    """The caller, who must hold `auth.planner_scope`."""
    return _scoped(who, verifier_of(request).settings.planner_scope)


async def operator(request: Request, who: Caller) -> Principal:
    """The caller, who must hold `auth.operator_scope`."""
    return _scoped(who, verifier_of(request).settings.operator_scope)


def _scoped(who: Principal, scope: str) -> Principal:
    if scope not in who.scopes:
        raise Refused(403, "insufficient_scope", f"this needs the scope {scope!r}", scope=scope)
    return who


Planner = Annotated[Principal, Depends(planner)]
Operator = Annotated[Principal, Depends(operator)]


def documented(model: type[Problem], *, scoped: bool) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of an authenticated route: 401, and 403 when `scoped`."""
    out: dict[int | str, dict[str, Any]] = {
        401: {
            "model": model,
            "description": "No bearer token, or one that fails a check (signature, issuer, "
            "audience, expiry): reason `unauthenticated`, with `WWW-Authenticate: Bearer`.",
            "headers": {
                "WWW-Authenticate": {
                    "description": "`Bearer` (RFC 6750), with the error.",
                    "schema": {"type": "string"},
                }
            },
        }
    }
    if scoped:
        out[403] = {
            "model": model,
            "description": "The token lacks the route's scope (reason `insufficient_scope`) "
            "or may not act on what the request names (the reason says why).",
        }
    return out
