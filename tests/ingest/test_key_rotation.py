"""Owner-key versions and rotation: the secrets file and its errors, keys that carry
their version, a rotation that keys only new rows, and erasure that finds an owner under
every version still stored, on the real servers (`usagepipe owner-keys` as a user runs
it, in a subprocess).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr, ValidationError

from devices.records import Purchase, PurchaseChannel
from ingest.errors import ConfigurationError
from ingest.key_versions import Retired, StoredVersion, retire_version, stored_versions
from ingest.owner_keys import (
    OWNERS_AT_LEAST_SQL,
    OwnerKeySecrets,
    add_version,
    key_version,
    keys_for,
    load_secrets,
    owner_key,
    owners_at_least,
    read_secrets,
)
from ingest.rollups import materialised_rows
from ingest.settings import EnrichSettings, Settings
from ingest.store import UsageStore
from tests.conftest import TEST_OWNER_KEY
from tests.ingest.test_enrich import (
    NOW,
    consume,
    enriching,
    fleet,
    message,
    produce,
    rows_of,
    running,
)
from tests.ingest.test_store import row
from tests.usagepipe.test_cli import environment, one_line, usagepipe

OWNER = uuid.UUID("6f1c2a4e-1b7d-4c8e-9a3f-0d2b5e7c9a11")
SECOND = "second-version-secret-0123456789abcdef-xyz"


def secrets_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "owner_key_secrets"
    path.write_text(text)
    path.chmod(0o600)
    return path


def with_file(path: Path, version: int) -> EnrichSettings:
    return EnrichSettings(owner_key_secrets_file=path, owner_key_version=version)


# -- keys and their versions -------------------------------------------------------------


def test_keys_carry_their_version_and_version_1_keys_are_as_before() -> None:
    bare = owner_key(TEST_OWNER_KEY.encode(), OWNER)
    assert len(bare) == 32 and key_version(bare) == 1
    assert owner_key(TEST_OWNER_KEY.encode(), OWNER, 1) == bare
    v2 = owner_key(SECOND.encode(), OWNER, 2)
    assert v2.startswith("2:") and len(v2) == 34 and key_version(v2) == 2
    # The same secret under another version is another key: the version is part of it.
    assert owner_key(TEST_OWNER_KEY.encode(), OWNER, 3) == f"3:{bare}"
    secrets = OwnerKeySecrets({1: TEST_OWNER_KEY.encode(), 2: SECOND.encode()}, 2, "test")
    assert secrets.key(OWNER) == v2
    assert keys_for(secrets, OWNER) == [bare, v2]


def test_the_env_secret_is_version_1(tmp_path: Path) -> None:
    secrets = load_secrets(EnrichSettings(owner_key_secret=SecretStr(TEST_OWNER_KEY)))
    assert (secrets.versions, secrets.current) == ((1,), 1)
    assert secrets.key(OWNER) == owner_key(TEST_OWNER_KEY.encode(), OWNER)


def test_a_secrets_file_and_a_directory_give_every_version(tmp_path: Path) -> None:
    path = secrets_file(tmp_path, f"# rotated 2026-12\n\n1 {TEST_OWNER_KEY}\n  2\t{SECOND}  \n")
    secrets = load_secrets(with_file(path, 2))
    assert (secrets.versions, secrets.current, secrets.source) == ((1, 2), 2, str(path))
    assert keys_for(secrets, OWNER) == [
        owner_key(TEST_OWNER_KEY.encode(), OWNER),
        owner_key(SECOND.encode(), OWNER, 2),
    ]
    # A directory as a Kubernetes secret volume mounts it: a file per version, and the
    # volume's own hidden entries.
    directory = tmp_path / "mounted"
    directory.mkdir()
    (directory / "1").write_text(TEST_OWNER_KEY + "\n")
    (directory / "2").write_text(SECOND)
    (directory / "..data").mkdir()
    assert read_secrets(directory) == {1: TEST_OWNER_KEY.encode(), 2: SECOND.encode()}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", ": holds no secret (lines `VERSION SECRET`)"),
        (
            f"one {TEST_OWNER_KEY}\n",
            ", line 1: the version must be a whole number from 1 to"
            " 9999, then a space and the secret",
        ),
        (f"1 {TEST_OWNER_KEY}\n1 {SECOND}\n", ", line 2: version 1 is given twice"),
        (
            f"1 {TEST_OWNER_KEY}\n2 short\n",
            ", line 2: the secret of version 2 is missing or shorter than 32 characters",
        ),
        ("1\n", ", line 1: the secret of version 1 is missing or shorter than 32 characters"),
        (
            f"1 {TEST_OWNER_KEY}\n2 {TEST_OWNER_KEY}\n",
            ", line 2: the secret of version 2 is version 1's again; a new version needs a new"
            " secret",
        ),
    ],
)
def test_a_malformed_secrets_file_is_refused_by_line(tmp_path: Path, text: str, error: str) -> None:
    path = secrets_file(tmp_path, text)
    with pytest.raises(ConfigurationError) as refused:
        load_secrets(with_file(path, 1))
    assert str(refused.value) == f"enrich.owner_key_secrets_file {path}{error}"
    # No secret is repeated.
    assert TEST_OWNER_KEY not in str(refused.value) and SECOND not in str(refused.value)
    assert "short" not in str(refused.value).replace("shorter", "")


def test_a_missing_unreadable_or_binary_file_or_version_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ConfigurationError) as refused:
        load_secrets(with_file(missing, 1))
    assert (
        str(refused.value) == f"enrich.owner_key_secrets_file {missing}: No such file or directory"
    )
    # Unreadable (as root, which any mode lets read: an entry that is no file) and not text.
    mounted = tmp_path / "mounted"
    (mounted / "1").mkdir(parents=True)
    with pytest.raises(ConfigurationError) as refused:
        load_secrets(with_file(mounted, 1))
    assert str(refused.value) == f"enrich.owner_key_secrets_file {mounted / '1'}: Is a directory"
    binary = tmp_path / "binary"
    binary.write_bytes(b"1 \xff\xfe" + b"x" * 40)
    with pytest.raises(ConfigurationError) as refused:
        load_secrets(with_file(binary, 1))
    assert str(refused.value) == f"enrich.owner_key_secrets_file {binary}: not UTF-8 text"
    path = secrets_file(tmp_path, f"1 {TEST_OWNER_KEY}\n")
    with pytest.raises(ConfigurationError) as refused:
        load_secrets(with_file(path, 2))
    assert str(refused.value) == (
        f"{path} holds no owner-key secret of version 2 (USAGEPIPE_ENRICH__OWNER_KEY_VERSION);"
        " it holds 1"
    )


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"owner_key_secrets_file": "f"}, "owner_key_version must be set with"),
        (
            {"owner_key_secrets_file": "f", "owner_key_version": 1, "owner_key_secret": "x" * 32},
            "set owner_key_secrets_file or owner_key_secret, not both",
        ),
        ({"owner_key_version": 2}, "owner_key_version other than 1 needs"),
    ],
)
def test_the_settings_name_one_source_and_the_current_version(
    fields: dict[str, object], error: str
) -> None:
    with pytest.raises(ValidationError, match=error):
        EnrichSettings.model_validate(fields)


def test_rotation_adds_a_version_and_keeps_the_files_mode(tmp_path: Path) -> None:
    path = secrets_file(tmp_path, f"1 {TEST_OWNER_KEY}")  # no newline at the end
    assert add_version(path) == 2
    assert add_version(path) == 3
    found = read_secrets(path)
    assert sorted(found) == [1, 2, 3] and found[1] == TEST_OWNER_KEY.encode()
    assert len({found[1], found[2], found[3]}) == 3
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing staged left
    # A file the containers' users read (Compose mounts it as it is) stays readable.
    path.chmod(0o644)
    assert add_version(path) == 4
    assert path.stat().st_mode & 0o777 == 0o644


def test_the_rotate_command_adds_a_version_and_says_what_comes_next(tmp_path: Path) -> None:
    path = secrets_file(tmp_path, f"1 {TEST_OWNER_KEY}\n")
    env = environment(
        USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE=str(path), USAGEPIPE_ENRICH__OWNER_KEY_VERSION="1"
    )
    env.pop("USAGEPIPE_ENRICH__OWNER_KEY_SECRET", None)
    done = usagepipe("owner-keys", "rotate", env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        f"added owner-key version 2 to {path} (it holds 1, 2; new rows use 1).",
        "Next: 1. give every consumer this file and restart them, so each finds owners under"
        " version 2 before any row carries it;",
        "      2. set USAGEPIPE_ENRICH__OWNER_KEY_VERSION=2 and restart them: new rows get"
        " version 2 keys, stored rows keep theirs.",
        "Keep every older version in the file until `usagepipe owner-keys versions` shows no"
        " stored row carrying it.",
    ]
    assert sorted(read_secrets(path)) == [1, 2]
    # A directory is the key manager's to add to.
    directory = tmp_path / "mounted"
    directory.mkdir()
    (directory / "1").write_text(TEST_OWNER_KEY)
    env["USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE"] = str(directory)
    done = usagepipe("owner-keys", "rotate", env=env)
    assert (done.returncode, one_line(done)) == (
        2,
        f"usagepipe owner-keys rotate: enrich.owner_key_secrets_file {directory} is a directory:"
        " add the new version's file through the key manager that writes it",
    )


def test_the_commands_say_what_is_wrong_with_the_secrets_file_in_one_line(
    tmp_path: Path,
) -> None:
    path = secrets_file(tmp_path, f"1 {TEST_OWNER_KEY}\n2 nope\n")
    env = environment(
        USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE=str(path), USAGEPIPE_ENRICH__OWNER_KEY_VERSION="1"
    )
    env.pop("USAGEPIPE_ENRICH__OWNER_KEY_SECRET", None)
    for args in (["owner-keys", "versions"], ["owner-keys", "rotate"], ["consume"]):
        done = usagepipe(*args, env=env)
        assert done.returncode == 2
        assert one_line(done) == (
            f"usagepipe {' '.join(args)}: enrich.owner_key_secrets_file {path}, line 2: the"
            " secret of version 2 is missing or shorter than 32 characters"
        )
    env.pop("USAGEPIPE_ENRICH__OWNER_KEY_VERSION")
    done = usagepipe("owner-keys", "versions", env=env)
    assert done.returncode == 2
    assert one_line(done) == (
        "usagepipe: USAGEPIPE_ENRICH__OWNER_KEY_VERSION must be set with"
        " USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE: the version of the file new owner keys"
        " are made with"
    )
    plain = environment()
    plain["USAGEPIPE_ENRICH__OWNER_KEY_SECRET"] = TEST_OWNER_KEY
    done = usagepipe("owner-keys", "rotate", env=plain)
    assert done.returncode == 2
    assert one_line(done).startswith(
        "usagepipe owner-keys rotate: rotation needs enrich.owner_key_secrets_file"
    )


# -- rotation and erasure on the real servers ----------------------------------------------


async def test_erasure_finds_an_owner_under_every_version_after_a_rotation(
    settings: Settings, tmp_path: Path
) -> None:
    """Rows and dead letters written under version 1, the secret rotated, more written
    under version 2, the rollups refreshed: the stored rows keep the version they were
    written with, `owner-keys versions` counts both, and erasing the owner leaves
    nothing under either, while another owner keeps both versions' keys."""
    path = secrets_file(tmp_path, f"1 {TEST_OWNER_KEY}\n")
    file_only = {"owner_key_secret": None, "owner_key_secrets_file": path}
    v1 = enriching(settings, **file_only, owner_key_version=1)
    v2 = enriching(settings, **file_only, owner_key_version=2)
    before, after = NOW - timedelta(days=3), NOW - timedelta(days=1)
    async with fleet(settings) as f:
        erased = await f.owner("erased", at=before - timedelta(days=1))
        kept = await f.owner("kept", at=before - timedelta(days=1))
        shop = Purchase(PurchaseChannel.OWN_ONLINE_SHOP)
        d_erased, _ = await f.register(erased, "SN-W1", shop, at=before - timedelta(days=1))
        d_kept, _ = await f.register(kept, "SN-W2", shop, at=before - timedelta(days=1))

        await produce(v1, [(d, message(d, s, before)) for d in (d_erased, d_kept) for s in (0, 1)])
        await produce(v1, [(d_erased, b'{"not": "a message"}')])
        await consume(v1, 5)
        assert add_version(path) == 2  # rotation, step 1: every consumer knows version 2
        await produce(v2, [(d, message(d, 2, after)) for d in (d_erased, d_kept)])
        await produce(v2, [(d_erased, b'{"not": "a message either"}')])
        await consume(v2, 3)  # step 2: new rows get version 2 keys

        secrets = load_secrets(v2.enrich)
        k1, k2 = keys_for(secrets, erased)
        assert (key_version(k1), key_version(k2)) == (1, 2)
        stored = await rows_of(
            settings, "SELECT device_id, seq, owner_key FROM {table} ORDER BY 1, 2"
        )
        kept1, kept2 = keys_for(secrets, kept)
        assert sorted(map(tuple, stored)) == sorted(
            [
                *[(d_erased, 0, k1), (d_erased, 1, k1), (d_erased, 2, k2)],
                *[(d_kept, 0, kept1), (d_kept, 1, kept1), (d_kept, 2, kept2)],
            ]
        )
        letters = await rows_of(settings, "SELECT owner_key FROM {table}_dead_letters")
        assert sorted(r["owner_key"] for r in letters) == sorted([k1, k2])

        async with UsageStore(settings.postgres) as store:
            await store.migrate()
            await store.refresh_rollups(wait=True)
            versions = await stored_versions(store)
        assert versions == [
            StoredVersion(1, 4, 2, 1, versions[0].oldest, versions[0].newest, owner_hours=2),
            StoredVersion(2, 2, 2, 1, versions[1].oldest, versions[1].newest, owner_hours=2),
        ]
        assert versions[0].newest is not None and versions[0].newest.date() == before.date()
        assert versions[1].oldest is not None and versions[1].oldest.date() == after.date()
        env = command_env(v2, path)
        done = usagepipe("owner-keys", "versions", env=env)
        assert done.returncode == 0, done.stderr
        b, a = before.date(), after.date()
        assert done.stdout.splitlines()[1:] == [
            "version  secret      rows  device-days  owner-hours  dead letters  oldest      newest",
            f"1        configured  4     2            2            1             {b}  {b}",
            f"2        current     2     2            2            1             {a}  {a}",
        ]

        await f.registry.erase_owner(erased, at=NOW)
        async with running(v2):
            await wait_for_erasure(settings, [k1, k2])

    for query in (
        "SELECT owner_key FROM {table} WHERE owner_key IS NOT NULL",
        "SELECT owner_key FROM {table}_device_daily WHERE owner_key IS NOT NULL",
        "SELECT owner_key FROM {table}_dead_letters",
    ):
        found = sorted(r["owner_key"] for r in await rows_of(settings, query))
        assert not {k1, k2} & set(found), query
    stored = await rows_of(settings, "SELECT owner_key FROM {table} WHERE owner_key IS NOT NULL")
    assert sorted(r["owner_key"] for r in stored) == sorted([kept1, kept1, kept2])
    erasures = await rows_of(settings, "SELECT owner_id, unlinked FROM {table}_erasures")
    assert [tuple(r) for r in erasures] == [(erased, 3)]

    # Version 1's secret taken out while rows still carry it: erasure could not find
    # them, and the command says so.
    path.write_text("\n".join(line for line in path.read_text().splitlines() if line[0] != "1"))
    done = usagepipe("owner-keys", "versions", env=command_env(v2, path))
    assert done.returncode == 1
    assert one_line(done) == (
        f"usagepipe owner-keys versions: version 1 is stored but its secret is not configured"
        f" ({path}): erasure cannot find owners' rows under it; put the secret back"
    )
    assert done.stdout.splitlines()[1:] == [
        "version  secret   rows  device-days  owner-hours  dead letters  oldest      newest",
        f"1        MISSING  2     1            1            0             {b}  {b}",
        f"2        current  1     1            1            0             {a}  {a}",
    ]

    # The remedy when the secret is lost: retire the version, unlinking all its keys.
    t = settings.postgres.table
    env = command_env(v2, path)
    done = usagepipe("owner-keys", "retire", "--version", "2", env=env)
    assert (done.returncode, one_line(done)) == (
        2,
        "usagepipe owner-keys retire: version 2 is the current one"
        " (USAGEPIPE_ENRICH__OWNER_KEY_VERSION): new rows carry it; rotate first",
    )
    done = usagepipe("owner-keys", "retire", "--version", "1", env=env)
    assert done.returncode == 0, done.stderr
    said = "1 of its keys unlinked from 2 rows and 1 device-days, 0 dead letters deleted"
    assert done.stdout.splitlines() == [
        f"version 1: {said} so far",
        f"owner-key version 1 retired from {t!r}: {said}",
    ]
    done = usagepipe("owner-keys", "retire", "--version", "1", env=env)
    assert done.stdout == f"nothing in {t!r} carries owner-key version 1\n"
    done = usagepipe("owner-keys", "versions", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == [
        f"2        current  1     1            1            0             {a}  {a}"
    ]
    stored = await rows_of(settings, "SELECT owner_key FROM {table} WHERE owner_key IS NOT NULL")
    assert [r["owner_key"] for r in stored] == [kept2]


async def test_retiring_a_version_goes_in_batches_and_leaves_the_others(
    either: UsageStore,
) -> None:
    """Keys of version 1 in the raw rows, in the device-daily rollup only (their rows
    dropped) and on dead letters only, two keys a batch; version 2's stay."""
    store = either
    t = store.table
    at = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    v1 = [c * 32 for c in "abc"]
    v2 = "2:" + "d" * 32
    rows = [dataclasses.replace(row(f"d{i}", 1, at), owner_key=k) for i, k in enumerate(v1)]
    await store.write([*rows, dataclasses.replace(row("d9", 1, at), owner_key=v2)])
    await store.refresh_rollups()
    async with store.pool.acquire() as conn:
        # A device-day whose raw rows retention dropped: the key only in the rollup.
        rollup = await materialised_rows(conn, t, "device_daily")
        await conn.execute(f"UPDATE {rollup} SET owner_key = $1 WHERE device_id = 'd0'", "e" * 32)
    seen: list[Retired] = []
    done = await retire_version(store, 1, batch_keys=2, progress=seen.append)
    assert seen == [Retired(2, 2, 1, 0), Retired(3, 3, 2, 0), Retired(4, 3, 3, 0)]
    assert done == seen[-1]
    left = await store.fetch("SELECT owner_key FROM {table} WHERE owner_key IS NOT NULL")
    assert [r[0] for r in left] == [v2]
    async with store.pool.acquire() as conn:
        days = await conn.fetch(f"SELECT owner_key FROM {rollup} WHERE owner_key IS NOT NULL")
    assert [r[0] for r in days] == [v2]
    assert [s.version for s in await stored_versions(store)] == [2]
    assert await retire_version(store, 1) == Retired(0, 0, 0, 0)


def command_env(s: Settings, path: Path) -> dict[str, str]:
    env = environment(
        s,
        USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE=str(path),
        USAGEPIPE_ENRICH__OWNER_KEY_VERSION=str(s.enrich.owner_key_version),
    )
    env.pop("USAGEPIPE_ENRICH__OWNER_KEY_SECRET")
    env["USAGEPIPE_POSTGRES__DSN"] = s.postgres.dsn.get_secret_value()
    return env


async def wait_for_erasure(settings: Settings, keys: list[str]) -> None:
    """Until no raw row or dead letter carries any of `keys`."""
    t = settings.postgres.table
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        for _ in range(400):  # 20 s
            left = await conn.fetchval(
                f"SELECT (SELECT count(*) FROM {t} WHERE owner_key = ANY($1::text[]))"
                f" + (SELECT count(*) FROM {t}_dead_letters WHERE owner_key = ANY($1::text[]))",
                keys,
            )
            if left == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{left} rows and letters still carry the erased owner's keys")
    finally:
        await conn.close()


# -- counting owners across a rotation -----------------------------------------------------


async def test_owners_across_a_rotation_are_counted_once_at_most(settings: Settings) -> None:
    """k-anonymity's count: an owner keyed under versions 1 and 2 (a report's range
    across a rotation) is not two owners; in Python (merging segments) and in SQL (the
    reports' `owners`) alike."""
    one, two = TEST_OWNER_KEY.encode(), SECOND.encode()
    people = [uuid.UUID(int=n) for n in range(1, 6)]
    # Three owners active both sides, one only before, one only after.
    keys = [owner_key(one, p) for p in people[:4]] + [owner_key(two, p, 2) for p in people[:3]]
    keys.append(owner_key(two, people[4], 2))
    assert len(set(keys)) == 8
    assert owners_at_least(keys) == 4
    assert owners_at_least([]) == 0
    assert owners_at_least(keys[:4]) == 4  # one version: every key is an owner
    conn = await asyncpg.connect(settings.postgres.dsn.get_secret_value())
    try:
        counted = await conn.fetchval(
            f"SELECT {OWNERS_AT_LEAST_SQL.format(keys='$1::text[]')}", [*keys, keys[0]]
        )
        empty = await conn.fetchval(f"SELECT {OWNERS_AT_LEAST_SQL.format(keys='$1::text[]')}", [])
    finally:
        await conn.close()
    assert (counted, empty) == (4, 0)
