"""The consumer's metrics an operator alerts on (deploy/prometheus/alerts.yml): lag per
partition, the rollup refreshes' last success, the registry lookups' latency."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from ingest.settings import Settings
from tests.ingest.test_enrich import message, produce, running, sample
from tests.pipeline import wait_for


def by_partition(metrics: CollectorRegistry, name: str, topic: str) -> dict[str, float]:
    """A per-partition gauge's samples of `topic`, by partition."""
    return {
        s.labels["partition"]: s.value
        for family in metrics.collect()
        for s in family.samples
        if s.name == name and s.labels["topic"] == topic
    }


async def test_lag_rollup_refreshes_and_lookups_are_reported(settings: Settings) -> None:
    s = settings.model_copy(
        update={
            "consumer": settings.consumer.model_copy(update={"lag_interval_s": 0.5}),
            "postgres": settings.postgres.model_copy(update={"rollup_refresh_s": 0.2}),
        }
    )
    topic = s.kafka.raw_topic
    at = datetime.now(UTC) - timedelta(hours=2)  # in an hour that has ended: refreshed
    devices = [f"wm-43-{n:06d}" for n in range(1, 13)]
    await produce(s, [(d, message(d, 1, at)) for d in devices])
    started = time.time()
    async with running(s) as (consumer, metrics):

        def committed() -> dict[str, float]:
            return by_partition(metrics, "usagepipe_consumer_committed_offset", topic)

        await wait_for(
            lambda: consumer.report.stored == 12 and sum(committed().values()) == 12,
            "12 records stored and their offsets committed",
        )
        await wait_for(
            lambda: (
                sample(
                    metrics, "usagepipe_consumer_rollup_refresh_buckets_total", granularity="hour"
                )
                >= 1
            ),
            "a refresh of the noted hour",
        )
        # One round of the lag task sets all three gauges: read between rounds.
        ends = by_partition(metrics, "usagepipe_consumer_end_offset", topic)
        lags = by_partition(metrics, "usagepipe_consumer_lag_messages", topic)
        done = committed()
        refreshed = {
            g: sample(
                metrics,
                "usagepipe_consumer_rollup_refresh_last_success_timestamp_seconds",
                granularity=g,
            )
            for g in ("hour", "day")
        }
        intervals = {
            g: sample(metrics, "usagepipe_consumer_rollup_refresh_interval_seconds", granularity=g)
            for g in ("hour", "day")
        }
        lookups = sample(metrics, "usagepipe_consumer_registry_lookup_seconds_count")
        misses = sample(metrics, "usagepipe_consumer_registry_lookups_total", result="miss")

    assert set(ends) == set(lags) == set(done) == {"0", "1", "2"}
    # Tansu reports end offsets too low: lag is end - committed, never below 0.
    assert lags == {p: max(0.0, ends[p] - done[p]) for p in ends}
    assert min(refreshed.values()) >= started
    assert intervals == {"hour": 0.2, "day": s.postgres.rollup_day_refresh_s}
    assert misses == 12  # each device once; the registry's "unknown" is cached
    assert 1 <= lookups <= misses
