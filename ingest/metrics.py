"""Every Prometheus metric usagepipe exports, declared in one place.

Each component takes its metrics object, built on a registry the caller passes in (the
CLI uses one registry per process; tests use a fresh one each). Labels are bounded: a
reason code, an error kind or a schema name, never a device id or an owner.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ingest.ports import unavailable

log = logging.getLogger(__name__)

_TOPIC_REPAIRS_HELP = (
    "Topic repairs by the periodic topic check (kafka.topic_check_s), by action: created "
    "(a topic was missing: a memory-storage broker restarted), grown (it had fewer "
    "partitions than kafka.partitions; partitions added), short (fewer, and the broker "
    "cannot add partitions; counted once each time it is found so)."
)

_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)


class BridgeMetrics:
    """`usagepipe bridge`: MQTT in, Kafka out."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "usagepipe_bridge_received_total",
            "MQTT messages received from the broker (redeliveries included).",
            registry=registry,
        )
        self.produced = Counter(
            "usagepipe_bridge_produced_total",
            "Messages Kafka confirmed (acks=all).",
            registry=registry,
        )
        self.acked = Counter(
            "usagepipe_bridge_acked_total",
            "MQTT messages acknowledged (PUBACK) after Kafka confirmed them.",
            registry=registry,
        )
        self.rejected = Counter(
            "usagepipe_bridge_rejected_total",
            "Messages the bridge dead-lettered instead of forwarding, by reason.",
            ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "usagepipe_bridge_errors_total",
            "Errors by kind (kafka_send, mqtt_disconnect, start: a server not up at start); each"
            " is retried.",
            ["kind"],
            registry=registry,
        )
        self.subscribed = Gauge(
            "usagepipe_bridge_subscribed",
            "1 while the broker has confirmed the bridge's subscription, else 0.",
            registry=registry,
        )
        self.inflight = Gauge(
            "usagepipe_bridge_inflight_messages",
            "MQTT messages received and not yet acknowledged (the bridge's window; at most"
            " bridge.max_inflight).",
            registry=registry,
        )
        self.inflight_peak = Gauge(
            "usagepipe_bridge_inflight_peak_messages",
            "The most MQTT messages held unacknowledged at once since the bridge started.",
            registry=registry,
        )
        self.holds = Counter(
            "usagepipe_bridge_holds_total",
            "Times the window filled (bridge.max_inflight) and the bridge stopped reading"
            " MQTT until PUBACKs freed room.",
            registry=registry,
        )
        self.traced = Counter(
            "usagepipe_bridge_traced_total",
            "Messages forwarded with a traceparent Kafka header, by origin: device (its own"
            " traceparent, carried on), bridge (started for a message without one, sampled"
            " by bridge.trace_sample_ratio), malformed (the device's was malformed: counted"
            " and replaced by a new trace; the message is forwarded as any other).",
            ["origin"],
            registry=registry,
        )
        self.reused_packet_ids = Counter(
            "usagepipe_bridge_reused_packet_ids_total",
            "MQTT messages that came with the packet id of one still unacknowledged (the"
            " broker had more than 65,535 in flight); each is forwarded and acknowledged in"
            " order.",
            registry=registry,
        )
        self.topic_repairs = Counter(
            "usagepipe_bridge_topic_repairs_total",
            _TOPIC_REPAIRS_HELP,
            ["action"],
            registry=registry,
        )
        self.window_limit = Gauge(
            "usagepipe_bridge_window_limit_messages",
            "The most MQTT messages the bridge holds unacknowledged (bridge.max_inflight, "
            "also its MQTT Receive Maximum): usagepipe_bridge_inflight_messages over this is "
            "how full the window is.",
            registry=registry,
        )
        self.awaiting_kafka = Gauge(
            "usagepipe_bridge_awaiting_kafka_messages",
            "Of usagepipe_bridge_inflight_messages: those handed to the Kafka producer and "
            "not yet acknowledged to the MQTT broker (waiting for Kafka's confirmation); the "
            "rest of the window has not been handed over yet.",
            registry=registry,
        )
        # Exported from the start at 0, so that rates and alerts see the series before
        # the first error.
        for kind in ("kafka_send", "mqtt_disconnect", "start"):
            self.errors.labels(kind)


class ConsumerMetrics:
    """`usagepipe consume`: Kafka in, PostgreSQL out."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.consumed = Counter(
            "usagepipe_consumer_consumed_total",
            "Kafka records read.",
            registry=registry,
        )
        self.stored = Counter(
            "usagepipe_consumer_stored_total",
            "Rows inserted into the usage table.",
            registry=registry,
        )
        self.duplicates = Counter(
            "usagepipe_consumer_duplicates_total",
            "Valid records that were already stored (same device, boot and sequence).",
            registry=registry,
        )
        self.dead_letters = Counter(
            "usagepipe_consumer_dead_letters_total",
            "Records sent to the dead-letter topic, by reason and the device's model (from "
            "the registry, by the record's key; unknown where it has none).",
            ["reason", "model"],
            registry=registry,
        )
        self.errors = Counter(
            "usagepipe_consumer_errors_total",
            "Errors by kind (store, registry, erasure, kafka_commit, dead_letter: the topic's"
            " copy, bridge_letters: storing the bridge's letters, letter_expiry, rollup_refresh,"
            " start: a server not up at start); batches are retried.",
            ["kind"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "usagepipe_consumer_batch_records",
            "Records per batch written in one transaction.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "usagepipe_consumer_batch_seconds",
            "Time to validate, store and commit one batch.",
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "usagepipe_consumer_stage_seconds",
            "Time one batch spent in each stage: validate, firmware (recording reported "
            "installations), enrich (registry lookups, the dead letters' too), store (the "
            "PostgreSQL transaction, dead letters included), dead_letter (their copy to "
            "the dead-letter topic), kafka_commit (each commit of the stored offsets to "
            "Kafka, made beside the batches: it holds none of them up).",
            ["stage"],
            registry=registry,
        )
        self.offset_holes = Counter(
            "usagepipe_consumer_offset_holes_total",
            "Holes met in a partition's offsets, by outcome: read_again (the partition is "
            "sought back to the hole and fetched again), read_past (still missing after "
            "a wait: logged, then skipped).",
            ["outcome"],
            registry=registry,
        )
        self.topic_repairs = Counter(
            "usagepipe_consumer_topic_repairs_total",
            _TOPIC_REPAIRS_HELP,
            ["action"],
            registry=registry,
        )
        self.recreated_partitions = Counter(
            "usagepipe_consumer_recreated_partitions_total",
            "Partitions whose log was found not to be the one the consumer's offsets were "
            "for (the topic re-created: a memory-storage broker restarted), by how it was "
            "found (assigned: checking the stored offset at an assignment; running: the "
            "periodic check of a partition being read). Each is read again from its start.",
            ["found"],
            registry=registry,
        )
        self.recreated_gap_offsets = Counter(
            "usagepipe_consumer_recreated_gap_offsets_total",
            "Offsets of re-created partitions' new logs that resuming at the old position "
            "would have skipped: from the log's start to where the consumer was. They are "
            "read again (anything already stored counts as a duplicate).",
            registry=registry,
        )
        self.rollup_refresh_seconds = Histogram(
            "usagepipe_consumer_rollup_refresh_seconds",
            "Plain PostgreSQL: time of each periodic rollup refresh that recomputed "
            "buckets (see postgres.rollup_refresh_s).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.rollup_refresh_buckets = Counter(
            "usagepipe_consumer_rollup_refresh_buckets_total",
            "Rollup buckets the periodic refreshes recomputed, by granularity (hour, day).",
            ["granularity"],
            registry=registry,
        )
        # Enrichment (ingest/enrich.py).
        self.registry_lookups = Counter(
            "usagepipe_consumer_registry_lookups_total",
            "Distinct devices of a batch looked up in the registry cache, by result (hit, "
            "miss: read from the registry).",
            ["result"],
            registry=registry,
        )
        self.registry_invalidations = Counter(
            "usagepipe_consumer_registry_invalidations_total",
            "Registry change notifications applied to the cache, by kind (device, "
            "device_key, owner, erased, model, reset: the cache was emptied).",
            ["kind"],
            registry=registry,
        )
        self.unregistered = Counter(
            "usagepipe_consumer_unregistered_total",
            "Valid records of devices the registry does not know (dead-lettered as "
            "unregistered_device, or stored unenriched, per enrich.unregistered).",
            registry=registry,
        )
        self.owner_links_removed = Counter(
            "usagepipe_consumer_owner_links_removed_total",
            "Stored rows whose owner key was removed because the owner was erased.",
            registry=registry,
        )
        self.consent_links_removed = Counter(
            "usagepipe_consumer_consent_links_removed_total",
            "Stored rows whose owner key was removed because the owner's analytics "
            "consent ended (withdrawn, or lapsed by a re-asking policy version).",
            registry=registry,
        )
        self.registry_lookup_seconds = Histogram(
            "usagepipe_consumer_registry_lookup_seconds",
            "Time of each registry query for the devices of a batch the cache did not "
            "have (the misses of usagepipe_consumer_registry_lookups_total).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        # Erasure (ingest/erasure.py), as of the consumer's last check (at start, then
        # every enrich.cache_ttl_s).
        self.erasures_pending = Gauge(
            "usagepipe_consumer_erasures_pending",
            "Owners the registry has erased whose erasure the usage tables have not "
            "applied and verified yet (a pass that found nothing left), as of the "
            "consumer's last check (at start, then every enrich.cache_ttl_s). An erasure "
            "is verified by the check after the one that applied it.",
            registry=registry,
        )
        self.erasure_oldest_pending = Gauge(
            "usagepipe_consumer_erasure_oldest_pending_timestamp_seconds",
            "When the registry erased the longest-waiting owner of "
            "usagepipe_consumer_erasures_pending (Unix time); 0 when none is pending.",
            registry=registry,
        )
        # Rollup refreshes (the periodic task of ingest/consumer.py).
        self.rollup_refresh_last_success = Gauge(
            "usagepipe_consumer_rollup_refresh_last_success_timestamp_seconds",
            "When this consumer's periodic rollup refresh last succeeded (Unix time), by "
            "granularity (hour; day: a refresh that took the ended days too). Set to the "
            "consumer's start until the first one, so that refreshes that never succeed "
            "show. One refresh runs at a time across the group: alert on the max over "
            "the consumers.",
            ["granularity"],
            registry=registry,
        )
        self.rollup_refresh_interval = Gauge(
            "usagepipe_consumer_rollup_refresh_interval_seconds",
            "How often the consumer refreshes the rollups, by granularity (hour: "
            "postgres.rollup_refresh_s; day: postgres.rollup_day_refresh_s), for alerts "
            "that follow the settings.",
            ["granularity"],
            registry=registry,
        )
        # Lag (the periodic task of ingest/consumer.py), per partition assigned here.
        self.lag = Gauge(
            "usagepipe_consumer_lag_messages",
            "Records of a partition assigned to this consumer not yet committed by the "
            "group: its end offset minus the group's committed offset (the log's start "
            "where none is committed), every consumer.lag_interval_s; never below 0. On "
            "the local Tansu broker end offsets are reported too low, so lag reads low "
            "there (often 0); on Apache Kafka it is exact.",
            ["topic", "partition"],
            registry=registry,
        )
        self.end_offset = Gauge(
            "usagepipe_consumer_end_offset",
            "A partition's end offset (the next offset to be written) as the broker "
            "reports it, for the partitions assigned to this consumer (too low on Tansu).",
            ["topic", "partition"],
            registry=registry,
        )
        self.committed_offset = Gauge(
            "usagepipe_consumer_committed_offset",
            "The group's committed offset of a partition assigned to this consumer (the "
            "log's start where none is committed): where lag is counted from.",
            ["topic", "partition"],
            registry=registry,
        )

        # Exported from the start at 0, so that rates, dashboards and alerts see the
        # series before the first error or hole.
        for kind in (
            "start",
            "store",
            "registry",
            "erasure",
            "kafka_commit",
            "dead_letter",
            "bridge_letters",
            "letter_expiry",
            "rollup_refresh",
        ):
            self.errors.labels(kind)
        for outcome in ("read_again", "read_past"):
            self.offset_holes.labels(outcome)


class SimulatorMetrics:
    """`usagepipe simulate`: the virtual fleet."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "usagepipe_simulator_published_total",
            "Messages the broker acknowledged (PUBACK), by kind (original, duplicate).",
            ["kind"],
            registry=registry,
        )
        self.connected = Gauge(
            "usagepipe_simulator_connected_devices",
            "Devices with an open MQTT connection.",
            registry=registry,
        )


_HTTP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HttpMetrics:
    """`registry serve` and `insights serve`: every request answered, by route.

    `route` is the route's template (`/owners/{owner_id}`), `unmatched` for a path no
    route knows; `method` is one of the HTTP methods or `other`: never a raw path or a
    client's token, so the label sets stay bounded.
    """

    def __init__(self, registry: CollectorRegistry, api: str) -> None:
        self.api = api
        self.requests = Counter(
            "usagepipe_http_requests_total",
            "HTTP requests answered, by API (registry, insights), method, route template "
            "and status code.",
            ["api", "method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "usagepipe_http_request_seconds",
            "Time from a request's arrival to its response's last byte, by API, method, "
            "route template and status code.",
            ["api", "method", "route", "status"],
            buckets=_HTTP_SECONDS_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (self.api, method, route, str(status))
        self.requests.labels(*labels).inc()
        self.seconds.labels(*labels).observe(seconds)


@contextlib.contextmanager
def serve_metrics(
    registry: CollectorRegistry, port: int, setting: str = "the metrics port"
) -> Iterator[int | None]:
    """Serve `registry` on 127.0.0.1:`port` for as long as the block runs (0: not at all).

    A port that cannot be had raises `PortUnavailable` naming it and `setting`, the
    variable that moves it (`USAGEPIPE_BRIDGE__METRICS_PORT`)."""
    if port == 0:
        yield None
        return
    server: WSGIServer
    thread: threading.Thread
    try:
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        raise unavailable(exc, "127.0.0.1", port, setting, what="metrics port") from exc
    log.info("metrics on http://127.0.0.1:%d/metrics", port)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
