"""Salted scrypt hashes: round trip, salting, cost upgrade, damaged hashes."""

from __future__ import annotations

from devices.credentials import hash_secret, new_device_secret, verify_secret


def test_hash_round_trip_and_salt() -> None:
    secret = new_device_secret()
    first, second = hash_secret(secret, log2_n=10), hash_secret(secret, log2_n=10)
    assert first != second  # a fresh salt each time
    assert secret not in first
    assert verify_secret(secret, first) and verify_secret(secret, second)
    assert not verify_secret(secret + "x", first)


def test_cost_travels_with_the_hash() -> None:
    cheap, dear = hash_secret("CODE-0001", log2_n=10), hash_secret("CODE-0001", log2_n=12)
    assert (cheap.split("$")[1], dear.split("$")[1]) == ("10", "12")
    assert verify_secret("CODE-0001", cheap) and verify_secret("CODE-0001", dear)


def test_damaged_hashes_verify_nothing() -> None:
    good = hash_secret("s", log2_n=10)
    for damaged in (
        "",
        "plain",
        good.replace("scrypt", "md5", 1),
        good[:-10] + "!!",
        "scrypt$x$8$1$a$b",
    ):
        assert verify_secret("s", damaged) is False
