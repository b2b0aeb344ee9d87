"""The simulated fleet's commands: `simulate`, `verify` and `demo`.

    usagepipe simulate ...        a seeded fleet publishing telemetry
    usagepipe verify LEDGER       did the pipeline keep what the fleet sent?
    usagepipe demo                all of the pipeline, end to end, with a summary

The options of `simulate` and `demo` are `simulators.cli`'s, beside `plan_from_args`,
which reads them, and `simulators.cli.simulate` runs a fleet; `simulators.verify` and
`usagepipe.demo` are imported when their command runs.
"""

from __future__ import annotations

import argparse

from ingest.settings import Settings
from simulators.cli import add_demo_options, add_simulate_options, simulate, span
from usagepipe.cli.arguments import Commands, command, duration


def add_simulate(commands: Commands) -> None:
    parser = command(
        commands, "simulate", _simulate, help="run a seeded fleet of virtual appliances"
    )
    add_simulate_options(parser)


def add_verify(commands: Commands) -> None:
    verify = command(
        commands,
        "verify",
        _verify,
        help="reconcile a fleet's ledger with the usage table and dead letters",
    )
    verify.add_argument("ledger", help="the JSONL ledger `simulate --ledger` wrote")
    verify.add_argument(
        "--timeout", type=span, default=span("60s"), help="wait this long to catch up (60s)"
    )


def add_demo(commands: Commands) -> None:
    demo = command(
        commands,
        "demo",
        _demo,
        help="run the whole pipeline on a simulated fleet; leaves a planner-ready dataset",
    )
    add_demo_options(demo)
    demo.add_argument(
        "--timeout", type=duration, default=900.0, help="give up after this long (900s)"
    )


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    return simulate(settings, args)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from simulators.verify import run_verify

    return run_verify(settings, args.ledger, args.timeout.total_seconds())


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from usagepipe.demo import run_demo

    return run_demo(settings, args)
