"""The owners' pseudonymous keys: the HMAC the usage rows carry instead of an owner id,
and the local development secret it is keyed with when none is configured.

owner_key = HMAC-SHA256(enrich.owner_key_secret, owner id), hex, first 32 digits. The
enricher puts it on rows whose owner may be attributed, and erasure finds rows by it.

`keys_for` is the one answer to "under which keys may this owner's data be stored": the
owner's export and the erasure proof look for every key it gives.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from pydantic import SecretStr

from ingest.errors import ConfigurationError
from ingest.settings import EnrichSettings, Settings

log = logging.getLogger(__name__)

OWNER_KEY_HEX_DIGITS = 32
"""128 bits of the HMAC: collisions are out of reach for any fleet."""


def owner_key(secret: bytes, owner_id: UUID) -> str:
    """The owner's pseudonymous key: HMAC-SHA256 of the canonical UUID text."""
    digest = hmac.new(secret, str(owner_id).encode(), hashlib.sha256).hexdigest()
    return digest[:OWNER_KEY_HEX_DIGITS]


def keys_for(enrich: EnrichSettings, owner_id: UUID) -> list[str]:
    """Every key the owner's usage data may be stored under, in `enrich`'s secrets: the
    key of `enrich.owner_key_secret` (one secret, so one key). Whatever finds an
    owner's data by key (the owner's export, `usagepipe erasure prove`) looks for each
    of these, so a secret with versions adds one key per version still stored here."""
    if enrich.owner_key_secret is None:
        raise ConfigurationError(
            "enrich.owner_key_secret is not set (USAGEPIPE_ENRICH__OWNER_KEY_SECRET): an"
            " owner's usage rows cannot be found without the key they are stored under"
        )
    return [owner_key(enrich.owner_key_secret.get_secret_value().encode(), owner_id)]


def create_once(path: Path, make: Callable[[], bytes]) -> bool:
    """Write `make()` to `path`, readable by its owner only, unless the file exists (the
    first process wins; every later one reads its content); whether it was written.
    For local runs' generated secrets: this key's secret, the dev signer's key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(make())
    return True


def with_local_owner_key(settings: Settings) -> Settings:
    """`settings` with `enrich.owner_key_secret` from `<run_dir>/enrich/owner_key_secret`
    when unset (generated there on first use, mode 0600), and a loud warning.

    For local runs only, like the local broker's logins: production sets
    USAGEPIPE_ENRICH__OWNER_KEY_SECRET from its secret store. Used by the CLI.
    """
    if settings.enrich.owner_key_secret is not None:
        return settings
    directory = settings.services.run_dir.resolve() / "enrich"
    path = directory / "owner_key_secret"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    create_once(path, lambda: secrets.token_urlsafe(48).encode())
    secret = path.read_text().strip()
    log.warning(
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET is not set: owner keys use the local development "
        "key in %s. Never run production like this: set the variable, and keep it",
        path,
    )
    enrich = settings.enrich.model_copy(update={"owner_key_secret": SecretStr(secret)})
    return settings.model_copy(update={"enrich": enrich})
