"""The per-device ceiling: a token bucket per device, over the times its messages
arrived at the bridge.

A device may send `consumer.device_burst` messages at once and `consumer.device_rate_per_s`
a second after that; the excess is dead-lettered with reason `rate_limited`, original
bytes and all, so nothing is dropped and an operator can replay it
(`usagepipe dlq replay --reason rate_limited`). Other devices are not affected: each
has its own bucket.

Where it is judged, and on which clock:

- In the consumer, before a record is parsed (a flood costs no parsing, and a flood of
  garbage is limited too), per Kafka partition. The bridge keys every record by the
  device id of its MQTT topic, which the broker's ACL makes the device's own, so one
  device's records are all in one partition, in the order the bridge produced them:
  per-partition state sees all of them.
- On the record's Kafka timestamp, which the bridge sets to the moment the message
  reached it (`ingest.bridge`), not on the consumer's clock: a consumer catching up on
  a backlog (after a restart, an outage, a rebalance) reads old records fast, but their
  timestamps are as far apart as the device sent them. Nor on the event time, which
  the device itself claims.
- Records that a replay produced carry the header `REPLAY_HEADER` and are exempt: the
  operator chose to replay them, and the rate they are replayed at says nothing about
  the device. Only Kafka clients (the replay) can set headers; a device's MQTT message
  becomes a record without any.

The state is kept leniently: a partition's buckets start full when this process is
given the partition (start, restart, rebalance), and a bucket that has filled up again
is forgotten (exactly: a full bucket is what a device unseen starts with), so memory
holds only the devices heard from in the last `burst / rate` seconds. A batch read again
after a crash may therefore be judged more leniently the second time: a record may
then be both dead-lettered and stored, and replaying its letter stores nothing more.

What the bridge's clock cannot tell apart: messages the broker queued while no bridge
ran reach the next bridge in a rush, as a flood would. The burst is there for that
too (and for a device's own backlog after it was offline): a device's first
`device_burst` queued messages pass; any beyond are dead-lettered and can be replayed.
"""

from __future__ import annotations

from collections.abc import Collection

from aiokafka import ConsumerRecord, TopicPartition

from schemas.errors import InvalidTelemetry, Reason

REPLAY_HEADER = "usagepipe-replay"
"""The Kafka header `usagepipe dlq replay` puts on each record it produces (its value:
the reason of the letter replayed); such records are never rate-limited."""


def replayed(record: ConsumerRecord) -> bool:
    """Whether `record` was produced by a replay of dead letters."""
    return any(name == REPLAY_HEADER for name, _ in record.headers or ())


class DeviceRateLimiter:
    """Token buckets per (partition, device key), refilled by Kafka timestamps.

    `rate_per_s` 0 turns the limit off (`admit` always says yes).
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._per_ms = rate_per_s / 1000.0
        self._burst = float(burst)
        self._buckets: dict[TopicPartition, dict[bytes, tuple[float, int]]] = {}
        """Per partition: device key -> (tokens, latest timestamp in ms), least recently
        updated first (an update re-inserts), so full buckets are found at the front."""

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def admit(self, tp: TopicPartition, record: ConsumerRecord) -> bool:
        """Whether `record` (of partition `tp`) is within its device's rate; takes a
        token if so. Records without a key or timestamp, and replayed ones, pass
        untouched."""
        if self._rate <= 0:
            return True
        key: bytes | None = record.key
        ts: int | None = record.timestamp
        if key is None or ts is None or ts < 0 or replayed(record):
            return True
        buckets = self._buckets.get(tp)
        if buckets is None:
            buckets = self._buckets[tp] = {}
        entry = buckets.pop(key, None)
        if entry is None:
            tokens, last = self._burst, ts
        else:
            tokens, last = entry
            if ts > last:  # timestamps may step back a little between two bridges
                tokens = min(self._burst, tokens + (ts - last) * self._per_ms)
                last = ts
        admitted = tokens >= 1.0
        if admitted:
            tokens -= 1.0
        buckets[key] = (tokens, last)
        self._forget_full(buckets, ts)
        return admitted

    def _forget_full(self, buckets: dict[bytes, tuple[float, int]], now_ms: int) -> None:
        """Drop the buckets at the front that have refilled by `now_ms`."""
        while buckets:
            key = next(iter(buckets))
            tokens, last = buckets[key]
            if tokens + (now_ms - last) * self._per_ms < self._burst:
                return
            del buckets[key]

    def keep_only(self, partitions: Collection[TopicPartition]) -> None:
        """Forget the partitions this process no longer reads (after a rebalance)."""
        for tp in [tp for tp in self._buckets if tp not in partitions]:
            del self._buckets[tp]

    def devices(self) -> int:
        """How many devices' buckets are held (those not full)."""
        return sum(len(b) for b in self._buckets.values())

    def refusal(self, record: ConsumerRecord) -> InvalidTelemetry:
        """The error a record over its device's rate is dead-lettered with."""
        return InvalidTelemetry(
            Reason.RATE_LIMITED,
            f"the device sent more than {self._rate:g} messages a second beyond a burst of"
            f" {self._burst:g} (judged by their arrival at the bridge; this one at Kafka"
            f" timestamp {record.timestamp} ms)",
        )
