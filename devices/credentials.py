"""Salted, slow hashes for the secrets the registry checks but must never store.

Two kinds of secret pass through the registry: the registration code printed inside a
unit (it proves a purchase) and the MQTT secret issued to a device (it proves the
device). Both are kept only as scrypt hashes with a per-secret random salt, encoded
with their cost parameters (`scrypt$<log2 N>$<r>$<p>$<salt>$<hash>`, base64 without
padding) so the cost can be raised later without invalidating stored hashes.

scrypt is memory-hard: a leaked table cannot be brute-forced on GPUs cheaply, which
matters most for the short registration codes. Hashing blocks for tens of
milliseconds, so async callers use `hash_secret_async` / `verify_secret_async`, which
run in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets

_SALT_BYTES = 16
_KEY_BYTES = 32
_R = 8
_P = 1
DEVICE_SECRET_BYTES = 32
"""Entropy of an issued MQTT secret (256 bits, 43 URL-safe characters)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(secret: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    # hashlib refuses above 32 MiB unless told; allow exactly what these parameters need.
    maxmem = 128 * r * n * p + 128 * r * n + (1 << 20)
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=_KEY_BYTES
    )


def new_device_secret() -> str:
    """A fresh random MQTT secret, returned to the owner once and never stored."""
    return secrets.token_urlsafe(DEVICE_SECRET_BYTES)


def hash_secret(secret: str, *, log2_n: int) -> str:
    """The encoded salted scrypt hash of `secret` at cost 2**log2_n."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(secret, salt, log2_n, _R, _P)
    return f"scrypt${log2_n}${_R}${_P}${_b64(salt)}${_b64(key)}"


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether `secret` matches the encoded hash (constant-time comparison).

    A malformed stored hash verifies nothing rather than raising: a damaged row must
    not let anyone in, nor break the caller.
    """
    try:
        scheme, log2_n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(key)
        actual = _scrypt(secret, _unb64(salt), int(log2_n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


async def hash_secret_async(secret: str, *, log2_n: int) -> str:
    """`hash_secret` in a worker thread, so the event loop keeps running."""
    return await asyncio.to_thread(hash_secret, secret, log2_n=log2_n)


async def verify_secret_async(secret: str, encoded: str) -> bool:
    """`verify_secret` in a worker thread, so the event loop keeps running."""
    return await asyncio.to_thread(verify_secret, secret, encoded)
