"""A long soak at production shape: a registered fleet through the whole path for half an
hour, every process sampled, then the ledger verified.

    nice -n 10 .venv/bin/python bench/soak.py [--devices 10000] [--duration 30m]
        [--window 30d] [--faults dup=0.01,reorder=0.01] [--sample-every 10]
        [--warm-up 5m] [--name soak<hex>]

The fleet (`--devices` appliances, the usage model's schema mix, provisioned as
`bench/fleet.py` does: registry, owners and ownership periods, each device its own
MQTT login on a broker of the soak's own) plays `--window` of household usage spread
over `--duration` of wall time, through one `usagepipe bridge` and one `usagepipe
consume` as their own processes, on the local Kafka and PostgreSQL (topics, table and
registry schema of its own, dropped after).

Every `--sample-every` seconds, in a thread of its own: CPU seconds (utime + stime,
all threads) and RSS of the bridge, the consumer, the fleet (this process) and the
soak's Mosquitto; the CPU of every PostgreSQL process of the machine (each one's growth
between samples: backends come and go); the consumer's rows stored and its rollup
refreshes (count and seconds, from its `/metrics`). Every 200th message the fleet
publishes (a stored one) is followed until its row is queryable (`RowPoller`): p50/p99/
max of publish -> queryable row for each minute of wall time. The poller runs in the
fleet's event loop: when the fleet's process is starved its polls come late, so the
figures are upper bounds that include the stall. At the end `simulators.verify` checks
the ledger against the table and the dead letters.

Prints per minute: messages, p50/p99/max latency, each process's CPU share and RSS,
refresh seconds; then each process's RSS growth after `--warm-up` (least-squares slope,
MB per 10 minutes, and first vs last sample), and the verdict. Writes
`bench/results/soak-<UTC time>.json` and a plot `.png` beside it (RSS, CPU, p99 per
minute, refresh seconds per minute). A benchmark: it prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import queue
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from e2e_procs import RowPoller, Service, free_port, percentile, pid_cpu_s, say
from fleet import provisioned_fleet
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ingest.metrics import SimulatorMetrics
from simulators.cli import span
from simulators.faults import parse_faults
from simulators.fleet import Fleet
from simulators.ledger import Entry, LedgerWriter, Outcome
from simulators.plan import FleetPlan
from simulators.verify import verify

RESULTS = Path(__file__).with_name("results")
LATENCY_EVERY = 200
"""One stored message in this many is followed to its row."""


class SamplingLedger(LedgerWriter):
    """The ledger, which also hands every n-th stored message's key, with the wall time
    the fleet wrote it (just before publishing it), to the row poller."""

    def __init__(self, path: Path, samples: queue.Queue[Any], every: int) -> None:
        super().__init__(path)
        self._samples, self._every, self._stored = samples, every, 0

    def write(self, entry: Entry) -> None:
        super().write(entry)
        if entry.outcome is Outcome.STORED and not entry.duplicate and entry.fault is None:
            self._stored += 1
            if self._stored % self._every == 0:
                self._samples.put((entry.key, time.time()))


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def postgres_pids() -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry.name}/comm") as comm:
                if comm.read().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def scrape(port: int) -> dict[str, float]:
    """The consumer's stored rows and its rollup refreshes (count, seconds) so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = {"stored": 0.0, "refreshes": 0.0, "refresh_s": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "usagepipe_consumer_stored_total":
                found["stored"] += sample.value
            elif sample.name == "usagepipe_consumer_rollup_refresh_seconds_count":
                found["refreshes"] += sample.value
            elif sample.name == "usagepipe_consumer_rollup_refresh_seconds_sum":
                found["refresh_s"] += sample.value
    return found


class Sampler:
    """Every `every_s`, in a thread of its own (so a busy event loop in the fleet does not
    delay it): each process's CPU and RSS, the consumer's figures."""

    def __init__(self, pids: dict[str, int], consumer_port: int, every_s: float) -> None:
        self.pids, self.port, self.every_s = pids, consumer_port, every_s
        self.samples: list[dict[str, Any]] = []
        self.started = time.time()
        self._pg: dict[int, float] = {}
        self._pg_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def postgres_cpu_s(self) -> float:
        """CPU seconds PostgreSQL's processes used so far: each process's growth since the
        last sample (backends come and go, so their sum is not monotonic; a new one counts
        from its start)."""
        now = {p: pid_cpu_s(p) for p in postgres_pids()}
        self._pg_total += sum(max(0.0, cpu - self._pg.get(p, 0.0)) for p, cpu in now.items())
        self._pg = now
        return self._pg_total

    def take(self) -> None:
        sample: dict[str, Any] = {"t": time.time() - self.started}
        for name, pid in self.pids.items():
            sample[f"{name}_cpu_s"] = pid_cpu_s(pid)
            sample[f"{name}_rss_mb"] = rss_mb(pid)
        sample["postgres_cpu_s"] = self.postgres_cpu_s()  # RSS: shared memory, not summed
        with contextlib.suppress(OSError):
            sample.update(scrape(self.port))
        self.samples.append(sample)

    def _run(self) -> None:
        self.postgres_cpu_s()  # the baseline: PostgreSQL's work before the soak is not its
        while not self._stop.is_set():
            self.take()
            self._stop.wait(self.every_s)
        self.take()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def slope_mb_per_10min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per 10 minutes."""
    if len(points) < 3:
        return 0.0
    slope = statistics.linear_regression([p[0] for p in points], [p[1] for p in points]).slope
    return slope * 600


def fmt(seconds: float | None) -> str:
    return f"{seconds:6.3f}" if seconds is not None else "     -"


def per_minute(
    samples: list[dict[str, Any]], timeline: list[tuple[float, float]], started: float
) -> list[dict[str, Any]]:
    """One line per minute of wall time: latency of the samples published in it, each
    process's CPU share and last RSS, the consumer's rows and refresh seconds."""
    minutes: list[dict[str, Any]] = []
    names = [k[: -len("_cpu_s")] for k in samples[0] if k.endswith("_cpu_s")]
    last = samples[0]
    for sample in samples[1:]:
        minute = int(sample["t"] // 60)
        while len(minutes) <= minute:
            minutes.append(
                {
                    "minute": len(minutes),
                    "cpu": dict.fromkeys(names, 0.0),
                    "rss": {},
                    "stored": 0.0,
                    "refresh_s": 0.0,
                    "refreshes": 0.0,
                }
            )
        m = minutes[minute]
        for name in names:
            m["cpu"][name] += sample[f"{name}_cpu_s"] - last[f"{name}_cpu_s"]
            if f"{name}_rss_mb" in sample:
                m["rss"][name] = sample[f"{name}_rss_mb"]
        for key in ("stored", "refresh_s", "refreshes"):
            m[key] += sample.get(key, 0.0) - last.get(key, 0.0)
        last = sample
    for m in minutes:
        lat = [latency for at, latency in timeline if int((at - started) // 60) == m["minute"]]
        m["latency"] = {
            "samples": len(lat),
            "p50": percentile(lat, 0.5) if lat else None,
            "p99": percentile(lat, 0.99) if lat else None,
            "max": max(lat) if lat else None,
        }
        m["cpu"] = {name: seconds / 60 for name, seconds in m["cpu"].items()}
    return minutes


def plot(path: Path, samples: list[dict[str, Any]], minutes: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k[: -len("_cpu_s")] for k in samples[0] if k.endswith("_cpu_s")]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 13), sharex=True)
    for name in names:
        if f"{name}_rss_mb" in samples[0]:
            axes[0].plot(t, [s[f"{name}_rss_mb"] for s in samples], label=name)
        cpu = [0.0] + [
            (b[f"{name}_cpu_s"] - a[f"{name}_cpu_s"]) / max(b["t"] - a["t"], 1e-9) * 100
            for a, b in itertools.pairwise(samples)
        ]
        axes[1].plot(t, cpu, label=name)
    axes[0].set_ylabel("RSS, MB")
    axes[1].set_ylabel("CPU, % of a core (per sample)")
    m = [x["minute"] + 0.5 for x in minutes]
    axes[2].plot(m, [x["latency"]["p99"] for x in minutes], marker="o", label="p99")
    axes[2].plot(m, [x["latency"]["p50"] for x in minutes], marker=".", label="p50")
    axes[2].set_ylabel("publish -> row, s")
    axes[3].bar(m, [x["refresh_s"] for x in minutes], width=0.8)
    axes[3].set_ylabel("rollup refresh s per minute")
    axes[3].set_xlabel("minutes since the services started")
    for ax in axes[:3]:
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


async def soak(args: argparse.Namespace) -> int:
    plan = FleetPlan(
        devices=args.devices,
        messages_per_device=0,
        seed=7,
        run_id=secrets.token_hex(4),
        fleet=args.name.replace("_", ""),
        window=args.window,
        speed=args.window / args.duration,
        faults=parse_faults(args.faults),
    )
    bridge_port, consumer_port = free_port(), free_port()
    extra = {
        "USAGEPIPE_BRIDGE__METRICS_PORT": str(bridge_port),
        "USAGEPIPE_CONSUMER__METRICS_PORT": str(consumer_port),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    ledger_path = Path(f"/tmp/{args.name}.jsonl")
    async with provisioned_fleet(args.name, plan, extra) as bench:
        logs = Path(tempfile.mkdtemp(prefix=f"{args.name}-logs-"))
        services = {
            command: Service(
                command,
                [bench.usagepipe, "--log-level", "WARNING", command],
                bench.env,
                logs / f"{command}.log",
            )
            for command in ("bridge", "consume")
        }
        broker_pid = int(bench.broker.pid_path.read_text().strip())
        pids = {
            "bridge": services["bridge"].pid,
            "consumer": services["consume"].pid,
            "fleet": os.getpid(),
            "mosquitto": broker_pid,
        }
        sampler = Sampler(pids, consumer_port, args.sample_every)
        samples: queue.Queue[Any] = queue.Queue()
        poller = RowPoller(
            bench.settings.postgres.dsn.get_secret_value(),
            bench.settings.postgres.table,
            samples,  # type: ignore[arg-type]  # a queue.Queue: get_nowait is all it takes
            interval_s=0.05,
        )
        published = asyncio.Event()
        say(
            f"soak: {args.devices:,} devices, {args.window} in {args.duration}"
            f" ({plan.speed:,.0f}x); load average {os.getloadavg()[0]:.2f}"
        )
        sampler.start()
        polling = asyncio.create_task(poller.run(published, timeout_after_done_s=120))
        try:
            await asyncio.sleep(5)  # the consumer joins its group
            with SamplingLedger(ledger_path, samples, LATENCY_EVERY) as ledger:
                fleet = Fleet(
                    bench.settings.mqtt,
                    plan,
                    SimulatorMetrics(CollectorRegistry()),
                    credentials=bench.credentials,
                    max_inflight=bench.settings.simulator.max_inflight_per_client,
                    ledger=ledger,
                )
                report = await fleet.run()
            say(
                f"fleet done: {report.sent:,} acknowledged of {report.planned:,} planned;"
                f" worst lag behind schedule {report.lag_s:.1f} s"
            )
            published.set()
            await polling
            result = await verify(bench.settings, ledger_path, timeout_s=600)
            say(f"verify: {'OK' if result.ok else f'{len(result.discrepancies)} discrepancies'}")
        finally:
            published.set()
            sampler.stop()
            for service in services.values():
                service.stop()
    minutes = per_minute(sampler.samples, poller.timeline, sampler.started)
    warm = [s for s in sampler.samples if s["t"] >= args.warm_up.total_seconds()]
    growth = (
        {
            name: {
                "first_mb": warm[0][f"{name}_rss_mb"],
                "last_mb": warm[-1][f"{name}_rss_mb"],
                "peak_mb": max(s[f"{name}_rss_mb"] for s in sampler.samples),
                "slope_mb_per_10min": slope_mb_per_10min(
                    [(s["t"], s[f"{name}_rss_mb"]) for s in warm]
                ),
            }
            for name in pids
        }
        if len(warm) >= 2
        else {}
    )
    print(
        f"{'min':>3} {'rows':>8} {'lat n':>5} {'p50':>6} {'p99':>6} {'max':>6}  "
        + " ".join(f"{n[:8] + ' cpu':>12}" for n in pids)
        + f" {'pg cpu':>7}"
        + " ".join(f"{n[:8] + ' MB':>11}" for n in pids)
        + f" {'refresh s':>9}"
    )
    for m in minutes:
        lat = m["latency"]
        print(
            f"{m['minute']:>3} {m['stored']:>8,.0f} {lat['samples']:>5} {fmt(lat['p50'])}"
            f" {fmt(lat['p99'])} {fmt(lat['max'])}  "
            + " ".join(f"{m['cpu'][n]:>12.0%}" for n in pids)
            + f" {m['cpu']['postgres']:>7.0%}"
            + " ".join(f"{m['rss'].get(n, 0):>11.0f}" for n in pids)
            + f" {m['refresh_s']:>9.2f}"
        )
    all_lat = [latency for _, latency in poller.timeline]
    if all_lat:
        print(
            f"latency, all {len(all_lat):,} samples: p50 {percentile(all_lat, 0.5):.3f} s,"
            f" p99 {percentile(all_lat, 0.99):.3f} s, max {max(all_lat):.3f} s;"
            f" {len(poller.pending)} samples never found"
        )
    for name, g in growth.items():
        print(
            f"RSS after warm-up, {name}: {g['first_mb']:.0f} -> {g['last_mb']:.0f} MB"
            f" (peak {g['peak_mb']:.0f}), slope {g['slope_mb_per_10min']:+.1f} MB per 10 min"
        )
    out = RESULTS / f"soak-{stamp}.json"
    doc = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "report": {"sent": report.sent, "planned": report.planned, "lag_s": report.lag_s},
        "verify_ok": result.ok,
        "discrepancies": result.discrepancies[:20],
        "minutes": minutes,
        "growth": growth,
        "samples": sampler.samples,
    }
    out.write_text(json.dumps(doc, indent=1, default=str))
    plot(out.with_suffix(".png"), sampler.samples, minutes)
    say(f"wrote {out} and {out.with_suffix('.png')}; load average {os.getloadavg()[0]:.2f}")
    return 0 if result.ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--duration", type=span, default=timedelta(minutes=30))
    parser.add_argument("--window", type=span, default=timedelta(days=30))
    parser.add_argument("--faults", default="dup=0.01,reorder=0.01")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds (10)")
    parser.add_argument("--warm-up", type=span, default=timedelta(minutes=5))
    parser.add_argument("--name", default=f"soak{secrets.token_hex(3)}")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(soak(parse_args())))
