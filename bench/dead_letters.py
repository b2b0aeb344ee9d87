"""What storing a batch's dead letters in its transaction costs the store stage.

Writes the same realistic rows (bench/store.py's fleet) in batches of `--batch`, each
batch in its own `UsageStore.write` transaction, once per letter share: with no
letters (what every batch without poison pays, as before), and with letters for a
given share of the batch's records beside its rows (1 % and 10 % by default: a
fleet's worst poison runs were about 0.3 %). Each letter carries a 300-byte original,
as a refused telemetry message does. Fresh tables each run (`usage_bench_letters`),
dropped after; the best of `--repeat` runs is printed. A benchmark: it prints figures
and asserts nothing.

    python bench/dead_letters.py [--devices 1000] [--messages 50] [--batch 5000]
                                 [--share 0.01 --share 0.1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time

import asyncpg
from store import drop, fleet_rows, settings

from ingest.dead_letter import DeadLetter
from ingest.dead_letter_table import LetterRow
from ingest.rows import SourceOffset, UsageRow
from ingest.settings import PostgresSettings
from ingest.store import UsageStore
from schemas.errors import InvalidTelemetry, Reason

COMMAND = "python bench/dead_letters.py " + " ".join(sys.argv[1:])
TABLE = "usage_bench_letters"


def letters_for(batch: list[UsageRow], n: int, share: float) -> list[LetterRow]:
    """`share` of a batch's size in letters, at offsets past the batch's rows."""
    count = round(len(batch) * share)
    return [
        LetterRow(
            DeadLetter.from_error(
                InvalidTelemetry(Reason.SCHEMA_VIOLATION, "body.energy_wh: not a number"),
                topic="bench.raw",
                partition=i % 6,
                offset=n * 1_000_000 + i,
                key=batch[i % len(batch)].device_id.encode(),
                original=b"x" * 300,
            ),
            model="WM-100",
        )
        for i in range(count)
    ]


async def run(base: PostgresSettings, batches: list[list[UsageRow]], share: float) -> float:
    await drop(base.dsn.get_secret_value(), TABLE)
    letters = [letters_for(batch, n, share) for n, batch in enumerate(batches)]
    try:
        async with UsageStore(settings(base, TABLE)) as store:
            await store.migrate()
            started = time.perf_counter()
            for n, batch in enumerate(batches):
                offsets = [SourceOffset("bench", p, (n + 1) * len(batch), n) for p in range(6)]
                await store.write(batch, offsets, group_id="bench", letters=letters[n])
            return time.perf_counter() - started
    finally:
        await drop(base.dsn.get_secret_value(), TABLE)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50, help="per device")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--share", type=float, action="append", help="letters per record")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shares = [0.0, *(args.share or [0.01, 0.1])]
    print(f"$ {COMMAND}".rstrip())
    base = PostgresSettings()
    rows = fleet_rows(args.devices, args.messages)
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    conn = await asyncpg.connect(base.dsn.get_secret_value())
    version = await conn.fetchval("SHOW server_version")
    await conn.close()
    print(
        f"{len(rows):,} rows from {args.devices:,} devices, {len(batches)} batches of "
        f"{args.batch:,}; PostgreSQL {version}, Python {platform.python_version()}"
    )
    best = dict.fromkeys(shares, float("inf"))
    for _ in range(args.repeat):  # alternate, so drift hits every share alike
        for share in shares:
            best[share] = min(best[share], await run(base, batches, share))
    plain = best[0.0]
    for share in shares:
        letters = sum(round(len(b) * share) for b in batches)
        print(
            f"letters {share:>6.1%} ({letters:>6,}): {best[share] / len(batches) * 1000:7.1f} ms"
            f" a batch, {len(rows) / best[share]:>9,.0f} rows/s, {best[share] / plain:.2f} x"
            " the time without letters"
        )


if __name__ == "__main__":
    asyncio.run(main())
