"""Bearer tokens for the tests of both HTTP APIs: a dev signer whose key lives in a
temporary directory of this test run (never the state directory), and headers for it."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest.auth import DevSigner, Verifier
from ingest.settings import AuthSettings

_DIR = Path(tempfile.mkdtemp(prefix="usagepipe-auth-test-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)

AUTH = AuthSettings()
SIGNER = DevSigner(_DIR / "dev_signer.pem")
OPERATOR = AUTH.operator_scope
PLANNER = AUTH.planner_scope


def verifier(settings: AuthSettings = AUTH) -> Verifier:
    return SIGNER.verifier(settings)


def token(subject: str, *scopes: str, **more: Any) -> str:
    """A token of the test signer for `subject` with `scopes`; signed in just now unless
    `auth_time` says otherwise."""
    more.setdefault("auth_time", datetime.now(UTC))
    return SIGNER.token(subject, audience=AUTH.audience, scopes=scopes, **more)


def bearer(subject: str, *scopes: str, **more: Any) -> dict[str, str]:
    """`Authorization` header of `token(...)`."""
    return {"Authorization": f"Bearer {token(subject, *scopes, **more)}"}
