"""The data path: telemetry from the MQTT broker to the usage table, at least once.

In the order a message travels:

    mqtt.py         the broker side: an asyncio MQTT client that acknowledges a
                    message only when told to (after Kafka has it)
    mqtt_wire.py    its PUBLISH framer, fenced off: the one module that uses paho's
                    private API (for speed), each use marked
    mqtt_session.py a retired bridge id's persistent session dropped on the broker,
                    with what it queued (`usagepipe bridge --forget-session`)
    bridge.py       MQTT -> Kafka: each message produced with acks=all, PUBACK after
    kafka.py        the Kafka clients, with every safety setting stated in one place,
                    held in `async with running(client)`
    consumer.py     Kafka -> PostgreSQL: validate, enrich, store, offsets committed
                    in the same transaction as the rows
    offsets.py      where each partition is read from: the stored offsets, no holes
    rows.py         a Kafka batch validated (`schemas.parse`) into usage rows and
                    dead letters; the row type, and the position a batch ends at
    enrich.py       the owner of each message, by the registry's attribution rule,
                    with its collaborators: `registry_lookup` (the registry's queries
                    and the device facts they return), `facts_cache` (those facts
                    cached per device, bounded), `registry_changes` (the LISTEN
                    connection whose notifications evict that cache), `owner_keys`
                    (the owners' pseudonymous keys and their versioned secrets)
    store.py        the usage table's writes: rows, their message ids and offsets in one
                    transaction
    tables.py       the usage table's lifecycle: migrations, layout (TimescaleDB
                    hypertable, or plain PostgreSQL partitions where the extension is
                    missing), partitions, TimescaleDB policies, retention
    rollups.py      the daily rollups the planners read, kept up to date
    erasure.py      erased owners' keys removed from stored rows and rollups
    key_versions.py the owner-key versions still stored, and how much of each
    dead_letter.py  what the consumer refuses, moved aside with its reason

And the plumbing they share: `settings` (the one settings model), `errors` (the
pipeline's part of the tree under `schemas.errors.UsagepipeError`), `backoff` (the
one jittered retry rhythm), `metrics` (every Prometheus metric), `migrations`
(versioned SQL, per schema), `postgres` (PostgreSQL's errors, translated at one
point), `httpapi` (the HTTP APIs' common error document, /health and /metrics), `ports`.
Nothing here imports the registry (`devices`), the planners' side (`insights`), the
simulators or the console script (`usagepipe`): they import this.
"""
