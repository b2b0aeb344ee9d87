"""The owner keys' command: `owner-keys`.

    usagepipe owner-keys versions   the owner-key versions stored (rows, device-days, dead
                                    letters, dates each) against those configured
    usagepipe owner-keys rotate     add a new version's secret to the secrets file
    usagepipe owner-keys retire --version N   unlink every stored key of an old version

A rotation keys only new rows (`ingest.owner_keys`, README Privacy), in two steps so
that no consumer ever stores a key another cannot erase: `rotate` adds the version to
`enrich.owner_key_secrets_file` (every consumer given the file looks owners up under it
from its next start), then the operator sets `enrich.owner_key_version` to it and
restarts the consumers. `versions` says when an old version's secret may go; `retire`
unlinks an old version's keys before retention drops them (or when its secret is lost).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ingest.settings import Settings
from usagepipe.cli.arguments import Commands, command, count


def add_owner_keys(commands: Commands) -> None:
    keys = command(
        commands,
        "owner-keys",
        _owner_keys,
        help="the owners' pseudonymous keys: versions stored, rotation of the secret",
    )
    keys.add_argument(
        "action",
        choices=["versions", "rotate", "retire"],
        help="versions: each owner-key version the usage tables still hold, with its rows,"
        " device-days and dead letters, and whether its secret is configured (exit 1 if a"
        " stored one is not: erasure cannot find owners under it); rotate: add a new"
        " version, with a generated secret, to enrich.owner_key_secrets_file (new rows"
        " use it once enrich.owner_key_version names it); retire: unlink every stored key"
        " of --version (rows and device-days lose key and tier, linked dead letters go,"
        " as erasure does), in batches, resumable",
    )
    keys.add_argument(
        "--version", type=int, default=None, help="retire only: the old version to unlink"
    )
    keys.add_argument(
        "--batch-keys",
        type=count,
        default=1000,
        help="retire only: keys a transaction unlinks (default 1000)",
    )


def _owner_keys(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.owner_keys import with_local_owner_key

    local = settings.enrich.owner_key_secret is None and not settings.enrich.owner_key_secrets_file
    settings = with_local_owner_key(settings)  # unset: the local run dir's, with a warning
    if args.version is not None and args.action != "retire":
        print(f"usagepipe owner-keys {args.action}: --version goes with retire", file=sys.stderr)
        return 2
    if args.action == "rotate":
        return _rotate(settings)
    if args.action == "retire":
        return _retire(settings, args.version, args.batch_keys)
    return _versions(settings, "the local development key" if local else None)


def _retire(settings: Settings, version: int | None, batch_keys: int) -> int:
    from ingest.key_versions import Retired, retire_version
    from ingest.owner_keys import load_secrets
    from ingest.store import UsageStore

    prog = "usagepipe owner-keys retire"
    secrets = load_secrets(settings.enrich)
    if version is None or batch_keys < 1:
        print(f"{prog}: give --version N (and --batch-keys of 1 or more)", file=sys.stderr)
        return 2
    if version == secrets.current:
        print(
            f"{prog}: version {version} is the current one (USAGEPIPE_ENRICH__OWNER_KEY_VERSION):"
            " new rows carry it; rotate first",
            file=sys.stderr,
        )
        return 2

    def said(done: Retired) -> str:
        return (
            f"{done.keys:,} of its keys unlinked from {done.rows:,} rows and"
            f" {done.device_days:,} device-days, {done.dead_letters:,} dead letters deleted"
        )

    async def retire() -> Retired:
        async with UsageStore(settings.postgres) as store:
            return await retire_version(
                store,
                version,
                batch_keys=batch_keys,
                progress=lambda done: print(f"version {version}: {said(done)} so far", flush=True),
            )

    done = asyncio.run(retire())
    if done.keys == 0:
        print(f"nothing in {settings.postgres.table!r} carries owner-key version {version}")
    else:
        print(f"owner-key version {version} retired from {settings.postgres.table!r}: {said(done)}")
    if version in secrets.versions:
        print(f"its secret may now be removed from {secrets.source}")
    return 0


def _rotate(settings: Settings) -> int:
    from ingest.owner_keys import add_version, read_secrets

    path = settings.enrich.owner_key_secrets_file
    if path is None:
        print(
            "usagepipe owner-keys rotate: rotation needs enrich.owner_key_secrets_file"
            " (USAGEPIPE_ENRICH__OWNER_KEY_SECRETS_FILE); USAGEPIPE_ENRICH__OWNER_KEY_SECRET"
            " holds one secret, version 1. Make a file, mode 0600, with the line `1 <that"
            " secret>`, set the file and USAGEPIPE_ENRICH__OWNER_KEY_VERSION=1, then rotate",
            file=sys.stderr,
        )
        return 2
    before = read_secrets(path)
    version = add_version(path)
    current = settings.enrich.owner_key_version
    print(
        f"added owner-key version {version} to {path} (it holds"
        f" {', '.join(map(str, sorted([*before, version])))}; new rows use {current}).\n"
        f"Next: 1. give every consumer this file and restart them, so each finds owners"
        f" under version {version} before any row carries it;\n"
        f"      2. set USAGEPIPE_ENRICH__OWNER_KEY_VERSION={version} and restart them: new"
        f" rows get version {version} keys, stored rows keep theirs.\n"
        f"Keep every older version in the file until `usagepipe owner-keys versions` shows"
        f" no stored row carrying it."
    )
    return 0


def _versions(settings: Settings, source: str | None) -> int:
    from ingest.key_versions import StoredVersion, stored_versions, unconfigured
    from ingest.owner_keys import load_secrets
    from ingest.store import UsageStore

    secrets = load_secrets(settings.enrich)

    async def read() -> list[StoredVersion]:
        async with UsageStore(settings.postgres) as store:
            return await stored_versions(store)

    stored = asyncio.run(read())
    held = {s.version for s in stored}
    rows = [
        (
            "version",
            "secret",
            "rows",
            "device-days",
            "owner-hours",
            "dead letters",
            "oldest",
            "newest",
        )
    ]
    for s in stored:
        rows.append(
            (
                str(s.version),
                _state(s.version, secrets.current, secrets.versions),
                f"{s.rows:,}",
                f"{s.device_days:,}",
                f"{s.owner_hours:,}",
                f"{s.dead_letters:,}",
                "" if s.oldest is None else s.oldest.date().isoformat(),
                "" if s.newest is None else s.newest.date().isoformat(),
            )
        )
    idle = [v for v in secrets.versions if v not in held]
    for v in idle:
        state = _state(v, secrets.current, secrets.versions)
        rows.append((str(v), state, "0", "0", "0", "0", "", ""))
    print(
        f"owner-key versions in {settings.postgres.table!r}; secrets from"
        f" {source or secrets.source},"
        f" new keys use version {secrets.current}"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    retirable = [v for v in idle if v != secrets.current]
    if retirable:
        print(
            "stored nowhere, so their secrets may be removed from the file:"
            f" version {', '.join(map(str, retirable))}"
        )
    missing = unconfigured(stored, secrets.versions)
    if missing:
        print(
            f"usagepipe owner-keys versions: version {', '.join(map(str, missing))} is stored"
            f" but its secret is not configured ({secrets.source}): erasure cannot find"
            " owners' rows under it; put the secret back",
            file=sys.stderr,
        )
        return 1
    return 0


def _state(version: int, current: int, configured: tuple[int, ...]) -> str:
    if version == current:
        return "current"
    return "configured" if version in configured else "MISSING"
