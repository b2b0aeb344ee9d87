-- One row per message id: `(device_id, boot_id, seq)` names a message for good
-- (schemas/envelope.py), whatever event time a resend carries. `{table}` is partitioned
-- on event_time, and a partitioned table's unique keys must hold the partition key, so
-- its key (device_id, boot_id, seq, event_time) let a resend with another event time
-- make a second row.
--
-- `{table}_ids`, unpartitioned, keyed by the id, holds each stored message's id with
-- the event time its row has and a digest of the rest (`ingest.rows.content_digest`:
-- schema, version, body). The store writes it in the batch's transaction, beside the
-- rows (a COPY into each; `ingest.store`), and a row goes in only if its id did: a
-- resend is a duplicate, dropped and counted, if event time and digest match, and is
-- dead-lettered `conflicting_duplicate` if not. It is now the only unique key, so the
-- usage table's own goes: two btrees on every COPY cost the store half its speed
-- (bench/store.py), and the ids table's is the one that says what the contract says.
-- COLLATE "C": compared on every write, byte order is the cheapest (and, like every
-- deterministic collation, equal exactly when the bytes are).
--
-- Whatever writes rows around the store (a manual backfill) must write their ids too.
-- Retention (`drop_expired`) deletes the ids of the partitions it drops, found by event
-- time (a BRIN index: ids arrive in about event-time order, as the rows do).
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

ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_pkey;
