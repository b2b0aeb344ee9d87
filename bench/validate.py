"""How much validation costs per message, and where the time goes.

Generates example messages across every schema (as the fleet simulator would send
them), then times, best of N runs over all messages:

    total     parse_message(raw)                          the consumer's real cost
    decode    pydantic_core.from_json(raw)                JSON bytes -> Python objects
    one pass  catalog.current_envelopes()                 envelope and body in one
              .validate_json(raw) - decode                validator (an old version
                                                          fails it: then by the rules)
    rest      total - one pass - decode                   duplicate-key count, NUL and
                                                          time checks, the body's JSON
                                                          text, the Telemetry tuple

plus parse_telemetry(raw) (the same, returning an Envelope, for other callers),
orjson.loads(raw) as a reference decoder, and a run of version-1 washer cycles to show
the upgrade's cost. This is a benchmark, not a test: it prints figures and asserts
nothing.

    python bench/validate.py [--messages 100000] [--repeat 3] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pydantic
from pydantic_core import from_json

from schemas.catalog import SCHEMA_NAMES, current_envelopes, current_version
from schemas.envelope import envelope_dict
from schemas.examples import example_body, example_v1_body
from schemas.parse import parse_message, parse_telemetry

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
MAX_BYTES = 64 * 1024


def messages(count: int, seed: int, *, v1: bool = False) -> list[tuple[bytes, dict[str, Any]]]:
    """`count` encoded envelopes, schemas in turn, with the envelope each was made from."""
    rng = random.Random(seed)
    out = []
    for seq in range(count):
        if v1:
            name, version = "washer.cycle", 1
            body = example_v1_body(name, rng)
        else:
            name = SCHEMA_NAMES[seq % len(SCHEMA_NAMES)]
            version = current_version(name)
            body = example_body(name, rng)
        event_time = NOW - timedelta(seconds=rng.uniform(0, 3600))
        document = envelope_dict(
            device_id=f"dev-{seq % 5000:06d}",
            boot_id="b7f3c2",
            seq=seq,
            event_time=event_time,
            schema_name=name,
            schema_version=version,
            body=body,
        )
        out.append((orjson.dumps(document), document))
    return out


def best_of(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of `repeat` runs, in seconds (the least disturbed by the machine)."""
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(batch: list[tuple[bytes, dict[str, Any]]], repeat: int) -> dict[str, float]:
    """Seconds per message for each stage over `batch`."""
    raws = [raw for raw, _ in batch]
    one_pass = current_envelopes().validator

    def total() -> None:
        for raw in raws:
            parse_message(raw, now=NOW, max_future_skew=SKEW, max_bytes=MAX_BYTES)

    def envelope() -> None:
        for raw in raws:
            parse_telemetry(raw, now=NOW, max_future_skew=SKEW, max_bytes=MAX_BYTES)

    def decode() -> None:
        for raw in raws:
            from_json(raw)

    def decode_orjson() -> None:
        for raw in raws:
            orjson.loads(raw)

    def validate() -> None:
        for raw in raws:
            with contextlib.suppress(pydantic.ValidationError):
                one_pass.validate_json(raw)

    n = len(raws)
    seconds = {
        "total": best_of(repeat, total) / n,
        "parse_telemetry": best_of(repeat, envelope) / n,
        "decode": best_of(repeat, decode) / n,
        "decode+one pass": best_of(repeat, validate) / n,
        "orjson.loads": best_of(repeat, decode_orjson) / n,
    }
    seconds["one pass"] = seconds["decode+one pass"] - seconds["decode"]
    seconds["rest"] = seconds["total"] - seconds["decode+one pass"]
    return seconds


def report(title: str, seconds: dict[str, float], size: float) -> None:
    total = seconds["total"]
    print(f"\n{title} (mean message {size:.0f} bytes)")
    print(f"  parse_message     {total * 1e6:7.2f} us/message  {1 / total:>10,.0f} messages/s")
    for stage in ("decode", "one pass", "rest"):
        share = seconds[stage] / total * 100
        print(f"    {stage:<15} {seconds[stage] * 1e6:7.2f} us  {share:5.1f} %")
    print(
        f"  for reference: parse_telemetry (an Envelope) {seconds['parse_telemetry'] * 1e6:.2f}"
        f" us/message, orjson.loads alone {seconds['orjson.loads'] * 1e6:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/validate.py", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    print(
        f"$ python bench/validate.py --messages {args.messages} "
        f"--repeat {args.repeat} --seed {args.seed}"
    )
    print(
        f"Python {platform.python_version()}, pydantic {pydantic.VERSION}, "
        f"orjson {orjson.__version__}, {platform.machine()}, best of {args.repeat}"
    )

    batch = messages(args.messages, args.seed)
    size = sum(len(raw) for raw, _ in batch) / len(batch)
    report(
        f"{len(batch):,} messages across all {len(SCHEMA_NAMES)} schemas",
        measure(batch, args.repeat),
        size,
    )

    legacy = messages(max(1, args.messages // 10), args.seed, v1=True)
    size = sum(len(raw) for raw, _ in legacy) / len(legacy)
    report(
        f"{len(legacy):,} washer.cycle v1 messages (validated, upgraded to v2)",
        measure(legacy, args.repeat),
        size,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
