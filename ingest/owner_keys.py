"""The owners' pseudonymous keys: the HMAC the usage rows carry instead of an owner id,
the versioned secrets they are keyed with, and the local development secret used when
none is configured.

owner_key = HMAC-SHA256(secret of version V, owner id), hex, first 32 digits, written
`V:<32 hex>`; version 1's keys are written bare (the 32 digits alone), as every key was
before secrets had versions, so rows stored then need no rewrite. The version is in the
key's text, not a column beside it: the key goes everywhere a row goes (the rollups,
TimescaleDB's continuous aggregates, the dead letters, the reports' key sets) without a
change to any of them, and a key alone names one owner under one secret. Two versions'
keys of one owner are different texts: nothing links them but the secrets.

The enricher makes the current version's keys (`OwnerKeySecrets.key`); erasure, an
owner's export and the erasure proof look an owner up under every version still
configured (`keys_for`). A rotation keys only new rows (README, Privacy): old rows keep
their version until retention drops them, so the old secret stays configured until
`usagepipe owner-keys versions` shows no stored row carrying it.

Where the secrets come from (`load_secrets`): `enrich.owner_key_secrets_file`, a file or
a directory the secret store or key manager provides, with `enrich.owner_key_version`
naming the current version; or `enrich.owner_key_secret`, one secret, version 1; or, for
local runs only, the generated `<run_dir>/enrich/owner_key_secret` (`with_local_owner_key`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from pydantic import SecretStr

from ingest.errors import ConfigurationError
from ingest.settings import EnrichSettings, Settings

log = logging.getLogger(__name__)

OWNER_KEY_HEX_DIGITS = 32
"""128 bits of the HMAC: collisions are out of reach for any fleet."""

BARE_VERSION = 1
"""The version whose keys carry no `V:` prefix: the keys stored before versions."""

MAX_VERSION = 9999
MIN_SECRET_CHARS = 32
_VERSION = re.compile(r"^[1-9][0-9]{0,3}$")


def owner_key(secret: bytes, owner_id: UUID, version: int = BARE_VERSION) -> str:
    """The owner's pseudonymous key under `secret` of `version`: HMAC-SHA256 of the
    canonical UUID text, `V:` and its first 32 hex digits (version 1: the digits alone)."""
    digest = hmac.new(secret, str(owner_id).encode(), hashlib.sha256).hexdigest()
    key = digest[:OWNER_KEY_HEX_DIGITS]
    return key if version == BARE_VERSION else f"{version}:{key}"


def key_version(key: str) -> int:
    """The secret's version a stored owner key was made with."""
    prefix, sep, _ = key.partition(":")
    return int(prefix) if sep else BARE_VERSION


KEY_VERSION_SQL = (
    "CASE WHEN {column} IS NULL THEN NULL WHEN strpos({column}, ':') = 0 THEN 1"
    " ELSE split_part({column}, ':', 1)::integer END"
)
"""`key_version` in SQL, of `{column}` (format it in): for counts by version."""


def owners_at_least(keys: Iterable[str]) -> int:
    """How many owners the distinct `keys` are at least: the most of them under one
    version. Keys of one version are one owner each; an owner active both sides of a
    rotation has a key under each, so counting every key would count them twice and
    let a group too small pass k-anonymity. Never more than there are owners: errs on
    suppressing (README, Privacy)."""
    by_version = Counter(key_version(k) for k in set(keys))
    return max(by_version.values(), default=0)


OWNERS_AT_LEAST_SQL = (
    "coalesce((SELECT max(n) FROM (SELECT count(DISTINCT k) AS n FROM unnest({keys}) AS k"
    f" GROUP BY {KEY_VERSION_SQL.format(column='k')}) AS by_version), 0)"
)
"""`owners_at_least` in SQL, of the text array `{keys}` (format it in)."""


@dataclass(frozen=True, slots=True)
class OwnerKeySecrets:
    """The owner-key secrets by version, and the version new keys are made with."""

    by_version: Mapping[int, bytes]
    current: int
    source: str
    """Where they came from, for messages: a path or a setting's variable."""

    def __post_init__(self) -> None:
        if self.current not in self.by_version:
            raise ConfigurationError(
                f"{self.source} holds no owner-key secret of version {self.current}"
                f" (USAGEPIPE_ENRICH__OWNER_KEY_VERSION); it holds"
                f" {_versions_text(self.by_version)}"
            )

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.by_version))

    def key(self, owner_id: UUID) -> str:
        """The owner's key for new rows: under the current version."""
        return owner_key(self.by_version[self.current], owner_id, self.current)


def keys_for(secrets: OwnerKeySecrets, owner_id: UUID) -> list[str]:
    """The owner's keys under every version still configured, oldest version first: what
    erasure, an owner's export and the erasure proof look the owner up by."""
    return [owner_key(secrets.by_version[v], owner_id, v) for v in secrets.versions]


def _versions_text(by_version: Mapping[int, bytes]) -> str:
    return ", ".join(map(str, sorted(by_version))) or "none"


def load_secrets(settings: EnrichSettings) -> OwnerKeySecrets:
    """The secrets `settings` configure (module docstring); `ConfigurationError` naming
    the file, line or setting when none is set or a file is missing, unreadable or
    malformed."""
    if settings.owner_key_secrets_file is not None:
        path = settings.owner_key_secrets_file
        assert settings.owner_key_version is not None  # the settings' own rule
        return OwnerKeySecrets(read_secrets(path), settings.owner_key_version, str(path))
    if settings.owner_key_secret is None:
        raise ConfigurationError(
            "no owner-key secret: set enrich.owner_key_secrets_file"
            " (USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE, with _OWNER_KEY_VERSION) or"
            " enrich.owner_key_secret (USAGEPIPE_ENRICH__OWNER_KEY_SECRET); the consumer"
            " will not store owner keys without one"
        )
    secret = settings.owner_key_secret.get_secret_value().encode()
    source = "USAGEPIPE_ENRICH__OWNER_KEY_SECRET"
    return OwnerKeySecrets({BARE_VERSION: secret}, BARE_VERSION, source)


def read_secrets(path: Path) -> dict[int, bytes]:
    """The secrets by version in `path`: a file of lines `VERSION SECRET` (blank lines
    and `#` comments ignored), or a directory of files named by their version, each
    holding that version's secret (as a Kubernetes secret volume or a key manager's agent
    writes them; names starting with `.` are ignored). `ConfigurationError` for a path
    missing or unreadable, a bad line or name, a version given twice, a short secret."""
    where = f"enrich.owner_key_secrets_file {path}"
    try:
        if path.is_dir():
            found = _read_directory(path, where)
        else:
            found = _read_lines(path.read_text(encoding="utf-8"), where)
    except OSError as exc:
        # The file, or in a directory the entry, that could not be read.
        failed = exc.filename or path
        raise ConfigurationError(
            f"enrich.owner_key_secrets_file {failed}: {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{where}: not UTF-8 text") from exc
    if not found:
        raise ConfigurationError(f"{where}: holds no secret (lines `VERSION SECRET`)")
    return found


def _read_lines(text: str, where: str) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        version, *secret = line.split(maxsplit=1)  # a space or a tab between
        _add(found, version, "".join(secret), f"{where}, line {number}")
    return found


def _read_directory(path: Path, where: str) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        _add(found, entry.name, entry.read_text(encoding="utf-8").strip(), f"{where}/{entry.name}")
    return found


def _add(found: dict[int, bytes], version: str, secret: str, where: str) -> None:
    # The secret itself is never repeated in a message.
    if not _VERSION.match(version):
        raise ConfigurationError(
            f"{where}: the version must be a whole number from 1 to {MAX_VERSION},"
            " then a space and the secret"
        )
    if int(version) in found:
        raise ConfigurationError(f"{where}: version {int(version)} is given twice")
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigurationError(
            f"{where}: the secret of version {version} is missing or shorter than"
            f" {MIN_SECRET_CHARS} characters"
        )
    again = [v for v, known in found.items() if known == secret.encode()]
    if again:
        raise ConfigurationError(
            f"{where}: the secret of version {version} is version {again[0]}'s again;"
            " a new version needs a new secret"
        )
    found[int(version)] = secret.encode()


def add_version(path: Path) -> int:
    """Rotation's first step: add a new version, one past the newest, with a secret
    generated here, to the secrets file `path` (not a directory: the key manager adds
    those); returns the new version. The file is replaced whole (written beside it with
    the old file's mode and, where allowed, owner, then renamed), so a process starting
    meanwhile reads either the old file or the new one, and the readers the old one had
    (a container's user) can read the new."""
    if path.is_dir():
        raise ConfigurationError(
            f"enrich.owner_key_secrets_file {path} is a directory: add the new version's"
            " file through the key manager that writes it"
        )
    found = read_secrets(path)
    version = max(found) + 1
    if version > MAX_VERSION:
        raise ConfigurationError(f"enrich.owner_key_secrets_file {path}: no version is left")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{version} {secrets.token_urlsafe(48)}\n"
    old = path.stat()
    staged = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            with contextlib.suppress(PermissionError):  # not root: the file is ours
                os.fchown(f.fileno(), old.st_uid, old.st_gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise ConfigurationError(
            f"enrich.owner_key_secrets_file {path}: {exc.strerror or exc}"
        ) from exc
    return version


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
    when neither it nor `enrich.owner_key_secrets_file` is set (generated there on first
    use, mode 0600; version 1), and a loud warning.

    For local runs only, like the local broker's logins: production sets
    USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE (or _SECRET) from its secret store. Used by
    the CLI.
    """
    if (
        settings.enrich.owner_key_secret is not None
        or settings.enrich.owner_key_secrets_file is not None
    ):
        return settings
    directory = settings.services.run_dir.resolve() / "enrich"
    path = directory / "owner_key_secret"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    create_once(path, lambda: secrets.token_urlsafe(48).encode())
    secret = path.read_text().strip()
    log.warning(
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE (or _SECRET) is not set: owner keys use the"
        " local development key in %s. Never run production like this: set the variable",
        path,
    )
    enrich = settings.enrich.model_copy(update={"owner_key_secret": SecretStr(secret)})
    return settings.model_copy(update={"enrich": enrich})
