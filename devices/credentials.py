"""Salted, slow hashes for the secrets the registry checks but must never store.

Two kinds of secret pass through the registry: the registration code printed inside a
unit (it proves a purchase) and the MQTT secret issued to a device (it proves the
device). Both are kept only as scrypt hashes with a per-secret random salt, encoded
with their cost parameters (`scrypt$<log2 N>$<r>$<p>$<salt>$<hash>`, base64 without
padding) so the cost can be raised later without invalidating stored hashes.

scrypt is memory-hard: a leaked table cannot be brute-forced on GPUs cheaply, which
matters most for the registration codes, short enough to type. Hashing blocks for tens
of milliseconds, so async callers use `hash_secret_async` / `verify_secret_async`,
which run in a worker thread.

How long a registration code must be. Online, a guesser gets the failures the
registry's rate limits allow per caller; subjects are cheap (anyone can open an
account), so an address is what an attacker has to pay for, and the settings allow
one address at most 2400 failures a day (`ingest.settings.MAX_FAILURES_PER_ADDRESS_PER_DAY`;
the default is 720). With 2^20 addresses (a large botnet, or 2^20 IPv6 /56 prefixes)
for ten years that is 2400 * 2^20 * 3650 ~ 2^43 guesses. Each guess names one unit and
one code, so whatever units it aims at, the expected number of units taken is at most
2^43 / 2^bits: with `MIN_CODE_BITS` = 64 one in two million (2^-21); with the 80 bits
of `new_registration_code` one in 2^37. The 40 bits of an 8-character code would give
the attacker about eight units. Hence the factory import refuses codes that cannot
hold 64 bits (`code_bits`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import secrets

_SALT_BYTES = 16
_KEY_BYTES = 32
_R = 8
_P = 1
DEVICE_SECRET_BYTES = 32
"""Entropy of an issued MQTT secret (256 bits, 43 URL-safe characters)."""


MIN_CODE_BITS = 64
"""The least entropy a registration code may have (see the module docstring)."""

CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32: digits and capitals without I, L, O and U, which people misread."""

CODE_BITS = 80
"""What `new_registration_code` makes: 16 characters of `CODE_ALPHABET`."""

_SEPARATORS = re.compile(r"[-\s]")
# The alphabets a code may be drawn from, smallest first: a code counts as drawn from
# the first one holding all its characters.
_ALPHABETS = (
    frozenset("0123456789"),
    frozenset("0123456789ABCDEF"),
    frozenset("0123456789abcdef"),
    frozenset(CODE_ALPHABET),
    frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    frozenset("0123456789abcdefghijklmnopqrstuvwxyz"),
    frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
)
_PRINTABLE_ASCII = 94


def new_registration_code() -> str:
    """A random registration code of `CODE_BITS` bits, as the factory should print it:
    16 characters of `CODE_ALPHABET` in groups of four (`K7QX-2M9D-P4HT-8WZL`)."""
    chars = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_BITS // 5))
    return "-".join(chars[i : i + 4] for i in range(0, len(chars), 4))


def code_bits(code: str) -> float:
    """The most entropy `code` can hold: its characters other than dashes and spaces
    times log2 of the smallest usual alphabet that has them all (digits, hex,
    Crockford's base32, letters and digits in one case, in both cases, printable
    ASCII). An upper bound: `CODE-0000-0000-0000` passes for 80 bits, so the factory
    must draw its codes at random (as `new_registration_code` does)."""
    chars = _SEPARATORS.sub("", code)
    size = next((len(a) for a in _ALPHABETS if a.issuperset(chars)), _PRINTABLE_ASCII)
    return len(chars) * math.log2(size)


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
