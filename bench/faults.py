"""The fault suite (issue 17): every scenario on private servers, each ending in
`usagepipe verify`, with a table of the fates expected and found.

    .venv/bin/python bench/faults.py                      every scenario (~12 minutes)
    .venv/bin/python bench/faults.py --only kafka_kill postgres_stop
    .venv/bin/python bench/faults.py --quick              the ones CI runs
    .venv/bin/python bench/faults.py --list

Starts its own Tansu (19692), Mosquitto (11684, TLS 18683) and PostgreSQL cluster
(5435, a proxy in front of it on 18680) under a temporary directory, removed at the
end (`--keep` keeps it, with every process's log). Exits 1 if any scenario failed.
See `usagepipe.faults`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from usagepipe.faults.scenarios import SCENARIOS, Scenario
from usagepipe.faults.servers import FaultServers
from usagepipe.faults.suite import Fleet, Result, plain
from usagepipe.services.host import ServiceError


def fates(result: Result) -> Table:
    """The scenario's expected and found fates, then its own checks."""
    table = Table(title=f"{result.name}: expected vs found", title_justify="left")
    for column in ("fate", "expected", "found", ""):
        table.add_column(column, justify="left" if column == "fate" else "right")
    for fate, expected, found in result.reconciliation.table():
        if expected or found:
            table.add_row(
                fate, f"{expected:,}", f"{found:,}", "ok" if expected == found else "DIFFERS"
            )
    if result.run.allowed_missing or result.missing:
        ok = result.missing <= result.run.allowed_missing
        table.add_row(
            "lost (allowed by design)",
            f"<= {result.run.allowed_missing:,}",
            f"{result.missing:,}",
            "ok" if ok else "DIFFERS",
        )
    for what, wanted, seen, passed in result.run.checks:
        table.add_row(what, wanted, seen, "ok" if passed else "DIFFERS")
    return table


async def main_async(args: argparse.Namespace, chosen: list[Scenario]) -> int:
    console = Console(width=110)
    root = Path(tempfile.mkdtemp(prefix="usagepipe-faults-"))
    servers = FaultServers(root)
    console.print(
        f"private servers under {root}: Tansu {servers.ports.kafka}, Mosquitto "
        f"{servers.ports.mqtt}, PostgreSQL {servers.ports.postgres}"
    )
    results: list[Result] = []
    try:
        servers.start()
        for scenario in chosen:
            fleet = Fleet(
                **{**scenario.fleet.__dict__, "devices": args.devices or scenario.fleet.devices}
            )
            console.rule(f"{scenario.name}: {scenario.summary}")
            result = await scenario.play(servers, fleet)
            results.append(result)
            console.print(fates(result))
            for note in result.run.notes:
                console.print(f"  {note}", highlight=False)
            if not result.ok:
                console.print(plain(result.verify_output), highlight=False)
                console.print(f"  logs: {result.run.dir}")
    except ServiceError as exc:
        console.print(f"fault suite: {exc}", highlight=False)
        return 2
    finally:
        servers.close(keep_files=args.keep)
    summary = Table(title="fault suite", title_justify="left")
    for column in ("scenario", "what was done", "seconds", "result"):
        summary.add_column(column)
    for scenario, result in zip(chosen, results, strict=False):
        summary.add_row(
            scenario.name,
            scenario.summary,
            f"{result.seconds:.0f}",
            "ok" if result.ok else "FAILED",
        )
    console.print(summary)
    console.print(
        f"reproduce: .venv/bin/python bench/faults.py --only {' '.join(s.name for s in chosen)}"
    )
    return 0 if all(r.ok for r in results) and len(results) == len(chosen) else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these scenarios only")
    parser.add_argument("--quick", action="store_true", help="the quick scenarios (CI's)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--devices", type=int, default=0, help="fleet size (default 120)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the directory with every process's log"
    )
    args = parser.parse_args()
    names = {s.name: s for s in SCENARIOS}
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:20} {'quick ' if s.quick else '      '}{s.summary}")
        return
    unknown = [n for n in args.only or () if n not in names]
    if unknown:
        parser.error(f"no scenario {', '.join(unknown)} (--list shows them)")
    chosen = (
        [names[n] for n in args.only]
        if args.only
        else [s for s in SCENARIOS if s.quick or not args.quick]
    )
    started = time.monotonic()
    status = asyncio.run(main_async(args, chosen))
    print(f"{len(chosen)} scenarios in {time.monotonic() - started:.0f}s")
    sys.exit(status)


if __name__ == "__main__":
    main()
