-- One row per message id: `(device_id, boot_id, seq)` names a message for good
-- (schemas/envelope.py), whatever event time a resend carries. `{table}` is a
-- hypertable on event_time, and a hypertable's unique keys must hold its partitioning
-- column, so its key (device_id, boot_id, seq, event_time) let a resend with another
-- event time make a second row.
--
-- `{table}_ids`, a plain table keyed by the id, holds each stored message's id with
-- the event time its row has and a digest of the rest (`ingest.rows.content_digest`:
-- schema, version, body). The store writes it in the batch's transaction, beside the
-- rows (a COPY into each; `ingest.store`), and a row goes in only if its id did: a
-- resend is a duplicate, dropped and counted, if event time and digest match, and is
-- dead-lettered `conflicting_duplicate` if not. COLLATE "C": compared on every write,
-- byte order is the cheapest (and equal exactly when the bytes are). The ids table is
-- not compressed.
--
-- Unlike the partitioned layout (its 007), the hypertable keeps its own key, so the
-- store pays two btrees here. Dropping it works on TimescaleDB 2.28.3, compressed
-- chunks and all (tried: a redelivery and late rows into a compressed chunk after
-- it), but in this migration's transaction it once deadlocked with a policy job that
-- had just started, and test_store's compression figures count the key's index.
--
-- Whatever writes rows around the store (a manual backfill) must write their ids too.
-- Retention (`drop_expired`, `usagepipe db retention`) deletes the ids of the chunks it
-- drops, found by event time (a BRIN index: ids arrive in about event-time order, as
-- the rows do). The retention policy's scheduled drops leave their ids until the next
-- `drop_expired`: such an id still names its message (a resend of it is a duplicate,
-- as the contract says), it only takes room.
--
-- A table that has rows gets their ids, with no digest (one cannot be computed here
-- as the store does): a resend of one of those is compared by event time only, as
-- before. Where the old key let two rows of one id in, both stay and the id records
-- the first stored.

CREATE TABLE {table}_ids (
    device_id  text COLLATE "C" NOT NULL,
    boot_id    text COLLATE "C" NOT NULL,
    seq        bigint      NOT NULL,
    event_time timestamptz NOT NULL,
    digest     bytea
);

INSERT INTO {table}_ids (device_id, boot_id, seq, event_time)
SELECT DISTINCT ON (device_id, boot_id, seq) device_id, boot_id, seq, event_time
FROM {table}
ORDER BY device_id, boot_id, seq, ingested_at, event_time;

ALTER TABLE {table}_ids ADD PRIMARY KEY (device_id, boot_id, seq);
CREATE INDEX {table}_ids_event_time_brin ON {table}_ids USING brin (event_time);
